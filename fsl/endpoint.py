"""The data-plane endpoint the ServerApp publishes: the address clients dial and its TLS material.

Both read the experiment's ``[server]`` section (``public_address``, ``tls_certfile``,
``tls_keyfile``, ``tls_ca_certfile``); the ServerApp passes the results to the split server and
to the clients' round config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["advertised_address", "dataplane_tls"]


def dataplane_tls(server_cfg: Any) -> tuple[dict[str, bytes], dict[str, str]]:
    """TLS for the split server from ``server.tls_certfile``/``tls_keyfile``/``tls_ca_certfile``.

    Returns ``(SplitServer keyword arguments, entries for the round config)``: the server's
    chain and key, and the PEM the clients verify it with (``dataplane-root-certificates``;
    the CA when ``tls_ca_certfile`` is set, else the certificate itself). Both empty when TLS
    is off. A certificate without its key (or the reverse) is an error, not plaintext.
    """
    cert = str(getattr(server_cfg, "tls_certfile", "") or "")
    key = str(getattr(server_cfg, "tls_keyfile", "") or "")
    ca = str(getattr(server_cfg, "tls_ca_certfile", "") or "")
    if not cert and not key:
        return {}, {}
    if not (cert and key):
        raise ValueError("data-plane TLS needs both server.tls_certfile and server.tls_keyfile")
    chain = Path(cert).read_bytes()
    roots = Path(ca).read_bytes() if ca else chain
    return {"certificate_chain": chain, "private_key": Path(key).read_bytes()}, {
        "dataplane-root-certificates": roots.decode()
    }


def advertised_address(server_cfg: Any, bound: str) -> str:
    """The data-plane address clients dial: ``server.public_address`` (its port defaults to the bound one)."""
    public = str(getattr(server_cfg, "public_address", "") or "")
    port = bound.rsplit(":", 1)[1]
    if not public:
        host = bound.rsplit(":", 1)[0]
        if host in ("0.0.0.0", "[::]", "::"):
            raise ValueError(
                f"the split server listens on {bound}; set server.public_address to the name clients reach it by"
            )
        return bound
    if public.startswith("[") and public.endswith("]") or ":" not in public:
        return f"{public}:{port}"
    return public
