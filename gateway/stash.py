"""Keeping a form POST across a login, so nothing a member typed is lost to an expired session.

When a browser form is POSTed to a gated page without a live session, its body is
encrypted (AES-GCM, key derived from the newest session secret) and kept in the
store for a few minutes under a random ID — in the store, so any replica can replay
it. After the login, the gateway sends the browser an auto-submitting form with the
original fields, method and target. The stash is taken once (single use) and only by
the browser that holds the matching signed cookie (the ID signed by the gateway's
``csrf`` signer: the hot path sets it, ``routes/replay`` checks it).

Each kept form records the origin that vouched for it (the ``Origin`` header, or the
gateway's own origin when only ``Sec-Fetch-Site: same-origin`` said so) and the subject
of the session that posted it; the replay page sends only a form whose recorded origin
is the gateway's own, and only to a session of the same subject (a cookie can be
planted, and a client other than a browser sets ``Origin`` freely). Who may keep a form
at all (a real session that just ended, same-origin, within the limits) is the hot
path's decision.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from urllib.parse import parse_qsl

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.sessions import KeyStore, Namespace

MAX_STASH_BYTES = 64 * 1024
STASH_TTL = 600  # seconds: long enough to sign in, short enough to forget


@dataclass(frozen=True, slots=True)
class StashedPost:
    """A kept form: where it was posted, its fields, the origin it was posted from and
    the subject of the session that posted it (``""`` for a form kept before these were
    recorded: never sent)."""

    target: str
    fields: list[tuple[str, str]]
    origin: str = ""
    subject: str = ""


class PostStash:
    """Forms kept across a sign-in, in the ``KeyStore`` (``Namespace.STASH``)."""

    def __init__(self, keys: KeyStore, secret: str, *, ttl: int = STASH_TTL) -> None:
        self._keys = keys
        self._ttl = ttl
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=b"sso-gateway post stash").derive(secret.encode())
        self._aead = AESGCM(key)

    async def keep(self, target: str, body: bytes, *, origin: str, subject: str) -> str:
        """Keep a urlencoded form body for ``target``, posted from ``origin`` by a session
        of ``subject``; returns the stash ID."""
        stash_id = secrets.token_urlsafe(18)
        plain = json.dumps({"target": target, "body": body.decode("latin-1"),
                            "origin": origin, "subject": subject}).encode()
        nonce = secrets.token_bytes(12)
        sealed = nonce + self._aead.encrypt(nonce, plain, stash_id.encode())
        await self._keys.add_once(Namespace.STASH + stash_id, sealed.hex(), self._ttl)
        return stash_id

    async def take(self, stash_id: str) -> StashedPost | None:
        """The stashed POST, once; ``None`` if unknown, used, expired or undecryptable."""
        raw = await self._keys.take(Namespace.STASH + stash_id)
        if raw is None:
            return None
        try:
            sealed = bytes.fromhex(raw)
            plain = self._aead.decrypt(sealed[:12], sealed[12:], stash_id.encode())
        except (ValueError, InvalidTag):
            return None
        data = json.loads(plain)
        body: str = data["body"]
        fields = parse_qsl(body.encode("latin-1").decode("utf-8", "replace"),
                           keep_blank_values=True)
        return StashedPost(str(data["target"]), fields, str(data.get("origin", "")),
                           str(data.get("subject", "")))
