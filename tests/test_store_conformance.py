"""The store seams' conformance suite: one test class per interface, on every backend.

``TestSessionStore``, ``TestKeyStore`` and ``TestRecordStore`` state what any backend of
``SessionStore``, ``KeyStore`` and ``RecordStore`` must do. They ask only for the
``stores`` fixture (a ``Stores`` bundle on the shared ``clock``) and ``twin`` (a second
instance on the same data, as a second process or replica has), which run on SQLite and
on a real redis-server: a new backend is one more entry in ``BACKENDS``. Time is a
``FakeClock``; nothing sleeps. Backend-specific behaviour (key layout, the upgrade of
an old SQLite file, Sentinel) is tested at the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from gateway.errors import StoreError
from gateway.principal import Principal
from gateway.sessions import (
    CookieSigner,
    Namespace,
    Registration,
    SessionManager,
    StoredSession,
    Stores,
    open_store,
    sqlite_upgrade,
)
from gateway.sessions.manager import SYNC_INTERVAL, TOUCH_INTERVAL
from gateway.sessions.redis import RedisStore, parse_sentinel_url
from gateway.sessions.sqlite import SQLiteStore
from gateway.sessions.sqlite_upgrade import legacy_principal
from tests.conftest import REDIS_SERVER, RedisServer, bound_socket, port_of

BACKENDS = ("sqlite", "redis")
NOW = 1_800_000_000.0


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def session(key: str, subject: str = "https://idp!M1001", *, handle: str = "handle-1",
            created: float = NOW, lasts: float = 100.0, **changes: object) -> StoredSession:
    """A stored session whose principal is consistent with its subject and handle."""
    principal = Principal(subject=subject, idp="https://idp", logout_handle=handle,
                          attributes={"member_id": ("M1001",), "email": ("a@example.org",)})
    values: dict[str, object] = {
        "key": key, "subject": subject, "logout_handle": handle,
        "principal_json": json.dumps(principal.to_dict(), sort_keys=True),
        "created": created, "last_seen": created, "expires": created + lasts,
        "user_agent": "UA", "client_ip": "127.0.0.1", **changes}
    return StoredSession(**values)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"
    redis: RedisServer = request.getfixturevalue("redis_server")
    return redis.url


@pytest.fixture(params=BACKENDS)
async def stores(request: pytest.FixtureRequest, tmp_path: Path,
                 clock: FakeClock) -> AsyncIterator[Stores]:
    """The backend under test, empty, on the test's clock."""
    if request.param == "redis":
        request.getfixturevalue("redis_server").command("FLUSHALL")
    opened = open_store(_url(request.param, tmp_path, request), clock, key_prefix="t:")
    await opened.backend.open()
    yield opened
    await opened.backend.close()


@pytest.fixture
async def twin(stores: Stores, request: pytest.FixtureRequest, tmp_path: Path,
               clock: FakeClock) -> AsyncIterator[Stores]:
    """A second instance on the same data, with its own connection(s)."""
    backend = "redis" if isinstance(stores.backend, RedisStore) else "sqlite"
    opened = open_store(_url(backend, tmp_path, request), clock, key_prefix="t:")
    await opened.backend.open()
    yield opened
    await opened.backend.close()


def keys_of(found: list[StoredSession]) -> list[str]:
    return [s.key for s in found]


