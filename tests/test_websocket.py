"""WebSocket proxying (issue 17), over real sockets.

A real WebSocket upstream (an ASGI app under uvicorn on a loopback port) echoes what it
gets and first tells the client the headers its upgrade request carried; the gateway
runs over https (``run_stack``) with that upstream at ``/live``; the client is the
``websockets`` library. Sessions are ended the ways a member or an admin ends them: the
sign-out page, and ``SessionManager`` on the same store (what ``sessions revoke`` and the
console call).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

from gateway.config import load_settings
from gateway.demo.stack import prepare
from gateway.identity import verify_token
from gateway.reload import LiveGateway
from gateway.server import uvicorn_options
from gateway.sessions import CookieSigner, SessionManager, open_store
from tests.browser import client, login
from tests.conftest import (
    Stack,
    TLSFiles,
    bound_socket,
    port_of,
    run_stack,
    seed_demo_keys,
    serving,
)
from tests.test_slo import sign_out_at_gateway

PAGE = "/issues/2023-03/pages/14"
MEMBER = "/live/member/chat"
OPEN = "/live/open/feed"
CHECK_INTERVAL = 0.5
IDLE = 3
LIMIT = 4096
SPOOFED = {"X-Member-Id": "M9999", "X-Gateway-Identity": "forged.token.value",
           "X-Remote-User": "root", "X-Forwarded-For": "203.0.113.9",
           "X-Forwarded-Host": "evil.example"}

_CONFIG = """
[[upstreams]]
name = "live"
prefix = "/live"
url = "http://127.0.0.1:{live}"
[[upstreams]]
name = "gone"
prefix = "/gone"
url = "http://127.0.0.1:{gone}"

[[rules]]
path = "/live/member/**"
access = "member"
[[rules]]
path = "/live/paid/**"
access = "member"
require = {{ status = "active" }}
[[rules]]
path = "/live/open/**"
access = "public"
[[rules]]
path = "/gone/**"
access = "public"

[websocket]
max_message_bytes = {limit}
idle_timeout = {idle}
session_check_interval = {interval}
"""


@dataclass
class LiveUpstream:
    """A WebSocket upstream: tells the client its upgrade headers, then echoes.

    ``big:N`` makes it send N bytes, ``close:CODE`` close with CODE; a path ending in
    ``/refuse`` answers the upgrade with 404. ``upgrades`` are the headers each upgrade
    request had, ``closes`` the close codes it received."""

    upgrades: list[list[tuple[str, str]]] = field(default_factory=list)
    closes: list[int] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await receive()  # websocket.connect
        headers = [(k.decode().lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        self.upgrades.append(headers)
        if scope["path"].endswith("/refuse"):
            await send({"type": "websocket.http.response.start", "status": 404,
                        "headers": [(b"content-length", b"0")]})
            await send({"type": "websocket.http.response.body", "body": b""})
            return
        chosen = "chat.v2" if "chat.v2" in scope.get("subprotocols", []) else None
        await send({"type": "websocket.accept", "subprotocol": chosen})
        await send({"type": "websocket.send", "text": json.dumps(
            {"path": scope["path"], "query": scope["query_string"].decode(),
             "headers": headers})})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                self.closes.append(message.get("code", 0))
                return
            text = message.get("text")
            if text and text.startswith("big:"):
                await send({"type": "websocket.send", "bytes": b"x" * int(text[4:])})
            elif text and text.startswith("close:"):
                await send({"type": "websocket.close", "code": int(text[6:])})
                return
            elif text is not None:
                await send({"type": "websocket.send", "text": text})
            else:
                await send({"type": "websocket.send", "bytes": message["bytes"]})


@dataclass
class Live:
    stack: Stack
    upstream: LiveUpstream

    def url(self, path: str) -> str:
        return self.stack.url.replace("https://", "wss://") + path

    def open(self, path: str, *, cookie: str | None = None, origin: str | None = "own",
             headers: dict[str, str] | None = None, **options: Any) -> ClientConnection:
        extra = dict(headers or {})
        if cookie is not None:
            extra["Cookie"] = f"__Host-gw_session={cookie}"
        chosen = self.stack.url if origin == "own" else origin
        ws: ClientConnection = connect(
            self.url(path), ssl=self.stack.tls.client_context(),
            origin=Origin(chosen) if chosen is not None else None, additional_headers=extra,
            open_timeout=10, close_timeout=5, max_size=None, **options)
        return ws

    def refused(self, path: str, **kwargs: Any) -> int:
        """The status of an upgrade the gateway refuses."""
        with pytest.raises(InvalidStatus) as refused:
            self.open(path, **kwargs).close()
        return refused.value.response.status_code


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tls: TLSFiles) -> Iterator[Live]:
    upstream = LiveUpstream()
    sock = bound_socket()
    with bound_socket() as closed:
        gone = port_of(closed)  # nothing listens there once this socket is closed
    extra = _CONFIG.format(live=port_of(sock), gone=gone, limit=LIMIT, idle=IDLE,
                           interval=CHECK_INTERVAL)
    with (serving(upstream, sock, lifespan="off"),
          run_stack(tmp_path_factory.mktemp("live"), tls, extra_config=extra) as stack):
        yield Live(stack, upstream)


@contextmanager
def signed_in(live: Live, username: str) -> Iterator[tuple[httpx.Client, str]]:
    """A browser of ``username``'s, signed in: the client and its session cookie."""
    with client(live.stack) as http:
        login(http, live.stack, PAGE, username)
        cookie = http.cookies.get("__Host-gw_session")
        assert cookie
        yield http, cookie


