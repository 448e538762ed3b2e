"""``sso-gateway sessions …`` and ``registrations …``: admin commands on the store.

``registrations delete EMAIL`` erases an address's registrations and ends their
sessions through the registration flow, exactly as the console's action does.

Part of the CLI (it prints); they work while the gateway runs, because the gateway
reads the store on every request: a revoked session's next request is anonymous.
Sessions are picked by subject (``--member`` is kept as another name for ``--subject``)
or by the session tag ``sessions list`` shows — the same 12-hex tag the logs, the audit
log and the admin console use (``logs.session_hash``) — and ended through the
``SessionManager``. Every change and every export is written to the audit log like the
console's, with ``by="cli:<operating-system user>"``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from gateway.audit import audit, configure_audit
from gateway.audit import log as audit_log
from gateway.config import Settings, load_settings
from gateway.errors import StoreError
from gateway.flows.registration import RegistrationFlow
from gateway.logs import StdStream, session_hash
from gateway.sessions import (
    Backend,
    CookieSigner,
    RecordStore,
    SessionManager,
    SessionRecord,
    Stores,
    open_store,
)
from gateway.sessions.export import registrations_csv
from gateway.sessions.manager import HANDLE_LENGTH


def add_parsers(sub: argparse._SubParsersAction, config_help: str) -> None:  # type: ignore[type-arg]
    """The ``sessions`` and ``registrations`` commands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help=config_help)
    sessions = sub.add_parser("sessions", help="list, revoke and purge sessions")
    verbs = sessions.add_subparsers(dest="sessions_command", required=True)
    listing = verbs.add_parser("list", parents=[common], help="active sessions (oldest first)")
    listing.add_argument("--subject", "--member", dest="subject", metavar="SUBJECT",
                         help="only this subject's sessions (as `sessions list` shows it)")
    revoke = verbs.add_parser("revoke", parents=[common], help="end sessions now")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("session", nargs="?",
                       help="a session tag (12 hex digits) as `sessions list`, the logs and "
                            "the admin console show it")
    which.add_argument("--subject", "--member", dest="subject", metavar="SUBJECT",
                       help="every session of this subject")
    which.add_argument("--all", action="store_true", help="every session")
    verbs.add_parser("purge-expired", parents=[common],
                     help="delete expired sessions and single-use keys")
    registrations = sub.add_parser("registrations", help="registered readers")
    reg_verbs = registrations.add_subparsers(dest="registrations_command", required=True)
    reg_verbs.add_parser("export", parents=[common],
                         help="write every registration as CSV to stdout")
    delete = reg_verbs.add_parser("delete", parents=[common],
                                  help="erase every registration of an e-mail address and "
                                       "end its sessions")
    delete.add_argument("email", metavar="EMAIL", help="the address (compared in any case)")
    reg_verbs.add_parser("purge-expired", parents=[common],
                         help="delete the registrations older than [registration] "
                              "retention_days, ending their sessions")


def run(args: argparse.Namespace) -> int:
    """Run one ``sessions`` or ``registrations`` command; the exit status."""
    settings = load_settings(args.config)
    _audit_to(settings)
    stores = open_store(settings.store.url, _now, **settings.store.options())
    if args.command == "registrations":
        flow = RegistrationFlow(settings, stores.records, stores.keys,
                                _manager(settings, stores), _now)
        if args.registrations_command == "delete":
            return _with_store(stores.backend, lambda: _delete(flow, args.email))
        if args.registrations_command == "purge-expired":
            return _with_store(stores.backend, lambda: _purge_registrations(flow))
        return _with_store(stores.backend, lambda: _export(stores.records))
    verb = args.sessions_command
    if verb == "purge-expired":
        return _with_store(stores.backend, lambda: _purge(stores.backend))
    sessions = _manager(settings, stores)
    if verb == "list":
        return _with_store(stores.backend, lambda: _list(sessions, args.subject))
    return _with_store(stores.backend,
                       lambda: _revoke(sessions, args.session, args.subject, args.all))


