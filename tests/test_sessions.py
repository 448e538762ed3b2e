"""Sessions: the Store contract (run against every backend), cookie signing, lifetimes.

``StoreContract`` is the conformance suite: a backend's test class subclasses it
and provides ``store`` and ``twin`` (a second instance on the same data, as a
second process or replica has) fixtures; SQLite and a real redis-server both run
it. Time is a ``FakeClock``; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.errors import StoreError
from gateway.principal import Principal
from gateway.sessions import CookieSigner, SessionManager, SessionRecord, Store, open_store
from gateway.sessions.redis import RedisStore, parse_sentinel_url
from gateway.sessions.store import Registration, session_key
from tests.conftest import REDIS_SERVER, RedisServer, bound_socket, port_of

SECRET_A = "a" * 40
SECRET_B = "b" * 40


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def alice(**changes: object) -> Principal:
    values: dict[str, object] = {"member_id": "M1001", "idp": "https://idp", "name_id": "n1",
                                 "email": "alice@example.org", "entitlements": ("e1", "e2")}
    values.update(changes)
    return Principal(**values)  # type: ignore[arg-type]


class StoreContract:
    """What every ``Store`` backend must do."""

    clock: FakeClock

    async def test_session_round_trip(self, store: Store) -> None:
        now = self.clock()
        record = SessionRecord("k1", alice(), now, now, now + 100, "UA", "127.0.0.1")
        await store.put_session(record)
        assert await store.get_session("k1") == record
        assert await store.get_session("missing") is None

    async def test_session_expires(self, store: Store) -> None:
        now = self.clock()
        await store.put_session(SessionRecord("k1", alice(), now, now, now + 100))
        self.clock.advance(100)
        assert await store.get_session("k1") is None

    async def test_touch_and_delete(self, store: Store) -> None:
        now = self.clock()
        await store.put_session(SessionRecord("k1", alice(), now, now, now + 100))
        await store.touch_session("k1", now + 5)
        got = await store.get_session("k1")
        assert got is not None and got.last_seen == now + 5
        assert await store.delete_session("k1") is True
        assert await store.delete_session("k1") is False
        assert await store.get_session("k1") is None

    async def test_member_sessions(self, store: Store) -> None:
        now = self.clock()
        for key, member in (("k1", "M1"), ("k2", "M1"), ("k3", "M2")):
            await store.put_session(SessionRecord(key, alice(member_id=member), now, now,
                                                  now + 100))
        assert {r.key for r in await store.list_sessions("M1")} == {"k1", "k2"}
        assert len(await store.list_sessions()) == 3
        assert await store.delete_member_sessions("M1") == 2
        assert [r.key for r in await store.list_sessions()] == ["k3"]

    async def test_add_once_is_single_use_until_expiry(self, store: Store) -> None:
        assert await store.add_once("a", "1", 10) is True
        assert await store.add_once("a", "2", 10) is False
        self.clock.advance(10)
        assert await store.add_once("a", "3", 10) is True
        assert await store.take("a") == "3"

    async def test_take_gives_the_value_once(self, store: Store) -> None:
        await store.add_once("t", "v", 10)
        assert await store.take("t") == "v"
        assert await store.take("t") is None
        await store.add_once("late", "v", 10)
        self.clock.advance(11)
        assert await store.take("late") is None

    async def test_get_reads_without_consuming(self, store: Store) -> None:
        assert await store.get("g") is None
        await store.add_once("g", "kept", 10)
        assert await store.get("g") == "kept"
        assert await store.get("g") == "kept"
        self.clock.advance(10)
        assert await store.get("g") is None

    async def test_concurrent_takes_let_exactly_one_through(self, store: Store) -> None:
        await store.add_once("race", "v", 10)
        results = await asyncio.gather(*(store.take("race") for _ in range(20)))
        assert results.count("v") == 1

    async def test_sessions_for_name_id(self, store: Store) -> None:
        now = self.clock()
        subjects = (("k1", "https://idp", "n1"), ("k2", "https://idp", "n1"),
                    ("k3", "https://idp", "n2"), ("k4", "https://other", "n1"))
        for key, idp, name_id in subjects:
            await store.put_session(SessionRecord(key, alice(idp=idp, name_id=name_id), now,
                                                  now + len(key), now + 100))
        assert [r.key for r in await store.sessions_for_name_id("https://idp", "n1")] == \
            ["k1", "k2"]
        assert [r.key for r in await store.sessions_for_name_id("https://other", "n1")] == ["k4"]
        assert await store.sessions_for_name_id("https://idp", "nobody") == []
        await store.delete_session("k1")
        assert [r.key for r in await store.sessions_for_name_id("https://idp", "n1")] == ["k2"]
        self.clock.advance(100)
        assert await store.sessions_for_name_id("https://idp", "n1") == []

    async def test_delete_member_sessions_updates_every_index(self, store: Store) -> None:
        now = self.clock()
        await store.put_session(SessionRecord("k1", alice(member_id="M1"), now, now, now + 100))
        await store.put_session(SessionRecord("k2", alice(member_id="M2"), now, now, now + 100))
        assert await store.delete_member_sessions("M1") == 1
        assert [r.key for r in await store.sessions_for_name_id("https://idp", "n1")] == ["k2"]
        assert await store.delete_member_sessions("M1") == 0

    async def test_touch_of_a_missing_session_creates_nothing(self, store: Store) -> None:
        await store.touch_session("ghost", self.clock())
        assert await store.get_session("ghost") is None
        assert await store.list_sessions() == []

    async def test_add_once_race_across_two_clients(self, store: Store, twin: Store) -> None:
        """Two replicas (two store instances, two connections) race on one key: one wins."""
        results = await asyncio.gather(*(
            (store if i % 2 else twin).add_once("rid", f"v{i}", 10) for i in range(40)))
        assert results.count(True) == 1
        winner = results.index(True)
        taken = await asyncio.gather(twin.take("rid"), store.take("rid"))
        assert sorted(taken, key=str) == [None, f"v{winner}"]

    async def test_registrations_are_kept_oldest_first(self, store: Store) -> None:
        for email, at in (("b@example.org", 20.0), ("a@example.org", 10.0),
                          ("c@example.org", 20.0)):
            await store.add_registration(Registration(email, at, "newsletter"))
        self.clock.advance(10 * 365 * 86400)  # records, not cache: they do not expire
        assert await store.purge_expired() == 0
        assert [r.email for r in await store.list_registrations()] == \
            ["a@example.org", "b@example.org", "c@example.org"]

    async def test_counts_for_the_gauges(self, store: Store) -> None:
        now = self.clock()
        await store.put_session(SessionRecord("k1", alice(), now, now, now + 100))
        await store.put_session(SessionRecord("k2", alice(), now, now, now + 5))
        await store.add_once("authn:a", "1", 10)
        await store.add_once("authn:b", "1", 60)
        await store.add_once("assertion:x", "1", 60)
        assert (await store.count_sessions(), await store.count_once("authn:")) == (2, 2)
        self.clock.advance(20)
        assert (await store.count_sessions(), await store.count_once("authn:")) == (1, 1)

    async def test_count_per_window(self, store: Store) -> None:
        assert [await store.count("client-a", 60) for _ in range(3)] == [1, 2, 3]
        assert await store.count("client-b", 60) == 1
        self.clock.advance(60)
        assert await store.count("client-a", 60) == 1  # a new window starts over

    async def test_purge_expired(self, store: Store) -> None:
        now = self.clock()
        await store.put_session(SessionRecord("old", alice(), now, now, now + 5))
        await store.put_session(SessionRecord("new", alice(), now, now, now + 500))
        await store.add_once("o", "v", 5)
        self.clock.advance(10)
        assert await store.purge_expired() == 2
        assert [r.key for r in await store.list_sessions()] == ["new"]


class TestSQLiteStore(StoreContract):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[Store]:
        self.clock = FakeClock()
        backend = open_store(f"sqlite:///{tmp_path}/s.db", self.clock)
        await backend.open()
        yield backend
        await backend.close()

    @pytest.fixture
    async def twin(self, store: Store, tmp_path: Path) -> AsyncIterator[Store]:
        """A second connection to the same file, as a second worker process would have."""
        backend = open_store(f"sqlite:///{tmp_path}/s.db", self.clock)
        await backend.open()
        yield backend
        await backend.close()

    async def test_sessions_survive_a_reopen(self, tmp_path: Path) -> None:
        clock = FakeClock()
        first = open_store(f"sqlite:///{tmp_path}/r.db", clock)
        await first.open()
        await first.put_session(SessionRecord("k", alice(), clock(), clock(), clock() + 60))
        await first.close()
        second = open_store(f"sqlite:///{tmp_path}/r.db", clock)
        await second.open()
        assert await second.get_session("k") is not None
        await second.close()


class TestRedisStore(StoreContract):
    @pytest.fixture
    async def store(self, redis_server: RedisServer) -> AsyncIterator[Store]:
        self.clock = FakeClock()
        redis_server.command("FLUSHALL")
        backend = open_store(redis_server.url, self.clock, key_prefix="t:")
        await backend.open()
        yield backend
        await backend.close()

    @pytest.fixture
    async def twin(self, store: Store, redis_server: RedisServer) -> AsyncIterator[Store]:
        """A second client with its own connection pool, as a second replica has."""
        backend = open_store(redis_server.url, self.clock, key_prefix="t:")
        await backend.open()
        yield backend
        await backend.close()

    async def test_every_key_is_namespaced_and_expires(self, store: Store,
                                                       redis_server: RedisServer) -> None:
        now = self.clock()
        await store.put_session(SessionRecord("k1", alice(), now, now, now + 100))
        await store.add_once("pending", "v", 30)
        assert isinstance(store, RedisStore)
        keys = await store.redis.keys("*")
        assert len(keys) == 5 and all(k.startswith("t:") for k in keys)
        ttls = [await store.redis.pttl(k) for k in keys]
        assert all(0 < ttl <= 100_000 for ttl in ttls), dict(zip(keys, ttls, strict=True))

    async def test_indexes_are_pruned_as_sessions_end(self, store: Store) -> None:
        assert isinstance(store, RedisStore)
        now = self.clock()
        for i in range(5):
            await store.put_session(SessionRecord(f"old{i}", alice(), now, now, now + 10))
        self.clock.advance(20)
        await store.put_session(SessionRecord("new", alice(), self.clock(), self.clock(),
                                              self.clock() + 10))
        assert await store.redis.zrange("t:member:M1001", 0, -1) == ["new"]
        assert await store.redis.zcard("t:sessions") == 1

    async def test_unreachable_redis_is_a_store_error(self) -> None:
        with bound_socket() as sock:
            url = f"redis://127.0.0.1:{port_of(sock)}/0"  # bound, never listening
        backend = open_store(url, FakeClock(), connect_timeout=0.5, socket_timeout=0.5)
        await backend.open()
        try:
            calls = (backend.ping, lambda: backend.get_session("k"), lambda: backend.take("t"),
                     lambda: backend.add_once("a", "v", 5))
            for call in calls:
                with pytest.raises(StoreError, match=r"Redis store: .* failed"):
                    await call()
        finally:
            await backend.close()

    async def test_sentinel_url(self, redis_server: RedisServer, tmp_path: Path) -> None:
        """A real Sentinel (redis-server --sentinel) hands out the master's address."""
        assert parse_sentinel_url("redis+sentinel://:pw@h1:26379,[::1]:26380/main/2") == (
            [("h1", 26379), ("::1", 26380)], "main", 2, {"password": "pw"})
        sentinel = RedisServer(tmp_path)
        conf = tmp_path / "sentinel.conf"
        conf.write_text(f"port {sentinel.port}\nbind 127.0.0.1\n"
                        f"sentinel monitor main 127.0.0.1 {redis_server.port} 1\n")
        proc = subprocess.Popen([str(REDIS_SERVER), str(conf), "--sentinel"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not sentinel.ping():
                assert proc.poll() is None, "redis-server --sentinel did not start"
                await asyncio.sleep(0.02)
            backend = open_store(f"redis+sentinel://127.0.0.1:{sentinel.port}/main/0",
                                 FakeClock(), key_prefix="sentinel-test:")
            await backend.open()
            try:
                await backend.ping()
                assert await backend.add_once("x", "v", 5) is True
                assert await backend.take("x") == "v"
            finally:
                await backend.close()
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def test_cookie_signer_rotation() -> None:
    old = CookieSigner([SECRET_A], "session")
    signed_old = old.sign("sid")
    rotated = CookieSigner([SECRET_B, SECRET_A], "session")  # newest first
    assert rotated.unsign(signed_old) == "sid"
    assert old.unsign(rotated.sign("sid")) is None  # new cookies are signed with the new secret
    assert CookieSigner([SECRET_B], "session").unsign(signed_old) is None  # old secret dropped


def test_cookie_signer_purposes_and_tampering() -> None:
    session = CookieSigner([SECRET_A], "session")
    login = CookieSigner([SECRET_A], "login")
    signed = session.sign("value")
    assert login.unsign(signed) is None
    assert session.unsign(signed[:-1] + ("A" if signed[-1] != "A" else "B")) is None
    assert session.unsign("") is None
    assert session.unsign("no-dot-at-all") is None


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[tuple[SessionManager, FakeClock]]:
    clock = FakeClock()
    store = open_store(f"sqlite:///{tmp_path}/m.db", clock)
    await store.open()
    yield SessionManager(store, CookieSigner([SECRET_A], "session"), lifetime=3600,
                         idle_timeout=600, clock=clock), clock
    await store.close()


async def test_manager_new_id_each_login_and_hashed_key(
        manager: tuple[SessionManager, FakeClock]) -> None:
    sessions, _ = manager
    one, cookie_one = await sessions.create(alice())
    two, cookie_two = await sessions.create(alice())
    assert one.key != two.key and cookie_one != cookie_two
    session_id = CookieSigner([SECRET_A], "session").unsign(cookie_one)
    assert session_id is not None and one.key == session_key(session_id) != session_id


async def test_manager_idle_timeout(manager: tuple[SessionManager, FakeClock]) -> None:
    sessions, clock = manager
    _, cookie = await sessions.create(alice())
    clock.advance(599)
    assert await sessions.resolve(cookie) is not None  # touches the idle clock
    clock.advance(599)
    assert await sessions.resolve(cookie) is not None
    clock.advance(600)
    assert await sessions.resolve(cookie) is None


async def test_manager_touches_at_most_once_a_minute(
        manager: tuple[SessionManager, FakeClock]) -> None:
    sessions, clock = manager
    record, cookie = await sessions.create(alice())
    clock.advance(30)
    resolved = await sessions.resolve(cookie)
    assert resolved is not None and resolved.last_seen == record.last_seen
    clock.advance(31)
    resolved = await sessions.resolve(cookie)
    assert resolved is not None and resolved.last_seen == clock()


async def test_manager_absolute_lifetime(manager: tuple[SessionManager, FakeClock]) -> None:
    sessions, clock = manager
    _, cookie = await sessions.create(alice())
    for _ in range(7):
        clock.advance(500)
        assert await sessions.resolve(cookie) is not None
    clock.advance(500)  # 4000 s > 3600 s lifetime, though never idle
    assert await sessions.resolve(cookie) is None


async def test_manager_caps_lifetime_by_session_not_on_or_after(
        manager: tuple[SessionManager, FakeClock]) -> None:
    sessions, clock = manager
    record, cookie = await sessions.create(alice(session_not_on_or_after=clock() + 120))
    assert record.expires == clock() + 120
    clock.advance(121)
    assert await sessions.resolve(cookie) is None


async def test_manager_rejects_bad_cookies(manager: tuple[SessionManager, FakeClock]) -> None:
    sessions, _ = manager
    _, cookie = await sessions.create(alice())
    assert await sessions.resolve(None) is None
    assert await sessions.resolve(cookie + "x") is None
    forged = CookieSigner([SECRET_B], "session").sign("made-up")
    assert await sessions.resolve(forged) is None