def first(ws: ClientConnection) -> dict[str, Any]:
    """The upstream's first message: what its upgrade request carried."""
    hello: dict[str, Any] = json.loads(ws.recv(timeout=5))
    return hello


def closed_with(ws: ClientConnection, within: float) -> tuple[int, float]:
    """Wait for the gateway to close ``ws``: its close code and the seconds it took."""
    start = time.monotonic()
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            ws.recv(timeout=within)
    assert closed.value.rcvd is not None, "closed without a close frame"
    return closed.value.rcvd.code, time.monotonic() - start


def end_sessions(live: Live, member_id: str) -> int:
    """End a member's sessions as ``sessions revoke`` and the admin console do: through a
    ``SessionManager`` on the gateway's store, from another process's point of view."""
    settings = live.stack.demo.settings

    async def revoke() -> int:
        stores = open_store(settings.store.url, time.time, **settings.store.options())
        await stores.backend.open()
        try:
            sessions = SessionManager(
                stores.sessions, CookieSigner(settings.session_secrets(), "session"),
                lifetime=settings.session.lifetime,
                idle_timeout=settings.session.idle_timeout, clock=time.time)
            subjects = {r.principal.subject for r in await sessions.sessions()
                        if r.principal.member_id == member_id}
            return sum([await sessions.end_subject_sessions(s) for s in subjects])
        finally:
            await stores.backend.close()

    return asyncio.run(revoke())


# -- a member's connection -----------------------------------------------------------------


def test_member_connection_carries_identity_and_token_and_no_spoofed_header(
        live: Live, caplog: pytest.LogCaptureFixture) -> None:
    with (signed_in(live, "alice") as (_, cookie),
          caplog.at_level(logging.INFO, logger="gateway.access")):
        with live.open(MEMBER + "?room=7", cookie=cookie, headers=SPOOFED,
                       subprotocols=["chat.v2", "chat.v1"]) as ws:
            hello = first(ws)
            assert ws.subprotocol == "chat.v2"
            ws.send("hello, ünïcode")
            assert ws.recv(timeout=5) == "hello, ünïcode"
            ws.send(b"\x00\x01\xff")
            assert ws.recv(timeout=5) == b"\x00\x01\xff"
        assert hello["path"] == MEMBER and hello["query"] == "room=7"
        headers: dict[str, list[str]] = {}
        for name, value in hello["headers"]:
            headers.setdefault(name, []).append(value)
        # The gateway's identity, once each; the client's copies never arrive.
        assert headers["x-member-id"] == ["M1001"]
        assert headers["x-member-name"] == ["Alice Archer"]
        assert headers["x-forwarded-for"] == ["127.0.0.1"]
        assert headers["x-forwarded-host"] == [live.stack.url.split("://")[1]]
        assert "x-remote-user" not in headers
        assert "gw_session" not in " ".join(headers.get("cookie", []))
        [token] = headers["x-gateway-identity"]
        jwks = httpx.get(live.stack.url + "/.well-known/jwks.json",
                         verify=live.stack.tls.client_context()).json()
        claims = verify_token(token, jwks, "live", issuer=live.stack.url)
        assert claims["sub"] == "M1001" and claims["name"] == "Alice Archer"
        assert headers["origin"] == [live.stack.url]
        deadline = time.monotonic() + 5
        while 1000 not in live.upstream.closes and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 1000 in live.upstream.closes  # the client's close reached the upstream
        lines = [r for r in caplog.records
                 if r.name == "gateway.access" and r.getMessage() == "websocket"]
        while not lines and time.monotonic() < deadline:
            time.sleep(0.05)
            lines = [r for r in caplog.records
                     if r.name == "gateway.access" and r.getMessage() == "websocket"]
        fields = lines[-1].fields  # type: ignore[attr-defined]
        assert fields["status"] == 101 and fields["closed_by"] == "client"
        assert fields["upstream"] == "live" and fields["session"]
        assert fields["bytes_in"] == len("hello, ünïcode".encode()) + 3


