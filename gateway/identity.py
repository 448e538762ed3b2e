"""What upstreams receive about the user: identity headers and a signed identity token.

``UpstreamIdentity`` is compiled once from the config: per upstream, which identity
headers and which token claims it gets (the subject always, plus the attributes its
``claims`` name).

**Headers.** Names come from ``[identity_headers]`` (attribute → header). Values are
UTF-8, percent-encoded outside printable ASCII, so a value can never carry CR/LF or raw
non-latin-1 bytes; ``%`` and ``,`` are encoded too, so a list (entitlements or any
multi-valued attribute, comma-separated) splits unambiguously and one ``unquote``
decodes any value. ``email_verified`` is ``true`` or ``false``: whether the member's IdP
or a confirmation link vouches for the e-mail address (``Principal.email_verified``).

**Token.** A short-lived JWT, ES256: P-256 signatures are small and fast (~40 µs
here) and every JOSE library in every language verifies them, where EdDSA support
is still patchy and RS256 signing costs ~1 ms. Issuer = ``public_url``, audience =
the upstream's name, subject = the principal's ``subject``, plus the claims that
upstream is configured to receive (``email_verified`` as a JSON boolean, as in OpenID
Connect). A token is minted once per session and upstream and
reused until shortly before it expires, so signing stays off the per-request cost.

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

from gateway.config import Settings
from gateway.errors import ConfigError, InvalidToken
from gateway.keys import IdentityKey
from gateway.principal import (
    DISPLAY_NAME,
    EMAIL,
    EMAIL_VERIFIED,
    MEMBER_ID,
    STATUS,
    Principal,
)

__all__ = ["ALGORITHM", "InvalidToken", "UpstreamIdentity", "claim_name", "encode_value",
           "normalise_name", "verify_token"]

ALGORITHM = "ES256"
# Printable ASCII minus '%' and ',' stays as it is.
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in "%,")
# Token claim names that differ from the attribute's name.
_CLAIM_NAMES = {DISPLAY_NAME: "name", STATUS: "member_status"}
# Attributes sent as one value (the first), in a header and in the token; any other
# attribute is a list.
_SINGLE = frozenset({"subject", "idp", MEMBER_ID, EMAIL, EMAIL_VERIFIED, DISPLAY_NAME,
                     STATUS})
# Claims the gateway sets itself: no attribute may take their place.
_REGISTERED = frozenset({"iss", "aud", "sub", "iat", "nbf", "exp", "jti", "sid"})
_CACHE_LIMIT = 50_000


def encode_value(value: str) -> bytes:
    return quote(value, safe=_SAFE).encode("ascii")


def normalise_name(name: str) -> str:
    """Header names as strip lists compare them: lower-case, ``_`` read as ``-``."""
    return name.strip().lower().replace("_", "-")


def claim_name(attribute: str) -> str:
    """The token claim that carries an attribute (``display_name`` → ``name``,
    ``status`` → ``member_status``, any other → its own name)."""
    return _CLAIM_NAMES.get(attribute, attribute)


class UpstreamIdentity:
    """The identity headers and token each upstream receives, compiled at startup.

    Raises ``ConfigError`` when an upstream's ``claims`` would overwrite a claim the
    gateway sets (``sub``, ``exp``, …) or put two attributes under one claim name.
    """

    def __init__(self, settings: Settings, keys: Sequence[IdentityKey],
                 clock: Callable[[], float] = time.time) -> None:
        self._tokens = TokenIssuer(keys, issuer=settings.public_url,
                                   lifetime=settings.identity.token_lifetime, clock=clock)
        #: The JWKS (every identity key, newest first) served at /.well-known/jwks.json.
        self.jwks = self._tokens.jwks
        self._token_header = settings.identity.token_header.lower().encode("ascii")
        headers = {name: header.lower().encode("ascii")
                   for name, header in settings.identity_headers.items() if header}
        self._for: dict[str, tuple[tuple[tuple[str, bytes], ...], tuple[str, ...]]] = {}
        for i, upstream in enumerate(settings.upstreams):
            claims = tuple(dict.fromkeys(upstream.claims))
            _check_claims(claims, f"{settings.source}: key upstreams[{i}].claims")
            wanted = {"subject", *claims}
            fields = tuple((name, h) for name, h in headers.items() if name in wanted)
            self._for[upstream.name] = (fields, claims)
        # The encoded headers per (session, upstream), for as long as the session's
        # principal is the same object (a session served from memory keeps its record).
        self._encoded: dict[tuple[str, str], tuple[Principal, list[tuple[bytes, bytes]]]] = {}
        #: Every identity header name and the token header (normalised): the proxy drops
        #: client-sent copies of them.
        self.strip_names = frozenset(
            normalise_name(h) for h in (*settings.identity_headers.values(),
                                        settings.identity.token_header) if h)

    def knows(self, upstream: str) -> bool:
        """Whether ``upstream`` is a configured upstream's name."""
        return upstream in self._for

    def headers(self, session_key: str, principal: Principal,
                upstream: str) -> list[tuple[bytes, bytes]]:
        """The identity headers and the token header for one request to ``upstream``
        (which must be known)."""
        fields, claims = self._for[upstream]
        encoded = self._encoded.get((session_key, upstream))
        if encoded is not None and encoded[0] is principal:
            values = encoded[1]
        else:
            values = [(header, _header_value(principal, name)) for name, header in fields]
            if len(self._encoded) >= _CACHE_LIMIT:
                self._encoded.clear()  # bounded: at worst every session encodes once more
            self._encoded[(session_key, upstream)] = (principal, values)
        return [*values, (self._token_header,
                          self._tokens.token(principal, session_key, upstream, claims))]


