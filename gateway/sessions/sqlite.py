"""SQLite store: the default, embedded backend for one gateway host.

Statements never run on the event loop: each connection lives in its own thread (a
single-thread executor), so a statement that waits for a lock, a slow disk or a full
one stalls only the requests that need that connection, never ``/healthz``, proxied
pages or the rest of the process. WAL mode lets the CLI (``sessions revoke``), backups
and several worker processes share the file safely.

Three connections, each with its own thread:

* **reads** (session lookups, pending sign-ins, listings): WAL readers never wait for
  another process's write lock, so pages keep answering while an admin command, a
  backup or a VACUUM holds it;
* **writes** on the request path (sign-in, touch, counters): a short busy timeout
  (``REQUEST_BUSY_TIMEOUT``), so a locked file answers 503 quickly instead of stalling;
* **background** work (``purge_expired``): a long busy timeout (``BACKGROUND_BUSY_TIMEOUT``).

A connection that fails with anything but a lock (read-only file, disk I/O error, full
disk, a file replaced under it) is closed and opened again on its next statement, so
a store that was fixed serves again without a restart. ``ping`` writes a heartbeat
key (``Namespace.HEARTBEAT``): readiness reports a store that cannot write.

Tables: ``sessions`` (indexed by subject and by logout handle), ``once`` (keys,
counters and expiring records such as login failures, each with its end) and
``registrations`` (records that never expire). A file written by an older version
is upgraded in place when it is opened (``gateway.sessions.sqlite_upgrade``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import StoreError
from gateway.sessions.sqlite_upgrade import upgrade_sessions
from gateway.sessions.store import (
    Clock,
    Namespace,
    Registration,
    StoredSession,
    registration_criterion,
)

log = logging.getLogger("gateway.store")
T = TypeVar("T")

#: Seconds a request-path write waits for another process's write lock (then 503).
REQUEST_BUSY_TIMEOUT = 0.25
#: Seconds background work (the purge, opening the store) waits for the write lock.
BACKGROUND_BUSY_TIMEOUT = 10.0
#: Rows one purge transaction deletes at most, so it never holds the lock for long.
PURGE_BATCH = 5000
HEARTBEAT_TTL = 60.0

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
        consent TEXT NOT NULL,
        subject TEXT NOT NULL DEFAULT '',
        verified_at REAL)""",
    """CREATE TABLE IF NOT EXISTS once (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        expires REAL NOT NULL)""",
    # The change log processes that keep sessions in memory read (``changed_since``):
    # triggers write it in the transaction of every deletion and touch, whoever makes it.
    """CREATE TABLE IF NOT EXISTS session_changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        key TEXT NOT NULL)""",
    """CREATE TRIGGER IF NOT EXISTS sessions_deleted AFTER DELETE ON sessions
        BEGIN INSERT INTO session_changes (key) VALUES (old.key); END""",
    """CREATE TRIGGER IF NOT EXISTS sessions_touched AFTER UPDATE ON sessions
        BEGIN INSERT INTO session_changes (key) VALUES (old.key); END""",
)
#: Change-log rows kept (the purge trims older ones); a reader further behind forgets all.
CHANGES_KEPT = 20_000
#: Change-log rows one ``changed_since`` returns at most (more: the reader forgets all).
CHANGES_READ = 5_000
_INSERT = ("INSERT OR REPLACE INTO sessions (key, subject, logout_handle, principal, created,"
           " last_seen, expires, user_agent, client_ip) VALUES (?,?,?,?,?,?,?,?,?)")
_LIVE = ("SELECT key, subject, logout_handle, principal, created, last_seen, expires,"
         " user_agent, client_ip FROM sessions WHERE expires > ?")
_ORDER = " ORDER BY created, rowid"
#: Columns a registrations table written by an older version lacks, added on open.
_REGISTRATION_COLUMNS = (("subject", "TEXT NOT NULL DEFAULT ''"), ("verified_at", "REAL"))
_REGISTRATION_INDEXES = (
    "CREATE INDEX IF NOT EXISTS registrations_email ON registrations (lower(email))",
    "CREATE INDEX IF NOT EXISTS registrations_subject ON registrations (subject)",
    "CREATE INDEX IF NOT EXISTS registrations_time ON registrations (registered_at)",
)
_REGISTRATION = "email, registered_at, consent, subject, verified_at"
_Args = tuple[object, ...]


