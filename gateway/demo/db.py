"""The reader's SQLite database: one file in ``data_dir``, or in memory for a throwaway reader.

The reader's handlers run on one event loop and every statement is short, so a
single connection is shared; ``check_same_thread`` is off only because the
connection is created before uvicorn's loop starts.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS notes (
    id TEXT PRIMARY KEY,
    member_id TEXT NOT NULL,
    ref TEXT NOT NULL,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS notes_member ON notes (member_id, created);
CREATE TABLE IF NOT EXISTS orders (
    id TEXT PRIMARY KEY,
    member_id TEXT NOT NULL,
    created REAL NOT NULL,
    total INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_member ON orders (member_id, created);
"""


def open_database(data_dir: Path | None) -> sqlite3.Connection:
    if data_dir is None:
        target = ":memory:"
    else:
        data_dir.mkdir(parents=True, exist_ok=True)
        target = str(data_dir / "reader.db")
    db = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
    db.row_factory = sqlite3.Row
    db.executescript(_SCHEMA)
    return db