class TestSessionStore:
    """What every ``SessionStore`` must do."""

    async def test_round_trip(self, stores: Stores) -> None:
        store = stores.sessions
        stored = session("k1")
        await store.put_session(stored)
        assert await store.get_session("k1") == stored
        assert await store.get_session("missing") is None

    async def test_gone_at_its_absolute_end(self, stores: Stores, clock: FakeClock) -> None:
        await stores.sessions.put_session(session("k1", lasts=100))
        clock.advance(99.9)
        assert await stores.sessions.get_session("k1") is not None
        clock.advance(0.1)
        assert await stores.sessions.get_session("k1") is None
        assert await stores.sessions.list_sessions() == []
        assert await stores.sessions.count_sessions() == 0

    async def test_touch_and_delete(self, stores: Stores) -> None:
        store = stores.sessions
        await store.put_session(session("k1"))
        await store.touch_session("k1", NOW + 5)
        got = await store.get_session("k1")
        assert got is not None and got.last_seen == NOW + 5
        assert await store.delete_session("k1") is True
        assert await store.delete_session("k1") is False
        assert await store.get_session("k1") is None

    async def test_touch_of_a_missing_session_creates_nothing(self, stores: Stores) -> None:
        await stores.sessions.touch_session("ghost", NOW)
        assert await stores.sessions.get_session("ghost") is None
        assert await stores.sessions.list_sessions() == []

    async def test_listed_oldest_first_all_or_by_subject(self, stores: Stores) -> None:
        store = stores.sessions
        for key, subject, created in (("k2", "A!M1", NOW + 2), ("k1", "A!M1", NOW + 1),
                                      ("k3", "B!M1", NOW + 3), ("k4", "M1", NOW + 4)):
            await store.put_session(session(key, subject, created=created))
        assert keys_of(await store.list_sessions()) == ["k1", "k2", "k3", "k4"]
        assert keys_of(await store.list_sessions("A!M1")) == ["k1", "k2"]
        # Subjects are compared whole: one IdP's member number is not another's.
        assert keys_of(await store.list_sessions("M1")) == ["k4"]
        assert await store.list_sessions("nobody") == []

    async def test_delete_subject_sessions_updates_every_index(self, stores: Stores) -> None:
        store = stores.sessions
        await store.put_session(session("k1", "A!M1", handle="h"))
        await store.put_session(session("k2", "A!M1", handle="h"))
        await store.put_session(session("k3", "B!M2", handle="h"))
        assert await store.delete_subject_sessions("A!M1") == 2
        assert keys_of(await store.list_sessions()) == ["k3"]
        assert keys_of(await store.sessions_for_logout("h")) == ["k3"]
        assert await store.count_sessions() == 1
        assert await store.delete_subject_sessions("A!M1") == 0

    async def test_sessions_for_logout_by_handle(self, stores: Stores,
                                                 clock: FakeClock) -> None:
        store = stores.sessions
        for key, handle, created in (("k1", "h1", NOW), ("k2", "h1", NOW + 1),
                                     ("k3", "h2", NOW + 2), ("k4", "", NOW + 3)):
            await store.put_session(session(key, handle=handle, created=created))
        assert keys_of(await store.sessions_for_logout("h1")) == ["k1", "k2"]
        assert keys_of(await store.sessions_for_logout("h2")) == ["k3"]
        assert await store.sessions_for_logout("nobody") == []
        assert await store.sessions_for_logout("") == []  # no handle names no session
        await store.delete_session("k1")
        assert keys_of(await store.sessions_for_logout("h1")) == ["k2"]
        clock.advance(200)
        assert await store.sessions_for_logout("h1") == []

    async def test_replacing_a_session_moves_it_between_indexes(self, stores: Stores) -> None:
        store = stores.sessions
        await store.put_session(session("k1", "A!M1", handle="h1"))
        await store.put_session(session("k1", "B!M2", handle="h2"))
        assert await store.list_sessions("A!M1") == []
        assert await store.sessions_for_logout("h1") == []
        assert keys_of(await store.list_sessions("B!M2")) == ["k1"]
        assert keys_of(await store.sessions_for_logout("h2")) == ["k1"]
        assert await store.count_sessions() == 1

    async def test_count_for_the_gauge(self, stores: Stores, clock: FakeClock) -> None:
        await stores.sessions.put_session(session("k1", lasts=100))
        await stores.sessions.put_session(session("k2", lasts=5))
        assert await stores.sessions.count_sessions() == 2
        clock.advance(20)
        assert await stores.sessions.count_sessions() == 1

    async def test_purge_expired_sessions(self, stores: Stores, clock: FakeClock) -> None:
        await stores.sessions.put_session(session("old", lasts=5))
        await stores.sessions.put_session(session("new", lasts=500))
        clock.advance(10)
        assert await stores.backend.purge_expired() == 1
        assert keys_of(await stores.sessions.list_sessions()) == ["new"]

    async def test_a_second_instance_sees_the_same_sessions(self, stores: Stores,
                                                             twin: Stores) -> None:
        await stores.sessions.put_session(session("k1"))
        assert await twin.sessions.get_session("k1") == session("k1")
        assert await twin.sessions.delete_subject_sessions("https://idp!M1001") == 1
        assert await stores.sessions.get_session("k1") is None

    async def test_change_log_names_every_end_and_touch_from_any_instance(
            self, stores: Stores, twin: Stores, clock: FakeClock) -> None:
        store = stores.sessions
        for key in ("k1", "k2", "k3", "k4"):
            await store.put_session(session(key, "A!M1" if key != "k4" else "B!M2",
                                            lasts=100 if key != "k3" else 5))
        start = await store.changed_since("")
        assert start is not None and start[1] == []
        assert await store.changed_since(start[0]) == (start[0], [])  # nothing since
        await twin.sessions.touch_session("k1", NOW + 1)
        await twin.sessions.delete_session("k2")
        await twin.sessions.delete_session("missing")  # ends nothing, logs nothing
        await twin.sessions.touch_session("missing", NOW)
        clock.advance(10)
        await twin.backend.purge_expired()  # k3 is over
        await twin.sessions.delete_subject_sessions("B!M2")
        changes = await store.changed_since(start[0])
        assert changes is not None
        cursor, keys = changes
        assert keys == ["k1", "k2", "k3", "k4"]
        assert await store.changed_since(cursor) == (cursor, [])

    async def test_change_log_that_does_not_reach_back_says_so(self, stores: Stores) -> None:
        store = stores.sessions
        foreign = "999999" if isinstance(stores.backend, SQLiteStore) else "99999999999999-0/5"
        assert await store.changed_since(foreign) is None  # another store's cursor
        start = await store.changed_since("")
        assert start is not None
        await store.put_session(session("k1"))
        await store.delete_session("k1")
        if isinstance(stores.backend, SQLiteStore):
            await stores.backend._write(lambda db: db.execute(  # the purge trimmed it
                "DELETE FROM session_changes").rowcount)
        else:
            await stores.backend.redis.xtrim("t:changes", maxlen=0)
        assert await store.changed_since(start[0]) is None