def _locked(exc: sqlite3.Error) -> bool:
    """A lock held by someone else: the connection itself is fine."""
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class _Connection:
    """One SQLite connection, used only by its own thread, opened on first use and
    opened again after an error that was not a lock."""

    def __init__(self, path: str, busy_timeout: float, name: str) -> None:
        self._path = path
        self._busy_ms = int(busy_timeout * 1000)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"sqlite-{name}")
        self._db: sqlite3.Connection | None = None
        self._name = name

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, work)

    def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            if self._db is None:
                self._db = self._connect()
            return work(self._db)
        except sqlite3.Error as exc:
            if not _locked(exc):  # read-only, I/O error, full disk…: start afresh next time
                self._drop()
                log.warning("SQLite %s connection closed after %s; it reopens on next use",
                            self._name, exc)
            elif self._db is not None and self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise StoreError(f"SQLite store error: {exc}") from exc
        except OSError as exc:
            self._drop()
            raise StoreError(f"SQLite store error: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            db.execute(f"PRAGMA busy_timeout={self._busy_ms}")
            db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error:
            db.close()
            raise
        return db

    def _drop(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._drop)
        self._executor.shutdown(wait=True)


def _one(sql: str, args: _Args = ()) -> Callable[[sqlite3.Connection], Any]:
    """A statement and its first row (fetched in the connection's thread, where its
    errors are mapped like the statement's)."""
    return lambda db: db.execute(sql, args).fetchone()


def _all(sql: str, args: _Args = ()) -> Callable[[sqlite3.Connection], list[Any]]:
    return lambda db: db.execute(sql, args).fetchall()


def _changed(sql: str, args: _Args = ()) -> Callable[[sqlite3.Connection], int]:
    return lambda db: db.execute(sql, args).rowcount


class SQLiteStore:
    """A ``Backend`` (sessions, keys, records) in one SQLite file."""

    def __init__(self, path: str, clock: Clock) -> None:
        self.path = path
        self._clock = clock
        self._reads: _Connection | None = None
        self._writes: _Connection | None = None
        self._background: _Connection | None = None

    async def open(self) -> None:
        """Open the file (creating it), and create or upgrade the tables in one
        transaction, so several processes opening one file at once stay safe. A file
        that cannot be written now but has its tables opens anyway: reads serve, writes
        answer 503 and readiness reports it until the file is writable again."""
        if self._writes is not None:
            return
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot open SQLite store {self.path}: {exc}") from exc
        writes = _Connection(self.path, REQUEST_BUSY_TIMEOUT, "writes")
        if self.path == ":memory:":  # one database per connection: share the one
            reads = background = writes
        else:
            reads = _Connection(self.path, REQUEST_BUSY_TIMEOUT, "reads")
            background = _Connection(self.path, BACKGROUND_BUSY_TIMEOUT, "background")
        try:
            await background.run(_create_schema)
        except StoreError as exc:
            try:
                if "readonly" not in exc.reason:  # only a read-only file opens degraded
                    raise
                await reads.run(_one("SELECT count(*) FROM sessions, once LIMIT 1"))
            except StoreError:
                for connection in {writes, reads, background}:
                    await connection.close()
                raise StoreError(f"cannot open SQLite store {self.path}: "
                                 f"{exc.reason}") from exc
            log.error("SQLite store %s opened read-only: %s", self.path, exc.reason)
        self._reads, self._writes, self._background = reads, writes, background

    async def close(self) -> None:
        connections = {self._reads, self._writes, self._background} - {None}
        self._reads = self._writes = self._background = None
        for connection in connections:
            assert connection is not None
            await connection.close()

    def _connection(self, which: _Connection | None) -> _Connection:
        if which is None:
            raise StoreError("the SQLite store is not open")
        return which

    async def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await self._connection(self._reads).run(work)

    async def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await self._connection(self._writes).run(work)

    async def ping(self) -> None:
        """A write (the heartbeat key), so readiness sees a store that cannot write."""
        now = self._clock()
        await self._write(_changed("INSERT OR REPLACE INTO once (key, value, expires)"
                                   " VALUES (?, ?, ?)",
                                   (Namespace.HEARTBEAT + "ping", repr(now),
                                    now + HEARTBEAT_TTL)))

    # -- sessions ------------------------------------------------------------------------

    async def put_session(self, session: StoredSession) -> None:
        s = session
        await self._write(_changed(_INSERT, (s.key, s.subject, s.logout_handle,
                                             s.principal_json, s.created, s.last_seen,
                                             s.expires, s.user_agent, s.client_ip)))

    async def get_session(self, key: str) -> StoredSession | None:
        row = await self._read(_one(_LIVE + " AND key = ?", (self._clock(), key)))
        return StoredSession(*row) if row else None

    async def touch_session(self, key: str, last_seen: float) -> None:
        await self._write(_changed("UPDATE sessions SET last_seen = ? WHERE key = ?",
                                   (last_seen, key)))

    async def delete_session(self, key: str) -> bool:
        return await self._write(_changed("DELETE FROM sessions WHERE key = ?", (key,))) > 0

    async def list_sessions(self, subject: str | None = None) -> list[StoredSession]:
        if subject is None:
            rows = await self._read(_all(_LIVE + _ORDER, (self._clock(),)))
        else:
            rows = await self._read(_all(_LIVE + " AND subject = ?" + _ORDER,
                                         (self._clock(), subject)))
        return [StoredSession(*row) for row in rows]

    async def delete_subject_sessions(self, subject: str) -> int:
        return await self._write(_changed("DELETE FROM sessions WHERE subject = ?", (subject,)))

    async def sessions_for_logout(self, logout_handle: str) -> list[StoredSession]:
        if not logout_handle:  # no handle names no session
            return []
        rows = await self._read(_all(_LIVE + " AND logout_handle = ?" + _ORDER,
                                     (self._clock(), logout_handle)))
        return [StoredSession(*row) for row in rows]

    async def count_sessions(self) -> int:
        row = await self._read(_one("SELECT count(*) FROM sessions WHERE expires > ?",
                                    (self._clock(),)))
        return int(row[0])

    async def changed_since(self, cursor: str) -> tuple[str, list[str]] | None:
        return await self._read(lambda db: _changes(db, cursor))

    # -- keys and counters ---------------------------------------------------------------

    async def add_once(self, key: str, value: str, ttl: float) -> bool:
        now = self._clock()
        # Insert, or replace a row whose time is up; a live row makes this a no-op.
        changed = await self._write(_changed(
            "INSERT INTO once (key, value, expires) VALUES (?, ?, ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value, expires = excluded.expires"
            " WHERE once.expires <= ?",
            (key, value, now + ttl, now)))
        return changed == 1

    async def take(self, key: str) -> str | None:
        row = await self._write(_one("DELETE FROM once WHERE key = ? AND expires > ?"
                                     " RETURNING value", (key, self._clock())))
        return str(row[0]) if row else None

    async def get(self, key: str) -> str | None:
        row = await self._read(_one("SELECT value FROM once WHERE key = ? AND expires > ?",
                                    (key, self._clock())))
        return str(row[0]) if row else None

    async def count(self, key: str, ttl: float) -> int:
        now = self._clock()
        # A window ends at its first hit + ttl. One that ends later than a window started
        # now could means the clock stepped back: start a new window rather than let a
        # backward step stretch this one.
        row = await self._write(_one(
            "INSERT INTO once (key, value, expires) VALUES (?, '1', ?)"
            " ON CONFLICT(key) DO UPDATE SET"
            "  value = CASE WHEN (once.expires <= ? OR once.expires > ?) THEN '1'"
            "          ELSE CAST(CAST(once.value AS INTEGER) + 1 AS TEXT) END,"
            "  expires = CASE WHEN (once.expires <= ? OR once.expires > ?)"
            "            THEN excluded.expires ELSE once.expires END"
            " RETURNING value",
            (f"count:{key}", now + ttl, now, now + ttl, now, now + ttl)))
        return int(row[0])

    async def count_keys(self, prefix: str) -> int:
        # A key range rather than LIKE, so the primary key index answers it.
        row = await self._read(_one(
            "SELECT count(*) FROM once WHERE key >= ? AND key < ? AND expires > ?",
            (prefix, prefix + "\uffff", self._clock())))
        return int(row[0])

    # -- records ---------------------------------------------------------------------------

    async def add_registration(self, registration: Registration) -> None:
        r = registration
        await self._write(_changed(f"INSERT INTO registrations ({_REGISTRATION})"  # noqa: S608
                                   " VALUES (?, ?, ?, ?, ?)",
                                   (r.email, r.registered_at, r.consent, r.subject,
                                    r.verified_at)))

    async def list_registrations(self) -> list[Registration]:
        rows = await self._read(_all(f"SELECT {_REGISTRATION} FROM registrations"  # noqa: S608
                                     " ORDER BY registered_at, rowid"))
        return [Registration(*row) for row in rows]

    async def delete_registrations(self, *, email: str = "", subject: str = "",
                                   registered_before: float | None = None
                                   ) -> list[Registration]:
        where, value = registration_criterion(email, subject, registered_before)
        column = {"email": "lower(email) = ?", "subject": "subject = ?",
                  "before": "registered_at < ?"}[where]
        rows = await self._write(_all(f"DELETE FROM registrations WHERE {column}"  # noqa: S608
                                      f" RETURNING {_REGISTRATION}", (value,)))
        return sorted((Registration(*row) for row in rows), key=lambda r: r.registered_at)

    async def put_record(self, key: str, value: str, ttl: float) -> None:
        # Expiring records share the ``once`` table: the key text is the one older
        # versions wrote, so their records stay readable.
        await self._write(_changed("INSERT OR REPLACE INTO once (key, value, expires)"
                                   " VALUES (?, ?, ?)", (key, value, self._clock() + ttl)))

    async def get_record(self, key: str) -> str | None:
        return await self.get(key)

    async def purge_expired(self) -> int:
        """In batches of ``PURGE_BATCH`` rows on the background connection (long busy
        timeout), so requests' writes get the lock between two batches. One process at a
        time (``purge-lock``, as on Redis); the others skip this round."""
        now = self._clock()
        if not await self.add_once(PURGE_LOCK, repr(now), PURGE_LOCK_SECONDS):
            return 0
        background = self._connection(self._background)
        gone = 0
        try:
            for table in ("sessions", "once"):
                while True:
                    batch = await background.run(_changed(
                        f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table}"  # noqa: S608
                        " WHERE expires <= ? LIMIT ?)", (now, PURGE_BATCH)))
                    gone += batch
                    if batch < PURGE_BATCH:
                        break
            await background.run(_changed(
                "DELETE FROM session_changes WHERE seq <="
                " (SELECT max(seq) FROM session_changes) - ?", (CHANGES_KEPT,)))
        finally:
            await self.take(PURGE_LOCK)
        return gone