def operator() -> str:
    """Who ran the command, for the audit log's ``by``: ``cli:<operating-system user>``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (some containers)
        user = f"uid{os.getuid()}"
    return f"cli:{user}"


def _audit_to(settings: Settings) -> None:
    """Audit lines go where the gateway writes them; to stderr when that is stdout, so
    they never mix with a command's own output (the CSV of ``registrations export``)."""
    configure_audit(settings.logging.audit, Path(settings.source).parent)
    if settings.logging.audit == "stdout":
        for old in list(audit_log.handlers):
            audit_log.removeHandler(old)
        handler = StdStream("stderr")
        handler.setFormatter(logging.Formatter("%(message)s"))
        audit_log.addHandler(handler)


def _now() -> float:
    return dt.datetime.now(dt.UTC).timestamp()


def _manager(settings: Settings, stores: Stores) -> SessionManager:
    """The gateway's session manager over the configured store: the CLI ends sessions
    the way the gateway does."""
    return SessionManager(stores.sessions, CookieSigner(settings.session_secrets(), "session"),
                          lifetime=settings.session.lifetime,
                          idle_timeout=settings.session.idle_timeout, clock=_now)


def _with_store(backend: Backend, action: Callable[[], Awaitable[int]]) -> int:
    async def go() -> int:
        await backend.open()
        try:
            return await action()
        finally:
            await backend.close()

    try:
        return asyncio.run(go())
    except StoreError as exc:
        print(f"error: {exc.reason}", file=sys.stderr)
        return 1


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _row(record: SessionRecord) -> str:
    p = record.principal
    return (f"{session_hash(record.key)}  {p.subject:<12}  idp {p.idp or '-'}"
            f"  name {p.display_name or '-'}  address {record.client_ip or '-'}"
            f"  started {_when(record.created)}  last seen {_when(record.last_seen)}")


def _picks(record: SessionRecord, reference: str) -> bool:
    """Whether ``reference`` names this session: its tag (12 hex digits, as the logs,
    audit log and console show it) or, from older versions' listings, its 16-character
    handle."""
    reference = reference.strip().lower()
    if len(reference) == HANDLE_LENGTH:
        return record.handle == reference
    return session_hash(record.key) == reference


async def _list(sessions: SessionManager, subject: str | None) -> int:
    records = await sessions.sessions(subject)
    for record in records:
        print(_row(record))
    print(f"{len(records)} session(s)")
    return 0


async def _revoke(sessions: SessionManager, handle: str | None, subject: str | None,
                  everyone: bool) -> int:
    by = operator()
    if subject is not None:
        ended = await sessions.end_subject_sessions(subject)
        audit("session_revoked", by=by, subject=subject, sessions_ended=ended, scope="all")
        print(f"revoked {ended} session(s) of {subject}")
        return 0
    records = await sessions.sessions()
    if not everyone:
        assert handle is not None
        records = [r for r in records if _picks(r, handle)]
        if not records:
            print(f"error: no active session {handle!r}", file=sys.stderr)
            return 1
    total = 0
    for record in records:
        ended = int(await sessions.end(record.key))
        total += ended
        audit("session_revoked", by=by, subject=record.principal.subject,
              sessions_ended=ended, scope="everyone" if everyone else "one",
              session=session_hash(record.key))
    print(f"revoked {total} session(s)")
    return 0


async def _purge(backend: Backend) -> int:
    print(f"purged {await backend.purge_expired()} expired entries")
    return 0


async def _delete(flow: RegistrationFlow, email: str) -> int:
    erased = await flow.erase(email, by=operator())
    if not erased.registrations and not erased.sessions_ended:
        print(f"error: no registration of {email!r}", file=sys.stderr)
        return 1
    print(f"deleted {erased.registrations} registration(s) of {email}, "
          f"ended {erased.sessions_ended} session(s)")
    return 0


async def _purge_registrations(flow: RegistrationFlow) -> int:
    print(f"deleted {await flow.purge_expired()} registration(s) past their retention")
    return 0


async def _export(records: RecordStore) -> int:
    registrations = await records.list_registrations()
    sys.stdout.write(registrations_csv(registrations))
    audit("registrations_exported", by=operator(), count=len(registrations))
    return 0