class TestSessionMemory:
    """``SessionManager(memory=True)`` on every backend: sessions resolved from memory,
    an end made by another instance seen within the bound."""

    @staticmethod
    def manager(stores: Stores, clock: FakeClock) -> SessionManager:
        return SessionManager(stores.sessions, CookieSigner(["s" * 43], "session"),
                              lifetime=3600, idle_timeout=600, clock=clock,
                              keys=stores.keys, memory=True)

    async def test_served_from_memory_until_another_instance_ends_it(
            self, stores: Stores, twin: Stores, clock: FakeClock) -> None:
        here, there = self.manager(stores, clock), self.manager(twin, clock)
        principal = Principal(subject="A!M1", idp="A", attributes={"member_id": ("M1",)})
        record, cookie = await here.create(principal)
        assert await there.resolve(cookie) == record
        assert await there.resolve(cookie) == record
        assert (there.from_memory, there.from_store) == (1, 1)
        assert await here.end_subject_sessions("A!M1") == 1
        assert await here.resolve(cookie) is None  # at once where it ended
        deadline = asyncio.get_running_loop().time() + SYNC_INTERVAL + 0.5
        while await there.resolve(cookie) is not None:  # within the bound elsewhere
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)

    @pytest.mark.parametrize("how", ["log_read_failed", "fresh_before_first_read"])
    async def test_nothing_is_remembered_without_a_cursor(
            self, stores: Stores, twin: Stores, clock: FakeClock, how: str,
            monkeypatch: pytest.MonkeyPatch) -> None:
        """A session read while the change log's position is unknown (a read of it just
        failed, or none was made yet) is not kept in memory: the next read starts from
        "now" and would never see an end made in between."""
        here, there = self.manager(stores, clock), self.manager(twin, clock)
        principal = Principal(subject="A!M1", idp="A", attributes={"member_id": ("M1",)})
        record, cookie = await here.create(principal)
        if how == "log_read_failed":
            real = twin.sessions.changed_since
            failures = [StoreError("the change log timed out")]

            async def flaky(cursor: str) -> tuple[str, list[str]] | None:
                if failures:
                    raise failures.pop()
                return await real(cursor)

            monkeypatch.setattr(twin.sessions, "changed_since", flaky)
            assert await there.resolve(cookie) == record  # from the store
        else:
            assert await there.resolve(cookie, fresh=True) == record
        assert await here.end_subject_sessions("A!M1") == 1
        deadline = asyncio.get_running_loop().time() + SYNC_INTERVAL + 0.5
        while await there.resolve(cookie) is not None:  # within the bound elsewhere
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)

    async def test_memory_is_bounded_by_time_and_the_store_decides_after_a_gap(
            self, stores: Stores, twin: Stores, clock: FakeClock) -> None:
        here, there = self.manager(stores, clock), self.manager(twin, clock)
        principal = Principal(subject="A!M1", idp="A", attributes={"member_id": ("M1",)})
        record, cookie = await here.create(principal)
        assert await there.resolve(cookie) == record
        clock.advance(TOUCH_INTERVAL)  # a touch is due: the store answers (and is touched)
        touched = await there.resolve(cookie)
        assert touched is not None and touched.last_seen == record.created + TOUCH_INTERVAL
        assert there.from_store == 2
        clock.advance(3600)  # past the absolute end: never answered from memory
        assert await there.resolve(cookie) is None


