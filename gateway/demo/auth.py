"""Who is reading: the gateway's identity token, verified against its JWKS, and CSRF tokens.

The reader trusts nothing but the signed token in ``X-Gateway-Identity``; the
``X-Member-*`` headers the gateway also sends are ignored, so a reader reached
without the gateway cannot be talked into anything by a forged header.

The JWKS is fetched on first use and kept for as long as the answer's
``Cache-Control: max-age`` says (the gateway sends 300 s; no header: 300 s; ``no-store``
or ``no-cache``: ``min_interval``), so a key the gateway pruned stops being trusted
at most that long after. An expired copy is never used: it is fetched again first,
and while that fails tokens are refused rather than checked against stale keys. A token
naming a key the cache does not know also triggers a refetch (the gateway rotated its
keys), at most once every ``min_interval`` seconds, so forged ``kid`` values cannot
hammer the gateway; ``min_interval`` is also the shortest time a copy is kept.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
from itsdangerous import Signer

from gateway.identity import InvalidToken, verify_token

log = logging.getLogger("gateway.demo.reader")

AUDIENCE = "reader"
TOKEN_HEADER = "x-gateway-identity"
MEMBER_ENTITLEMENT = "urn:mace:example.org:entitlement:member"


@dataclass(frozen=True)
class Viewer:
    """A verified identity: a member (active or lapsed) or a registered visitor.

    ``member_id`` is the token's ``sub``: the gateway's subject, which for the demo's IdP
    (whose member numbers are the organisation's own) is the member number.
    """

    member_id: str
    name: str
    email: str
    entitlements: tuple[str, ...]
    status: str
    sid: str  # stable for one gateway session

    @property
    def is_member(self) -> bool:
        """A SAML member of any status (not a visitor who only registered an e-mail)."""
        return self.status != "registered"

    @property
    def is_active_member(self) -> bool:
        return self.status == "active" and MEMBER_ENTITLEMENT in self.entitlements

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any]) -> Viewer:
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise InvalidToken("no subject")
        entitlements = claims.get("entitlements") or []
        if not isinstance(entitlements, list) or not all(isinstance(e, str) for e in entitlements):
            raise InvalidToken("entitlements must be a list of strings")
        sid = claims.get("sid")
        return cls(member_id=sub, name=str(claims.get("name") or claims.get("email") or sub),
                   email=str(claims.get("email") or ""), entitlements=tuple(entitlements),
                   status=str(claims.get("member_status") or ""),
                   sid=sid if isinstance(sid, str) and sid else f"sub:{sub}")


DEFAULT_MAX_AGE = 300.0  # seconds, when the JWKS answer names no lifetime
LONGEST_MAX_AGE = 86400.0  # a longer max-age is cut to this


def max_age(cache_control: str | None) -> float:
    """Seconds a JWKS answer may be used, from its ``Cache-Control`` header."""
    if cache_control is None:
        return DEFAULT_MAX_AGE
    found = DEFAULT_MAX_AGE
    for directive in cache_control.lower().split(","):
        name, _, value = directive.strip().partition("=")
        if name in ("no-store", "no-cache"):
            return 0.0
        if name == "max-age":
            try:
                found = float(int(value.strip().strip('"')))
            except ValueError:
                return 0.0  # unreadable: treat as not cacheable
    return min(max(found, 0.0), LONGEST_MAX_AGE)


class JwksCache:
    """The gateway's JWKS, fetched lazily, kept for its ``max-age``, and refetched
    (rate-limited) for unknown keys."""

    def __init__(self, url: str, *, verify: ssl.SSLContext | bool = True,
                 min_interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self._verify = verify
        self._min_interval = min_interval
        self._clock = clock
        self._jwks: dict[str, Any] | None = None
        self._fetched_at: float | None = None  # the last attempt, successful or not
        self._expires_at = 0.0  # by ``clock``: the copy in ``_jwks`` is not used after it
        self._lock = asyncio.Lock()
        self.fetches = 0

    def _fresh(self) -> bool:
        return self._jwks is not None and self._clock() < self._expires_at

    def _knows(self, kid: object) -> bool:
        return self._fresh() and any(
            k.get("kid") == kid for k in (self._jwks or {}).get("keys", []))

    async def get(self, kid: object) -> dict[str, Any] | None:
        """The JWKS, refetched first when the copy has expired, or (rate-limited) when it
        lacks ``kid``; ``None`` when no current copy could be had."""
        if self._knows(kid):
            return self._jwks
        async with self._lock:
            if self._knows(kid):
                return self._jwks
            now = self._clock()
            # A copy lives at least min_interval, so an expired one was fetched longer ago
            # than that too; only after a failed fetch does this wait before the next try.
            if self._fetched_at is None or now - self._fetched_at >= self._min_interval:
                self._fetched_at = now
                await self._fetch()
            return self._jwks if self._fresh() else None

    async def _fetch(self) -> None:
        self.fetches += 1
        try:
            async with httpx.AsyncClient(verify=self._verify, timeout=5) as client:
                answer = await client.get(self.url)
                answer.raise_for_status()
                jwks = answer.json()
            if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
                raise ValueError("not a JWKS document")
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("could not fetch the gateway JWKS from %s: %s", self.url, exc)
            return
        lifetime = max(max_age(answer.headers.get("cache-control")), self._min_interval)
        self._jwks = jwks
        self._expires_at = self._clock() + lifetime


class Authenticator:
    """Turns a request's identity token into a ``Viewer``, or ``None`` for anonymous."""

    def __init__(self, gateway_url: str, jwks: JwksCache) -> None:
        self.issuer = gateway_url
        self.jwks = jwks

    async def viewer(self, token: str | None) -> Viewer | None:
        if not token:
            return None
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            jwks = await self.jwks.get(kid)
            if jwks is None:
                raise InvalidToken("JWKS unavailable")
            claims = verify_token(token, jwks, AUDIENCE, issuer=self.issuer)
            return Viewer.from_claims(claims)
        except (InvalidToken, jwt.PyJWTError) as exc:
            log.info("identity token refused: %s", exc)
            return None


class Csrf:
    """Form tokens: an HMAC over the member ID, so a token is useless for anyone else.

    Bound to the member rather than the gateway session on purpose: a form kept by the
    gateway across an expired session is replayed after a new sign-in (new ``sid``) and
    must still be accepted. Cross-site posts are refused by the Origin checks anyway.
    """

    def __init__(self, secret: str) -> None:
        self._signer = Signer(secret, salt="gateway.demo.reader.csrf")

    def token(self, viewer: Viewer) -> str:
        return self._signer.get_signature(viewer.member_id).decode("ascii")

    def valid(self, viewer: Viewer, token: object) -> bool:
        if not isinstance(token, str) or not token:
            return False
        return self._signer.verify_signature(viewer.member_id.encode(), token.encode())


def load_secret(data_dir: Path | None) -> str:
    """The reader's CSRF secret: kept in ``data_dir`` (mode 0600), else new per instance."""
    if data_dir is None:
        return secrets.token_urlsafe(32)
    path = data_dir / "reader-secret"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32))
    return path.read_text().strip()
