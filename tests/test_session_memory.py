"""Sessions served from memory, ended everywhere within one second, over real processes.

Replica A is the test stack's gateway; replica B is ``sso-gateway serve`` in a process
of its own on the same store (the same SQLite file, or one real redis-server). B
answers the member from its memory (its metrics say so); a revocation from the CLI, a
sign-out at A and a Single Logout received by A each make the session anonymous at B
within one second (``[session] memory``; docs/architecture.md).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.cli import main
from gateway.demo.stack import DemoStack
from tests.browser import client, login
from tests.conftest import (
    RedisServer,
    Stack,
    TLSFiles,
    bound_socket,
    port_of,
    run_stack,
    wait_until_healthy,
)

PAGE = "/issues/2023-03/pages/14"
COOKIE = "__Host-gw_session"
BOUND = 1.0  # seconds: the documented revocation bound


@dataclass
class Replicas:
    a: Stack
    b_url: str
    config: Path

    def at_b(self, cookie: str) -> httpx.Response:
        """The member's request at B (plain http: the cookie is sent by hand)."""
        return httpx.get(self.b_url + PAGE, headers={
            "Cookie": f"{COOKIE}={cookie}", "Accept": "application/json"})

    def memory_hits(self) -> float:
        text = httpx.get(self.b_url + "/metrics").text
        found = re.search(r'^gateway_session_lookups_total\{source="memory"\} (\S+)$', text,
                          re.M)
        return float(found.group(1)) if found else 0.0


@contextmanager
def replicas(workdir: Path, tls: TLSFiles, store_url: str = "") -> Iterator[Replicas]:
    sock = bound_socket()
    b_port = port_of(sock)
    sock.close()

    def setup(demo: DemoStack) -> None:
        config = demo.workdir / "gateway.toml"
        text = config.read_text()
        if store_url:
            text = text.replace('url = "sqlite:///gateway.db"', f'url = "{store_url}"')
        config.write_text(text.replace(
            "\nlisten = ", f'\nallowed_hosts = ["127.0.0.1:{b_port}"]\nlisten = ', 1))

    with run_stack(workdir, tls, setup=setup) as stack:
        config = stack.demo.workdir / "gateway.toml"
        log = workdir / "b.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this checkout
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config),
                 "--host", "127.0.0.1", "--port", str(b_port)],
                cwd=stack.demo.workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until_healthy(f"http://127.0.0.1:{b_port}", process, log)
            yield Replicas(stack, f"http://127.0.0.1:{b_port}", config)
        finally:
            process.terminate()
            process.wait(timeout=20)


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def both(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
         tls: TLSFiles) -> Iterator[Replicas]:
    """A and B on one store; one pair per backend for the module (each test signs in
    anew, so its session is its own)."""
    url = ""
    if request.param == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        redis.command("FLUSHALL")
        url = redis.url
    with replicas(tmp_path_factory.mktemp(f"memory-{request.param}"), tls, url) as running:
        yield running


def served_from_memory_at_b(both: Replicas, cookie: str) -> None:
    """B answers the member, from memory: its count of memory hits grows."""
    before = both.memory_hits()
    started = time.monotonic()
    while time.monotonic() - started < 0.7:  # across a read of the change log
        assert both.at_b(cookie).status_code == 200
        time.sleep(0.02)
    assert both.at_b(cookie).status_code == 200
    assert both.memory_hits() > before


def anonymous_at_b_within_the_bound(both: Replicas, cookie: str, ended: float) -> None:
    """Every request B starts one second after the end is anonymous (401)."""
    time.sleep(max(0.0, ended + BOUND - time.monotonic()))
    for _ in range(5):
        answer = both.at_b(cookie)
        assert answer.status_code == 401, (answer.status_code, answer.text[:200])


def signed_in(both: Replicas, http: httpx.Client) -> str:
    login(http, both.a, PAGE, "alice")
    return http.cookies[COOKIE]


def test_revocation_from_the_cli_reaches_b_within_a_second(both: Replicas) -> None:
    with client(both.a) as http:
        cookie = signed_in(both, http)
        served_from_memory_at_b(both, cookie)
        assert main(["sessions", "revoke", "--member", "M1001", "--config",
                     str(both.config)]) == 0
        ended = time.monotonic()
        anonymous_at_b_within_the_bound(both, cookie, ended)
        assert http.get(both.a.url + PAGE).status_code == 302  # and at A


def test_sign_out_at_a_reaches_b_within_a_second(both: Replicas) -> None:
    with client(both.a) as http:
        cookie = signed_in(both, http)
        served_from_memory_at_b(both, cookie)
        confirm = http.get(both.a.url + "/saml/logout")
        csrf = re.search(r'name="csrf" value="([^"]+)"', confirm.text)
        assert csrf is not None
        out = http.post(both.a.url + "/saml/logout", data={"csrf": csrf.group(1)},
                        headers={"origin": both.a.url})
        assert out.status_code == 302
        anonymous_at_b_within_the_bound(both, cookie, time.monotonic())


def test_single_logout_at_a_reaches_b_within_a_second(both: Replicas) -> None:
    stack = both.a
    with client(stack) as http, client(stack) as idp_side:
        cookie = signed_in(both, http)
        served_from_memory_at_b(both, cookie)
        started = idp_side.post(stack.demo.idp.slo_url + "/initiate",
                                data={"username": "alice", "binding": "redirect"})
        assert started.status_code == 302
        assert started.headers["location"].startswith(stack.url + "/saml/sls?")
        assert idp_side.get(started.headers["location"]).status_code == 302
        anonymous_at_b_within_the_bound(both, cookie, time.monotonic())