class TestKeyStore:
    """What every ``KeyStore`` must do."""

    async def test_add_once_is_single_use_until_expiry(self, stores: Stores,
                                                       clock: FakeClock) -> None:
        keys = stores.keys
        assert await keys.add_once("a", "1", 10) is True
        assert await keys.add_once("a", "2", 10) is False
        clock.advance(10)
        assert await keys.add_once("a", "3", 10) is True
        assert await keys.take("a") == "3"

    async def test_take_gives_the_value_once(self, stores: Stores, clock: FakeClock) -> None:
        keys = stores.keys
        await keys.add_once("t", "v", 10)
        assert await keys.take("t") == "v"
        assert await keys.take("t") is None
        await keys.add_once("late", "v", 10)
        clock.advance(11)
        assert await keys.take("late") is None

    async def test_get_reads_without_consuming(self, stores: Stores, clock: FakeClock) -> None:
        keys = stores.keys
        assert await keys.get("g") is None
        await keys.add_once("g", "kept\nwith a newline", 10)
        assert await keys.get("g") == "kept\nwith a newline"
        assert await keys.get("g") == "kept\nwith a newline"
        clock.advance(10)
        assert await keys.get("g") is None

    async def test_concurrent_takes_let_exactly_one_through(self, stores: Stores) -> None:
        await stores.keys.add_once("race", "v", 10)
        results = await asyncio.gather(*(stores.keys.take("race") for _ in range(20)))
        assert results.count("v") == 1

    async def test_add_once_race_across_two_clients(self, stores: Stores,
                                                    twin: Stores) -> None:
        """Two replicas (two store instances, two connections) race on one key: one wins."""
        results = await asyncio.gather(*(
            (stores if i % 2 else twin).keys.add_once("rid", f"v{i}", 10) for i in range(40)))
        assert results.count(True) == 1
        winner = results.index(True)
        taken = await asyncio.gather(twin.keys.take("rid"), stores.keys.take("rid"))
        assert sorted(taken, key=str) == [None, f"v{winner}"]

    async def test_count_per_window(self, stores: Stores, clock: FakeClock) -> None:
        keys = stores.keys
        assert [await keys.count("rate:client-a", 60) for _ in range(3)] == [1, 2, 3]
        assert await keys.count("rate:client-b", 60) == 1
        clock.advance(60)
        assert await keys.count("rate:client-a", 60) == 1  # a new window starts over

    async def test_a_backward_clock_step_does_not_stretch_a_window(
            self, stores: Stores, clock: FakeClock) -> None:
        keys = stores.keys
        assert [await keys.count("rate:client-a", 60) for _ in range(3)] == [1, 2, 3]
        clock.advance(-1800)  # the clock steps back half an hour
        assert await keys.count("rate:client-a", 60) == 1  # a new window, not 30 min more
        clock.advance(60)
        assert await keys.count("rate:client-a", 60) == 1

    async def test_counters_are_shared_by_instances(self, stores: Stores,
                                                    twin: Stores) -> None:
        counts = await asyncio.gather(*(
            (stores if i % 2 else twin).keys.count("rate:x", 60) for i in range(10)))
        assert sorted(counts) == list(range(1, 11))

    async def test_count_keys_by_prefix(self, stores: Stores, clock: FakeClock) -> None:
        keys = stores.keys
        await keys.add_once(f"{Namespace.LOGIN_STATE}a", "1", 10)
        await keys.add_once(f"{Namespace.LOGIN_STATE}b", "1", 60)
        await keys.add_once(f"{Namespace.ASSERTION}x", "1", 60)
        await keys.add_once("a*b", "1", 60)
        assert await keys.count_keys(Namespace.LOGIN_STATE) == 2
        assert await keys.count_keys(Namespace.ASSERTION) == 1
        assert await keys.count_keys("a*") == 1  # a prefix, not a pattern
        assert await keys.count_keys("a?") == 0
        clock.advance(20)
        assert await keys.count_keys(Namespace.LOGIN_STATE) == 1

    async def test_purge_expired_keys(self, stores: Stores, clock: FakeClock) -> None:
        await stores.keys.add_once("short", "v", 5)
        await stores.keys.add_once("long", "v", 500)
        clock.advance(10)
        assert await stores.backend.purge_expired() == 1
        assert await stores.keys.get("long") == "v"


