"""Session lifecycle: create at login, resolve a cookie to a live session, revoke.

The cookie carries only a signed, random session ID. Absolute lifetime (capped
by the IdP's ``SessionNotOnOrAfter``) and idle timeout are checked on every
resolve; the idle clock is written at most once per ``TOUCH_INTERVAL`` so a
busy reader does not turn every page view into a store write.
"""

from __future__ import annotations

import secrets

from gateway.principal import Principal
from gateway.sessions.cookies import CookieSigner
from gateway.sessions.store import Clock, SessionRecord, Store, session_key

TOUCH_INTERVAL = 60.0
# Sessions are picked by the first characters of their store key (a hash): enough to tell
# a member's sessions apart, and nothing that works as a cookie.
HANDLE_LENGTH = 16


class SessionManager:
    def __init__(self, store: Store, signer: CookieSigner, *, lifetime: float,
                 idle_timeout: float, clock: Clock) -> None:
        self.store = store
        self._signer = signer
        self._lifetime = lifetime
        self._idle = idle_timeout
        self._clock = clock

    def now(self) -> float:
        return self._clock()

    async def create(self, principal: Principal, *, user_agent: str = "",
                     client_ip: str = "") -> tuple[SessionRecord, str]:
        """A new session with a fresh ID; returns the record and the signed cookie value."""
        session_id = secrets.token_urlsafe(32)
        now = self._clock()
        expires = now + self._lifetime
        if principal.session_not_on_or_after is not None:
            expires = min(expires, principal.session_not_on_or_after)
        record = SessionRecord(session_key(session_id), principal, now, now, expires,
                               user_agent[:200], client_ip)
        await self.store.put_session(record)
        return record, self._signer.sign(session_id)

    async def resolve(self, cookie: str | None) -> SessionRecord | None:
        """The live session for a cookie value, or ``None`` (bad signature, unknown, expired)."""
        session_id = self._signer.unsign(cookie)
        if session_id is None:
            return None
        key = session_key(session_id)
        record = await self.store.get_session(key)
        if record is None:
            return None
        now = self._clock()
        if now >= record.expires:
            return None
        if now - record.last_seen >= self._idle:
            await self.store.delete_session(key)
            return None
        if now - record.last_seen >= TOUCH_INTERVAL:
            await self.store.touch_session(key, now)
            record = record.touched(now)
        return record

    async def revoke(self, key: str) -> bool:
        return await self.store.delete_session(key)

    async def end_member_sessions(self, member_id: str, handle: str = "all") -> int:
        """End a member's sessions: all of them, or the one whose key starts with
        ``handle`` (``HANDLE_LENGTH`` characters). Returns how many ended."""
        if handle == "all":
            return await self.store.delete_member_sessions(member_id)
        if len(handle) != HANDLE_LENGTH:
            return 0
        ended = 0
        for record in await self.store.list_sessions(member_id):
            if record.key.startswith(handle):
                ended += await self.store.delete_session(record.key)
        return ended
