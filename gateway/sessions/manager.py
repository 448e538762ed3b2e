"""Session lifecycle: the only code that creates, resolves and ends sessions.

The cookie carries only a signed, random session ID. Absolute lifetime (capped
by the IdP's ``SessionNotOnOrAfter``) and idle timeout are checked on every
resolve; the idle clock is written at most once per ``TOUCH_INTERVAL`` so a
busy reader does not turn every page view into a store write. Principals are
parsed from the store's JSON once and cached, for every backend.

A session that ends by idling leaves a small marker in the ``KeyStore``
(``Namespace.ENDED``, naming the session's subject) until the session's absolute end,
the longest its cookie can still be sent: ``recently_ended`` tells a cookie of a real
session that just ended (a form posted after a pause, worth keeping across the sign-in,
for that member only) from a junk or forged one, which never reaches the store.

The last-seen touch a page view makes on the way is best-effort: a store that reads but
cannot write (full disk, read-only file, Redis at ``maxmemory``, a lock held elsewhere)
never fails the page (the idle clock may then run from the previous touch: at most
``TOUCH_INTERVAL`` early).
Each failure is logged and counted (``best_effort_failed``, the metric
``gateway_best_effort_failures_total{what}``).

Sessions resolved once are kept in memory (``memory=True``), so a page view usually
asks the store nothing. What another process or replica changes reaches this one
through the store's change log (``SessionStore.changed_since``: every deletion and
touch is logged atomically with it): memory is used only while the last read of that
log started less than ``SYNC_INTERVAL`` ago, so a session revoked, signed out or ended
by Single Logout anywhere is anonymous here within ``SYNC_INTERVAL`` plus one store
round trip (the documented bound is one second). If the log cannot be read, or no
longer reaches back far enough, memory is emptied and the store answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import StoreError
from gateway.principal import Principal
from gateway.sessions.cookies import CookieSigner
from gateway.sessions.store import (
    Clock,
    KeyStore,
    Namespace,
    SessionStore,
    StoredSession,
    session_key,
)

TOUCH_INTERVAL = 60.0
#: Seconds touches pause after one failed (the store is locked, full or read-only).
TOUCH_BACKOFF = 5.0
# Sessions are picked by the first characters of their store key (a hash): enough to tell
# a member's sessions apart, and nothing that works as a cookie.
HANDLE_LENGTH = 16
_PRINCIPALS_LIMIT = 10_000
#: Seconds a read of the change log keeps memory usable: the revocation bound, less a
#: margin for the read itself (docs/architecture.md states one second).
SYNC_INTERVAL = 0.5
#: Sessions kept in memory at most (the oldest go first).
MEMORY_LIMIT = 50_000
#: An ENDED marker's value: this, then the subject of the session that idled out (older
#: versions wrote ``"idle"`` alone, which names nobody).
ENDED_IDLE = "idle:"
log = logging.getLogger("gateway.sessions")
_listeners: list[weakref.WeakMethod[Callable[[str], None]]] = []


def on_best_effort_failure(listener: Callable[[str], None]) -> None:
    """Call the bound method ``listener(what)`` on every best-effort write that failed
    in this process (the metrics counter listens; held weakly)."""
    _listeners.append(weakref.WeakMethod(listener))


def best_effort_failed(what: str, exc: StoreError) -> None:
    """A best-effort store write failed: logged and counted, the request goes on."""
    log.warning("best-effort store write failed what=%s: %s", what, exc.reason)
    for ref in list(_listeners):
        listener = ref()
        if listener is None:
            _listeners.remove(ref)
        else:
            listener(what)


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A live session with its principal."""

    key: str  # session_key(session ID)
    principal: Principal
    created: float
    last_seen: float
    expires: float
    user_agent: str = ""
    client_ip: str = ""

    @property
    def handle(self) -> str:
        """The short reference that picks this session in pages, logs and the CLI."""
        return self.key[:HANDLE_LENGTH]


