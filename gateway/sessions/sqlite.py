"""SQLite store: the default, embedded backend for one gateway host.

Statements run directly on the event loop thread: each is a local B-tree
lookup or a small WAL append that takes microseconds, cheaper than a thread
hop per request. WAL mode lets the CLI (``sessions revoke``) and several
worker processes share the file safely.

Tables: ``sessions`` (indexed by subject and by logout handle), ``once`` (keys,
counters and expiring records such as login failures, each with its end) and
``registrations`` (records that never expire). A file written by an older version
is upgraded in place when it is opened (``gateway.sessions.sqlite_upgrade``).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gateway.errors import StoreError
from gateway.sessions.sqlite_upgrade import upgrade_sessions
from gateway.sessions.store import Clock, Registration, StoredSession

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS sessions (
        key TEXT PRIMARY KEY,
        subject TEXT NOT NULL,
        logout_handle TEXT NOT NULL DEFAULT '',
        principal TEXT NOT NULL,
        created REAL NOT NULL,
        last_seen REAL NOT NULL,
        expires REAL NOT NULL,
        user_agent TEXT NOT NULL DEFAULT '',
        client_ip TEXT NOT NULL DEFAULT '')""",
    "CREATE INDEX IF NOT EXISTS sessions_subject ON sessions (subject)",
    "CREATE INDEX IF NOT EXISTS sessions_logout ON sessions (logout_handle)",
    """CREATE TABLE IF NOT EXISTS registrations (
        email TEXT NOT NULL,
        registered_at REAL NOT NULL,
        consent TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS once (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        expires REAL NOT NULL)""",
)
_INSERT = ("INSERT OR REPLACE INTO sessions (key, subject, logout_handle, principal, created,"
           " last_seen, expires, user_agent, client_ip) VALUES (?,?,?,?,?,?,?,?,?)")
_LIVE = ("SELECT key, subject, logout_handle, principal, created, last_seen, expires,"
         " user_agent, client_ip FROM sessions WHERE expires > ?")
_ORDER = " ORDER BY created, rowid"


class SQLiteStore:
    """A ``Backend`` (sessions, keys, records) in one SQLite file."""

    def __init__(self, path: str, clock: Clock) -> None:
        self.path = path
        self._clock = clock
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        """Open the file (creating it), and create or upgrade the tables in one
        transaction, so several processes opening one file at once stay safe."""
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open SQLite store {self.path}: {exc}") from exc
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
            db.execute("BEGIN IMMEDIATE")
            try:
                upgrade_sessions(db, SCHEMA[0])
                for statement in SCHEMA:
                    db.execute(statement)
                db.execute("COMMIT")
            finally:
                if db.in_transaction:
                    db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            db.close()
            raise StoreError(f"cannot open SQLite store {self.path}: {exc}") from exc
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        """The open connection (``StoreError`` if the store is not open)."""
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

    # -- sessions ------------------------------------------------------------------------

    async def put_session(self, session: StoredSession) -> None:
        s = session
        self._run(_INSERT, (s.key, s.subject, s.logout_handle, s.principal_json, s.created,
                   s.last_seen, s.expires, s.user_agent, s.client_ip))

    async def get_session(self, key: str) -> StoredSession | None:
        row = self._run(_LIVE + " AND key = ?", (self._clock(), key)).fetchone()
        return StoredSession(*row) if row else None

    async def touch_session(self, key: str, last_seen: float) -> None:
        self._run("UPDATE sessions SET last_seen = ? WHERE key = ?", (last_seen, key))

    async def delete_session(self, key: str) -> bool:
        return self._run("DELETE FROM sessions WHERE key = ?", (key,)).rowcount > 0

    async def list_sessions(self, subject: str | None = None) -> list[StoredSession]:
        if subject is None:
            rows = self._run(_LIVE + _ORDER, (self._clock(),))
        else:
            rows = self._run(_LIVE + " AND subject = ?" + _ORDER, (self._clock(), subject))
        return [StoredSession(*row) for row in rows]

    async def delete_subject_sessions(self, subject: str) -> int:
        return self._run("DELETE FROM sessions WHERE subject = ?", (subject,)).rowcount

    async def sessions_for_logout(self, logout_handle: str) -> list[StoredSession]:
        if not logout_handle:  # no handle names no session
            return []
        rows = self._run(_LIVE + " AND logout_handle = ?" + _ORDER,
                         (self._clock(), logout_handle))
        return [StoredSession(*row) for row in rows]

    async def count_sessions(self) -> int:
        row = self._run("SELECT count(*) FROM sessions WHERE expires > ?",
                        (self._clock(),)).fetchone()
        return int(row[0])

    # -- keys and counters ---------------------------------------------------------------

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
        row = self._run("DELETE FROM once WHERE key = ? AND expires > ? RETURNING value",
                        (key, self._clock())).fetchone()
        return str(row[0]) if row else None

    async def get(self, key: str) -> str | None:
        row = self._run("SELECT value FROM once WHERE key = ? AND expires > ?",
                        (key, self._clock())).fetchone()
        return str(row[0]) if row else None

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

    async def count_keys(self, prefix: str) -> int:
        # A key range rather than LIKE, so the primary key index answers it.
        row = self._run("SELECT count(*) FROM once WHERE key >= ? AND key < ? AND expires > ?",
                        (prefix, prefix + "\uffff", self._clock())).fetchone()
        return int(row[0])

    # -- records ---------------------------------------------------------------------------

    async def add_registration(self, registration: Registration) -> None:
        self._run("INSERT INTO registrations VALUES (?, ?, ?)",
                  (registration.email, registration.registered_at, registration.consent))

    async def list_registrations(self) -> list[Registration]:
        rows = self._run("SELECT email, registered_at, consent FROM registrations"
                         " ORDER BY registered_at, rowid")
        return [Registration(*row) for row in rows]

    async def put_record(self, key: str, value: str, ttl: float) -> None:
        # Expiring records share the ``once`` table: the key text is the one older
        # versions wrote, so their records stay readable.
        self._run("INSERT OR REPLACE INTO once (key, value, expires) VALUES (?, ?, ?)",
                  (key, value, self._clock() + ttl))

    async def get_record(self, key: str) -> str | None:
        return await self.get(key)

    async def purge_expired(self) -> int:
        now = self._clock()
        gone = self._run("DELETE FROM sessions WHERE expires <= ?", (now,)).rowcount
        return gone + self._run("DELETE FROM once WHERE expires <= ?", (now,)).rowcount
