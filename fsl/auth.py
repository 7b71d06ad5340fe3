"""Data-plane credentials bound to the run, the round and the client.

The ServerApp owns a :class:`RoundAuthority`. For every round it issues each
selected client a token (an HMAC of run, round and client id under a secret that
never leaves the server) and hands it out through the control plane. The split
server verifies every data-plane request against the same authority: a missing
or forged token is *unauthenticated*; a genuine token for a round that is no
longer open (a replay, an expired credential) is *permission denied*.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading

__all__ = ["AuthError", "ExpiredCredential", "RoundAuthority"]


class AuthError(Exception):
    """The request carries no valid credential (maps to UNAUTHENTICATED)."""


class ExpiredCredential(Exception):
    """A genuine credential used outside the round it was issued for (maps to PERMISSION_DENIED)."""


class RoundAuthority:
    """Issues and verifies per-(run, round, client) tokens; thread-safe."""

    def __init__(self, run_id: str, secret: bytes | None = None) -> None:
        self.run_id = run_id
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._open: set[int] = set()

    def _mac(self, round_: int, client_id: str) -> str:
        msg = f"{self.run_id}\x00{round_}\x00{client_id}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()

    def open_round(self, round_: int) -> None:
        """Make ``round_`` the only round whose tokens are accepted."""
        with self._lock:
            self._open = {round_}

    def close_all(self) -> None:
        """Accept no token at all (between runs, after the last round)."""
        with self._lock:
            self._open = set()

    def issue(self, round_: int, client_id: str) -> str:
        """The token for ``client_id`` in ``round_`` of this run."""
        return self._mac(round_, client_id)

    def verify(self, run_id: str, round_: int, client_id: str, token: str) -> None:
        """Raise :class:`AuthError` or :class:`ExpiredCredential` unless the token is valid now."""
        if not token:
            raise AuthError("no data-plane credential; the ServerApp hands one out with each round's config")
        if run_id != self.run_id or not client_id:
            raise AuthError(f"credential is not for this run ({self.run_id})")
        if not hmac.compare_digest(token, self._mac(round_, client_id)):
            raise AuthError(f"invalid credential for client {client_id!r} in round {round_}")
        with self._lock:
            if round_ not in self._open:
                raise ExpiredCredential(
                    f"credential for round {round_} is not valid now (open: {sorted(self._open) or 'none'})"
                )
