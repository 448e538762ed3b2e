"""The ``Store`` protocol: sessions and single-use keys, and the factory that picks a backend.

Every operation is one atomic step in the backend (one SQL statement or
transaction; one Redis command or Lua script), so several processes or
replicas sharing a store never let the same single-use key through twice.
Sessions are stored under a hash of their ID: the store never holds a value
that works as a cookie.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from gateway.errors import ConfigError
from gateway.principal import Principal

Clock = Callable[[], float]


def session_key(session_id: str) -> str:
    """The store key of a session: a hash, so a leaked store yields no usable cookie."""
    return hashlib.sha256(session_id.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class SessionRecord:
    key: str  # session_key(session ID)
    principal: Principal
    created: float
    last_seen: float
    expires: float  # absolute end of the session
    user_agent: str = ""
    client_ip: str = ""

    def touched(self, now: float) -> SessionRecord:
        return replace(self, last_seen=now)


@dataclass(frozen=True, slots=True)
class Registration:
    """A visitor who gave an e-mail address for the free issue, and what they agreed to."""

    email: str
    registered_at: float
    consent: str


class Store(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise ``StoreError`` if the store cannot serve requests."""

    async def put_session(self, record: SessionRecord) -> None: ...

    async def get_session(self, key: str) -> SessionRecord | None:
        """The session, or ``None`` if absent or past its absolute expiry."""

    async def touch_session(self, key: str, last_seen: float) -> None: ...

    async def delete_session(self, key: str) -> bool: ...

    async def list_sessions(self, member_id: str | None = None) -> list[SessionRecord]: ...

    async def delete_member_sessions(self, member_id: str) -> int: ...

    async def sessions_for_name_id(self, idp: str, name_id: str) -> list[SessionRecord]:
        """Live sessions of one SAML subject (for Single Logout), found by index, not scan."""

    async def add_once(self, key: str, value: str, ttl: float) -> bool:
        """Store ``value`` under ``key`` unless a live value is there; ``True`` if stored."""

    async def take(self, key: str) -> str | None:
        """Atomically read and delete a live value: at most one caller ever gets it."""

    async def count_sessions(self) -> int:
        """Live sessions (for the metrics gauge; read at scrape time, not per request)."""

    async def count_once(self, prefix: str) -> int:
        """Live single-use keys whose name starts with ``prefix`` (e.g. pending logins)."""

    async def get(self, key: str) -> str | None:
        """Read a live value without consuming it (records kept for a while, such as
        login failures for ``sso-gateway explain``)."""

    async def count(self, key: str, ttl: float) -> int:
        """Add one to a counter and return the new value; the counter lives ``ttl`` seconds
        from its first hit (rate limits use one counter per client and time window)."""

    async def purge_expired(self) -> int: ...

    async def add_registration(self, registration: Registration) -> None: ...

    async def list_registrations(self) -> list[Registration]:
        """Every registration, oldest first (kept until an admin removes them)."""


def open_store(url: str, clock: Clock, *, key_prefix: str = "gw:", pool_size: int = 32,
               connect_timeout: float = 2.0, socket_timeout: float = 2.0) -> Store:
    """The backend for a store URL: ``sqlite:///path``, ``redis://``, ``rediss://`` or
    ``redis+sentinel://`` (see ``gateway.sessions.redis``). The other options are Redis's."""
    scheme = url.split("://", 1)[0]
    if scheme == "sqlite":
        from gateway.sessions.sqlite import SQLiteStore

        return SQLiteStore(url.removeprefix("sqlite://"), clock)
    if scheme in {"redis", "rediss", "redis+sentinel"}:
        from gateway.sessions.redis import RedisStore

        return RedisStore(url, clock, key_prefix=key_prefix, pool_size=pool_size,
                          connect_timeout=connect_timeout, socket_timeout=socket_timeout)
    raise ConfigError([f"store.url: unknown session store type {scheme!r}"])
