"""Upgrade of a SQLite store file written before sessions were indexed by subject.

Older versions kept a session's member number, IdP and protocol name ID in columns and
the principal as fixed fields (member number, e-mail, name, entitlements, status, plus
the sign-in protocol's own fields). ``upgrade_sessions`` rewrites such a table into
today's shape when the store is opened, so nobody is signed out by an upgrade. Delete
this module once no store file from before the change can be around (sessions last
hours, so one release later is enough).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Mapping
from typing import Any

from gateway.principal import ROLES, Principal

log = logging.getLogger("gateway.store")


# Sessions from before the login-protocol seam name no protocol; the one protocol of that
# version recognises them by their protocol data (see its ``owns``).
LEGACY_PROTOCOL = ""
# Fields of the old principal that keep their meaning; every other non-empty field that
# is not a role belonged to the sign-in protocol and moves to ``protocol_data``.
_COMMON = frozenset({"idp", "kind", "authn_instant", "session_not_on_or_after"})


def upgrade_sessions(db: sqlite3.Connection, create_table: str) -> int:
    """Rewrite an old-style ``sessions`` table in place; returns how many sessions moved.

    Runs inside the caller's transaction (the store's ``open``), so the upgrade happens
    whole or not at all, and a second process opening the file meanwhile waits and then
    finds the new table. ``create_table`` is the statement that makes today's table. The
    subject of an old session is its member number (what identified it then); it gets no
    logout handle. A row whose principal cannot be read is dropped: it could not be used.
    """
    columns = {row[1] for row in db.execute("PRAGMA table_info(sessions)")}
    if "member_id" not in columns:
        return 0
    db.execute("ALTER TABLE sessions RENAME TO sessions_before_upgrade")
    db.execute(create_table)
    rows = db.execute("SELECT key, principal, created, last_seen, expires, user_agent,"
                      " client_ip FROM sessions_before_upgrade").fetchall()
    moved = 0
    for key, text, created, last_seen, expires, user_agent, client_ip in rows:
        try:
            principal = legacy_principal(json.loads(text))
        except (ValueError, TypeError, KeyError, AttributeError):
            continue
        db.execute("INSERT INTO sessions (key, subject, logout_handle, principal, created,"
                   " last_seen, expires, user_agent, client_ip) VALUES (?,?,?,?,?,?,?,?,?)",
                   (key, principal.subject, principal.logout_handle,
                    json.dumps(principal.to_dict(), sort_keys=True), created, last_seen,
                    expires, user_agent, client_ip))
        moved += 1
    db.execute("DROP TABLE sessions_before_upgrade")
    log.warning("session store upgraded: %d session(s) moved to the new table, %d unreadable "
                "dropped", moved, len(rows) - moved)
    return moved


def legacy_principal(old: Mapping[str, Any]) -> Principal:
    """Today's ``Principal`` for a principal stored by an older version (fixed fields)."""
    attributes: dict[str, tuple[str, ...]] = {}
    for name in ROLES:
        raw = old.get(name)
        values = raw if isinstance(raw, list | tuple) else [raw]
        kept = tuple(str(v) for v in values if v not in (None, ""))
        if kept:
            attributes[name] = kept
    member = old.get("kind") != "registered"
    protocol_data = {str(k): str(v) for k, v in old.items()
                     if k not in ROLES and k not in _COMMON and v not in (None, "")}
    until = old.get("session_not_on_or_after")
    return Principal(
        subject=str(old["member_id"]), idp=str(old.get("idp") or ""), attributes=attributes,
        kind="member" if member else "registered",
        protocol=LEGACY_PROTOCOL,
        authn_instant=float(old.get("authn_instant") or 0.0),
        session_not_on_or_after=None if until is None else float(until),
        protocol_data=protocol_data)