class TestRecordStore:
    """What every ``RecordStore`` must do."""

    async def test_registrations_are_kept_oldest_first(self, stores: Stores,
                                                       clock: FakeClock) -> None:
        records = stores.records
        for email, at in (("b@example.org", 20.0), ("a@example.org", 10.0),
                          ("c@example.org", 20.0)):
            await records.add_registration(Registration(email, at, "newsletter"))
        clock.advance(10 * 365 * 86400)  # records, not cache: they do not expire
        assert await stores.backend.purge_expired() == 0
        assert [r.email for r in await records.list_registrations()] == \
            ["a@example.org", "b@example.org", "c@example.org"]

    async def test_put_and_get_record(self, stores: Stores, clock: FakeClock) -> None:
        records = stores.records
        key = f"{Namespace.FAILURE}ABC123"
        assert await records.get_record(key) is None
        await records.put_record(key, '{"kind": "signature"}', 30)
        assert await records.get_record(key) == '{"kind": "signature"}'
        assert await records.get_record(key) == '{"kind": "signature"}'  # not consumed
        await records.put_record(key, "newer", 30)  # replaces
        assert await records.get_record(key) == "newer"
        clock.advance(30)
        assert await records.get_record(key) is None

    async def test_records_are_shared_by_instances(self, stores: Stores,
                                                   twin: Stores) -> None:
        await stores.records.put_record("failure:X", "v", 60)
        assert await twin.records.get_record("failure:X") == "v"

    async def test_registrations_keep_subject_and_confirmation(self, stores: Stores) -> None:
        kept = Registration("r@example.org", 10.0, "newsletter", "reader!1", 12.5)
        await stores.records.add_registration(kept)
        await stores.records.add_registration(Registration("s@example.org", 11.0, "n"))
        assert await stores.records.list_registrations() == [
            kept, Registration("s@example.org", 11.0, "n", "", None)]

    async def test_delete_registrations_by_address_subject_or_age(self, stores: Stores,
                                                                  twin: Stores) -> None:
        records = stores.records
        for email, at, subject in (("Gone@Example.org", 10.0, "reader!a"),
                                   ("kept@example.org", 20.0, "reader!b"),
                                   ("gone@example.org", 30.0, "reader!c"),
                                   ("old@example.org", 5.0, "reader!d")):
            await records.add_registration(Registration(email, at, "newsletter", subject))
        gone = await records.delete_registrations(email="GONE@example.ORG")  # any case
        assert [(r.email, r.subject) for r in gone] == [("Gone@Example.org", "reader!a"),
                                                       ("gone@example.org", "reader!c")]
        assert await twin.records.delete_registrations(email="gone@example.org") == []
        by_subject = await records.delete_registrations(subject="reader!b")
        assert [r.email for r in by_subject] == ["kept@example.org"]
        assert await records.delete_registrations(registered_before=5.0) == []  # strictly
        aged = await records.delete_registrations(registered_before=5.5)
        assert [r.email for r in aged] == ["old@example.org"]
        assert await records.list_registrations() == []
        with pytest.raises(ValueError):
            await records.delete_registrations()
        with pytest.raises(ValueError):
            await records.delete_registrations(email="a@example.org", subject="reader!a")

    async def test_each_registration_is_deleted_once(self, stores: Stores,
                                                     twin: Stores) -> None:
        """Two replicas deleting the same address at once: each row is returned (and its
        sessions ended, audited) by exactly one of them."""
        for n in range(20):
            await stores.records.add_registration(
                Registration("same@example.org", float(n), "newsletter", f"reader!{n}"))
        first, second = await asyncio.gather(
            stores.records.delete_registrations(email="same@example.org"),
            twin.records.delete_registrations(email="same@example.org"))
        assert sorted(r.subject for r in first + second) == \
            sorted(f"reader!{n}" for n in range(20))

    async def test_a_failure_kept_by_an_older_version_is_readable(self, stores: Stores) -> None:
        """Older versions kept failures as single-use keys under the same key text."""
        await stores.keys.add_once("failure:OLD1", '{"kind": "replay"}', 60)
        assert await stores.records.get_record("failure:OLD1") == '{"kind": "replay"}'