def test_close_codes_are_relayed_from_the_upstream(live: Live) -> None:
    with live.open(OPEN) as ws:
        first(ws)
        ws.send("close:4000")
        code, _ = closed_with(ws, 5)
    assert code == 4000


def test_public_path_takes_anonymous_upgrades_without_identity(live: Live) -> None:
    with live.open(OPEN, origin=None) as ws:  # no Origin: allowed where nothing is gated
        names = {name for name, _ in first(ws)["headers"]}
    assert "x-member-id" not in names and "x-gateway-identity" not in names


# -- refusals before the handshake ---------------------------------------------------------


def test_anonymous_upgrade_to_a_gated_path_is_a_401_and_reaches_nothing(live: Live) -> None:
    upgrades, sessions = len(live.upstream.upgrades), live.stack.session_count()
    assert live.refused(MEMBER) == 401
    assert live.refused(MEMBER, cookie="forged.cookie") == 401
    assert len(live.upstream.upgrades) == upgrades
    assert live.stack.session_count() == sessions  # nothing was kept for the visitor


def test_a_member_the_rules_deny_gets_a_403(live: Live) -> None:
    upgrades = len(live.upstream.upgrades)
    with signed_in(live, "bob") as (_, cookie):  # bob's membership has lapsed
        assert live.refused("/live/paid/feed", cookie=cookie) == 403
        with live.open("/live/member/feed", cookie=cookie) as ws:  # any member may
            assert first(ws)["path"] == "/live/member/feed"
    assert len(live.upstream.upgrades) == upgrades + 1


def test_cross_origin_and_origin_less_upgrades_are_refused(
        live: Live, caplog: pytest.LogCaptureFixture) -> None:
    upgrades = len(live.upstream.upgrades)
    with signed_in(live, "dave") as (_, cookie), caplog.at_level(logging.INFO):
        # A page on another site opening a socket with the member's cookie (CSWSH).
        assert live.refused(MEMBER, cookie=cookie, origin="https://evil.example") == 403
        assert live.refused(OPEN, cookie=cookie, origin="https://evil.example") == 403
        assert live.refused(MEMBER, cookie=cookie, origin="null") == 403
        # No browser omits Origin: on a gated path that is refused too.
        assert live.refused(MEMBER, cookie=cookie, origin=None) == 403
    assert len(live.upstream.upgrades) == upgrades
    assert any("refused cross-origin WebSocket" in r.getMessage() for r in caplog.records)


def test_gateway_paths_refuse_upgrades_with_501(live: Live) -> None:
    for path in ("/_gateway/sessions", "/saml/login", "/healthz"):
        assert live.refused(path) == 501


def test_upstream_down_is_a_502_and_its_own_refusal_is_passed_on(live: Live) -> None:
    assert live.refused("/gone/feed") == 502
    assert live.refused(OPEN + "/refuse") == 404


# -- the connection ends with the session --------------------------------------------------


def test_revoking_the_session_closes_the_connection_within_the_check_interval(
        live: Live) -> None:
    with signed_in(live, "carol") as (_, cookie), live.open(MEMBER, cookie=cookie) as ws:
        first(ws)
        ws.send("still here")
        assert ws.recv(timeout=5) == "still here"
        assert end_sessions(live, "M1003") == 1
        code, took = closed_with(ws, 5)
    assert code == 4401
    assert took < CHECK_INTERVAL + 2.0, took  # the interval plus one round of store reads


def test_signing_out_closes_the_connection(live: Live) -> None:
    with signed_in(live, "alice") as (http, cookie), live.open(MEMBER, cookie=cookie) as ws:
        first(ws)
        assert sign_out_at_gateway(http, live.stack).status_code in (302, 303)
        code, took = closed_with(ws, 5)
    assert code == 4401
    assert took < CHECK_INTERVAL + 2.0, took  # the interval plus one round of store reads


