"""The audit log: security events, one JSON object per line, in a documented schema.

Any module records an event with ``audit(event, **fields)``::

    from gateway.audit import audit
    audit("slo_in", idp=entity_id, sessions_ended=2, result="logout_request")

The line gets ``schema``, ``event``, ``time`` (UTC, ISO 8601) and, while a request is
being served, its ``request_id`` and ``client_ip``. ``EVENTS`` below is the schema (also
in docs/operations.md); a change that breaks readers of old lines bumps ``SCHEMA_ID``.

The stream is separate from the ordinary logs (logger ``gateway.audit``, not propagated)
and goes to stdout or an append-only file (``[logging] audit``). Values that work as
credentials never go in: no cookies, SAML messages, tokens or session keys — sessions
appear as ``session`` = ``logs.session_hash(key)``. Field names that suggest a secret
are dropped on the way in, so a careless caller cannot leak one. Whoever an event is
about is named by ``subject`` (unique across IdPs), with the ``member_id`` the IdP
asserted when there is one.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

from gateway.logs import StdStream, current, utc_now

SCHEMA_ID = "sso-gateway.audit/2"  # /2: people are named by ``subject``
log = logging.getLogger("gateway.audit")
log.propagate = False
log.setLevel(logging.INFO)

Fields = dict[str, type | tuple[type, ...]]
#: Every field every line has, then per event: (required fields, optional fields).
COMMON: Fields = {"schema": str, "event": str, "time": str}
COMMON_OPTIONAL: Fields = {"request_id": str, "client_ip": str}
EVENTS: dict[str, tuple[Fields, Fields]] = {
    "login_success": ({"idp": str, "subject": str, "session": str},
                      {"member_id": str, "protocol": str}),
    "login_failure": ({"reference": str, "kind": str, "reason": str, "idp": str}, {}),
    "logout": ({"subject": str, "session": str}, {"member_id": str, "idp": str}),
    "slo_in": ({"idp": str}, {"sessions_ended": int, "result": str}),
    "slo_out": ({"idp": str, "subject": str}, {"member_id": str, "session": str,
                                                "result": str}),
    "session_revoked": ({"by": str, "subject": str, "sessions_ended": int, "scope": str},
                        {"session": str}),
    "access_denied": ({"subject": str, "session": str, "path": str, "rule": str,
                       "reason": str}, {"member_id": str, "failed": str}),
    "registration": ({"subject": str}, {"mail_sent": bool, "consent": str}),
    "registrations_exported": ({"by": str, "count": int}, {}),
    "registration_verified": ({"subject": str}, {"session": str}),
    "registration_deleted": ({"by": str, "subject": str, "sessions_ended": int}, {}),
    "registration_purged": ({"subject": str, "sessions_ended": int}, {}),
    "config_reload": ({"trigger": str, "config": str, "config_sha256": str},
                      {"version": str, "result": str, "reason": str}),
    "metadata_change": ({"change": str, "entity_id": str, "source": str},
                        {"sha256": str, "idps": int, "added": int, "removed": int,
                         "updated": int}),
    "step_up": ({"subject": str, "session": str, "replaced": str}, {"authn_context": str}),
}
_FORBIDDEN = ("cookie", "samlresponse", "samlrequest", "token", "password", "secret",
              "assertion")


def audit(event: str, **fields: Any) -> None:
    """Write one audit line. ``None`` values are left out; unknown events are still
    written (and warned about), so a typo never loses an event."""
    line: dict[str, Any] = {"schema": SCHEMA_ID, "event": event, "time": utc_now()}
    ctx = current()
    if ctx is not None:
        line["request_id"] = ctx.request_id
        if ctx.client:
            line["client_ip"] = ctx.client
    for key, value in fields.items():
        if value is None:
            continue
        if any(word in key.lower() for word in _FORBIDDEN):
            logging.getLogger("gateway").warning("audit %s: field %r dropped", event, key)
            continue
        line[key] = value
    if event not in EVENTS:
        logging.getLogger("gateway").warning("audit: unknown event %r", event)
    log.info(json.dumps(line, default=str, separators=(",", ":")))


def validate(line: dict[str, Any]) -> list[str]:
    """Every way ``line`` departs from the schema; an empty list means it conforms."""
    problems = []
    if line.get("schema") != SCHEMA_ID:
        problems.append(f"schema is {line.get('schema')!r}, expected {SCHEMA_ID!r}")
    event = line.get("event")
    if event not in EVENTS:
        return [*problems, f"unknown event {event!r}"]
    required, optional = EVENTS[event]
    expected = {**COMMON, **required}
    allowed = {**expected, **COMMON_OPTIONAL, **optional}
    for key in expected:
        if key not in line:
            problems.append(f"{event}: missing {key!r}")
    for key, value in line.items():
        kind = allowed.get(key)
        if kind is None:
            problems.append(f"{event}: unexpected field {key!r}")
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            problems.append(f"{event}: {key!r} is {type(value).__name__}, not {kind}")
    try:
        when = dt.datetime.fromisoformat(str(line.get("time")).replace("Z", "+00:00"))
        if when.utcoffset() != dt.timedelta(0):
            problems.append(f"{event}: time is not UTC")
    except ValueError:
        problems.append(f"{event}: time {line.get('time')!r} is not ISO 8601")
    return problems


def json_schema() -> dict[str, Any]:
    """The schema as JSON Schema (draft 2020-12), for readers in other languages."""
    names = {str: "string", int: "integer", bool: "boolean"}

    def props(fields: Fields) -> dict[str, Any]:
        return {k: {"type": names.get(v, "string")} for k, v in fields.items()
                if isinstance(v, type)}

    variants = []
    for event, (required, optional) in EVENTS.items():
        variants.append({
            "type": "object", "additionalProperties": False,
            "required": [*COMMON, *required],
            "properties": {**props(COMMON), **props(COMMON_OPTIONAL), **props(required),
                           **props(optional), "schema": {"const": SCHEMA_ID},
                           "event": {"const": event}},
        })
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            "oneOf": variants}


def configure_audit(destination: str, base: Path | None = None) -> None:
    """Send audit lines to ``stdout`` or append them to a file (relative to ``base``).
    The same destination again (a reload) keeps its handler: a line written meanwhile,
    from another thread, never meets a closed file."""
    target = destination
    if destination != "stdout":
        path = Path(destination).expanduser()
        if not path.is_absolute() and base is not None:
            path = base / path
        target = str(path)
    if getattr(log, "audit_target", None) == target and log.handlers:
        return
    handler: logging.Handler
    if destination == "stdout":
        handler = StdStream("stdout")
    else:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(target, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    old_handlers = list(log.handlers)
    log.addHandler(handler)
    for old in old_handlers:  # the new one is in place before the old ones go
        log.removeHandler(old)
        old.close()
    log.audit_target = target  # type: ignore[attr-defined]