async def test_the_bundle_is_one_backend(stores: Stores) -> None:
    parts: tuple[object, ...] = (stores.sessions, stores.keys, stores.records)
    assert all(part is stores.backend for part in parts)
    await stores.backend.ping()


# -- SQLite ------------------------------------------------------------------------------

async def test_sqlite_sessions_survive_a_reopen(tmp_path: Path, clock: FakeClock) -> None:
    first = open_store(f"sqlite:///{tmp_path}/r.db", clock)
    await first.backend.open()
    await first.sessions.put_session(session("k"))
    await first.backend.close()
    second = open_store(f"sqlite:///{tmp_path}/r.db", clock)
    await second.backend.open()
    assert await second.sessions.get_session("k") == session("k")
    await second.backend.close()



async def test_sqlite_workers_on_one_file_take_turns_to_purge(tmp_path: Path,
                                                             clock: FakeClock) -> None:
    first = open_store(f"sqlite:///{tmp_path}/p.db", clock)
    second = open_store(f"sqlite:///{tmp_path}/p.db", clock)
    await first.backend.open()
    await second.backend.open()
    try:
        await first.keys.add_once("gone-soon", "x", 10)
        clock.advance(11)
        assert await second.keys.add_once("purge-lock", "another worker", 120)
        assert await first.backend.purge_expired() == 0  # the other worker is purging
        assert await second.keys.take("purge-lock") == "another worker"
        assert await first.backend.purge_expired() == 1
        assert await first.keys.get("purge-lock") is None  # released after the purge
    finally:
        await first.backend.close()
        await second.backend.close()


_OLD_SCHEMA = """
CREATE TABLE sessions (key TEXT PRIMARY KEY, member_id TEXT NOT NULL, idp TEXT NOT NULL,
    name_id TEXT NOT NULL, principal TEXT NOT NULL, created REAL NOT NULL,
    last_seen REAL NOT NULL, expires REAL NOT NULL, user_agent TEXT NOT NULL DEFAULT '',
    client_ip TEXT NOT NULL DEFAULT '');
CREATE INDEX sessions_member ON sessions (member_id);
CREATE INDEX sessions_name_id ON sessions (idp, name_id);
CREATE TABLE registrations (email TEXT NOT NULL, registered_at REAL NOT NULL,
    consent TEXT NOT NULL);
CREATE TABLE once (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires REAL NOT NULL);
"""
_OLD_MEMBER = {
    "member_id": "M1001", "idp": "https://idp.example.org", "name_id": "n-7f3a",
    "email": "alice@example.org", "display_name": "Alice Liddell",
    "entitlements": ["urn:x:reader", "urn:x:admin"], "status": "active",
    "name_id_format": "urn:oasis:names:tc:SAML:2.0:nameid-format:persistent",
    "session_index": "_si-42", "authn_instant": NOW - 60,
    "session_not_on_or_after": NOW + 7200, "kind": "member"}
_OLD_VISITOR = {
    "member_id": "reader-9", "idp": "", "name_id": "", "email": "v@example.org",
    "display_name": "", "entitlements": [], "status": "registered", "name_id_format": "",
    "session_index": "", "authn_instant": NOW - 30, "session_not_on_or_after": None,
    "kind": "registered"}


