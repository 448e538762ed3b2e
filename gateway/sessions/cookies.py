"""Cookie signing with key rotation: newest secret signs, every listed secret verifies.

Each purpose (session, login state, …) has its own salt, so a value signed for
one purpose never verifies as another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from itsdangerous import BadSignature, Signer

# Signed values already verified, per signer: a session cookie comes with every request,
# and its HMAC is the same each time. Only good signatures are kept; bounded.
_VERIFIED_LIMIT = 10_000


class CookieSigner:
    """Signs and verifies the values of one purpose's cookies."""

    def __init__(self, secrets: Sequence[str], purpose: str) -> None:
        if not secrets:
            raise ValueError("at least one secret is required")
        # itsdangerous signs with the *last* key; our config lists newest first.
        self._signer = Signer(list(reversed(secrets)), salt=f"sso-gateway.{purpose}",
                              digest_method=hashlib.sha256)
        self._verified: dict[str, str] = {}

    def sign(self, value: str) -> str:
        return self._signer.sign(value).decode("ascii")

    def unsign(self, signed: str | None) -> str | None:
        """The value, or ``None`` if absent, malformed or signed by an unknown secret."""
        if not signed:
            return None
        value = self._verified.get(signed)
        if value is not None:
            return value
        try:
            value = self._signer.unsign(signed).decode("ascii")
        except (BadSignature, UnicodeError):
            return None
        if len(self._verified) >= _VERIFIED_LIMIT:
            self._verified.clear()
        self._verified[signed] = value
        return value