def _check_claims(claims: Sequence[str], key: str) -> None:
    seen: dict[str, str] = {}
    for j, name in enumerate(claims):
        claim = claim_name(name)
        if claim in _REGISTERED:
            raise ConfigError([f"{key}[{j}] ({name!r}): would replace the token's own "
                               f"claim {claim!r}; name the attribute differently"])
        if claim in seen:
            raise ConfigError([f"{key}[{j}] ({name!r}): its token claim {claim!r} is "
                               f"also {seen[claim]!r}'s; name the attribute differently"])
        seen[claim] = name


def _header_value(principal: Principal, name: str) -> bytes:
    if name in _SINGLE:
        return encode_value(principal.first(name))
    return b",".join(encode_value(v) for v in principal.values(name))


def _claim_value(principal: Principal, name: str) -> str | bool | list[str]:
    if name == EMAIL_VERIFIED:
        return principal.has_verified_email  # a JSON boolean, as OpenID Connect's
    if name in _SINGLE:
        return principal.first(name)
    return list(principal.values(name))


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
        """The current token for this session and upstream, minting a new one when due;
        ``claims`` names the attributes it carries besides the subject."""
        now = self._clock()
        cached = self._cache.get((session_key, audience))
        if cached is not None and now < cached[1]:
            return cached[0]
        expires = int(now) + self._lifetime
        payload: dict[str, Any] = {
            claim_name(name): _claim_value(principal, name) for name in claims}
        payload.update({
            "iss": self._issuer, "aud": audience, "sub": principal.subject,
            "iat": int(now), "nbf": int(now) - 5, "exp": expires,
            "jti": secrets.token_urlsafe(12),
            "sid": hashlib.sha256(f"{session_key}|{audience}".encode()).hexdigest()[:32],
        })
        token = jwt.encode(payload, self._signing.private_key, algorithm=ALGORITHM,
                           headers={"kid": self._signing.kid}).encode("ascii")
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()  # bounded: at worst every session mints once more
        self._cache[(session_key, audience)] = (token, expires - self._refresh_margin)
        return token


def verify_token(token: str | bytes, jwks: Mapping[str, Any], audience: str, *,
                 issuer: str, leeway: float = 5.0) -> dict[str, Any]:
    """Verify a gateway identity token against a JWKS; return its claims.

    ``issuer`` is required: the gateway's ``public_url`` (the ``iss`` it signs with), so
    a token another gateway minted with a key the JWKS shares is refused.
    Raises ``InvalidToken`` for a bad signature, an unknown ``kid``, another
    audience or issuer, an expired token, or anything malformed. Only ES256 is
    accepted, whatever the token's header claims.
    """
    if not issuer:
        raise ValueError("verify_token needs the gateway's public_url as issuer")
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
