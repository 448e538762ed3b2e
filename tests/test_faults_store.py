"""Store faults over real sockets and real processes (issue 15, items 3 to 7).

Each case asserts what clients get while the store misbehaves, and that the gateway
recovers without a restart:

* another process holds the SQLite write lock for 10 s: signed-in pages and ``/healthz``
  keep answering at once; a sign-in start is 503 quickly, and works once the lock goes;
* a read-only store file (immutable, so even root cannot write it): sign-in start is 503,
  ``/readyz`` names the store; writable again, a member signs in;
* a full disk (a small tmpfs): 503 pages, never 500, pages of existing sessions still
  200; back when space returns;
* Redis at ``maxmemory`` with ``noeviction``: pages of existing sessions keep working,
  ``/readyz`` names the store, sign-in start is 503; back when memory is freed;
* 10,000 pending sign-ins expire and are purged while the gateway runs; ``/metrics``
  counts them from an index, not a scan.

The tmpfs cases mount a filesystem (root in the test container); without the permission
they are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.demo.stack import DemoStack
from gateway.sessions import open_store
from gateway.sessions.sqlite import SCHEMA
from tests.browser import client, login
from tests.conftest import RedisServer, Stack, TLSFiles, memory_sees_it, run_stack

PAGE = "/issues/2023-03/pages/14"
SESSION = "__Host-gw_session"


# -- helpers ------------------------------------------------------------------------------


def store_at(url: str, purge_interval: int | None = None) -> object:
    """A ``run_stack`` setup that points ``[store] url`` elsewhere."""
    def setup(demo: DemoStack) -> None:
        config = demo.workdir / "gateway.toml"
        text = config.read_text()
        assert 'url = "sqlite:///gateway.db"' in text
        extra = f"\npurge_interval = {purge_interval}" if purge_interval else ""
        config.write_text(text.replace('url = "sqlite:///gateway.db"', f'url = "{url}"{extra}'))

    return setup


@contextlib.contextmanager
def tmpfs(directory: Path, size: str) -> Iterator[Path]:
    directory.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(directory)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def sign_in_start(http: httpx.Client, stack: Stack) -> httpx.Response:
    return http.get(stack.url + "/saml/login", params={"idp": stack.demo.idp.entity_id})


def timed(call: object) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    answer = call()  # type: ignore[operator]
    return answer, time.monotonic() - start


def metric(http: httpx.Client, stack: Stack, name: str) -> float | None:
    text = http.get(stack.url + "/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def touch_due(db: Path) -> None:
    """Every session was last seen two minutes ago: its next page view writes a touch."""
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE sessions SET last_seen = ?", (time.time() - 120,))
    memory_sees_it()


def readiness(http: httpx.Client, stack: Stack) -> httpx.Response:
    return http.get(stack.url + "/readyz")


# -- item 3: another process holds the write lock ------------------------------------------


def test_a_write_lock_held_for_10_s_stalls_no_page(tmp_path: Path, tls: TLSFiles) -> None:
    with run_stack(tmp_path, tls) as stack, client(stack) as http:
        login(http, stack, PAGE, "alice")
        touch_due(stack.db)
        held, release = threading.Event(), threading.Event()

        def hold_the_lock() -> None:  # as an admin command, a backup or a VACUUM would
            conn = sqlite3.connect(stack.db, isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO once VALUES ('holder', '1', 1e12)")
            held.set()
            release.wait(10)
            conn.execute("COMMIT")
            conn.close()

        holder = threading.Thread(target=hold_the_lock)
        holder.start()
        assert held.wait(5)
        pages, health, starts = [], [], []
        began = time.monotonic()
        while time.monotonic() - began < 9:
            pages.append(timed(lambda: http.get(stack.url + PAGE)))
            health.append(timed(lambda: http.get(stack.url + "/healthz")))
            if len(starts) < 3:
                starts.append(timed(lambda: sign_in_start(http, stack)))
        locked_touches = metric(http, stack,
                                'gateway_best_effort_failures_total{what="touch"}')
        release.set()
        holder.join()
        after = sign_in_start(http, stack)
        page_after = http.get(stack.url + PAGE)
    assert len(pages) > 20
    assert all(a.status_code == 200 for a, _ in pages)
    assert max(t for _, t in pages) < 1.0, max(t for _, t in pages)
    assert all(a.status_code == 200 for a, _ in health)
    assert max(t for _, t in health) < 0.5, max(t for _, t in health)
    # A sign-in needs a write: 503 at once, not after seconds of a frozen event loop.
    assert [a.status_code for a, _ in starts] == [503, 503, 503]
    assert max(t for _, t in starts) < 1.0
    assert locked_touches is not None and locked_touches >= 1
    assert after.status_code == 302 and page_after.status_code == 200


# -- item 4: a store file that cannot be written -------------------------------------------


def test_a_read_only_store_file_recovers_without_restart(tmp_path: Path,
                                                         tls: TLSFiles) -> None:
    with tmpfs(tmp_path / "disk", "16m") as disk:
        db = disk / "gateway.db"
        with sqlite3.connect(db, isolation_level=None) as conn:  # a store that exists
            conn.execute("PRAGMA journal_mode=WAL")
            for statement in SCHEMA:
                conn.execute(statement)
        conn.close()
        files = [db]
        subprocess.run(["chattr", "+i", *map(str, files)], check=True)
        try:
            with (run_stack(tmp_path / "stack", tls,
                            setup=store_at(f"sqlite:///{db}")) as stack,  # type: ignore[arg-type]
                  client(stack) as http):
                assert http.get(stack.url + "/healthz").status_code == 200
                ready = readiness(http, stack)
                refused = [sign_in_start(http, stack) for _ in range(3)]
                subprocess.run(["chattr", "-i", *map(str, files)], check=True)
                login(http, stack, PAGE, "alice")
                page = http.get(stack.url + PAGE)
                ready_after = readiness(http, stack)
        finally:
            subprocess.run(["chattr", "-i", *map(str, files)], check=False)
    assert ready.status_code == 503
    assert "readonly" in ready.json()["failed"]["store"]
    assert [a.status_code for a in refused] == [503, 503, 503]
    assert all("temporarily unavailable" in a.text for a in refused)
    assert page.status_code == 200
    assert ready_after.status_code == 200, ready_after.text


# -- item 6: a full disk --------------------------------------------------------------------


def fill(disk: Path) -> Path:
    """Take every free block of ``disk`` with one file."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as out:
        for block in (65536, 512):
            with contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * block)
    return filler


