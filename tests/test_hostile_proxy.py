"""What the proxy lets through, and what the server in front of it bounds, over real sockets.

* item 3: client headers an upstream may trust for identity (``X-Remote-User``,
  ``Remote-User``, ``X-Auth-Request-*``, ``Shib-*``, ``MELLON_*``…) never reach it, in any
  spelling, nor the names added in ``[proxy]``;
* item 9: an upstream cannot set (or shadow) the gateway's own cookies;
* item 11: a request head over ``[server] header_limit`` gets 431 and nothing goes
  upstream; a client that has not sent its head within ``header_timeout`` is dropped
  while others are served; idle connections are capped; the ``serve`` command applies it;
* item 15: an upstream's absolute ``Location`` (and ``Refresh``) pointing at its own
  origin is rewritten to ``public_url``; no ``Server`` header.

The raw-socket tests speak HTTP/1.1 by hand: an HTTP client library would refuse to send
what an attacker sends.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from gateway.demo.stack import prepare, servers
from gateway.proxy_headers import norm
from tests.conftest import (
    Stack,
    TLSFiles,
    bound_socket,
    port_of,
    seed_demo_keys,
    serve_gateway,
    serving,
)

PLAIN_SERVER = "\n[server]\nheader_timeout = 1\nkeepalive_timeout = 1\nlimit_concurrency = 40\n"

# -- helpers ------------------------------------------------------------------------------


def connect(url: str, tls: TLSFiles | None = None, timeout: float = 10) -> socket.socket:
    """A raw connection to the gateway at ``url`` (TLS-wrapped for https)."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname or "", parts.port or 80), timeout=timeout)
    if parts.scheme == "https":
        assert tls is not None
        return tls.client_context().wrap_socket(sock, server_hostname=parts.hostname)
    return sock


