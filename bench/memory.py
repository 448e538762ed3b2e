"""Memory: what 10,000 stored sessions cost in each store, and in the gateway process."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp
from redis.asyncio import Redis

from bench.servers import Proc, free_port, wait_for_port
from gateway.demo.stack import DemoStack
from gateway.principal import Principal
from gateway.sessions import CookieSigner, SessionManager, Stores, open_store

SESSIONS = 10_000


def _principal(i: int) -> Principal:
    return Principal(
        subject=f"M{100000 + i}", idp="http://127.0.0.1/metadata", protocol="saml",
        attributes={"member_id": (f"M{100000 + i}",),
                    "email": (f"member{i}@members.example.org",),
                    "display_name": (f"Member Number {i}",),
                    "entitlements": ("urn:mace:example.org:entitlement:member",),
                    "status": ("active",)},
        logout_handle=secrets.token_hex(32), authn_instant=time.time(),
        protocol_data={"name_id": secrets.token_hex(20),
                       "session_index": "_" + secrets.token_hex(20),
                       "name_id_format": "urn:oasis:names:tc:SAML:2.0:nameid-format:persistent"})


async def _fill(stores: Stores, count: int, secrets_: list[str] | None = None) -> list[str]:
    """Store ``count`` sessions the way sign-ins do; returns their signed cookie values."""
    manager = SessionManager(stores.sessions, CookieSigner(secrets_ or ["bench" * 9], "session"),
                             lifetime=8 * 3600, idle_timeout=3600, clock=time.time)
    cookies = []
    for i in range(count):
        _, cookie = await manager.create(_principal(i), user_agent="Mozilla/5.0 (X11; Linux) bench",
                                         client_ip="127.0.0.1")
        cookies.append(cookie)
    return cookies


async def _sqlite_bytes(path: Path) -> int:
    stores = open_store(f"sqlite://{path}", time.time)
    await stores.backend.open()
    await _fill(stores, SESSIONS)
    await stores.backend.close()  # checkpoints the WAL into the file
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


async def _redis_bytes(port: int) -> int:
    client = Redis(host="127.0.0.1", port=port)
    before = int((await client.info("memory"))["used_memory"])
    stores = open_store(f"redis://127.0.0.1:{port}/0", time.time)
    await stores.backend.open()
    await _fill(stores, SESSIONS)
    await stores.backend.close()
    after = int((await client.info("memory"))["used_memory"])
    await client.aclose()
    return after - before


def store_memory(workdir: Path) -> dict[str, object]:
    """Bytes per 10,000 sessions: SQLite file size; Redis ``used_memory`` growth."""
    out: dict[str, object] = {
        "sqlite_file_bytes_per_10k": asyncio.run(_sqlite_bytes(workdir / "mem" / "s.db"))}
    server = shutil.which("redis-server")
    if server is None:
        out["redis_note"] = "redis-server not installed: Redis not measured"
        return out
    port = free_port()
    redis = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL)
    proc = Proc("redis", redis, port)
    try:
        wait_for_port(port, redis)
        out["redis_used_memory_bytes_per_10k"] = asyncio.run(_redis_bytes(port))
    finally:
        proc.stop()
    return out


async def _use_sessions(stack: DemoStack, url: str, count: int) -> int:
    """Put ``count`` sessions into the gateway's own store and make one request with each."""
    stores = open_store(stack.settings.store.url, time.time)
    await stores.backend.open()
    signed = await _fill(stores, count, stack.settings.session_secrets())
    await stores.backend.close()
    cookies = [f"{stack.settings.session.cookie_name}={value}" for value in signed]
    failures = 0

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal failures
        while cookies:
            async with http.get(url, headers={"Cookie": cookies.pop()}) as resp:
                await resp.read()
                failures += resp.status != 200

    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        await asyncio.gather(*(worker(http) for _ in range(32)))
    return failures


def gateway_sessions_rss(stack: DemoStack, gateway: Proc, url: str) -> int:
    """Growth of the gateway's RSS after 10,000 distinct sessions each made a request."""
    before = gateway.rss_bytes()
    failures = asyncio.run(_use_sessions(stack, url, SESSIONS))
    if failures:
        raise RuntimeError(f"{failures} requests with stored sessions failed")
    return gateway.rss_bytes() - before