# -- limits ------------------------------------------------------------------------------


def test_a_message_over_the_limit_closes_with_1009_either_way(live: Live) -> None:
    with live.open(OPEN) as ws:
        first(ws)
        ws.send("x" * LIMIT)  # at the limit: relayed
        assert ws.recv(timeout=5) == "x" * LIMIT
        ws.send(b"x" * (LIMIT + 1))
        code, _ = closed_with(ws, 5)
    assert code == 1009
    with live.open(OPEN) as ws:
        first(ws)
        ws.send(f"big:{LIMIT + 1}")  # the upstream sends too much
        code, _ = closed_with(ws, 5)
    assert code == 1009


def test_an_idle_connection_closes_with_1001(live: Live) -> None:
    with live.open(OPEN) as ws:
        first(ws)
        code, took = closed_with(ws, IDLE + 3)
    assert code == 1001
    assert IDLE - 0.5 <= took < IDLE + CHECK_INTERVAL + 2.0, took


def test_metrics_count_open_connections_and_why_they_ended(live: Live) -> None:
    def value(name: str) -> float:
        text = httpx.get(live.stack.url + "/metrics",
                         verify=live.stack.tls.client_context()).text
        line = next(row for row in text.splitlines() if row.startswith(name + " "))
        return float(line.split()[1])

    def settles(name: str, expected: float) -> bool:
        """The gauge reaches ``expected``: a connection is counted until both of its sides
        are closed, a moment after the client saw its close frame."""
        deadline = time.monotonic() + 5
        while value(name) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return value(name) == expected

    open_now, by_upstream = ("gateway_websocket_connections",
                             'gateway_websocket_closed_total{reason="upstream"}')
    assert settles(open_now, 0)  # earlier tests' connections are all closed
    before = value(by_upstream)
    with live.open(OPEN) as ws:
        first(ws)
        assert value(open_now) == 1
        ws.send("close:1000")
        assert closed_with(ws, 5)[0] == 1000
    assert settles(open_now, 0)
    assert value(by_upstream) == before + 1


# -- a reload ------------------------------------------------------------------------------


class ReloadOnRequest:
    """``LiveGateway`` (the app ``serve`` runs) plus ``GET /test-reload``, which reloads it
    in the server's own event loop, as SIGHUP does."""

    def __init__(self, app: LiveGateway) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/test-reload":
            outcome = await self.app.reload()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": outcome.result.encode()})
            return
        await self.app(scope, receive, send)


def test_a_reload_ends_the_old_configurations_sockets_with_1012(
        tmp_path: Path, tls: TLSFiles) -> None:
    upstream, up_sock, gw_sock = LiveUpstream(), bound_socket(), bound_socket()
    url = f"https://127.0.0.1:{port_of(gw_sock)}"
    extra = _CONFIG.format(live=port_of(up_sock), gone=1, limit=LIMIT, idle=30,
                           interval=CHECK_INTERVAL) + "\n[server]\nshutdown_timeout = 1\n"
    seed_demo_keys(tmp_path)
    prepare(tmp_path, gateway_url=url, idp_url="http://127.0.0.1:9",
            reader_url="http://127.0.0.1:9", extra_config=extra)
    settings = load_settings(tmp_path / "gateway.toml", environ={})
    app = ReloadOnRequest(LiveGateway(settings))
    with (serving(upstream, up_sock, lifespan="off"),
          serving(app, gw_sock, ssl_keyfile=str(tls.key), ssl_certfile=str(tls.cert),
                  **uvicorn_options(settings.server, settings.websocket))):
        wss = url.replace("https://", "wss://") + OPEN
        with connect(wss, ssl=tls.client_context(), origin=Origin(url),
                     open_timeout=10) as ws:
            first(ws)
            answer = httpx.get(url + "/test-reload", verify=tls.client_context(), timeout=30)
            assert answer.text == "ok"
            ws.send("still on the old configuration")  # until it retires
            assert ws.recv(timeout=5) == "still on the old configuration"
            code, took = closed_with(ws, 10)
        assert code == 1012 and took < 1 + 3, took  # [server] shutdown_timeout, then closed
        assert 1001 in upstream.closes  # the upstream was told the gateway went away
        with connect(wss, ssl=tls.client_context(), origin=Origin(url),
                     open_timeout=10) as ws:
            first(ws)  # the new configuration takes sockets
