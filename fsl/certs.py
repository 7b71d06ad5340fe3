"""A deployment's key material: a CA, the SuperLink host's certificate and SuperNode key pairs.

``fsl certs DIR`` (:mod:`fsl_cli.deploy`) calls :func:`make_certs`; tests make throwaway
deployments with it. The server certificate serves both Flower's control plane and the data plane.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "make_certs"]


def atomic_write(path: Path, data: bytes, private: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file (mode 0600 when ``private``): never half a key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _san(hosts: Sequence[str]) -> list[Any]:
    from cryptography import x509

    names: list[Any] = []
    for h in dict.fromkeys(["127.0.0.1", "localhost", *hosts]):  # keeps order, drops duplicates
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return names


def make_certs(
    out_dir: str | Path, hosts: Sequence[str] = (), nodes: int = 0, days: int = 365, first_node: int = 1
) -> dict[str, Path]:
    """Create (or extend) a deployment's key material in ``out_dir``; returns the paths.

    ``ca.pem``/``ca.key``: the CA, reused when it exists so certificates made later chain to
    the same root. ``server.pem``/``server.key``: the SuperLink host's certificate (used for
    Flower's control plane and for the data plane), SANs ``127.0.0.1``, ``localhost`` and
    ``hosts``; rewritten on every call. ``node-N.key``/``node-N.pub``: ECDSA P-384 key pairs in
    OpenSSH format for SuperNode authentication (``flwr supernode register node-N.pub``),
    kept when they exist. Private keys are written with mode 0600.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    plain = serialization.NoEncryption()
    paths = {
        "ca": out / "ca.pem",
        "ca_key": out / "ca.key",
        "server": out / "server.pem",
        "server_key": out / "server.key",
    }

    if paths["ca"].exists() and paths["ca_key"].exists():
        ca_cert = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
        ca_key = serialization.load_pem_private_key(paths["ca_key"].read_bytes(), password=None)
    else:
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fsl deployment CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        atomic_write(paths["ca_key"], ca_key.private_bytes(pem, pkcs8, plain), private=True)
        atomic_write(paths["ca"], ca_cert.public_bytes(pem))
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{paths['ca_key']}: expected an EC private key")

    key = ec.generate_private_key(ec.SECP384R1())
    primary = next((h for h in hosts), "localhost")
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, primary)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    atomic_write(paths["server_key"], key.private_bytes(pem, pkcs8, plain), private=True)
    atomic_write(paths["server"], cert.public_bytes(pem))

    for i in range(first_node, first_node + nodes):
        priv, pub = out / f"node-{i}.key", out / f"node-{i}.pub"
        if not (priv.exists() and pub.exists()):
            nkey = ec.generate_private_key(ec.SECP384R1())
            atomic_write(priv, nkey.private_bytes(pem, serialization.PrivateFormat.OpenSSH, plain), private=True)
            ssh = serialization.Encoding.OpenSSH
            atomic_write(pub, nkey.public_key().public_bytes(ssh, serialization.PublicFormat.OpenSSH) + b"\n")
        paths[f"node-{i}"], paths[f"node-{i}.pub"] = priv, pub
    return paths