def test_a_full_disk_answers_503_never_500_and_recovers(tmp_path: Path,
                                                        tls: TLSFiles) -> None:
    with tmpfs(tmp_path / "disk", "4m") as disk:
        db = disk / "gateway.db"
        with (run_stack(tmp_path / "stack", tls,
                        setup=store_at(f"sqlite:///{db}")) as stack,  # type: ignore[arg-type]
              client(stack) as http):
            login(http, stack, PAGE, "alice")
            member = dict(http.cookies)
            touch_due(db)
            filler = fill(disk)
            answers = []
            for _ in range(300):  # the WAL reuses its space for a while: write until full
                answers.append(sign_in_start(http, stack))
                if answers[-1].status_code == 503:
                    break
            more = [sign_in_start(http, stack) for _ in range(5)]
            http.cookies.clear()
            http.cookies.update(member)
            pages = [http.get(stack.url + PAGE) for _ in range(5)]
            ready = readiness(http, stack)
            filler.unlink()
            http.cookies.clear()
            login(http, stack, PAGE, "alice")
            back = http.get(stack.url + PAGE)
            ready_after = readiness(http, stack)
    statuses = [a.status_code for a in answers + more]
    assert 500 not in statuses
    assert set(statuses) <= {302, 503}, statuses
    assert [a.status_code for a in more] == [503] * 5
    assert all("temporarily unavailable" in a.text for a in more)
    assert [p.status_code for p in pages] == [200] * 5
    assert ready.status_code == 503 and "full" in ready.json()["failed"]["store"]
    assert back.status_code == 200 and ready_after.status_code == 200


# -- item 5: Redis at maxmemory with noeviction --------------------------------------------


