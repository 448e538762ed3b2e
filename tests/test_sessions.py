"""Sessions: the Store contract (run against every backend), cookie signing, lifetimes.

``StoreContract`` is the conformance suite: a backend's test class subclasses it
and provides a ``store`` fixture. Time is a ``FakeClock``; nothing sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.principal import Principal
from gateway.sessions import CookieSigner, SessionManager, SessionRecord, Store, open_store
from gateway.sessions.store import session_key

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

    async def test_concurrent_takes_let_exactly_one_through(self, store: Store) -> None:
        await store.add_once("race", "v", 10)
        results = await asyncio.gather(*(store.take("race") for _ in range(20)))
        assert results.count("v") == 1

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
