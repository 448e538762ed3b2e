"""``sso-gateway sessions …`` and ``registrations …``: admin commands on the store.

Part of the CLI (it prints); they work while the gateway runs, because the gateway
reads the store on every request: a revoked session's next request is anonymous.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
from collections.abc import Awaitable, Callable

from gateway.config import load_settings
from gateway.errors import StoreError
from gateway.routes.admin import registrations_csv
from gateway.sessions import SessionRecord, Store, open_store
from gateway.sessions.manager import HANDLE_LENGTH


def add_parsers(sub: argparse._SubParsersAction, config_help: str) -> None:  # type: ignore[type-arg]
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help=config_help)
    sessions = sub.add_parser("sessions", help="list, revoke and purge sessions")
    verbs = sessions.add_subparsers(dest="sessions_command", required=True)
    listing = verbs.add_parser("list", parents=[common], help="active sessions (oldest first)")
    listing.add_argument("--member", help="only this member's sessions")
    revoke = verbs.add_parser("revoke", parents=[common], help="end sessions now")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("session", nargs="?", help="a session key as `sessions list` shows it")
    which.add_argument("--member", help="every session of this member")
    which.add_argument("--all", action="store_true", help="every session")
    verbs.add_parser("purge-expired", parents=[common],
                     help="delete expired sessions and single-use keys")
    registrations = sub.add_parser("registrations", help="registered readers")
    reg_verbs = registrations.add_subparsers(dest="registrations_command", required=True)
    reg_verbs.add_parser("export", parents=[common],
                         help="write every registration as CSV to stdout")


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    store = open_store(settings.store.url, _now, **settings.store.options())
    if args.command == "registrations":
        return _with_store(store, lambda: _export(store))
    verb = args.sessions_command
    if verb == "list":
        return _with_store(store, lambda: _list(store, args.member))
    if verb == "purge-expired":
        return _with_store(store, lambda: _purge(store))
    return _with_store(store, lambda: _revoke(store, args.session, args.member, args.all))


def _now() -> float:
    return dt.datetime.now(dt.UTC).timestamp()


def _with_store(store: Store, action: Callable[[], Awaitable[int]]) -> int:
    async def go() -> int:
        await store.open()
        try:
            return await action()
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    except StoreError as exc:
        print(f"error: {exc.reason}", file=sys.stderr)
        return 1


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _row(record: SessionRecord) -> str:
    p = record.principal
    return (f"{record.key[:16]}  {p.member_id:<12} {p.kind:<10} started {_when(record.created)}"
            f"  last seen {_when(record.last_seen)}  {record.client_ip or '-'}")


async def _list(store: Store, member: str | None) -> int:
    records = await store.list_sessions(member)
    for record in records:
        print(_row(record))
    print(f"{len(records)} session(s)")
    return 0


async def _revoke(store: Store, key: str | None, member: str | None, everyone: bool) -> int:
    if member is not None:
        print(f"revoked {await store.delete_member_sessions(member)} session(s) of {member}")
        return 0
    records = await store.list_sessions()
    if everyone:
        chosen = records
    else:
        assert key is not None
        chosen = [r for r in records if len(key) >= HANDLE_LENGTH and r.key.startswith(key)]
        if not chosen:
            print(f"error: no active session {key!r}", file=sys.stderr)
            return 1
    for record in chosen:
        await store.delete_session(record.key)
    print(f"revoked {len(chosen)} session(s)")
    return 0


async def _purge(store: Store) -> int:
    print(f"purged {await store.purge_expired()} expired entries")
    return 0


async def _export(store: Store) -> int:
    sys.stdout.write(registrations_csv(await store.list_registrations()))
    return 0