@pytest.fixture
def small_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of its own with 2 MB of memory and no eviction: full means full."""
    server = RedisServer(tmp_path_factory.mktemp("small-redis")).start()
    try:
        for name, value in (("maxmemory", "2mb"), ("maxmemory-policy", "noeviction")):
            assert server.command("CONFIG", "SET", name, value).startswith(b"+OK")
        yield server
    finally:
        server.stop()


def redis_info(redis: RedisServer, field: str) -> int:
    reply = redis.command("INFO", "memory").decode()
    match = re.search(rf"^{field}:(\d+)", reply, re.M)
    assert match is not None, reply[:500]
    return int(match.group(1))


def test_a_full_redis_keeps_serving_signed_in_pages(tmp_path: Path, tls: TLSFiles,
                                                    small_redis: RedisServer) -> None:
    with (run_stack(tmp_path, tls, setup=store_at(small_redis.url)) as stack,  # type: ignore[arg-type]
          client(stack) as http):
        login(http, stack, PAGE, "alice")
        keys = re.findall(rb"gw:session:[0-9a-f]+", small_redis.command("KEYS", "gw:session:*"))
        assert len(keys) == 1
        small_redis.command("HSET", keys[0].decode(), "last_seen", repr(time.time() - 120))
        free = 2 * 1024 * 1024 - redis_info(small_redis, "used_memory")
        assert small_redis.command("SETRANGE", "filler", str(max(free, 1)), "x").startswith(b":")
        assert small_redis.command("SET", "one-more", "x" * 65536).startswith(b"-OOM")
        pages = [http.get(stack.url + PAGE) for _ in range(20)]
        touches = metric(http, stack, 'gateway_best_effort_failures_total{what="touch"}')
        ready = readiness(http, stack)
        start = sign_in_start(http, stack)
        small_redis.command("DEL", "filler")
        ready_after = readiness(http, stack)
        start_after = sign_in_start(http, stack)
    assert [p.status_code for p in pages] == [200] * 20
    assert touches is not None and touches >= 1
    assert ready.status_code == 503 and "maxmemory" in ready.json()["failed"]["store"]
    assert start.status_code == 503 and "temporarily unavailable" in start.text
    assert ready_after.status_code == 200 and start_after.status_code == 302


# -- item 7: 10,000 pending sign-ins expire and are purged ----------------------------------


PENDING = 10_000


def add_pending(url: str, ttl: float) -> None:
    """``PENDING`` pending sign-ins, written as the gateway writes them (its store class)."""
    async def add() -> None:
        stores = open_store(url, time.time)
        await stores.backend.open()
        try:
            for i in range(PENDING):
                assert await stores.keys.add_once(f"authn:load-{i}", '{"next": "/"}', ttl)
        finally:
            await stores.backend.close()

    asyncio.run(add())


def pending_gauge(http: httpx.Client, stack: Stack) -> tuple[float | None, float]:
    start = time.monotonic()
    value = metric(http, stack, "gateway_login_requests_outstanding")
    return value, time.monotonic() - start


def test_10000_pending_sign_ins_expire_and_are_purged_on_sqlite(tmp_path: Path,
                                                                tls: TLSFiles) -> None:
    db = tmp_path / "store" / "gateway.db"
    with (run_stack(tmp_path / "stack", tls,
                    setup=store_at(f"sqlite:///{db}", purge_interval=1)) as stack,  # type: ignore[arg-type]
          client(stack) as http):
        add_pending(f"sqlite:///{db}", ttl=4)
        counted, took = pending_gauge(http, stack)
        deadline = time.monotonic() + 20
        while True:
            with sqlite3.connect(db) as conn:
                left = conn.execute("SELECT count(*) FROM once WHERE key LIKE 'authn:%'"
                                    ).fetchone()[0]
            if left == 0:
                break
            assert time.monotonic() < deadline, left
            time.sleep(0.2)
        after, _ = pending_gauge(http, stack)
        assert sign_in_start(http, stack).status_code == 302
    assert counted == PENDING and took < 1.0
    assert after == 0


def test_10000_pending_sign_ins_on_redis_are_counted_without_a_scan(
        tmp_path: Path, tls: TLSFiles, redis_server: RedisServer) -> None:
    redis_server.command("FLUSHALL")
    with (run_stack(tmp_path, tls,
                    setup=store_at(redis_server.url, purge_interval=1)) as stack,  # type: ignore[arg-type]
          client(stack) as http):
        add_pending(redis_server.url, ttl=4)
        counted, took = pending_gauge(http, stack)
        deadline = time.monotonic() + 20
        while True:
            left = redis_server.command("ZCARD", "gw:index:authn:")
            keys = redis_server.command("EVAL", "return #redis.call('KEYS', ARGV[1])", "0",
                                        "gw:once:authn:*")
            if left == b":0\r\n" and keys == b":0\r\n":
                break
            assert time.monotonic() < deadline, (left, keys)
            time.sleep(0.2)
        after, _ = pending_gauge(http, stack)
        assert sign_in_start(http, stack).status_code == 302
        now, _ = pending_gauge(http, stack)
    assert counted == PENDING and took < 0.5, (counted, took)
    assert after == 0 and now == 1
