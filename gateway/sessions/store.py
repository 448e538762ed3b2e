"""The store seams: sessions, single-use keys and counters, durable records; and the factory.

Three small interfaces instead of one large one, each with its own conformance suite
(``tests/test_store_conformance.py``) that every backend passes:

* ``SessionStore``: sessions, under a hash of their ID (the store never holds a value
  that works as a cookie), indexed by subject and by the login protocol's opaque
  logout handle;
* ``KeyStore``: values with an expiry that are added once, taken once, or counted
  (pending sign-ins, the replay cache, rate limits, kept forms);
* ``RecordStore``: durable records an admin reads later (registrations, login failures).

A backend class implements all three over one connection; ``open_store`` returns them
as a ``Stores`` bundle. Every operation is one atomic step in the backend (one SQL
statement or transaction; one Redis command or Lua script), so processes or replicas
sharing a store never let the same single-use key through twice. Every key prefix a
caller uses is in ``Namespace``: one place to see what the store holds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Protocol

from gateway.config_schema import STORE_SCHEMES as SCHEMES
from gateway.errors import ConfigError

Clock = Callable[[], float]


class Namespace(StrEnum):
    """Prefixes of ``KeyStore`` keys and ``RecordStore`` kinds, by what they hold."""

    LOGIN_STATE = "authn:"  # a pending sign-in of one browser (protocol state, next URL)
    ASSERTION = "assertion:"  # an accepted one-time login message ID (replay cache)
    LOGOUT = "slo:"  # a logout we started and wait to be confirmed
    LOGOUT_SEEN = "slo-in:"  # a logout message already received (replay cache)
    RATE = "rate:"  # a rate-limit counter per client and action
    STASH = "stash:"  # a form kept across a sign-in
    ENDED = "ended:"  # a session that ended by idling, until its cookie's end (kept forms)
    FAILURE = "failure:"  # a refused sign-in, for `sso-gateway explain` (a record)
    HEARTBEAT = "health:"  # the readiness probe's write (``Backend.ping``)
    CONFIRM = "confirm:"  # a registration waiting for its mailed link (by the link's hash)


def session_key(session_id: str) -> str:
    """The store key of a session: a hash, so a leaked store yields no usable cookie."""
    return hashlib.sha256(session_id.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class StoredSession:
    """A session as the store keeps it: the principal as its JSON text (the session
    manager parses it, with a cache, so every backend shares one parsing path)."""

    key: str  # session_key(session ID)
    subject: str
    logout_handle: str
    principal_json: str
    created: float
    last_seen: float
    expires: float  # absolute end of the session
    user_agent: str = ""
    client_ip: str = ""

    def touched(self, now: float) -> StoredSession:
        """The same session, last seen ``now``."""
        return replace(self, last_seen=now)


@dataclass(frozen=True, slots=True)
class Registration:
    """A visitor who gave an e-mail address for the free issue, and what they agreed to:
    the consent wording itself, the reader's random ``subject`` (their sessions' subject;
    "" for registrations kept before it was recorded) and when the address was confirmed
    by a mailed link (``None``: not confirmed)."""

    email: str
    registered_at: float
    consent: str
    subject: str = ""
    verified_at: float | None = None


def registration_criterion(email: str, subject: str,
                           registered_before: float | None) -> tuple[str, str | float]:
    """Which registrations ``RecordStore.delete_registrations`` deletes: ("email", the
    address in lower case), ("subject", it) or ("before", the time); ``ValueError``
    unless exactly one criterion is given."""
    given: list[tuple[str, str | float]] = [
        (name, value) for name, value in (("email", email.lower()), ("subject", subject))
        if value]
    if registered_before is not None:
        given.append(("before", registered_before))
    if len(given) != 1:
        raise ValueError("delete_registrations takes exactly one of email, subject, "
                         "registered_before")
    return given[0]


class SessionStore(Protocol):
    """Sessions by key, with indexes by subject and by logout handle."""

    async def put_session(self, session: StoredSession) -> None:
        """Store (or replace) a session; it disappears by itself at ``expires``."""

    async def get_session(self, key: str) -> StoredSession | None:
        """The session, or ``None`` if absent or past its absolute expiry."""

    async def touch_session(self, key: str, last_seen: float) -> None:
        """Record activity; never recreates a session that is gone."""

    async def delete_session(self, key: str) -> bool:
        """Delete one session; ``True`` if it existed."""

    async def list_sessions(self, subject: str | None = None) -> list[StoredSession]:
        """Live sessions, oldest first: all, or one subject's (by index, not scan)."""

    async def delete_subject_sessions(self, subject: str) -> int:
        """Delete every session of one subject; returns how many."""

    async def sessions_for_logout(self, logout_handle: str) -> list[StoredSession]:
        """Live sessions with this logout handle, oldest first (by index, not scan); an
        empty handle names no session."""

    async def count_sessions(self) -> int:
        """Live sessions (the metrics gauge; read at scrape time, not per request)."""

    async def changed_since(self, cursor: str) -> tuple[str, list[str]] | None:
        """Keys of the sessions deleted or touched after ``cursor``, with the cursor to ask
        from next time; ``cursor=""`` gives the current cursor and no keys. ``None``: the
        change log no longer reaches back to ``cursor`` (or the store was replaced), so
        whoever keeps sessions in memory must forget them all. Every deletion and touch
        is logged in the same atomic step that makes it."""