def _old_store(path: Path) -> None:
    """A store file as the version before subjects wrote it, by plain SQL."""
    with sqlite3.connect(path) as db:
        db.executescript(_OLD_SCHEMA)
        for key, old in (("k-member", _OLD_MEMBER), ("k-visitor", _OLD_VISITOR)):
            db.execute("INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (key, old["member_id"], old["idp"], old["name_id"], json.dumps(old),
                        NOW - 60, NOW - 10, NOW + 3600, "UA", "10.0.0.1"))
        db.execute("INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?,?,?)",
                   ("k-broken", "M9", "", "", "{not json", NOW, NOW, NOW + 3600, "", ""))
        db.execute("INSERT INTO once VALUES ('failure:REF1', 'kept', ?)", (NOW + 600,))
        db.execute("INSERT INTO registrations VALUES ('r@example.org', 1.0, 'newsletter')")


async def test_sqlite_store_of_an_older_version_is_upgraded_in_place(
        tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "old.db"
    _old_store(path)
    stores = open_store(f"sqlite:///{path}", clock)
    await stores.backend.open()
    try:
        member = await stores.sessions.get_session("k-member")
        assert member is not None and member.subject == "M1001" and member.logout_handle == ""
        assert (member.created, member.last_seen, member.expires) == (NOW - 60, NOW - 10,
                                                                      NOW + 3600)
        assert (member.user_agent, member.client_ip) == ("UA", "10.0.0.1")
        assert keys_of(await stores.sessions.list_sessions("M1001")) == ["k-member"]
        assert keys_of(await stores.sessions.list_sessions()) == ["k-member", "k-visitor"]
        principal = Principal.from_dict(json.loads(member.principal_json))
        assert principal == Principal(
            subject="M1001", idp="https://idp.example.org", protocol="",
            attributes={"member_id": ("M1001",), "email": ("alice@example.org",),
                        "display_name": ("Alice Liddell",),
                        "entitlements": ("urn:x:reader", "urn:x:admin"),
                        "status": ("active",)},
            authn_instant=NOW - 60, session_not_on_or_after=NOW + 7200,
            protocol_data={"name_id": "n-7f3a", "session_index": "_si-42",
                           "name_id_format": str(_OLD_MEMBER["name_id_format"])})
        visitor = await stores.sessions.get_session("k-visitor")
        assert visitor is not None and visitor.subject == "reader-9"
        assert Principal.from_dict(json.loads(visitor.principal_json)) == Principal(
            subject="reader-9", idp="", kind="registered", authn_instant=NOW - 30,
            attributes={"member_id": ("reader-9",), "email": ("v@example.org",),
                        "status": ("registered",)})
        # The rest of the file is untouched: keys, records and registrations.
        assert await stores.records.get_record("failure:REF1") == "kept"
        assert await stores.records.list_registrations() == \
            [Registration("r@example.org", 1.0, "newsletter", "", None)]
        # The session manager serves an upgraded session like any other.
        manager = SessionManager(stores.sessions, CookieSigner(["s" * 43], "session"),
                                 lifetime=3600, idle_timeout=600, clock=clock)
        [record] = await manager.sessions("M1001")
        assert record.principal.display_name == "Alice Liddell"
    finally:
        await stores.backend.close()
    with sqlite3.connect(path) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        columns = {row[1] for row in db.execute("PRAGMA table_info(sessions)")}
    assert "sessions_before_upgrade" not in tables and "sessions_name_id" not in tables
    assert "member_id" not in columns and {"subject", "logout_handle"} <= columns
    again = open_store(f"sqlite:///{path}", clock)  # a second open finds nothing to do
    await again.backend.open()
    assert await again.sessions.count_sessions() == 2
    await again.backend.close()


async def test_sqlite_upgrade_is_all_or_nothing(tmp_path: Path, clock: FakeClock,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An upgrade that fails half-way leaves the old file as it was (one transaction)."""
    path = tmp_path / "old.db"
    _old_store(path)
    converted: list[str] = []

    def fail_on_the_second(old: dict[str, object]) -> Principal:
        if converted:
            raise sqlite3.OperationalError("disk I/O error")
        converted.append(str(old["member_id"]))
        return legacy_principal(old)

    monkeypatch.setattr(sqlite_upgrade, "legacy_principal", fail_on_the_second)
    stores = open_store(f"sqlite:///{path}", clock)
    with pytest.raises(StoreError, match="disk I/O error"):
        await stores.backend.open()
    assert converted == ["M1001"]  # the first row was written before the failure
    with sqlite3.connect(path) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        columns = {row[1] for row in db.execute("PRAGMA table_info(sessions)")}
        count = db.execute("SELECT count(*) FROM sessions").fetchone()[0]
    assert "member_id" in columns and "sessions_before_upgrade" not in tables and count == 3


async def test_sqlite_store_that_cannot_be_opened_is_a_store_error(
        tmp_path: Path, clock: FakeClock) -> None:
    (tmp_path / "file").write_text("")
    stores = open_store(f"sqlite:///{tmp_path}/file/under/a/file.db", clock)
    with pytest.raises(StoreError, match="cannot open SQLite store"):
        await stores.backend.open()


# -- Redis -------------------------------------------------------------------------------

@pytest.fixture
async def redis_store(redis_server: RedisServer,
                      clock: FakeClock) -> AsyncIterator[RedisStore]:
    redis_server.command("FLUSHALL")
    store = RedisStore(redis_server.url, clock, key_prefix="t:")
    await store.open()
    yield store
    await store.close()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def test_redis_keys_are_namespaced_indexed_by_hash_and_expire(
        redis_store: RedisStore) -> None:
    await redis_store.put_session(session("k1", "https://idp!M1001", handle="h1"))
    await redis_store.put_session(session("k2", "https://idp!M1002", handle=""))
    await redis_store.add_once("pending", "v", 30)
    keys = set(await redis_store.redis.keys("*"))
    assert keys == {"t:session:k1", "t:session:k2", "t:sessions", "t:once:pending",
                    f"t:subject:{_sha('https://idp!M1001')}",
                    f"t:subject:{_sha('https://idp!M1002')}", f"t:logout:{_sha('h1')}"}
    ttls = {k: await redis_store.redis.pttl(k) for k in keys}
    assert all(0 < ttl <= 100_000 for ttl in ttls.values()), ttls


async def test_redis_indexes_are_pruned_as_sessions_end(redis_store: RedisStore,
                                                        clock: FakeClock) -> None:
    for i in range(5):
        await redis_store.put_session(session(f"old{i}", lasts=10))
    clock.advance(20)
    await redis_store.put_session(session("new", created=clock(), lasts=10))
    subject_index = f"t:subject:{_sha('https://idp!M1001')}"
    assert await redis_store.redis.zrange(subject_index, 0, -1) == ["new"]
    assert await redis_store.redis.zrange(f"t:logout:{_sha('handle-1')}", 0, -1) == ["new"]
    assert await redis_store.redis.zcard("t:sessions") == 1


async def test_redis_session_of_an_older_version_reads_as_absent(
        redis_store: RedisStore) -> None:
    """A hash without a subject (written before subjects) is no session: sign in again."""
    await redis_store.redis.hset("t:session:old", mapping={
        "principal": json.dumps(_OLD_MEMBER), "created": repr(NOW), "last_seen": repr(NOW),
        "expires": repr(NOW + 100), "user_agent": "", "client_ip": ""})
    await redis_store.redis.zadd("t:sessions", {"old": NOW + 100})
    assert await redis_store.get_session("old") is None
    assert await redis_store.list_sessions() == []
    assert await redis_store.delete_session("old") is True


async def test_unreachable_redis_is_a_store_error(clock: FakeClock) -> None:
    with bound_socket() as sock:
        url = f"redis://127.0.0.1:{port_of(sock)}/0"  # bound, never listening
    stores = open_store(url, clock, connect_timeout=0.5, socket_timeout=0.5)
    await stores.backend.open()
    calls: tuple[Callable[[], Awaitable[object]], ...] = (
        stores.backend.ping, lambda: stores.sessions.get_session("k"),
        lambda: stores.keys.take("t"), lambda: stores.keys.add_once("a", "v", 5),
        lambda: stores.records.get_record("failure:X"),
        lambda: stores.records.put_record("failure:X", "v", 5))
    try:
        for call in calls:
            with pytest.raises(StoreError, match=r"Redis store: .* failed"):
                await call()
    finally:
        await stores.backend.close()


async def test_redis_sentinel_url(redis_server: RedisServer, tmp_path: Path) -> None:
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
        stores = open_store(f"redis+sentinel://127.0.0.1:{sentinel.port}/main/0",
                            FakeClock(), key_prefix="sentinel-test:")
        await stores.backend.open()
        try:
            await stores.backend.ping()
            assert await stores.keys.add_once("x", "v", 5) is True
            assert await stores.keys.take("x") == "v"
        finally:
            await stores.backend.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
