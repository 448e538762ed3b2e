"""Member notes: private notes about a page, stored per member.

Every query names the member: a note is found only under the member who wrote
it, so another member's note ID simply does not exist for you (404, never 403,
which would confirm that the ID is real).
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_TEXT = 2000


@dataclass(frozen=True)
class Note:
    id: str
    member_id: str
    ref: str  # the path of the page the note is about
    title: str  # that page's title when the note was written
    text: str
    created: float
    updated: float

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "ref": self.ref, "title": self.title, "text": self.text,
                "created": self.created, "updated": self.updated,
                "url": f"/members/{self.member_id}/notes/{self.id}"}


def clean_text(value: object) -> tuple[str, str | None]:
    """The note text, stripped, and an error message if it is not acceptable."""
    if not isinstance(value, str):
        return "", "Write your note as text."
    text = value.strip().replace("\r\n", "\n")
    if not text:
        return text, "Write something in the note first."
    if len(text) > MAX_TEXT:
        return text, f"A note can be at most {MAX_TEXT} characters long."
    return text, None


class NoteStore:
    def __init__(self, db: sqlite3.Connection, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock

    @staticmethod
    def _note(row: sqlite3.Row | None) -> Note | None:
        return None if row is None else Note(**dict(row))

    def create(self, member_id: str, ref: str, title: str, text: str) -> Note:
        now = self._clock()
        note = Note(secrets.token_hex(8), member_id, ref, title, text, now, now)
        self._db.execute(
            "INSERT INTO notes (id, member_id, ref, title, text, created, updated) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (note.id, member_id, ref, title, text, now, now))
        return note

    def for_member(self, member_id: str) -> list[Note]:
        rows = self._db.execute(
            "SELECT * FROM notes WHERE member_id = ? ORDER BY created, id", (member_id,))
        return [Note(**dict(row)) for row in rows]

    def get(self, member_id: str, note_id: str) -> Note | None:
        row = self._db.execute("SELECT * FROM notes WHERE member_id = ? AND id = ?",
                               (member_id, note_id)).fetchone()
        return self._note(row)

    def update(self, member_id: str, note_id: str, text: str) -> Note | None:
        self._db.execute("UPDATE notes SET text = ?, updated = ? WHERE member_id = ? AND id = ?",
                         (text, self._clock(), member_id, note_id))
        return self.get(member_id, note_id)

    def delete(self, member_id: str, note_id: str) -> bool:
        cursor = self._db.execute("DELETE FROM notes WHERE member_id = ? AND id = ?",
                                  (member_id, note_id))
        return cursor.rowcount > 0
