"""The session manager (lifetime, idle timeout, touch interval, ending sessions, the
principal cache) and signed cookies.

What the store backends must do is ``tests/test_store_conformance.py``; here the
manager runs on a SQLite store, as every backend serves it alike. Time is a
``FakeClock``; nothing sleeps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.principal import Principal
from gateway.sessions import CookieSigner, SessionManager, Stores, open_store
from gateway.sessions import manager as manager_module
from gateway.sessions.store import session_key
from tests.test_store_conformance import FakeClock

SECRET_A = "a" * 43
SECRET_B = "b" * 43


def alice(**changes: object) -> Principal:
    values: dict[str, object] = {
        "subject": "https://idp!M1001", "idp": "https://idp", "protocol": "test",
        "attributes": {"member_id": ("M1001",), "email": ("alice@example.org",),
                       "entitlements": ("e1", "e2")},
        "logout_handle": "alice-at-idp"}
    values.update(changes)
    return Principal(**values)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def stores(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Stores]:
    opened = open_store(f"sqlite:///{tmp_path}/m.db", clock)
    await opened.backend.open()
    yield opened
    await opened.backend.close()


@pytest.fixture
def sessions(stores: Stores, clock: FakeClock) -> SessionManager:
    return SessionManager(stores.sessions, CookieSigner([SECRET_A], "session"), lifetime=3600,
                          idle_timeout=600, clock=clock)


# -- signed cookies ------------------------------------------------------------------------

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


# -- lifetime --------------------------------------------------------------------------------

async def test_new_id_each_login_and_hashed_key(sessions: SessionManager,
                                                stores: Stores) -> None:
    one, cookie_one = await sessions.create(alice())
    two, cookie_two = await sessions.create(alice())
    assert one.key != two.key and cookie_one != cookie_two
    session_id = CookieSigner([SECRET_A], "session").unsign(cookie_one)
    assert session_id is not None and one.key == session_key(session_id) != session_id
    stored = await stores.sessions.get_session(one.key)
    assert stored is not None
    assert (stored.subject, stored.logout_handle) == ("https://idp!M1001", "alice-at-idp")


async def test_resolve_gives_the_principal_back(sessions: SessionManager) -> None:
    made, cookie = await sessions.create(alice(), user_agent="UA " * 100, client_ip="10.0.0.9")
    record = await sessions.resolve(cookie)
    assert record is not None and record == made and record.principal == alice()
    assert record.handle == record.key[:16] and len(record.user_agent) == 200
    assert record.client_ip == "10.0.0.9"


async def test_idle_timeout(sessions: SessionManager, clock: FakeClock) -> None:
    _, cookie = await sessions.create(alice())
    clock.advance(599)
    assert await sessions.resolve(cookie) is not None  # touches the idle clock
    clock.advance(599)
    assert await sessions.resolve(cookie) is not None
    clock.advance(600)
    assert await sessions.resolve(cookie) is None
    assert await sessions.sessions() == []  # an idle session is ended, not just refused


async def test_touches_at_most_once_a_minute(sessions: SessionManager,
                                            clock: FakeClock) -> None:
    record, cookie = await sessions.create(alice())
    clock.advance(30)
    resolved = await sessions.resolve(cookie)
    assert resolved is not None and resolved.last_seen == record.last_seen
    clock.advance(31)
    resolved = await sessions.resolve(cookie)
    assert resolved is not None and resolved.last_seen == clock()
    [listed] = await sessions.sessions()
    assert listed.last_seen == clock()  # written to the store, not only answered


async def test_absolute_lifetime(sessions: SessionManager, clock: FakeClock) -> None:
    _, cookie = await sessions.create(alice())
    for _ in range(7):
        clock.advance(500)
        assert await sessions.resolve(cookie) is not None
    clock.advance(500)  # 4000 s > 3600 s lifetime, though never idle
    assert await sessions.resolve(cookie) is None


async def test_lifetime_capped_by_the_idp(sessions: SessionManager, clock: FakeClock) -> None:
    record, cookie = await sessions.create(alice(session_not_on_or_after=clock() + 120))
    assert record.expires == clock() + 120
    clock.advance(121)
    assert await sessions.resolve(cookie) is None


async def test_rejects_bad_cookies(sessions: SessionManager) -> None:
    _, cookie = await sessions.create(alice())
    assert await sessions.resolve(None) is None
    assert await sessions.resolve(cookie + "x") is None
    forged = CookieSigner([SECRET_B], "session").sign("made-up")
    assert await sessions.resolve(forged) is None
    assert await sessions.resolve(CookieSigner([SECRET_A], "login").sign("made-up")) is None


# -- ending sessions ---------------------------------------------------------------------------

async def test_end_one_session(sessions: SessionManager) -> None:
    record, cookie = await sessions.create(alice())
    assert await sessions.end(record.key) is True
    assert await sessions.end(record.key) is False
    assert await sessions.resolve(cookie) is None


async def test_end_subject_sessions_all_or_one_by_handle(sessions: SessionManager) -> None:
    first, _ = await sessions.create(alice())
    second, second_cookie = await sessions.create(alice())
    third, _ = await sessions.create(alice())
    bob, bob_cookie = await sessions.create(alice(subject="https://idp!M1002"))
    # A handle picks one session of that subject only, and must be a whole handle.
    assert await sessions.end_subject_sessions("https://idp!M1001", bob.handle) == 0
    assert await sessions.end_subject_sessions("https://idp!M1001", first.handle[:8]) == 0
    assert await sessions.end_subject_sessions("https://idp!M1001", first.handle) == 1
    assert {r.key for r in await sessions.sessions("https://idp!M1001")} == \
        {second.key, third.key}
    assert await sessions.end_subject_sessions("https://idp!M1001") == 2
    assert await sessions.resolve(second_cookie) is None
    assert await sessions.resolve(bob_cookie) is not None


async def test_subjects_of_two_idps_are_apart(sessions: SessionManager) -> None:
    """The same member number from two IdPs is two subjects: ending one leaves the other."""
    _, here = await sessions.create(alice())
    _, there = await sessions.create(alice(subject="https://other!M1001", idp="https://other"))
    assert await sessions.end_subject_sessions("https://idp!M1001") == 1
    assert await sessions.resolve(here) is None
    assert await sessions.resolve(there) is not None


async def test_end_for_logout(sessions: SessionManager) -> None:
    one, one_cookie = await sessions.create(alice(protocol_data={"index": "1"}))
    _, two_cookie = await sessions.create(alice(protocol_data={"index": "2"}))
    _, other_cookie = await sessions.create(alice(logout_handle="someone-else"))
    _, none_cookie = await sessions.create(alice(logout_handle=""))
    # The protocol decides which of the handle's sessions its logout names.
    ended = await sessions.end_for_logout(
        "alice-at-idp", lambda p: p.protocol_data.get("index") == "1")
    assert ended == 1 and await sessions.resolve(one_cookie) is None
    assert await sessions.resolve(two_cookie) is not None
    assert await sessions.end_for_logout("", lambda p: True) == 0  # no handle, no session
    assert await sessions.end_for_logout("alice-at-idp", lambda p: True) == 1
    assert await sessions.resolve(two_cookie) is None
    assert await sessions.resolve(other_cookie) is not None
    assert await sessions.resolve(none_cookie) is not None
    assert one.principal.protocol_data == {"index": "1"}


# -- the principal cache -------------------------------------------------------------------------

async def test_principals_are_parsed_once(sessions: SessionManager) -> None:
    _, cookie = await sessions.create(alice())
    first, second = await sessions.resolve(cookie), await sessions.resolve(cookie)
    assert first is not None and second is not None
    assert first.principal is second.principal  # one parse, shared
    [listed] = await sessions.sessions()
    assert listed.principal is first.principal


async def test_principal_cache_is_bounded(sessions: SessionManager,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manager_module, "_PRINCIPALS_LIMIT", 2)
    cookies = [(await sessions.create(alice(subject=f"s{i}")))[1] for i in range(5)]
    for cookie in cookies * 2:
        record = await sessions.resolve(cookie)
        assert record is not None
    assert len(sessions._principals) <= 2
    assert [r.principal.subject for r in await sessions.sessions()] == \
        [f"s{i}" for i in range(5)]


def test_a_verified_cookie_is_remembered_only_as_itself() -> None:
    signer = CookieSigner(["new-secret-0123456789abcdef", "old-secret-0123456789abcdef"],
                          "session")
    signed = signer.sign("session-key-1")
    assert signer.unsign(signed) == signer.unsign(signed) == "session-key-1"
    tampered = signed[:-1] + ("A" if signed[-1] != "A" else "B")
    assert signer.unsign(tampered) is None
    assert signer.unsign(signed.replace("session-key-1", "session-key-2")) is None
    # Another purpose, or the same purpose under other secrets: not verified by the memory.
    assert CookieSigner(["new-secret-0123456789abcdef"], "csrf").unsign(signed) is None
    assert CookieSigner(["other-secret-0123456789abcd"], "session").unsign(signed) is None
