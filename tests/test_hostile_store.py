"""Anonymous store exhaustion and the kept form, over real sockets (issue 14, items 2 and 4).

What an anonymous client can make the gateway write, and for how long:

* a form POSTed to a gated page is kept across a sign-in only for the cookie of a real
  session that just ended (idle timeout): a junk or forged cookie keeps nothing; kept
  forms are limited per client and in total;
* a cross-site POST is refused (403) before the keep-the-form branch, a kept form
  records its Origin, and the replay page never sends a cross-site one;
* ``/saml/login?idp=<unknown>`` is rate-limited before the failure is recorded, and
  failure records are capped per hour (past the cap: a log line only);
* pending sign-ins and everything else that expires are purged on a timer while the
  gateway runs;
* a full store (Redis at its ``maxmemory``) answers the 503 page on every path, never 500;
* 10,000 hostile anonymous requests leave the store (SQLite, and Redis with an 8 MB
  ``maxmemory``) under a bound stated in the test, and a member still signs in.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from gateway.demo.stack import DemoStack
from gateway.sessions import CookieSigner, open_store
from gateway.stash import PostStash
from tests.browser import client, login
from tests.conftest import RedisServer, Stack, TLSFiles, memory_sees_it, run_stack

PAGE = "/issues/2023-03/pages/14"
SESSION = "__Host-gw_session"
BLOG = "https://blog.example.org"
UNKNOWN_IDP = "https://unknown-idp.example.org/idp"


# -- helpers ------------------------------------------------------------------------------


def from_address(stack: Stack, address: str) -> httpx.Client:
    """A client whose connections come from another loopback address (another client for
    the gateway's per-client limits)."""
    transport = httpx.HTTPTransport(local_address=address, verify=stack.tls.client_context())
    return httpx.Client(transport=transport, timeout=20)


def once_rows(stack: Stack, prefix: str = "") -> int:
    with sqlite3.connect(stack.db) as db:
        return int(db.execute("SELECT count(*) FROM once WHERE key LIKE ?",
                              (prefix + "%",)).fetchone()[0])


def row_kinds(stack: Stack) -> Counter[str]:
    """Rows of the ``once`` table by key prefix (``authn``, ``failure``, ``count``…)."""
    with sqlite3.connect(stack.db) as db:
        keys = [k for (k,) in db.execute("SELECT key FROM once")]
    return Counter(k.split(":", 1)[0] for k in keys)


def idle_out(stack: Stack) -> None:
    """Every session has been unused past the idle timeout (its cookie lives on)."""
    with sqlite3.connect(stack.db) as db:
        db.execute("UPDATE sessions SET last_seen = last_seen - 86400")
    memory_sees_it()


def post_form(http: httpx.Client, stack: Stack, cookie: str | None, *,
              headers: dict[str, str] | None = None, size: int = 100) -> httpx.Response:
    sent = {"origin": stack.url} if headers is None else headers
    if cookie is not None:
        sent = {**sent, "cookie": f"{SESSION}={cookie}"}
    return http.post(stack.url + PAGE, content=f"text={'x' * size}".encode(),
                     headers={**sent, "content-type": "application/x-www-form-urlencoded"})


def signed_cookie(stack: Stack) -> str:
    """A correctly signed cookie for a session ID that never existed (a forger with the
    secret could make this; it names no real session)."""
    secret_list = stack.demo.settings.session_secrets()
    return CookieSigner(secret_list, "session").sign(secrets.token_urlsafe(32))


def stale_cookie(stack: Stack, http: httpx.Client, username: str = "alice") -> str:
    """Sign ``username`` in, then let the session idle out: the cookie of a real session
    that just ended."""
    login(http, stack, PAGE, username)
    cookie = http.cookies[SESSION]
    idle_out(stack)
    http.cookies.clear()
    return cookie


def plain_sign_in_answer(answer: httpx.Response) -> bool:
    """The answer a POST without a live session gets when its form is not kept."""
    return (answer.status_code == 401 and "Sign-in required" in answer.text
            and not any(c.startswith("__Secure-gw-stash=")
                        for c in answer.headers.get_list("set-cookie")))


def limits(**values: int) -> str:
    merged = {"logins": 100000, "registrations": 100000, "logouts": 100000, **values}
    return "\n[limits]\n" + "".join(f"{k} = {v}\n" for k, v in merged.items())


# -- the kept form (items 2a and 4) --------------------------------------------------------


def test_junk_and_forged_cookies_keep_nothing(stack: Stack) -> None:
    before = once_rows(stack)
    with client(stack) as http:
        for cookie in ("junk", "x" * 4000, signed_cookie(stack),
                       CookieSigner(["y" * 48], "session").sign("some-id")):
            answer = post_form(http, stack, cookie, size=60_000)
            assert plain_sign_in_answer(answer), (cookie[:20], answer.status_code)
    assert once_rows(stack) == before  # not a stash, not a marker, not even a counter
    assert stack.upstream.requests == []


def test_a_form_is_kept_for_a_session_that_just_ended(stack: Stack) -> None:
    with client(stack) as http:
        cookie = stale_cookie(stack, http)
        kept = post_form(http, stack, cookie)
    assert kept.status_code == 303
    assert kept.headers["location"].startswith("/saml/login?next=%2F_gateway%2Freplay%2F")
    assert once_rows(stack, "stash:") == 1 and stack.upstream.requests == []


@pytest.mark.stack(extra_config=limits(kept_forms=2, kept_forms_total=3))
def test_kept_forms_are_limited_per_client_and_in_total(stack: Stack) -> None:
    with client(stack) as alice, from_address(stack, "127.0.0.3") as bob:
        alice_cookie = stale_cookie(stack, alice, "alice")
        bob_cookie = stale_cookie(stack, bob, "bob")
        from_alice = [post_form(alice, stack, alice_cookie) for _ in range(3)]
        from_bob = [post_form(bob, stack, bob_cookie) for _ in range(2)]
    assert [a.status_code for a in from_alice[:2]] == [303, 303]
    assert plain_sign_in_answer(from_alice[2])  # this client's limit: 2 a minute
    assert from_bob[0].status_code == 303
    assert plain_sign_in_answer(from_bob[1])  # everyone's limit: 3 per 10 minutes
    assert once_rows(stack, "stash:") == 3


def test_cross_site_post_with_a_stale_cookie_is_refused_and_nothing_kept(stack: Stack) -> None:
    with client(stack) as http:
        cookie = stale_cookie(stack, http)
        from_blog = post_form(http, stack, cookie, headers={"origin": BLOG})
        fetch_says = post_form(http, stack, cookie, headers={"sec-fetch-site": "cross-site"})
        same_site = post_form(http, stack, cookie,
                              headers={"origin": "https://sub.127.0.0.1.nip.io"})
        # No Origin and no Sec-Fetch-Site: nothing vouches for it, so it is not kept either.
        unknown = post_form(http, stack, cookie, headers={})
    for answer in (from_blog, fetch_says, same_site):
        assert answer.status_code == 403, answer.text
        assert "This request came from another site." in answer.text
    assert plain_sign_in_answer(unknown)
    assert once_rows(stack, "stash:") == 0
    assert stack.upstream.requests == []


def test_the_replay_page_never_sends_a_cross_site_form(stack: Stack) -> None:
    """A kept form whose recorded Origin is another site's (kept by an older version, or
    by any bug) is refused at replay: no form on the page, nothing sent upstream."""
    settings = stack.demo.settings
    secret_list = settings.session_secrets()
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        with sqlite3.connect(stack.db) as db:
            (subject,), = db.execute("SELECT subject FROM sessions").fetchall()
        stores = open_store(settings.store.url, time.time)
        stash = PostStash(stores.keys, secret_list[0])

        async def keep(origin: str) -> str:  # kept for alice herself: only the origin is off
            await stores.backend.open()
            try:
                return await stash.keep("/transfer", b"to=mallory&amount=1000", origin=origin,
                                        subject=subject)
            finally:
                await stores.backend.close()

        import asyncio

        for origin in (BLOG, ""):
            stash_id = asyncio.run(keep(origin))
            binding = CookieSigner(secret_list, "csrf").sign(stash_id)
            http.cookies.set("__Secure-gw-stash", binding, path="/_gateway/replay")
            answer = http.get(f"{stack.url}/_gateway/replay/{stash_id}")
            assert answer.status_code == 403, (origin, answer.text)
            assert "did not come from this site" in answer.text
            assert "<form" not in answer.text and "mallory" not in answer.text
            assert once_rows(stack, f"stash:{stash_id}") == 0  # taken: it cannot come back
    assert all(r["method"] != "POST" for r in stack.upstream.requests)


# -- sign-in starts and failure records (items 2b and 2c) ------------------------------------


@pytest.mark.stack(extra_config=limits(logins=5))
def test_unknown_idp_is_rate_limited_before_anything_is_recorded(stack: Stack) -> None:
    with client(stack) as http:
        answers = [http.get(stack.url + "/saml/login", params={"idp": f"{UNKNOWN_IDP}/{i}"})
                   for i in range(20)]
        starts = http.get(stack.url + "/saml/login", params={"idp": stack.demo.idp.entity_id})
    assert [a.status_code for a in answers] == [400] * 5 + [429] * 15
    assert starts.status_code == 429  # the same limit: no pending sign-in written either
    assert once_rows(stack, "failure:") == 5 and once_rows(stack, "authn:") == 0


@pytest.mark.stack(extra_config=limits(failure_records=3))
def test_failure_records_are_capped_then_only_logged(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway"), client(stack) as http:
        answers = [http.get(stack.url + "/saml/login", params={"idp": f"{UNKNOWN_IDP}/{i}"})
                   for i in range(10)]
    references = [re.search(r"[0-9A-F]{8}", a.text.split("eference", 1)[1]).group(0)  # type: ignore[union-attr]
                  for a in answers]
    assert all(a.status_code == 400 for a in answers)
    assert once_rows(stack, "failure:") == 3
    not_kept = [r.getMessage() for r in caplog.records if "not kept" in r.getMessage()]
    assert len(not_kept) == 7
    assert all(any(f"ref={ref}" in line for line in not_kept) for ref in references[3:])


def _purge_every_second(demo: DemoStack) -> None:
    config = demo.workdir / "gateway.toml"
    text = config.read_text()
    assert 'url = "sqlite:///gateway.db"' in text
    config.write_text(text.replace('url = "sqlite:///gateway.db"',
                                   'url = "sqlite:///gateway.db"\npurge_interval = 1'))


@pytest.mark.stack(setup=_purge_every_second)
def test_expired_rows_are_purged_while_the_gateway_runs(stack: Stack) -> None:
    with client(stack) as http:
        for _ in range(5):  # five pending sign-ins, as a visitor who never finishes
            assert http.get(stack.url + "/saml/login",
                            params={"idp": stack.demo.idp.entity_id}).status_code == 302
    assert once_rows(stack, "authn:") == 5
    with sqlite3.connect(stack.db) as db:  # their time is up (as after login_timeout)
        db.execute("UPDATE once SET expires = 1 WHERE key LIKE 'authn:%'")
        db.execute("INSERT INTO once VALUES ('assertion:old', '1', 1), "
                   "('count:rate:logins:192.0.2.1', '3', 1), ('authn:live', '{}', 1e12)")
    deadline = time.monotonic() + 10
    while once_rows(stack) > 1 + once_rows(stack, "count:rate:logins:127"):
        assert time.monotonic() < deadline, row_kinds(stack)
        time.sleep(0.1)
    assert once_rows(stack, "authn:") == 1  # the live one stays


# -- a full store: 503, never 500 ----------------------------------------------------------


def redis_stack_setup(redis: RedisServer) -> object:
    def use_redis(demo: DemoStack) -> None:
        config = demo.workdir / "gateway.toml"
        text = config.read_text()
        assert 'url = "sqlite:///gateway.db"' in text
        config.write_text(text.replace('url = "sqlite:///gateway.db"',
                                       f'url = "{redis.url}"\nsocket_timeout = 2'))

    return use_redis


@pytest.fixture
def small_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of its own with 8 MB of memory and no eviction: full means full."""
    server = RedisServer(tmp_path_factory.mktemp("small-redis")).start()
    try:
        for name, value in (("maxmemory", "8mb"), ("maxmemory-policy", "noeviction")):
            assert server.command("CONFIG", "SET", name, value).startswith(b"+OK")
        yield server
    finally:
        server.stop()


def test_a_form_is_kept_for_a_session_that_just_ended_on_redis(
        tmp_path: Path, tls: TLSFiles, redis_server: RedisServer) -> None:
    """The same on Redis: the idle end leaves a marker until the session's absolute end,
    and only that cookie keeps a form."""
    redis_server.command("FLUSHALL")
    with (run_stack(tmp_path, tls, setup=redis_stack_setup(redis_server)) as stack,  # type: ignore[arg-type]
          client(stack) as http):
        login(http, stack, PAGE, "alice")
        cookie = http.cookies[SESSION]
        http.cookies.clear()
        for key in redis_keys(redis_server):
            if key.startswith("gw:session:"):
                redis_server.command("HSET", key, "last_seen", "0")  # idled out
        junk = post_form(http, stack, signed_cookie(stack))
        kept = post_form(http, stack, cookie)
        keys = redis_keys(redis_server)
    assert plain_sign_in_answer(junk) and kept.status_code == 303
    ended = [k for k in keys if k.startswith("gw:once:ended:")]
    assert len(ended) == 1 and 0 < int(redis_server.command("TTL", ended[0])[1:]) <= 8 * 3600
    assert len([k for k in keys if k.startswith("gw:once:stash:")]) == 1
    assert not any(k.startswith("gw:session:") for k in keys)


def redis_info(redis: RedisServer, field: str) -> int:
    reply = redis.command("INFO", "memory").decode()
    match = re.search(rf"^{field}:(\d+)", reply, re.M)
    assert match is not None, reply[:500]
    return int(match.group(1))


def redis_keys(redis: RedisServer) -> list[str]:
    reply = redis.command("KEYS", "*").decode()
    return re.findall(r"\$\d+\r\n([^\r]*)\r\n", reply)


def test_a_full_store_answers_503_never_500(tmp_path: Path, tls: TLSFiles,
                                            small_redis: RedisServer,
                                            caplog: pytest.LogCaptureFixture) -> None:
    with (run_stack(tmp_path, tls, setup=redis_stack_setup(small_redis),  # type: ignore[arg-type]
                    extra_config=limits()) as stack,
          client(stack) as http, caplog.at_level(logging.WARNING)):
        login(http, stack, PAGE, "alice")
        cookie = http.cookies[SESSION]
        http.cookies.clear()
        for key in redis_keys(small_redis):
            if key.startswith("gw:session:"):
                small_redis.command("HSET", key, "last_seen", "0")  # idled out
        # Fill what is left of the 8 MB with one value, as an attacker's forms did.
        free = 8 * 1024 * 1024 - redis_info(small_redis, "used_memory")
        filler = small_redis.command("SETRANGE", "filler", str(max(free - 4096, 1)), "x")
        assert filler.startswith(b":"), filler
        assert small_redis.command("SET", "one-more", "x" * 65536).startswith(b"-OOM")
        answers = {
            "kept form": post_form(http, stack, cookie),
            "sign-in start": http.get(stack.url + "/saml/login",
                                      params={"idp": stack.demo.idp.entity_id}),
            "unknown IdP": http.get(stack.url + "/saml/login", params={"idp": UNKNOWN_IDP}),
            "ACS": http.post(stack.url + "/saml/acs", data={"SAMLResponse": "x"}),
            "SLS": http.get(stack.url + "/saml/sls?SAMLRequest=x"),
            "registration": http.post(stack.url + "/_gateway/register",
                                      data={"email": "a@example.org", "consent": "yes"},
                                      headers={"origin": stack.url}),
        }
    for what, answer in answers.items():
        assert answer.status_code == 503, (what, answer.status_code, answer.text[:300])
        assert "temporarily unavailable" in answer.text, what
    crashes = [r for r in caplog.records if r.exc_info or "internal error" in r.getMessage()]
    assert crashes == [], [r.getMessage() for r in crashes]


# -- 10,000 hostile anonymous requests ----------------------------------------------------

HOSTILE = 10_000
ADDRESSES = [f"127.0.0.{10 + i}" for i in range(10)]  # the attacker's clients
LOGINS = 30  # [limits] logins in these runs: sign-in starts per client and minute
FAILURE_RECORDS = 100  # [limits] failure_records (the default): kept per hour, everyone
ROW_BYTES = 1024  # the largest row a hostile request can leave (measured: under 300)


def hostile_requests(stack: Stack) -> tuple[Counter[str], float]:
    """10,000 anonymous requests from ten client addresses in turn, a third of each kind:
    junk-cookie form POSTs to a gated page, sign-in starts for unknown IdPs, sign-in
    starts. Returns the answers by kind and status, and the seconds it took."""
    body = b"text=" + b"x" * 8000
    seen: Counter[str] = Counter()
    clients = [from_address(stack, address) for address in ADDRESSES]
    started = time.monotonic()
    try:
        for i in range(HOSTILE):
            http = clients[i % len(clients)]
            if i % 3 == 0:
                answer = http.post(stack.url + PAGE, content=body, headers={
                    "cookie": f"{SESSION}=junk{i}", "origin": stack.url,
                    "content-type": "application/x-www-form-urlencoded"})
                kind = "form"
            elif i % 3 == 1:
                answer = http.get(f"{stack.url}/saml/login?idp={quote(UNKNOWN_IDP)}%2F{i}")
                kind = "unknown idp"
            else:
                answer = http.get(f"{stack.url}/saml/login?idp="
                                  f"{quote(stack.demo.idp.entity_id, safe='')}&next=%2Fx{i}")
                kind = "sign-in"
            http.cookies.clear()
            seen[f"{kind} {answer.status_code}"] += 1
    finally:
        for http in clients:
            http.close()
    return seen, time.monotonic() - started


def member_signs_in(stack: Stack) -> None:
    """A member on another address signs in and reads: the store still serves."""
    with from_address(stack, "127.0.0.2") as member:
        login(member, stack, PAGE, "alice")
        assert member.get(stack.url + PAGE).status_code == 200


def check_answers(seen: Counter[str], elapsed: float) -> tuple[int, int]:
    """Every answer was one of the expected refusals. Returns the bounds the run must
    stay under: pending sign-ins (each client's sign-in starts are behind its ``logins``
    limit, so at most ``LOGINS`` per client and minute window touched) and failure
    records (behind the same limit, and at most ``FAILURE_RECORDS`` this hour)."""
    assert set(seen) <= {"form 401", "unknown idp 400", "unknown idp 429", "sign-in 302",
                         "sign-in 429"}, seen
    windows = math.ceil(elapsed / 60) + 1
    per_clients = LOGINS * windows * len(ADDRESSES)
    assert seen["unknown idp 400"] + seen["sign-in 302"] <= per_clients, seen
    return per_clients, min(per_clients, FAILURE_RECORDS)


@pytest.mark.stack(extra_config=limits(logins=LOGINS))
def test_10000_hostile_requests_leave_sqlite_small(stack: Stack) -> None:
    wal = Path(str(stack.db) + "-wal")
    db_before = stack.db.stat().st_size
    seen, elapsed = hostile_requests(stack)
    pending, failures = check_answers(seen, elapsed)
    kinds = row_kinds(stack)
    with sqlite3.connect(stack.db) as db:
        largest, total = db.execute(
            "SELECT max(length(key) + length(value)), sum(length(key) + length(value))"
            " FROM once").fetchone()
        sessions = db.execute("SELECT count(*) FROM sessions").fetchone()[0]
    print(f"\n{HOSTILE} hostile requests in {elapsed:.1f} s: {dict(seen)}; rows {dict(kinds)}, "
          f"{total} bytes (largest {largest}); file {stack.db.stat().st_size} "
          f"(+{stack.db.stat().st_size - db_before}), WAL {wal.stat().st_size}")
    counters = len(ADDRESSES) + 1  # one row per counter: per client, and the failure cap's
    bound = pending + failures + counters
    assert kinds["stash"] == 0 and kinds.get("ended", 0) == 0 and sessions == 0
    assert kinds["authn"] <= pending and kinds["failure"] <= failures
    assert sum(kinds.values()) <= bound
    assert largest <= ROW_BYTES and total <= bound * ROW_BYTES
    # The file: a few hundred small rows add some pages; the WAL stays within SQLite's
    # automatic checkpoint (1,000 pages of 4 KiB), whatever the number of requests.
    assert stack.db.stat().st_size - db_before <= 512 * 1024
    assert wal.stat().st_size <= 5 * 1024 * 1024
    member_signs_in(stack)


def redis_key_bytes(redis: RedisServer, keys: list[str]) -> int:
    """What Redis says the keys take (``MEMORY USAGE``: key, value and their overhead)."""
    sizes = [redis.command("MEMORY", "USAGE", key) for key in keys]
    return sum(int(reply.decode().strip().lstrip(":") or 0) for reply in sizes
               if reply.startswith(b":"))


def test_10000_hostile_requests_leave_redis_small(tmp_path: Path, tls: TLSFiles,
                                                  small_redis: RedisServer) -> None:
    with run_stack(tmp_path, tls, setup=redis_stack_setup(small_redis),  # type: ignore[arg-type]
                   extra_config=limits(logins=LOGINS)) as stack:
        used_before = redis_info(small_redis, "used_memory")
        seen, elapsed = hostile_requests(stack)
        pending, failures = check_answers(seen, elapsed)
        # Counters: one key per client and window (a window's key lives two windows),
        # and the failure cap's.
        bound = pending + failures + 3 * len(ADDRESSES) + 1
        keys = redis_keys(small_redis)
        kinds = Counter(k.removeprefix("gw:").removeprefix("once:").split(":", 1)[0]
                        for k in keys)
        key_bytes = redis_key_bytes(small_redis, keys)
        used = redis_info(small_redis, "used_memory")
        print(f"\n{HOSTILE} hostile requests in {elapsed:.1f} s: {dict(seen)}; keys "
              f"{dict(kinds)} of {key_bytes} bytes; used_memory {used_before} -> {used} "
              f"of 8 MB")
        assert kinds["stash"] == 0 and kinds.get("ended", 0) == 0 and kinds["session"] == 0
        assert kinds["authn"] <= pending and kinds["failure"] <= failures
        assert len(keys) <= bound and key_bytes <= bound * ROW_BYTES
        # Redis as a whole: the keys, plus the gateway's pooled connections' buffers and
        # its cached scripts — far from the 8 MB, which the old code filled in 195 requests.
        assert used - used_before <= 1024 * 1024
        member_signs_in(stack)
