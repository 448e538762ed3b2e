"""Registrations as CSV: the one export format, for the CLI and the admin console."""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterable

from gateway.sessions.store import Registration


def registrations_csv(registrations: Iterable[Registration]) -> str:
    """Every registration as CSV (header row, ISO times in UTC), safe to open in a
    spreadsheet: a cell that would start a formula is quoted with a leading ``'``."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["email", "registered_at", "consent", "subject", "verified_at"])
    for reg in registrations:
        # A leading = + - @ would make a spreadsheet run the cell as a formula.
        email = "'" + reg.email if reg.email[:1] in "=+-@" else reg.email
        verified = "" if reg.verified_at is None else _iso(reg.verified_at)
        writer.writerow([email, _iso(reg.registered_at), reg.consent, reg.subject, verified])
    return out.getvalue()


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")
