"""What upstreams receive about the user: identity headers and a signed identity token.

**Headers.** Names come from config and are compiled once. Values are UTF-8,
percent-encoded outside printable ASCII, so a value can never carry CR/LF or raw
non-latin-1 bytes; ``%`` and ``,`` are encoded too, so a list (entitlements,
comma-separated) splits unambiguously and one ``unquote`` decodes any value.

**Token.** A short-lived JWT, ES256: P-256 signatures are small and fast (~40 µs
here) and every JOSE library in every language verifies them, where EdDSA support
is still patchy and RS256 signing costs ~1 ms. Issuer = ``public_url``, audience =
the upstream's name, subject = member_id, plus the claims that upstream is
configured to receive. A token is minted once per session and upstream and reused
until shortly before it expires, so signing stays off the per-request cost.

Services verify tokens with ``verify_token`` against the gateway's JWKS.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import jwt

from gateway.config import IdentityHeaders
from gateway.keys import IdentityKey
from gateway.principal import Principal

ALGORITHM = "ES256"
# Client headers in these families are always dropped, whatever the config names.
RESERVED_PREFIXES = ("x-member-", "x-gateway-")
# Printable ASCII minus '%' and ',' stays as it is.
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in "%,")
# Claim name in the token for each optional identity field.
CLAIMS = {"email": "email", "display_name": "name", "entitlements": "entitlements",
          "status": "member_status", "idp": "idp"}
_CACHE_LIMIT = 50_000


class InvalidToken(Exception):
    """The identity token failed verification; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode_value(value: str) -> bytes:
    return quote(value, safe=_SAFE).encode("ascii")


def normalise_name(name: str) -> str:
    """Header names as strip lists compare them: lower-case, ``_`` read as ``-``."""
    return name.strip().lower().replace("_", "-")


class IdentityHeaderSet:
    """Builds the identity headers for a principal, limited to the fields an upstream gets."""

    def __init__(self, names: IdentityHeaders) -> None:
        self._names = {field: header.lower().encode("ascii")
                       for field, header in names.model_dump().items()}
        self.names = frozenset(normalise_name(h) for h in names.model_dump().values())

    def fields(self, claims: Iterable[str]) -> tuple[tuple[str, bytes], ...]:
        """The (field, header) pairs for an upstream receiving ``claims``; member_id always."""
        wanted = {"member_id", *claims}
        return tuple((f, h) for f, h in self._names.items() if f in wanted)

    @staticmethod
    def headers(principal: Principal,
                fields: Sequence[tuple[str, bytes]]) -> list[tuple[bytes, bytes]]:
        out = []
        for field, header in fields:
            if field == "entitlements":
                value = b",".join(encode_value(e) for e in principal.entitlements)
            else:
                value = encode_value(str(getattr(principal, field)))
            out.append((header, value))
        return out


class TokenIssuer:
    """Mints identity tokens with the newest key and publishes every key in the JWKS."""

    def __init__(self, keys: Sequence[IdentityKey], *, issuer: str, lifetime: int,
                 clock: Callable[[], float] = time.time) -> None:
        if not keys:
            raise ValueError("at least one identity key is required")
        self._signing = keys[-1]
        self._issuer = issuer
        self._lifetime = lifetime
        self._refresh_margin = min(15.0, lifetime / 4)
        self._clock = clock
        self._cache: dict[tuple[str, str], tuple[bytes, float]] = {}
        self.jwks: dict[str, Any] = {"keys": [k.public_jwk() for k in reversed(keys)]}

    def token(self, principal: Principal, session_key: str, audience: str,
              claims: Iterable[str]) -> bytes:
        """The current token for this session and upstream, minting a new one when due."""
        now = self._clock()
        cached = self._cache.get((session_key, audience))
        if cached is not None and now < cached[1]:
            return cached[0]
        expires = int(now) + self._lifetime
        payload: dict[str, Any] = {
            "iss": self._issuer, "aud": audience, "sub": principal.member_id,
            "iat": int(now), "nbf": int(now) - 5, "exp": expires,
            "jti": secrets.token_urlsafe(12),
            "sid": hashlib.sha256(f"{session_key}|{audience}".encode()).hexdigest()[:32],
        }
        for field in claims:
            value = getattr(principal, field)
            payload[CLAIMS[field]] = list(value) if isinstance(value, tuple) else value
        token = jwt.encode(payload, self._signing.private_key, algorithm=ALGORITHM,
                           headers={"kid": self._signing.kid}).encode("ascii")
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()  # bounded: at worst every session mints once more
        self._cache[(session_key, audience)] = (token, expires - self._refresh_margin)
        return token


def verify_token(token: str | bytes, jwks: Mapping[str, Any], audience: str, *,
                 issuer: str | None = None, leeway: float = 5.0) -> dict[str, Any]:
    """Verify a gateway identity token against a JWKS; return its claims.

    Raises ``InvalidToken`` for a bad signature, an unknown ``kid``, another
    audience or issuer, an expired token, or anything malformed. Only ES256 is
    accepted, whatever the token's header claims.
    """
    try:
        header = jwt.get_unverified_header(token)
        keys = {k.get("kid"): k for k in jwks.get("keys", [])}
        if header.get("alg") != ALGORITHM or header.get("kid") not in keys:
            raise InvalidToken(f"unknown key or algorithm (kid={header.get('kid')!r})")
        key = jwt.PyJWK.from_dict(keys[header["kid"]], algorithm=ALGORITHM)
        options: jwt.types.Options = {"require": ["exp", "iat", "iss", "aud", "sub"]}
        return dict(jwt.decode(token, key.key, algorithms=[ALGORITHM], audience=audience,
                               issuer=issuer, leeway=leeway, options=options))
    except jwt.PyJWTError as exc:
        raise InvalidToken(str(exc)) from exc
