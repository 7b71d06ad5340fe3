"""Secure aggregation of the client segments by pairwise additive masking (Bonawitz et al. 2017, no dropouts).

What it protects
----------------
Each client's returned segment from the server: the server receives only masked vectors and stores
(aggregates, checkpoints) only their sum, which is the FedAvg numerator. It does not hide the
aggregate itself (with two clients, each learns the other's update from the average and its own),
nor the activations, labels or gradients of the data plane, and it is not DP.

Protocol, per round
-------------------
1. Setup (a QUERY message): every selected client makes a fresh X25519 key pair, keeps the private
   key in its ``context.state`` and returns the public key.
2. The TRAIN message carries every participant's public key. Client ``i`` turns ``n_i * w_i`` (its
   example count times its trained segment, flattened) into fixed point mod 2^64 (24 fractional
   bits) and adds, for every peer ``j``, ``+PRG(s_ij)`` if ``i < j`` else ``-PRG(s_ij)``, where
   ``s_ij = HKDF-SHA256(X25519(sk_i, pk_j), info = run/round)`` and PRG is the ChaCha20 keystream.
3. The server adds the masked vectors mod 2^64: the masks cancel pairwise, leaving
   ``sum_i n_i w_i``, which it divides by ``sum_i n_i``.

A client that drops out after setup leaves its masks in the sum: without the secret-shared recovery of
SecAgg(+), the round cannot be unmasked and the server keeps the previous segment (and says so).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "FRAC_BITS",
    "SecAggError",
    "decode_fixed",
    "encode_fixed",
    "flatten",
    "generate_keypair",
    "mask",
    "pair_seed",
    "prg",
    "unflatten",
    "unmask_sum",
]

FRAC_BITS = 24  # fixed point: 2^-24 resolution, |sum_i n_i w_i| < 2^39 before it wraps
MASKED_KEY = "secagg/masked"


class SecAggError(RuntimeError):
    """A round whose sum cannot be unmasked (a participant missing, a vector of the wrong length)."""


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes ``(private, public)``."""
    sk = X25519PrivateKey.generate()
    raw = serialization.Encoding.Raw
    private = sk.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return private, sk.public_key().public_bytes(raw, serialization.PublicFormat.Raw)


def pair_seed(private: bytes, peer_public: bytes, context: bytes) -> bytes:
    """The 32-byte seed two clients share: HKDF-SHA256 of their X25519 secret, bound to ``context`` (run/round)."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fsl-secagg/" + context).derive(shared)


def prg(seed: bytes, n: int) -> np.ndarray:
    """``n`` uniform uint64 words from the ChaCha20 keystream under ``seed``."""
    enc = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(b"\0" * (8 * n)), dtype="<u8").astype(np.uint64)


def encode_fixed(x: np.ndarray) -> np.ndarray:
    """Float vector -> fixed point mod 2^64 (two's complement)."""
    return np.round(np.asarray(x, dtype=np.float64) * 2.0**FRAC_BITS).astype(np.int64).view(np.uint64)


def decode_fixed(u: np.ndarray) -> np.ndarray:
    return u.view(np.int64).astype(np.float64) / 2.0**FRAC_BITS


def mask(vector: np.ndarray, me: str, private: bytes, peers: Mapping[str, bytes], context: bytes) -> np.ndarray:
    """Client ``me``'s masked upload of float ``vector`` for the participants ``peers`` (id -> public key)."""
    y = encode_fixed(vector)
    with np.errstate(over="ignore"):
        for peer in sorted(peers):
            if peer == me:
                continue
            m = prg(pair_seed(private, peers[peer], context), y.size)
            y = y + m if me < peer else y - m  # uint64: wraps mod 2^64
    return y


def unmask_sum(masked: Sequence[np.ndarray]) -> np.ndarray:
    """The sum of the clients' vectors from ALL participants' masked uploads (masks cancel pairwise)."""
    if not masked:
        raise SecAggError("no masked uploads to sum")
    if len({m.size for m in masked}) != 1:
        raise SecAggError("masked uploads differ in length")
    total = np.zeros(masked[0].size, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for m in masked:
            total = total + m.astype(np.uint64)
    return decode_fixed(total)


def flatten(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, list[tuple[str, tuple[int, ...], np.dtype]]]:
    """Named arrays -> one float64 vector and the layout to undo it (keys in order)."""
    layout = [(k, tuple(v.shape), np.asarray(v).dtype) for k, v in arrays.items()]
    flat = (
        np.concatenate([np.asarray(v, dtype=np.float64).reshape(-1) for v in arrays.values()])
        if arrays
        else np.zeros(0)
    )
    return flat, layout


def unflatten(vector: np.ndarray, layout: list[tuple[str, tuple[int, ...], np.dtype]]) -> dict[str, np.ndarray]:
    out, i = {}, 0
    for key, shape, dtype in layout:
        n = int(np.prod(shape)) if shape else 1
        part = vector[i : i + n].reshape(shape)
        out[key] = np.round(part).astype(dtype) if np.issubdtype(dtype, np.integer) else part.astype(dtype)
        i += n
    return out
