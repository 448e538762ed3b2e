"""``sso-gateway explain CODE``: why a login with that reference was refused, and what to do.

Part of the CLI (it prints). It reads the failure the gateway stored under the reference
the member saw (kept 30 days, in the configured store, so any replica's failures are
found) and prints the check that failed, the values it compared and advice.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from gateway.config import load_settings
from gateway.errors import StoreError
from gateway.explain import Failure, explain, find_failure
from gateway.sessions import open_store


def add_parsers(sub: argparse._SubParsersAction, config_help: str) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("explain", help="explain a failed login by its reference code")
    parser.add_argument("code", help="the reference shown to the member (e.g. 3F9A0C12)")
    parser.add_argument("--config", help=config_help)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    stores = open_store(settings.store.url, time.time, **settings.store.options())

    async def read() -> Failure | None:
        await stores.backend.open()
        try:
            return await find_failure(stores.records, args.code)
        finally:
            await stores.backend.close()

    try:
        failure = asyncio.run(read())
    except StoreError as exc:
        print(f"error: {exc.reason}", file=sys.stderr)
        return 1
    if failure is None:
        print(f"error: no login failure with reference {args.code.strip().upper()!r} "
              "(unknown, mistyped, or older than 30 days)", file=sys.stderr)
        return 1
    for line in explain(failure):
        print(line)
    return 0
