"""Two gateway replicas sharing one Redis, on two real https sockets, no balancer between.

Replica A's URL is the ``public_url``: the dev IdP posts there, and ACS/Destination
checks come from ``public_url``, not from the Host header, so a response posted to B
validates too. Cookies are host-scoped, not port-scoped, so one httpx client carries
the session and the login-binding cookies to both replicas, as a browser behind a
balancer would. Redis trouble is tested on a redis-server of its own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from lxml import etree

from gateway.cli import main
from gateway.demo.stack import DemoStack, prepare
from gateway.sessions import CookieSigner, SessionManager, open_store
from tests.browser import client, login, post_to_acs, sign_in_at_idp, start_login
from tests.conftest import (
    RedisServer,
    Stack,
    TLSFiles,
    bound_socket,
    memory_sees_it,
    port_of,
    run_stack,
    seed_demo_keys,
    serve_gateway,
)
from tests.test_login_hostile import PAGE, Pending, forge

SESSION_COOKIE = "__Host-gw_session"


@dataclass
class Replicas:
    a: Stack  # replica A: the stack the dev IdP answers to
    b_url: str
    redis: RedisServer

    def session_count(self) -> int:
        reply = self.redis.command("EVAL", "return #redis.call('KEYS', ARGV[1])", "0",
                                   "gw:session:*")
        return int(reply.decode().strip().lstrip(":"))


@contextmanager
def run_replicas(workdir: Path, tls: TLSFiles, redis: RedisServer) -> Iterator[Replicas]:
    sock = bound_socket()
    b_host = f"127.0.0.1:{port_of(sock)}"

    def use_redis(demo: DemoStack) -> None:
        config = demo.workdir / "gateway.toml"
        text = config.read_text()
        assert 'url = "sqlite:///gateway.db"' in text and "\nlisten = " in text
        text = text.replace('url = "sqlite:///gateway.db"',
                            f'url = "{redis.url}"\nsocket_timeout = 1')
        # B is reached by its own address here (a balancer would send public_url's host).
        config.write_text(text.replace("\nlisten = ", f'\nallowed_hosts = ["{b_host}"]\nlisten = ',
                                       1))

    with (sock, run_stack(workdir, tls, setup=use_redis) as stack,
          serve_gateway(stack.demo.settings, sock, tls=tls)):  # the very same settings as A
        yield Replicas(stack, f"https://{b_host}", redis)


@pytest.fixture
def replicas(tmp_path: Path, tls: TLSFiles, redis_server: RedisServer) -> Iterator[Replicas]:
    redis_server.command("FLUSHALL")
    with run_replicas(tmp_path, tls, redis_server) as running:
        yield running


def begin_at(http: httpx.Client, stack: Stack, base_url: str) -> Pending:
    """Start a login at one replica; the AuthnRequest ID and RelayState (cf. ``begin``)."""
    answer = http.get(base_url + "/saml/login",
                      params={"idp": stack.demo.idp.entity_id, "next": PAGE})
    assert answer.status_code == 302, answer.text
    query = parse_qs(urlsplit(answer.headers["location"]).query)
    xml = zlib.decompress(base64.b64decode(query["SAMLRequest"][0]), -15)
    return Pending(etree.fromstring(xml).get("ID"), query["RelayState"][0])


def test_login_at_a_is_a_session_at_b_and_revoking_ends_it_everywhere(
        replicas: Replicas) -> None:
    a, b = replicas.a.url, replicas.b_url
    with client(replicas.a) as http:
        login(http, replicas.a, PAGE, "alice")
        assert replicas.session_count() == 1
        at_b = http.get(b + PAGE)
        assert at_b.status_code == 200 and "Upstream page" in at_b.text
        assert http.get(a + PAGE).status_code == 200

        async def revoke() -> int:  # a third client of the same Redis, as an admin tool is
            settings = replicas.a.demo.settings
            stores = open_store(replicas.redis.url, time.time)
            await stores.backend.open()
            try:
                sessions = SessionManager(
                    stores.sessions, CookieSigner(settings.session_secrets(), "session"),
                    lifetime=settings.session.lifetime,
                    idle_timeout=settings.session.idle_timeout, clock=time.time)
                [subject] = {r.principal.subject for r in await sessions.sessions()
                             if r.principal.member_id == "M1001"}
                return await sessions.end_subject_sessions(subject)
            finally:
                await stores.backend.close()

        assert asyncio.run(revoke()) == 1
        memory_sees_it()  # the revoking tool is a third process
        for url in (a, b):
            gone = http.get(url + PAGE)
            assert gone.status_code == 302, gone.text
            assert gone.headers["location"].startswith("/saml/login")
    assert replicas.session_count() == 0


def test_assertion_consumed_at_a_is_refused_at_b(replicas: Replicas) -> None:
    stack = replicas.a
    with client(stack) as http:
        answer = sign_in_at_idp(http, start_login(http, stack, PAGE), "alice")
        assert post_to_acs(http, answer).status_code == 302  # consumed at A
        replayed = http.post(replicas.b_url + "/saml/acs",
                             data={"SAMLResponse": answer.saml_response,
                                   "RelayState": answer.relay_state})
        assert replayed.status_code == 400
    # The same Assertion ID in a fresh response to a fresh request started at B: only the
    # shared replay cache can refuse this one.
    with client(stack) as http:
        first = begin_at(http, stack, stack.url)
        assert http.post(stack.url + "/saml/acs", data={
            "SAMLResponse": forge(stack, first, assertion_id="_once"),
            "RelayState": first.relay_state}).status_code == 302
    with client(stack) as http:
        second = begin_at(http, stack, replicas.b_url)
        again = http.post(replicas.b_url + "/saml/acs", data={
            "SAMLResponse": forge(stack, second, assertion_id="_once"),
            "RelayState": second.relay_state})
        assert again.status_code == 400 and "Sign-in failed" in again.text
    assert replicas.session_count() == 2


async def test_fifty_concurrent_acs_posts_across_replicas_make_one_session(
        replicas: Replicas) -> None:
    stack = replicas.a
    with client(stack) as http:
        pending = begin_at(http, stack, stack.url)
        cookies = http.cookies
    response = forge(stack, pending)
    data = {"SAMLResponse": response, "RelayState": pending.relay_state}
    async with httpx.AsyncClient(verify=stack.tls.client_context(), cookies=cookies,
                                 timeout=30) as browser:
        answers = await asyncio.gather(*(
            browser.post((stack.url if i % 2 else replicas.b_url) + "/saml/acs", data=data)
            for i in range(50)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [302] + [400] * 49
    assert replicas.session_count() == 1


def test_redis_lost_and_back(tmp_path: Path, tls: TLSFiles) -> None:
    """Redis stops: 503s, never anonymous access or a 500; it returns: served again, no restart.

    This Redis keeps nothing on disk, so the session dies with it: after the restart the
    old cookie leads to a new login, and a fresh login works on the same gateway.
    """
    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis").start()
    try:
        with run_replicas(tmp_path / "site", tls, redis) as replicas:
            stack = replicas.a
            with client(stack) as http:
                login(http, stack, PAGE, "alice")
                assert http.get(stack.url + PAGE).status_code == 200
                seen = len(stack.upstream.requests)
                redis.stop()
                # A session checked in the last moment may be answered from memory, for
                # at most the memory bound; then every answer is the store's: 503.
                memory_sees_it()
                for url in (stack.url, replicas.b_url):
                    page = http.get(url + PAGE)
                    assert page.status_code == 503, page.text
                    assert "Temporarily unavailable" in page.text and "reference" in page.text
                    as_json = http.get(url + PAGE, headers={"accept": "application/json"})
                    assert as_json.status_code == 503
                    assert as_json.json()["error"] == "Temporarily unavailable"
                    ready = http.get(url + "/readyz")
                    assert ready.status_code == 503 and "store" in ready.json()["failed"]
                starting = http.get(stack.url + "/saml/login",
                                    params={"idp": stack.demo.idp.entity_id, "next": PAGE})
                assert starting.status_code == 503
                assert len(stack.upstream.requests) == seen  # nothing reached the upstream
                assert "Traceback" not in json.dumps(ready.json())

                redis.start()  # same port, empty: the gateways reconnect on their own
                assert http.get(stack.url + "/readyz").status_code == 200
                assert http.get(replicas.b_url + "/readyz").status_code == 200
                old = http.get(stack.url + PAGE)
                assert old.status_code == 302  # the session went with Redis's memory
                login(http, stack, PAGE, "alice")
                assert http.get(replicas.b_url + PAGE).status_code == 200
    finally:
        redis.stop()


def test_check_reports_the_store_with_its_password_masked(
        tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    seed_demo_keys(tmp_path)
    config = prepare(tmp_path).workdir / "gateway.toml"
    sqlite_line = 'url = "sqlite:///gateway.db"'
    with bound_socket() as sock:
        down = f"redis://:s3cret-pw@127.0.0.1:{port_of(sock)}/0"  # nothing listens there
    config.write_text(config.read_text().replace(
        sqlite_line, f'url = "{down}"\nconnect_timeout = 0.5'))
    assert main(["check", "--config", str(config)]) == 1
    out, err = capsys.readouterr()
    assert "s3cret" not in out + err
    assert err.count("\n") == 1 and err.startswith(
        f"error: session store redis://:*****@127.0.0.1:{down.rsplit(':', 1)[1]} "
        "is not reachable: ")
    config.write_text(config.read_text().replace(down, redis_server.url))
    assert main(["check", "--config", str(config)]) == 0
    assert f"store       {redis_server.url}" in capsys.readouterr().out


def test_sign_out_at_b_ends_the_session_at_a(replicas: Replicas) -> None:
    a, b = replicas.a.url, replicas.b_url
    with client(replicas.a) as http:
        login(http, replicas.a, PAGE, "alice")
        confirm = http.get(b + "/saml/logout")
        csrf = re.search(r'name="csrf" value="([^"]+)"', confirm.text)
        assert confirm.status_code == 200 and csrf is not None
        # Behind a balancer the browser is on the public origin, whichever replica answers.
        out = http.post(b + "/saml/logout", data={"csrf": csrf.group(1)}, headers={"origin": a})
        assert out.status_code == 302  # on to the IdP's single logout
        assert replicas.session_count() == 0
        memory_sees_it()  # A learns it from the store's change log
        assert http.get(a + PAGE).status_code == 302


def test_idp_logout_received_by_a_ends_the_session_used_at_b(replicas: Replicas) -> None:
    stack, b = replicas.a, replicas.b_url
    with client(stack) as at_b, client(stack) as idp_side:
        login(at_b, stack, PAGE, "alice")
        assert at_b.get(b + PAGE).status_code == 200
        started = idp_side.post(stack.demo.idp.slo_url + "/initiate",
                                data={"username": "alice", "binding": "redirect"})
        assert started.status_code == 302
        assert started.headers["location"].startswith(stack.url + "/saml/sls?")  # replica A
        answered = idp_side.get(started.headers["location"])
        assert answered.status_code == 302, answered.text
        assert replicas.session_count() == 0
        memory_sees_it()  # B learns it from the store's change log
        gone = at_b.get(b + PAGE)
    assert gone.status_code == 302 and gone.headers["location"].startswith("/saml/login")