def read_response(sock: socket.socket) -> bytes:
    """One response: its head and a Content-Length body, or everything up to EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), None)
    while length is None or len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def split_response(data: bytes) -> tuple[bytes, bytes]:
    """The first whole response in ``data`` (by its Content-Length), and what follows."""
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), len(body))
    return head + b"\r\n\r\n" + body[:length], body[length:]


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.") else 0


def host_of(url: str) -> bytes:
    return urlsplit(url).netloc.encode()


def closed_after(sock: socket.socket, limit: float) -> tuple[float | None, bytes]:
    """Seconds until the server closed ``sock`` (None: still open after ``limit``), and
    what it sent before closing."""
    start = time.monotonic()
    got = b""
    sock.settimeout(0.1)
    while time.monotonic() - start < limit:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - start, got
        if not chunk:
            return time.monotonic() - start, got
        got += chunk
    return None, got


# -- item 3: authentication headers a client must not forge ----------------------------------

FORGED = [
    ("X-Remote-User", "mallory"), ("x_remote_user", "mallory"), ("REMOTE_USER", "mallory"),
    ("Remote-User", "mallory"), ("remote_user", "mallory"), ("X-Remote.User", "mallory"),
    ("X-Forwarded-User", "mallory"), ("X-Forwarded-Email", "mallory@evil.example"),
    ("X-Forwarded-Preferred-Username", "mallory"), ("X-Forwarded-Groups", "admin"),
    ("X-Auth-Request-User", "mallory"), ("x-auth-request-email", "mallory@evil.example"),
    ("X_AUTH_REQUEST_GROUPS", "admin"), ("X-User", "mallory"), ("X-EMAIL", "mallory@evil"),
    ("Auth-User", "mallory"), ("auth_user", "mallory"), ("Shib-Identity-Provider", "mallory"),
    ("shib_session_id", "mallory"), ("Shib-eppn", "mallory"), ("MELLON_NAME_ID", "mallory"),
    ("Mellon-uid", "mallory"), ("X-Webauth-User", "mallory"), ("X-Member-Id", "mallory"),
    ("X-Gateway-Identity", "mallory"), ("X-Original-URL", "/mallory"),
    # named in [proxy] below
    ("X-Tenant-Admin", "mallory"), ("x_tenant_admin", "mallory"), ("X-Corp-Role", "mallory"),
    ("x_corp_login", "mallory"),
]
PROXY_CONFIG = '\n[proxy]\nstrip_headers = ["X-Tenant-Admin"]\nstrip_prefixes = ["X-Corp-"]\n'


@pytest.mark.stack(extra_config=PROXY_CONFIG)
def test_authentication_headers_never_reach_the_upstream(stack: Stack) -> None:
    """``X-Remote-User: mallory`` and its family, in every spelling and also named in
    ``Connection``, are dropped; a harmless header still passes."""
    headers = [*FORGED, ("Connection", "X-Remote-User, Remote_User, x-hop"), ("X-Hop", "1"),
               ("X-Harmless", "kept")]
    with httpx.Client(verify=stack.tls.client_context(), timeout=10) as http:
        answer = http.get(f"{stack.url}/public/about", headers=headers)
    assert answer.status_code == 200, answer.text
    seen = stack.upstream.requests[-1]["headers"]
    leaked = [(k, v) for k, v in seen if "mallory" in v or v == "admin"]
    assert leaked == []
    forged_names = {norm(k.encode()) for k, _ in FORGED}
    assert not [k for k, _ in seen if norm(k.encode()) in forged_names]
    assert ("x-harmless", "kept") in seen
    assert not [k for k, _ in seen if k == "x-hop"]


def test_strip_settings_are_checked(tmp_path: Path) -> None:
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        prepare(tmp_path, extra_config='\n[proxy]\nstrip_headers = ["X Bad"]\n'
                                       'strip_prefixes = [""]\n')
    problems = " ".join(info.value.problems)
    assert "proxy.strip_headers" in problems and "proxy.strip_prefixes" in problems


# -- items 9 and 15: what an upstream answers ------------------------------------------------

OWN_COOKIES = [
    "__Host-gw_session=EVIL; Path=/; Secure; HttpOnly",
    "gw_session=EVIL; Path=/",
    "__HOST-GW_SESSION=EVIL; Path=/; Secure",
    "=__Host-gw_session=EVIL; Path=/",  # a nameless cookie, sent back as its value
    "__Secure-gw-login-abc=EVIL; Path=/saml; Secure",
    "gw-login-xyz=EVIL",
    "__secure-gw_idp=EVIL; Path=/; Secure",
    "__Secure-gw-stash=EVIL; Path=/_gateway/replay; Secure",
    "  __Secure-__Host-gw_session=EVIL",
]
OTHER_COOKIES = ["theme=dark; Path=/", "gw_session_hint=fine; Path=/",
                 "my-gw-login-x=fine"]


def hostile_upstream() -> Any:
    """Answers ``/public/cookies`` with Set-Cookie headers for the gateway's own names,
    ``/public/redirect?to=URL`` with a 302 to URL (``&refresh=1``: a Refresh header)."""
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&")
                     if "=" in p)
        headers: list[tuple[bytes, bytes]] = [(b"content-length", b"2"),
                                              (b"server", b"upstream/1.0")]
        status = 200
        if scope["path"] == "/public/cookies":
            headers += [(b"set-cookie", c.encode()) for c in OWN_COOKIES + OTHER_COOKIES]
        elif scope["path"] == "/public/redirect":
            target = unquote(query["to"]).encode()
            if query.get("refresh"):
                headers.append((b"refresh", b"0; url=" + target))
            else:
                status = 302
                headers.append((b"location", target))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, tls: TLSFiles) -> Iterator[tuple[str, str]]:
    """The gateway (https) in front of ``hostile_upstream``: (gateway URL, upstream URL)."""
    gw_sock, up_sock = bound_socket(), bound_socket()
    gateway_url = f"https://127.0.0.1:{port_of(gw_sock)}"
    upstream_url = f"http://127.0.0.1:{port_of(up_sock)}"
    demo = prepare(tmp_path_factory.mktemp("hostile"), gateway_url=gateway_url,
                   idp_url="http://127.0.0.1:9", reader_url=upstream_url)
    with serving(hostile_upstream(), up_sock, lifespan="off"), \
            serve_gateway(demo.settings, gw_sock, tls=tls):
        yield gateway_url, upstream_url


def test_upstream_cannot_set_the_gateway_cookies(hostile: tuple[str, str], tls: TLSFiles,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    gateway_url, _ = hostile
    with httpx.Client(verify=tls.client_context()) as http:
        answer = http.get(f"{gateway_url}/public/cookies")
    assert answer.status_code == 200
    assert answer.headers.get_list("set-cookie") == OTHER_COOKIES
    assert "set a cookie of the gateway's own" in caplog.text


def test_upstream_location_is_rewritten_to_public_url(hostile: tuple[str, str],
                                                      tls: TLSFiles) -> None:
    gateway_url, upstream_url = hostile
    port = urlsplit(upstream_url).port
    cases = [
        (f"{upstream_url}/issues/2023-03?page=2#top", f"{gateway_url}/issues/2023-03?page=2#top"),
        (f"HTTP://127.0.0.1:{port}/a/b", f"{gateway_url}/a/b"),
        (upstream_url, f"{gateway_url}/"),
        (f"{upstream_url}?q=1", f"{gateway_url}/?q=1"),
        ("/relative/path?x=1", "/relative/path?x=1"),
        ("https://elsewhere.example/x", "https://elsewhere.example/x"),
        (f"{upstream_url}9/x", f"{upstream_url}9/x"),  # another port
        (f"{upstream_url}@evil.example/x", f"{upstream_url}@evil.example/x"),  # another host
    ]
    with httpx.Client(verify=tls.client_context()) as http:
        for location, expected in cases:
            answer = http.get(f"{gateway_url}/public/redirect", params={"to": location})
            assert answer.status_code == 302
            assert answer.headers["location"] == expected, location
        refresh = http.get(f"{gateway_url}/public/redirect",
                           params={"to": f"{upstream_url}/next", "refresh": "1"})
        assert refresh.headers["refresh"] == f"0; url={gateway_url}/next"


def test_no_server_header(hostile: tuple[str, str], tls: TLSFiles) -> None:
    """Neither uvicorn's ``server: uvicorn`` nor the upstream's; the Date stays."""
    gateway_url, _ = hostile
    with httpx.Client(verify=tls.client_context()) as http:
        for path in ("/public/cookies", "/healthz", "/nope/../x", "/saml/login"):
            answer = http.get(gateway_url + path)
            assert "server" not in answer.headers, path
            assert len(answer.headers.get_list("date")) == 1, path


def test_demo_runs_the_gateway_as_serve_does(tmp_path: Path) -> None:
    seed_demo_keys(tmp_path)
    demo = prepare(tmp_path, gateway_url="http://127.0.0.1:18000",
                   idp_url="http://127.0.0.1:18001", reader_url="http://127.0.0.1:18002")
    config = servers(demo)[0].config
    assert config.server_header is False
    assert config.timeout_keep_alive == demo.settings.server.keepalive_timeout
    assert config.limit_concurrency == demo.settings.server.limit_concurrency
    assert getattr(config.http, "limits", None) is not None  # the guarded protocol


# -- item 11: request heads, slow and idle clients ---------------------------------------------


@pytest.mark.parametrize("over_tls", [False, True], ids=["http", "https"])
def test_oversized_request_head_gets_431(tmp_path: Path, tls: TLSFiles, over_tls: bool,
                                         caplog: pytest.LogCaptureFixture) -> None:
    """A 1 MB header: 431 once 64 KiB are read, nothing reaches the upstream; the same
    head under the limit is served."""
    from tests.conftest import run_stack

    with run_stack(tmp_path, tls, gateway_tls=over_tls) as stack:
        host = host_of(stack.url)
        with connect(stack.url, tls) as sock:
            sock.sendall(b"GET /public/big HTTP/1.1\r\nHost: " + host + b"\r\nX-Big: "
                         + b"a" * (1024 * 1024) + b"\r\n\r\n")
            answer = read_response(sock)
        assert status_of(answer) == 431, answer[:200]
        assert b"connection: close" in answer.lower()
        many = b"".join(b"X-Many-%d: %s\r\n" % (i, b"b" * 40) for i in range(2000))
        with connect(stack.url, tls) as sock:
            sock.sendall(b"GET /public/many HTTP/1.1\r\nHost: " + host + b"\r\n" + many
                         + b"\r\n")
            assert status_of(read_response(sock)) == 431
        with connect(stack.url, tls) as sock:
            sock.sendall(b"GET /public/" + b"u" * 70_000 + b" HTTP/1.1\r\nHost: " + host
                         + b"\r\n\r\n")
            assert status_of(read_response(sock)) == 431
        assert stack.upstream.requests == []  # nothing was forwarded
        assert "request head over 65536 bytes" in caplog.text
        with connect(stack.url, tls) as sock:
            sock.sendall(b"GET /public/fits HTTP/1.1\r\nHost: " + host + b"\r\nX-Big: "
                         + b"a" * 60_000 + b"\r\nConnection: close\r\n\r\n")
            assert status_of(read_response(sock)) == 200
        assert [r["path"] for r in stack.upstream.requests] == ["/public/fits"]


@pytest.mark.stack(gateway_tls=False, extra_config=PLAIN_SERVER)
def test_a_large_body_after_a_small_head_is_not_a_large_head(stack: Stack) -> None:
    """The limit counts the head only: a head and 300 KB of body in one write is served,
    and so are two pipelined requests."""
    host = host_of(stack.url)
    body = b"f=" + b"x" * 300_000
    with connect(stack.url) as sock:
        sock.sendall(b"POST /public/form HTTP/1.1\r\nHost: " + host
                     + b"\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert status_of(read_response(sock)) == 200
        sock.sendall(b"GET /public/one HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
                     + b"GET /public/two HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        # Both answers may arrive in one read: keep what the first read brought.
        first, rest = split_response(read_response(sock))
        second, _ = split_response(rest or read_response(sock))
        assert (status_of(first), status_of(second)) == (200, 200)
    assert stack.upstream.requests[0]["body"] == body
    assert [r["path"] for r in stack.upstream.requests[1:]] == ["/public/one", "/public/two"]


@pytest.mark.stack(gateway_tls=False, extra_config=PLAIN_SERVER)
def test_slow_client_is_dropped_while_others_are_served(stack: Stack) -> None:
    """One byte of header every 0.2 s: dropped (408) after the 1 s header timeout, while
    a normal client is answered at once all along."""
    host = host_of(stack.url)
    slow = connect(stack.url)
    slow.sendall(b"GET /public/slow HTTP/1.1\r\nHost: " + host + b"\r\nX-Slow: ")
    start = time.monotonic()
    dropped_at = None
    got = b""
    with httpx.Client(timeout=5) as http:
        while time.monotonic() - start < 5:
            try:
                slow.sendall(b"a")
            except OSError:
                dropped_at = time.monotonic() - start
                break
            gone, sent = closed_after(slow, 0.2)
            got += sent
            if gone is not None:
                dropped_at = time.monotonic() - start
                break
            quick = time.monotonic()
            assert http.get(f"{stack.url}/public/quick").status_code == 200
            assert time.monotonic() - quick < 1.0
    slow.close()
    assert dropped_at is not None and 0.9 <= dropped_at < 3.0, dropped_at
    assert status_of(got) in (0, 408), got[:100]
    assert "/public/slow" not in [r["path"] for r in stack.upstream.requests]


@pytest.mark.stack(gateway_tls=False, extra_config=PLAIN_SERVER)
def test_idle_connections_are_closed(stack: Stack) -> None:
    """A connection that sends nothing goes after the header timeout; one that stays
    idle after an answer goes after the keep-alive timeout."""
    host = host_of(stack.url)
    silent = connect(stack.url)
    kept = connect(stack.url)
    kept.sendall(b"GET /public/once HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert status_of(read_response(kept)) == 200
    results: dict[str, float | None] = {}

    def watch(name: str, sock: socket.socket) -> None:
        results[name] = closed_after(sock, 4)[0]

    threads = [threading.Thread(target=watch, args=pair)
               for pair in (("silent", silent), ("kept", kept))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["silent"] is not None and results["silent"] < 3.0, results
    assert results["kept"] is not None and results["kept"] < 3.0, results
    silent.close()
    kept.close()


@pytest.mark.stack(gateway_tls=False, extra_config=PLAIN_SERVER)
def test_a_request_in_progress_outlives_the_header_timeout(stack: Stack) -> None:
    """The timer covers the head only: a body sent slowly over 2 s is still forwarded."""
    host = host_of(stack.url)
    with connect(stack.url) as sock:
        sock.sendall(b"POST /public/slow-body HTTP/1.1\r\nHost: " + host
                     + b"\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n")
        for byte in b"hello":
            time.sleep(0.4)
            sock.sendall(bytes([byte]))
        assert status_of(read_response(sock)) == 200
    assert stack.upstream.requests[-1]["body"] == b"hello"


@pytest.mark.stack(gateway_tls=False, extra_config=PLAIN_SERVER.replace("40", "10"))
def test_idle_connections_make_room_for_requests(stack: Stack) -> None:
    """With ``limit_concurrency = 10``, 30 idle connections cannot lock members out: each
    new connection closes the one idle the longest; requests in progress are kept."""
    host = host_of(stack.url)
    busy = []
    for i in range(3):  # heads complete, bodies pending: requests in progress
        sock = connect(stack.url)
        sock.sendall(b"POST /public/busy-%d HTTP/1.1\r\nHost: " % i + host
                     + b"\r\nContent-Length: 2\r\n\r\n")
        busy.append(sock)
    time.sleep(0.2)
    idle = [connect(stack.url) for _ in range(30)]
    time.sleep(0.3)
    with httpx.Client(timeout=5) as http:
        assert http.get(f"{stack.url}/public/fresh").status_code == 200
    closed = sum(closed_after(s, 0.05)[0] is not None for s in idle)
    assert closed >= 20, closed
    for sock in busy:
        sock.sendall(b"ok")
        assert status_of(read_response(sock)) == 200
        sock.close()
    for sock in idle:
        sock.close()


# -- the serve command, as deployed ----------------------------------------------------------


@contextmanager
def served(tmp_path: Path, extra: str) -> Iterator[str]:
    """``sso-gateway serve`` in a subprocess (uvloop, httptools) on a demo config."""
    with bound_socket() as sock:
        port = port_of(sock)
    url = f"http://127.0.0.1:{port}"
    seed_demo_keys(tmp_path)
    prepare(tmp_path, gateway_url=url, idp_url="http://127.0.0.1:9",
            reader_url="http://127.0.0.1:9", extra_config=extra)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config",
                                str(tmp_path / "gateway.toml")], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("serve did not start: " + (
                        process.stderr.read().decode() if process.stderr else "")) from None
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()


def test_serve_bounds_heads_and_slow_clients(tmp_path: Path) -> None:
    with served(tmp_path, "\n[server]\nheader_timeout = 1\n") as url:
        host = host_of(url)
        with connect(url) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            answer = read_response(sock)
        assert status_of(answer) == 200
        assert b"\r\nserver:" not in answer.lower() and b"\r\ndate:" in answer.lower()
        with connect(url) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\r\nX-Big: "
                         + b"a" * (1024 * 1024) + b"\r\n\r\n")
            assert status_of(read_response(sock)) == 431
        slow = connect(url)
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\r\nX-Slow: a")
        with connect(url) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            assert status_of(read_response(sock)) == 200
        gone, _ = closed_after(slow, 4)
        slow.close()
        assert gone is not None and gone < 3.0


def test_server_settings_are_checked(tmp_path: Path) -> None:
    from gateway.errors import ConfigError

    seed_demo_keys(tmp_path)
    server = prepare(tmp_path).settings.server
    assert (server.header_limit, server.header_timeout) == (64 * 1024, 30)
    assert (server.keepalive_timeout, server.limit_concurrency) == (5, 1000)
    with pytest.raises(ConfigError) as info:
        prepare(tmp_path, extra_config="\n[server]\nheader_limit = 100\nheader_timeout = 0\n")
    problems = " ".join(info.value.problems)
    assert "server.header_limit" in problems and "server.header_timeout" in problems