class SessionManager:
    """Creates sessions at sign-in, resolves cookies, and ends sessions (the only code
    that does)."""

    def __init__(self, store: SessionStore, signer: CookieSigner, *, lifetime: float,
                 idle_timeout: float, clock: Clock, keys: KeyStore | None = None,
                 memory: bool = False) -> None:
        """``keys`` holds the markers of sessions that ended by idling (without it, none
        are kept and ``recently_ended`` is always ``None``). ``memory`` keeps resolved
        sessions in memory, kept true by the store's change log."""
        self.store = store
        self._keys = keys
        self._signer = signer
        self._lifetime = lifetime
        self._idle = idle_timeout
        self._clock = clock
        # Parsed principals by their stored text: a Principal is immutable, and parsing the
        # same JSON on every request was a measurable share of the hot path (bench/).
        self._principals: dict[str, Principal] = {}
        self._touch_paused_until = 0.0
        self._memory = memory
        self._records: dict[str, SessionRecord] = {}  # by key, oldest first
        self._cursor = ""
        self._synced = -1e9  # monotonic start of the last good read of the change log
        self._sync: asyncio.Future[bool] | None = None
        self._epoch = 0  # reads of the change log started so far
        #: Resolves answered from memory and from the store, since the last report.
        self.from_memory = 0
        self.from_store = 0
        #: Called with those two counts after each read of the change log (the metrics),
        #: so the hot path itself only adds one to an int.
        self.report: Callable[[int, int], None] | None = None

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
        text = json.dumps(principal.to_dict(), sort_keys=True)
        stored = StoredSession(session_key(session_id), principal.subject,
                               principal.logout_handle, text, now, now, expires,
                               user_agent[:200], client_ip)
        await self.store.put_session(stored)
        return self._record(stored), self._signer.sign(session_id)

    async def resolve(self, cookie: str | None, *, fresh: bool = False) -> SessionRecord | None:
        """The live session for a cookie value, or ``None`` (bad signature, unknown, expired).
        ``fresh``: from the store, never from memory (for an answer that is cached
        elsewhere, whose own lifetime then spends the revocation bound)."""
        session_id = self._signer.unsign(cookie)
        if session_id is None:
            return None
        key = session_key(session_id)
        if self._memory and not fresh and await self._synced_now():
            record = self._records.get(key)
            if record is not None:
                now = self._clock()
                if now >= record.expires:
                    return None
                if now - record.last_seen < TOUCH_INTERVAL:
                    self.from_memory += 1
                    return record
        self.from_store += 1
        epoch = self._epoch
        stored = await self.store.get_session(key)
        if stored is None:
            return None
        now = self._clock()
        if now >= stored.expires:
            return None
        if now - stored.last_seen >= self._idle:
            # Not best-effort: without the marker a form posted now could not be kept,
            # and a 503 (a store that cannot write cannot sign anyone in either) lets
            # the member send it again later instead of losing it.
            self._forget([key])
            if await self.store.delete_session(key) and self._keys is not None:
                await self._keys.add_once(Namespace.ENDED + key, ENDED_IDLE + stored.subject,
                                          max(stored.expires - now, 1.0))
            return None
        if now - stored.last_seen >= TOUCH_INTERVAL and now >= self._touch_paused_until:
            try:
                await self.store.touch_session(key, now)
            except StoreError as exc:  # the page is served; a later view tries again
                # Not on every view meanwhile: each would wait for the store's timeout.
                self._touch_paused_until = now + TOUCH_BACKOFF
                best_effort_failed("touch", exc)
            else:
                stored = stored.touched(now)
        record = self._record(stored)
        if self._memory and self._cursor and epoch == self._epoch:
            # Only from a known place in the change log (none yet, or the last read
            # failed: the next read starts from "now" and would never see an end made
            # in between), and only when no read started meanwhile (it may already
            # have passed this session's end, and would not drop it again).
            self._remember(record)
        return record

    async def recently_ended(self, cookie: str | None) -> str | None:
        """The subject of the real session a cookie (that ``resolve`` found no live
        session for) belonged to, if it ended by idling and its cookie is still within
        its lifetime; else ``None``. A marker from before subjects were recorded names
        nobody: ``None``. A cookie with a bad signature is answered without asking the
        store."""
        session_id = self._signer.unsign(cookie)
        if session_id is None or self._keys is None:
            return None
        marker = await self._keys.get(Namespace.ENDED + session_key(session_id))
        if marker is None or not marker.startswith(ENDED_IDLE):
            return None
        return marker[len(ENDED_IDLE):] or None

    async def sessions(self, subject: str | None = None) -> list[SessionRecord]:
        """Live sessions, oldest first: all, or one subject's."""
        return [self._record(s) for s in await self.store.list_sessions(subject)]

    async def end(self, key: str) -> bool:
        """End one session (sign-out); ``True`` if it was live."""
        self._forget([key])
        return await self.store.delete_session(key)

    async def end_subject_sessions(self, subject: str, handle: str = "all") -> int:
        """End a subject's sessions: all of them, or the one whose ``handle`` is given.
        Returns how many ended."""
        if handle == "all":
            self._forget(subject=subject)
            return await self.store.delete_subject_sessions(subject)
        if len(handle) != HANDLE_LENGTH:
            return 0
        ended = 0
        for stored in await self.store.list_sessions(subject):
            if stored.key.startswith(handle):
                self._forget([stored.key])
                ended += await self.store.delete_session(stored.key)
        return ended

    async def end_for_logout(self, logout_handle: str,
                             ends: Callable[[Principal], bool]) -> int:
        """End the sessions a login protocol's logout names: those with ``logout_handle``
        whose principal ``ends`` accepts. Returns how many ended."""
        if not logout_handle:
            return 0
        ended = 0
        for stored in await self.store.sessions_for_logout(logout_handle):
            if ends(self._principal(stored.principal_json)):
                self._forget([stored.key])
                ended += await self.store.delete_session(stored.key)
        return ended

    async def _synced_now(self) -> bool:
        """Whether memory may answer: the change log was read, from a start less than
        ``SYNC_INTERVAL`` ago. One read at a time; requests meanwhile wait for it."""
        if time.monotonic() - self._synced < SYNC_INTERVAL:
            return True
        if self._sync is None:
            self._sync = asyncio.ensure_future(self._read_changes())
        sync = self._sync
        return await asyncio.shield(sync)

    async def _read_changes(self) -> bool:
        started = time.monotonic()
        self._epoch += 1
        if self.report is not None:
            self.report(self.from_memory, self.from_store)
        self.from_memory = self.from_store = 0
        try:
            changes = await self.store.changed_since(self._cursor)
        except StoreError as exc:
            log.warning("session change log unreadable, sessions come from the store: %s",
                        exc.reason)
            changes = None
            ok = False
        else:
            ok = True
        finally:
            self._sync = None
        if changes is None:
            self._records.clear()
            self._cursor = ""
            if ok:  # a fresh cursor now; memory refills from the store
                return await self._restart(started)
            return False
        self._cursor, keys = changes
        for key in keys:
            self._records.pop(key, None)
        self._synced = started
        return True

    async def _restart(self, started: float) -> bool:
        try:
            changes = await self.store.changed_since("")
        except StoreError:
            return False
        if changes is None:
            return False
        self._cursor = changes[0]
        self._synced = started
        return True

    def _remember(self, record: SessionRecord) -> None:
        if len(self._records) >= MEMORY_LIMIT:
            self._records.pop(next(iter(self._records)))
        self._records[record.key] = record

    def _forget(self, keys: list[str] | None = None, subject: str = "") -> None:
        """Drop sessions this process ended from its memory at once (other processes
        learn it from the change log)."""
        for key in keys or ():
            self._records.pop(key, None)
        if subject:
            for key in [k for k, r in self._records.items() if r.principal.subject == subject]:
                del self._records[key]

    def _record(self, stored: StoredSession) -> SessionRecord:
        return SessionRecord(stored.key, self._principal(stored.principal_json),
                             stored.created, stored.last_seen, stored.expires,
                             stored.user_agent, stored.client_ip)

    def _principal(self, text: str) -> Principal:
        principal = self._principals.get(text)
        if principal is None:
            if len(self._principals) >= _PRINCIPALS_LIMIT:
                self._principals.clear()  # bounded: at worst each session parses once more
            principal = self._principals[text] = Principal.from_dict(json.loads(text))
        return principal