class KeyStore(Protocol):
    """Values with an expiry: added once, read, taken once, or counted."""

    async def add_once(self, key: str, value: str, ttl: float) -> bool:
        """Store ``value`` under ``key`` unless a live value is there; ``True`` if stored."""

    async def take(self, key: str) -> str | None:
        """Atomically read and delete a live value: at most one caller ever gets it."""

    async def get(self, key: str) -> str | None:
        """Read a live value without consuming it."""

    async def count(self, key: str, ttl: float) -> int:
        """Add one to a counter and return the new value; the counter lives ``ttl`` seconds
        from its first hit (rate limits use one counter per client and time window)."""

    async def count_keys(self, prefix: str) -> int:
        """Live keys whose name starts with ``prefix`` (e.g. pending sign-ins)."""


class RecordStore(Protocol):
    """Durable records: kept until they expire (failures) or are deleted."""

    async def add_registration(self, registration: Registration) -> None:
        """Keep a registration (until ``delete_registrations`` removes it)."""

    async def list_registrations(self) -> list[Registration]:
        """Every registration, oldest first."""

    async def delete_registrations(self, *, email: str = "", subject: str = "",
                                   registered_before: float | None = None
                                   ) -> list[Registration]:
        """Delete, in one atomic step, the registrations of one address (compared in any
        case), of one subject, or made before a time (retention); returns those deleted.
        Exactly one criterion is given."""

    async def put_record(self, key: str, value: str, ttl: float) -> None:
        """Keep ``value`` under ``key`` for ``ttl`` seconds (replacing an older one)."""

    async def get_record(self, key: str) -> str | None:
        """A live record, or ``None``."""


class Backend(SessionStore, KeyStore, RecordStore, Protocol):
    """One connection to one store, serving all three interfaces."""

    async def open(self) -> None:
        """Connect (and create or upgrade what the store needs); ``StoreError`` if it
        cannot."""

    async def close(self) -> None:
        """Release the connection; the backend may be opened again."""

    async def ping(self) -> None:
        """Raise ``StoreError`` if the store cannot serve requests: a write (a heartbeat
        key under ``Namespace.HEARTBEAT``), so a store that reads but cannot take new
        sessions is reported too."""

    async def purge_expired(self) -> int:
        """Delete what has expired; returns how many entries went."""


@dataclass(frozen=True, slots=True)
class Stores:
    """The three interfaces of one backend, and the backend for its lifecycle."""

    backend: Backend

    @property
    def sessions(self) -> SessionStore:
        """Sessions and their indexes."""
        return self.backend

    @property
    def keys(self) -> KeyStore:
        """Single-use keys and counters."""
        return self.backend

    @property
    def records(self) -> RecordStore:
        """Registrations and expiring records."""
        return self.backend


def open_store(url: str, clock: Clock, *, key_prefix: str = "gw:", pool_size: int = 32,
               connect_timeout: float = 2.0, socket_timeout: float = 2.0) -> Stores:
    """The backend for a store URL: ``sqlite:///path``, ``redis://``, ``rediss://`` or
    ``redis+sentinel://`` (see ``gateway.sessions.redis``). The other options are Redis's."""
    scheme = url.split("://", 1)[0]
    if scheme == "sqlite":
        from gateway.sessions.sqlite import SQLiteStore

        return Stores(SQLiteStore(url.removeprefix("sqlite://"), clock))
    if scheme in SCHEMES:
        from gateway.sessions.redis import RedisStore

        return Stores(RedisStore(url, clock, key_prefix=key_prefix, pool_size=pool_size,
                                 connect_timeout=connect_timeout,
                                 socket_timeout=socket_timeout))
    raise ConfigError([f"store.url: unknown session store type {scheme!r}"])
