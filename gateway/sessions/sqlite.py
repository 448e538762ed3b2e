"""SQLite store: the default, embedded backend for one gateway host.

Statements run directly on the event loop thread: each is a local B-tree
lookup or a small WAL append that takes microseconds, cheaper than a thread
hop per request. WAL mode lets the CLI (``sessions revoke``) and several
worker processes share the file safely.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from gateway.errors import StoreError
from gateway.principal import Principal
from gateway.sessions.store import Clock, Registration, SessionRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    key TEXT PRIMARY KEY,
    member_id TEXT NOT NULL,
    idp TEXT NOT NULL,
    name_id TEXT NOT NULL,
    principal TEXT NOT NULL,
    created REAL NOT NULL,
    last_seen REAL NOT NULL,
    expires REAL NOT NULL,
    user_agent TEXT NOT NULL DEFAULT '',
    client_ip TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS sessions_member ON sessions (member_id);
CREATE INDEX IF NOT EXISTS sessions_name_id ON sessions (idp, name_id);
CREATE TABLE IF NOT EXISTS registrations (
    email TEXT NOT NULL,
    registered_at REAL NOT NULL,
    consent TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS once (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    expires REAL NOT NULL
);
"""


class SQLiteStore:
    def __init__(self, path: str, clock: Clock) -> None:
        self.path = path
        self._clock = clock
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite store {self.path}: {exc}") from exc
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("the SQLite store is not open")
        return self._db

    async def ping(self) -> None:
        self._run("SELECT 1")

    def _run(self, sql: str, args: tuple[object, ...] = ()) -> sqlite3.Cursor:
        try:
            return self.db.execute(sql, args)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store error: {exc}") from exc

    async def put_session(self, record: SessionRecord) -> None:
        p = record.principal
        self._run(
            "INSERT OR REPLACE INTO sessions VALUES (?,?,?,?,?,?,?,?,?,?)",
            (record.key, p.member_id, p.idp, p.name_id, json.dumps(p.to_dict()),
             record.created, record.last_seen, record.expires, record.user_agent,
             record.client_ip),
        )

    async def get_session(self, key: str) -> SessionRecord | None:
        row = self._run(
            "SELECT key, principal, created, last_seen, expires, user_agent, client_ip"
            " FROM sessions WHERE key = ? AND expires > ?",
            (key, self._clock()),
        ).fetchone()
        return _record(row) if row else None

    async def touch_session(self, key: str, last_seen: float) -> None:
        self._run("UPDATE sessions SET last_seen = ? WHERE key = ?", (last_seen, key))

    async def delete_session(self, key: str) -> bool:
        return self._run("DELETE FROM sessions WHERE key = ?", (key,)).rowcount > 0

    async def list_sessions(self, member_id: str | None = None) -> list[SessionRecord]:
        sql = ("SELECT key, principal, created, last_seen, expires, user_agent, client_ip"
               " FROM sessions WHERE expires > ?")
        args: tuple[object, ...] = (self._clock(),)
        if member_id is not None:
            sql += " AND member_id = ?"
            args += (member_id,)
        return [_record(row) for row in self._run(sql + " ORDER BY created", args)]

    async def sessions_for_name_id(self, idp: str, name_id: str) -> list[SessionRecord]:
        return [_record(row) for row in self._run(
            "SELECT key, principal, created, last_seen, expires, user_agent, client_ip"
            " FROM sessions WHERE idp = ? AND name_id = ? AND expires > ? ORDER BY created",
            (idp, name_id, self._clock()))]

    async def delete_member_sessions(self, member_id: str) -> int:
        return self._run("DELETE FROM sessions WHERE member_id = ?", (member_id,)).rowcount

    async def add_once(self, key: str, value: str, ttl: float) -> bool:
        now = self._clock()
        # Insert, or replace a row whose time is up; a live row makes this a no-op.
        cur = self._run(
            "INSERT INTO once (key, value, expires) VALUES (?, ?, ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value, expires = excluded.expires"
            " WHERE once.expires <= ?",
            (key, value, now + ttl, now),
        )
        return cur.rowcount == 1

    async def take(self, key: str) -> str | None:
        row = self._run(
            "DELETE FROM once WHERE key = ? AND expires > ? RETURNING value",
            (key, self._clock()),
        ).fetchone()
        return str(row[0]) if row else None

    async def count_sessions(self) -> int:
        row = self._run("SELECT count(*) FROM sessions WHERE expires > ?",
                        (self._clock(),)).fetchone()
        return int(row[0])

    async def count_once(self, prefix: str) -> int:
        # A key range rather than LIKE, so the primary key index answers it.
        row = self._run("SELECT count(*) FROM once WHERE key >= ? AND key < ? AND expires > ?",
                        (prefix, prefix + "\uffff", self._clock())).fetchone()
        return int(row[0])

    async def get(self, key: str) -> str | None:
        row = self._run("SELECT value FROM once WHERE key = ? AND expires > ?",
                        (key, self._clock())).fetchone()
        return str(row[0]) if row else None

    async def add_registration(self, registration: Registration) -> None:
        self._run("INSERT INTO registrations VALUES (?, ?, ?)",
                  (registration.email, registration.registered_at, registration.consent))

    async def list_registrations(self) -> list[Registration]:
        rows = self._run("SELECT email, registered_at, consent FROM registrations"
                         " ORDER BY registered_at, rowid")
        return [Registration(*row) for row in rows]

    async def count(self, key: str, ttl: float) -> int:
        now = self._clock()
        row = self._run(
            "INSERT INTO once (key, value, expires) VALUES (?, '1', ?)"
            " ON CONFLICT(key) DO UPDATE SET"
            "  value = CASE WHEN once.expires <= ? THEN '1'"
            "          ELSE CAST(CAST(once.value AS INTEGER) + 1 AS TEXT) END,"
            "  expires = CASE WHEN once.expires <= ? THEN excluded.expires ELSE once.expires END"
            " RETURNING value",
            (f"count:{key}", now + ttl, now, now),
        ).fetchone()
        return int(row[0])

    async def purge_expired(self) -> int:
        now = self._clock()
        gone = self._run("DELETE FROM sessions WHERE expires <= ?", (now,)).rowcount
        return gone + self._run("DELETE FROM once WHERE expires <= ?", (now,)).rowcount


# Parsed principals by their stored text: a Principal is immutable, and parsing the same
# JSON on every request was a measurable share of the hot path (bench/, profile).
_PRINCIPALS: dict[str, Principal] = {}
_PRINCIPALS_LIMIT = 10_000


def _principal(text: str) -> Principal:
    principal = _PRINCIPALS.get(text)
    if principal is None:
        if len(_PRINCIPALS) >= _PRINCIPALS_LIMIT:
            _PRINCIPALS.clear()
        principal = _PRINCIPALS[text] = Principal.from_dict(json.loads(text))
    return principal


def _record(row: tuple[str, str, float, float, float, str, str]) -> SessionRecord:
    key, principal, created, last_seen, expires, user_agent, client_ip = row
    return SessionRecord(key, _principal(principal), created, last_seen, expires, user_agent,
                         client_ip)