#: Held (with an expiry) while one process purges, so the workers on one file take turns.
PURGE_LOCK = "purge-lock"
PURGE_LOCK_SECONDS = 120


def _changes(db: sqlite3.Connection, cursor: str) -> tuple[str, list[str]] | None:
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'session_changes'").fetchone()
    top = int(row[0]) if row else 0
    if not cursor:
        return str(top), []
    if not cursor.isdigit() or int(cursor) > top:  # another file, or one made afresh
        return None
    after = int(cursor)
    rows = db.execute("SELECT seq, key FROM session_changes WHERE seq > ? ORDER BY seq"
                      " LIMIT ?", (after, CHANGES_READ + 1)).fetchall()
    if after < top and (not rows or rows[0][0] != after + 1 or len(rows) > CHANGES_READ):
        return None  # trimmed past the cursor (sequence numbers have no gaps), or too many
    return (str(rows[-1][0]) if rows else cursor), [str(key) for _, key in rows]


def _create_schema(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("BEGIN IMMEDIATE")
    try:
        upgrade_sessions(db, SCHEMA[0])
        for statement in SCHEMA:
            db.execute(statement)
        have = {row[1] for row in db.execute("PRAGMA table_info(registrations)")}
        for column, kind in _REGISTRATION_COLUMNS:
            if column not in have:
                db.execute(f"ALTER TABLE registrations ADD COLUMN {column} {kind}")
        for statement in _REGISTRATION_INDEXES:
            db.execute(statement)
        db.execute("COMMIT")
    finally:
        if db.in_transaction:
            db.execute("ROLLBACK")
