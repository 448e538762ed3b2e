"""gateway.proxy over real sockets: httpx → uvicorn(wrapper) → the upstream client (the
lean one and aiohttp's, every test with each) → uvicorn(upstream); and the one pass over
a request's headers (``HeadReader``) on its own."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from gateway.config import Upstream
from gateway.cookies import Cookies
from gateway.errors import BadRequest, BodyTooLarge, GatewayError
from gateway.proxy import Proxy
from gateway.proxy_headers import HeadReader, ResponseRules, header_text
from tests.conftest import serving

MAX_BODY = 6 * 1024 * 1024
SESSION_COOKIE = "gw_session"
PUBLIC_HOST = "gw.example.test"
IDENTITY = (b"x-member-id", b"m-42")
GZIPPED = gzip.compress(b"<p>member-only issue</p>" * 2000, mtime=0)


# -- servers -----------------------------------------------------------------------------


def _bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class UpstreamLog:
    """What the upstream saw, shared with the tests across threads."""

    paths: list[str] = field(default_factory=list)
    client_ports: list[int] = field(default_factory=list)
    stream_closed: threading.Event = field(default_factory=threading.Event)


def upstream_app(seen: UpstreamLog) -> Any:
    async def start(send: Send, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})

    async def whole(send: Send, body: bytes, headers: list[tuple[bytes, bytes]],
                    status: int = 200) -> None:
        await start(send, status, [(b"content-length", str(len(body)).encode()), *headers])
        await send({"type": "http.response.body", "body": body})

    async def read_body(receive: Receive) -> bytes | None:
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                return b"".join(chunks)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        seen.paths.append(path)
        seen.client_ports.append(scope["client"][1])
        if path == "/slow":  # answers only when the caller hangs up (at most 1 s)
            await read_body(receive)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(receive(), 1.0)
            return
        if path == "/stream":  # endless body until the client goes away (at most 1 s)
            await start(send, 200, [(b"content-type", b"text/plain")])
            gone = asyncio.Event()

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone.set()
                seen.stream_closed.set()

            watcher = asyncio.create_task(watch())
            for _ in range(100):
                if gone.is_set():
                    break
                await send({"type": "http.response.body", "body": b"x" * 1024,
                            "more_body": True})
                await asyncio.sleep(0.01)
            watcher.cancel()
            return
        if path == "/truncated":  # promises 1000 bytes, sends 10, hangs up
            await start(send, 200, [(b"content-length", b"1000")])
            await send({"type": "http.response.body", "body": b"0123456789",
                        "more_body": True})
            return
        body = await read_body(receive)
        if body is None:
            return
        if path == "/upload":
            digest = hashlib.sha256(body).hexdigest().encode()
            await start(send, 201, [(b"x-body-sha256", digest)])
            for i in range(0, len(body), 65536):
                await send({"type": "http.response.body", "body": body[i:i + 65536],
                            "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        if path == "/gzip":
            await whole(send, GZIPPED, [(b"content-encoding", b"gzip"),
                                        (b"content-type", b"text/html")])
            return
        if path == "/cookies":
            await whole(send, b"ok", [(b"set-cookie", b"a=1; Path=/"),
                                      (b"set-cookie", b"b=2; Path=/; HttpOnly")])
            return
        if path == "/hop":
            await whole(send, b"ok", [(b"connection", b"x-secret-hop"),
                                      (b"x-secret-hop", b"1"),
                                      (b"keep-alive", b"timeout=5"),
                                      (b"x-accel-redirect", b"/other-upstream/"),
                                      (b"x-accel-expires", b"3600"),
                                      (b"x-accel-limit-rate", b"1"),
                                      (b"x-accel-charset", b"koi8-r"),
                                      (b"x-accel-buffering", b"no"),
                                      (b"x-kept", b"1")])
            return
        if path.startswith("/cache/"):
            case = path.removeprefix("/cache/")
            headers = {
                "none": [],
                "public": [(b"cache-control", b"public, max-age=3600"),
                           (b"vary", b"Accept-Encoding")],
                "no-store": [(b"cache-control", b"no-store, public"),
                             (b"cache-control", b"max-age=0"), (b"vary", b"cookie")],
                "vary-star": [(b"vary", b"*")],
            }[case]
            await whole(send, b"ok", headers)
            return
        echo = {
            "method": scope["method"],
            "raw_path": scope["raw_path"].decode("latin-1"),
            "query": scope["query_string"].decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")]
                        for k, v in scope["headers"]],
            "body_len": len(body),
        }
        await whole(send, json.dumps(echo).encode(), [(b"content-type", b"application/json"),
                                                      (b"x-upstream", b"echo")], status=207)

    return app


def gateway_app(proxy: Proxy) -> Any:
    """The smallest caller of ``Proxy.forward``: one pass over the headers, lookup,
    verbatim target, one identity."""
    reader = proxy.head_reader()

    async def answer(send: Send, status: int, text: str) -> None:
        body = text.encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await proxy.start()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await proxy.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        route = proxy.route(scope["path"])
        if route is None:
            await answer(send, 404, "no route")
            return
        query = scope["query_string"].decode("latin-1")
        target = scope["raw_path"].decode("latin-1") + ("?" + query if query else "")
        try:
            await proxy.forward(scope, reader.read(scope["headers"]), receive, send,
                                route=route, target=target, add_headers=[IDENTITY], gated=True)
        except GatewayError as exc:
            await answer(send, exc.status, f"{type(exc).__name__}: {exc.reason}")

    return app


def make_proxy(upstream_url: str, dead_url: str = "http://127.0.0.1:9",
               max_body: int = MAX_BODY, client: Literal["lean", "aiohttp"] = "lean") -> Proxy:
    return Proxy(
        [
            Upstream(name="main", prefix="/", url=upstream_url),
            Upstream(name="down", prefix="/down", url=dead_url, connect_timeout=2),
            Upstream(name="slow", prefix="/slow", url=upstream_url, timeout=0.2),
            Upstream(name="based", prefix="/based", url=upstream_url + "/base/"),
        ],
        strip_headers=["X-Member-Id", "X-Gateway-Identity"],
        strip_cookies=[SESSION_COOKIE],
        strip_cookie_prefixes=["gw-login-"],
        public_host=PUBLIC_HOST,
        public_scheme="https",
        max_body_bytes=max_body,
        client=client,
    )


@dataclass
class Stack:
    upstream: str
    gateway: str
    seen: UpstreamLog
    client: Literal["lean", "aiohttp"]


@pytest.fixture(scope="module", params=["lean", "aiohttp"])
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    seen = UpstreamLog()
    dead = _bound_socket()  # bound, never listening: connections are refused
    dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}"
    with serving(upstream_app(seen), _bound_socket(), lifespan="off") as upstream:
        proxy = make_proxy(upstream.url, dead_url, client=request.param)
        with serving(gateway_app(proxy), _bound_socket(), proxy_headers=False) as gateway:
            yield Stack(upstream.url, gateway.url, seen, request.param)
    dead.close()


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.gateway, timeout=10) as c:
        yield c


def upstream_headers(response: httpx.Response) -> list[tuple[str, str]]:
    assert response.headers["x-upstream"] == "echo", response.text
    return [(k, v) for k, v in response.json()["headers"]]


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k == name]


# -- relaying ----------------------------------------------------------------------------


async def test_get_relays_status_body_and_headers(client: httpx.AsyncClient,
                                                  stack: Stack) -> None:
    r = await client.get("/issues/1", headers={"Accept": "application/json",
                                                "User-Agent": "reader/1.0"})
    assert r.status_code == 207
    assert r.headers["content-type"] == "application/json"
    assert r.headers["content-length"] == str(len(r.content))
    # the gateway's server writes Date and Server; the upstream's are not doubled
    assert len(r.headers.get_list("date")) == len(r.headers.get_list("server")) == 1
    echo = r.json()
    assert echo["method"] == "GET" and echo["raw_path"] == "/issues/1"
    sent = upstream_headers(r)
    assert values(sent, "host") == [stack.upstream.removeprefix("http://")]
    assert values(sent, "accept") == ["application/json"]
    assert values(sent, "user-agent") == ["reader/1.0"]
    assert values(sent, "x-forwarded-for") == ["127.0.0.1"]
    assert values(sent, "x-forwarded-proto") == ["https"]
    assert values(sent, "x-forwarded-host") == [PUBLIC_HOST]


async def test_upstream_connections_are_reused(client: httpx.AsyncClient,
                                               stack: Stack) -> None:
    before = len(stack.seen.client_ports)
    for path in ["/", "/gzip", "/cookies", "/"] * 5:
        assert (await client.get(path)).status_code in (200, 207)
    async with client.stream("POST", "/upload", content=b"y" * 200_000) as r:
        await r.aread()
    assert (await client.get("/")).status_code == 207
    assert len(set(stack.seen.client_ports[before:])) == 1  # one pooled keep-alive connection


async def test_client_adds_no_headers_of_its_own(client: httpx.AsyncClient) -> None:
    request = client.build_request("POST", "/", content=b"form")
    for name in ("accept", "accept-encoding", "user-agent"):
        del request.headers[name]
    names = {k for k, _ in upstream_headers(await client.send(request))}
    assert names.isdisjoint({"accept", "accept-encoding", "user-agent", "content-type"})
    assert "content-length" in names


async def test_head_keeps_content_length_without_body(client: httpx.AsyncClient) -> None:
    r = await client.head("/gzip")
    assert r.status_code == 200
    assert r.headers["content-length"] == str(len(GZIPPED)) and r.content == b""


@pytest.mark.parametrize("streamed", [False, True], ids=["content-length", "chunked"])
async def test_post_streams_5mb_both_ways(client: httpx.AsyncClient, streamed: bool) -> None:
    payload = os.urandom(5 * 1024 * 1024)
    digest = hashlib.sha256(payload).hexdigest()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 100_000):
            yield payload[i:i + 100_000]

    async with client.stream("POST", "/upload",
                             content=chunks() if streamed else payload) as r:
        got = hashlib.sha256()
        async for chunk in r.aiter_raw():
            got.update(chunk)
    assert r.status_code == 201
    assert r.headers["x-body-sha256"] == digest
    assert got.hexdigest() == digest


async def test_gzip_passes_through_compressed(client: httpx.AsyncClient) -> None:
    async with client.stream("GET", "/gzip", headers={"Accept-Encoding": "gzip"}) as r:
        raw = b"".join([chunk async for chunk in r.aiter_raw()])
    assert r.headers["content-encoding"] == "gzip"
    assert r.headers["content-length"] == str(len(GZIPPED))
    assert raw == GZIPPED


async def test_target_is_sent_verbatim(client: httpx.AsyncClient) -> None:
    r = await client.get("/a%20b/c%7E/%C3%A9?x=%2F&y=a+b")
    echo = r.json()
    assert echo["raw_path"] == "/a%20b/c%7E/%C3%A9"
    assert echo["query"] == "x=%2F&y=a+b"


async def test_upstream_url_path_comes_first(client: httpx.AsyncClient) -> None:
    r = await client.get("/based/a%2Fb?q=1")
    assert r.json()["raw_path"] == "/base/based/a%2Fb"


async def test_multiple_set_cookie_kept(client: httpx.AsyncClient) -> None:
    r = await client.get("/cookies")
    assert r.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/; HttpOnly"]


# -- identity and hop-by-hop headers ---------------------------------------------------


async def test_client_identity_headers_never_reach_upstream(client: httpx.AsyncClient) -> None:
    r = await client.get("/", headers=[
        ("X-Member-Id", "evil-1"), ("x_member_id", "evil-2"), ("X-MEMBER-ID", "evil-3"),
        ("X-Member-Id", "evil-4"), ("X-Member-Email", "boss@example.org"),
        ("X-Gateway-Identity", "forged.jwt"), ("x_gateway_identity", "forged"),
        ("X-Forwarded-For", "6.6.6.6"), ("x_forwarded_host", "evil.example"),
        ("X-Forwarded-Proto", "http"), ("Forwarded", "for=6.6.6.6"), ("X-Real-IP", "6.6.6.6"),
    ])
    sent = upstream_headers(r)
    names = [k for k, _ in sent]
    assert values(sent, "x-member-id") == ["m-42"]
    assert not [n for n in names if "_" in n]
    for name in ("x-member-email", "x-gateway-identity", "forwarded", "x-real-ip"):
        assert name not in names
    assert values(sent, "x-forwarded-for") == ["127.0.0.1"]
    assert values(sent, "x-forwarded-host") == [PUBLIC_HOST]
    assert values(sent, "x-forwarded-proto") == ["https"]


async def test_connection_header_cannot_remove_gateway_headers(
        client: httpx.AsyncClient) -> None:
    r = await client.get("/", headers={
        "Connection": "x-member-id, x-forwarded-for, X-Forwarded-Host, x-custom",
        "X-Custom": "hop", "X-Member-Id": "evil",
    })
    sent = upstream_headers(r)
    assert values(sent, "x-member-id") == ["m-42"]
    assert values(sent, "x-forwarded-for") == ["127.0.0.1"]
    assert values(sent, "x-forwarded-host") == [PUBLIC_HOST]
    assert not values(sent, "x-custom")  # named in Connection: hop-by-hop


async def test_hop_by_hop_request_headers_not_forwarded(client: httpx.AsyncClient) -> None:
    r = await client.get("/", headers={
        "Keep-Alive": "timeout=300", "TE": "trailers", "Trailer": "X-Checksum",
        "Proxy-Authorization": "Basic c2VjcmV0", "Proxy-Connection": "keep-alive",
        "X-Other": "kept",
    })
    names = {k for k, _ in upstream_headers(r)}
    assert names.isdisjoint({"keep-alive", "te", "trailer", "proxy-authorization",
                             "proxy-connection", "connection", "transfer-encoding"})
    assert "x-other" in names


async def test_hop_by_hop_response_headers_not_relayed(client: httpx.AsyncClient) -> None:
    r = await client.get("/hop")
    assert r.headers["x-kept"] == "1"
    assert "x-secret-hop" not in r.headers and "keep-alive" not in r.headers
    assert r.headers.get("connection") != "x-secret-hop"
    # An upstream's orders to an nginx in front of the gateway are not passed on (an
    # internal redirect would take the request past the gateway); streaming stays.
    assert [n for n in r.headers if n.startswith("x-accel-")] == ["x-accel-buffering"]


@pytest.mark.parametrize(("cookie", "expected"), [
    (f"a=1; {SESSION_COOKIE}=SECRET; x{SESSION_COOKIE}=keep;b=2",
     f"a=1; x{SESSION_COOKIE}=keep;b=2"),
    (f"{SESSION_COOKIE}=SECRET; a=1", "a=1"),
    ("a=1;  b=\"quoted; not split\"", "a=1;  b=\"quoted; not split\""),
    (f"{SESSION_COOKIE}=SECRET", None),
    ("gw-login-abc=STATE; a=1; xgw-login-abc=keep", "a=1; xgw-login-abc=keep"),
])
async def test_session_cookie_stripped(client: httpx.AsyncClient, cookie: str,
                                       expected: str | None) -> None:
    sent = upstream_headers(await client.get("/", headers={"Cookie": cookie}))
    assert values(sent, "cookie") == ([] if expected is None else [expected])


# -- gated responses --------------------------------------------------------------------


@pytest.mark.parametrize(("case", "cache_control", "vary"), [
    ("none", "private, no-store", "Cookie"),
    ("public", "private, no-store", "Accept-Encoding, Cookie"),
    ("no-store", "no-store, max-age=0, private", "cookie"),
    ("vary-star", "private, no-store", "*"),
])
async def test_gated_responses_are_private(client: httpx.AsyncClient, case: str,
                                           cache_control: str, vary: str) -> None:
    r = await client.get(f"/cache/{case}")
    assert r.headers.get_list("cache-control") == [cache_control]
    assert r.headers.get_list("vary") == [vary]


# -- failures ---------------------------------------------------------------------------


async def test_upstream_down_is_502(client: httpx.AsyncClient) -> None:
    r = await client.get("/down/page")
    assert r.status_code == 502
    assert r.text.startswith("UpstreamError: down:")


async def test_slow_upstream_is_504(client: httpx.AsyncClient) -> None:
    r = await client.get("/slow")
    assert r.status_code == 504
    assert r.text.startswith("UpstreamTimeout: slow:")


async def test_declared_body_over_limit_is_413_before_upstream(client: httpx.AsyncClient,
                                                               stack: Stack) -> None:
    r = await client.post("/too-big-declared", content=b"x" * (MAX_BODY + 1))
    assert r.status_code == 413
    assert r.text.startswith("BodyTooLarge:")
    assert "/too-big-declared" not in stack.seen.paths


async def test_streamed_body_over_limit_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"x" * 65536

    r = await client.post("/too-big-streamed", content=chunks())
    assert r.status_code == 413
    assert r.text.startswith("BodyTooLarge:")


async def test_upstream_failing_mid_body_cuts_the_response(
        client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.proxy")
    with pytest.raises(httpx.RemoteProtocolError):
        await client.get("/truncated")
    assert any("upstream main failed mid-response" in rec.getMessage()
               for rec in caplog.records if rec.name == "gateway.proxy")
    assert (await client.get("/")).status_code == 207  # the gateway is fine


async def test_client_disconnect_closes_upstream(client: httpx.AsyncClient,
                                                 stack: Stack) -> None:
    async with client.stream("GET", "/stream") as r:
        async for _chunk in r.aiter_raw():
            break
    # The upstream learns of it only if the gateway closed its upstream response.
    assert await asyncio.to_thread(stack.seen.stream_closed.wait, 5)
    assert (await client.get("/")).status_code == 207


# -- the API without a network -----------------------------------------------------------


def test_route_longest_prefix_on_segment_boundary() -> None:
    proxy = Proxy(
        [Upstream(name=n, prefix=p, url=f"http://{n}.internal:8080/")
         for n, p in [("root", "/"), ("reader", "/reader"), ("admin", "/reader/admin/")]],
        strip_headers=[], strip_cookies=[], public_host="h", public_scheme="https",
        max_body_bytes=1024,
    )

    def name(path: str) -> str | None:
        route = proxy.route(path)
        return route.name if route else None

    assert name("/reader") == name("/reader/") == name("/reader/issue/1") == "reader"
    assert name("/readers") == name("/") == name("/readerX/1") == "root"
    assert name("/reader/admin") == name("/reader/admin/x") == "admin"
    assert name("/reader/administrator") == "reader"
    assert proxy.route("/reader/x").base_url == "http://reader.internal:8080"  # type: ignore[union-attr]

    only = Proxy([Upstream(name="r", prefix="/reader", url="http://r")], strip_headers=[],
                 strip_cookies=[], public_host="h", public_scheme="https", max_body_bytes=1024)
    assert only.route("/other") is None and only.route("/readers") is None


def _scope(headers: list[tuple[bytes, bytes]], method: str = "POST") -> Scope:
    return {"type": "http", "method": method, "path": "/", "raw_path": b"/",
            "query_string": b"", "headers": headers, "client": ("127.0.0.1", 5000)}


async def _no_receive() -> Message:
    raise AssertionError("the body must not be read")


async def _no_send(message: Message) -> None:
    raise AssertionError("nothing may be sent")


@pytest.mark.parametrize("client", ["lean", "aiohttp"])
@pytest.mark.parametrize(("headers", "error"), [
    ([(b"content-length", b"5"), (b"transfer-encoding", b"chunked")], BadRequest),
    ([(b"content-length", b"5"), (b"content-length", b"6")], BadRequest),
    ([(b"content-length", b"-1")], BadRequest),
    ([(b"transfer-encoding", b"gzip, chunked")], BadRequest),
    ([(b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")], BadRequest),
    ([(b"content-length", b"1025")], BodyTooLarge),
])
async def test_bad_framing_refused_before_upstream(headers: list[tuple[bytes, bytes]],
                                                   error: type[GatewayError],
                                                   client: Literal["lean", "aiohttp"]) -> None:
    proxy = make_proxy("http://127.0.0.1:9", max_body=1024, client=client)
    await proxy.start()
    try:
        route = proxy.route("/")
        assert route is not None
        head = proxy.head_reader().read(headers)  # reading never raises: forward does
        with pytest.raises(error) as info:
            await proxy.forward(_scope(headers), head, _no_receive, _no_send, route=route,
                                target="/", add_headers=[], gated=False)
        assert info.value.status == (413 if error is BodyTooLarge else 400)
    finally:
        await proxy.close()


async def test_client_gone_during_upload_sends_nothing(stack: Stack) -> None:
    proxy = make_proxy(stack.upstream, client=stack.client)
    await proxy.start()
    messages: list[Message] = [{"type": "http.request", "body": b"x" * 1000, "more_body": True},
                               {"type": "http.disconnect"}]

    async def receive() -> Message:
        return messages.pop(0)

    headers = [(b"transfer-encoding", b"chunked")]
    try:
        route = proxy.route("/")
        assert route is not None
        await proxy.forward(_scope(headers), proxy.head_reader().read(headers), receive,
                            _no_send, route=route, target="/gone", add_headers=[], gated=True)
        assert messages == []  # the body was read up to the disconnect; nothing was sent
    finally:
        await proxy.close()


# -- the one pass over the request headers -------------------------------------------------


def _reader(**options: Any) -> HeadReader:
    cookies = Cookies(secure=True, session_name="gw_session", session_lifetime=3600,
                      stash_ttl=600)
    return HeadReader(**{"strip_headers": ["X-Member-Id", "X-Gateway-Identity",
                                           "X-Request-Id"],
                         "max_body_bytes": 1024,
                         "strip_cookies": [cookies.session_name, cookies.idp_name,
                                           cookies.stash_name],
                         "strip_cookie_prefixes": [cookies.login_prefix],
                         "session_value": cookies.session_value, **options})


def test_one_pass_reads_what_the_hot_path_decides_on() -> None:
    head = _reader().read([
        (b"host", b"GW.example.test"), (b"host", b"evil.example"),
        (b"accept", b"text/html"), (b"accept", b"application/json"),
        (b"cookie", b"a=1; __Host-gw_session=FIRST"),
        (b"cookie", b"__Host-gw_session=SECOND; b=2"),
        (b"sec-fetch-mode", b"navigate"), (b"sec-fetch-site", b"same-origin"),
        (b"origin", b"https://gw.example.test"),
        (b"content-type", b"application/x-www-form-urlencoded"),
        (b"content-length", b"3"),
    ])
    assert head.host == b"GW.example.test"  # the first Host
    assert head.accept == "application/json"  # decoded once, as a str
    assert head.session == "FIRST"  # the first session cookie wins, across Cookie headers
    assert (head.fetch_mode, head.fetch_site) == (b"navigate", b"same-origin")
    assert head.origin == b"https://gw.example.test"
    assert head.content_type == b"application/x-www-form-urlencoded"
    assert head.has_body and head.refused is None
    # The same pass made the upstream's headers: no Host, the gateway's cookie cut out.
    assert head.upstream == [
        ("accept", "text/html"), ("accept", "application/json"), ("cookie", "a=1"),
        ("cookie", "b=2"), ("sec-fetch-mode", "navigate"), ("sec-fetch-site", "same-origin"),
        ("origin", "https://gw.example.test"),
        ("content-type", "application/x-www-form-urlencoded"), ("content-length", "3")]


def test_one_pass_drops_what_only_the_gateway_may_send() -> None:
    # (ASGI servers hand over header names in lower case.)
    head = _reader().read([
        (b"x-member-id", b"evil"), (b"x_member_id", b"evil"), (b"x-member-email", b"evil"),
        (b"x-gateway-identity", b"forged"), (b"x-request-id", b"spoofed"),
        (b"x-forwarded-for", b"6.6.6.6"), (b"forwarded", b"for=6.6.6.6"),
        (b"x-real-ip", b"6.6.6.6"), (b"expect", b"100-continue"), (b"te", b"trailers"),
        (b"keep-alive", b"timeout=5"), (b"connection", b"x-custom, close, content-length"),
        (b"x-custom", b"hop"), (b"x-kept", b"1"), (b"content-length", b"0"),
        (b"cookie", b"__Secure-gw-login-s1=STATE; __Secure-gw_idp=x; __Secure-gw-stash=y"),
    ])
    assert head.upstream == [("x-kept", "1"), ("content-length", "0")]
    assert head.session is None and not head.has_body and head.refused is None


def test_one_pass_rules_hold_whatever_names_came_before() -> None:
    """Names are judged once and remembered, up to a bound: a flood of made-up names
    neither grows the reader without end nor changes what is dropped."""
    reader = _reader()
    for i in range(3000):
        assert reader.read([(f"x-made-up-{i}".encode(), b"1")]).upstream == [
            (f"x-made-up-{i}", "1")]
    for _ in range(2):
        head = reader.read([(b"x_member_id", b"evil"), (b"x-gateway-identity", b"forged"),
                            (b"x-made-up-2999", b"1"), (b"x-late-name", b"2")])
        assert head.upstream == [("x-made-up-2999", "1"), ("x-late-name", "2")]


@pytest.mark.parametrize(("headers", "has_body", "refused"), [
    ([], False, None),
    ([(b"content-length", b"0")], False, None),
    ([(b"content-length", b"7"), (b"content-length", b"7")], True, None),
    ([(b"transfer-encoding", b"Chunked ")], True, None),
    ([(b"content-length", b"5"), (b"content-length", b"6")], True, BadRequest),
    ([(b"content-length", b"1e3")], False, BadRequest),
    ([(b"content-length", b"1025")], True, BodyTooLarge),
    ([(b"transfer-encoding", b"chunked"), (b"content-length", b"1")], True, BadRequest),
])
def test_one_pass_checks_the_framing(headers: list[tuple[bytes, bytes]], has_body: bool,
                                     refused: type[GatewayError] | None) -> None:
    head = _reader().read(headers)
    assert head.has_body is has_body
    assert type(head.refused) is refused if refused else head.refused is None
    assert sum(k == "content-length" for k, _ in head.upstream) <= 1


def test_header_values_for_the_upstream_client() -> None:
    assert header_text("café ✓".encode()) == "café ✓"  # UTF-8 goes out byte for byte
    assert header_text(b"caf\xe9") == "caf\xe9"  # obs-text: Latin-1


# -- the response rules on their own ------------------------------------------------------


def _rules(upstream_url: str) -> ResponseRules:
    cookies = Cookies(secure=True, session_name="gw_session", session_lifetime=3600,
                      stash_ttl=600)
    return ResponseRules(name="up", upstream_url=upstream_url,
                         public_url="https://gw.example.test",
                         own_cookies=[cookies.session_name, cookies.idp_name,
                                      cookies.stash_name],
                         own_cookie_prefixes=[cookies.login_prefix])


@pytest.mark.parametrize(("upstream", "location", "expected"), [
    ("http://up:9000", "http://up:9000/a?b=1", "https://gw.example.test/a?b=1"),
    ("http://up:9000/", "http://UP:9000#x", "https://gw.example.test/#x"),
    ("http://up", "http://up:80/a", "https://gw.example.test/a"),
    ("http://up", "http://up/a", "https://gw.example.test/a"),
    ("http://up", "http://up:8080/a", "http://up:8080/a"),
    ("https://up", "https://up:443/a", "https://gw.example.test/a"),
    ("https://up", "http://up/a", "http://up/a"),  # another scheme, another origin
    ("http://up:9000/base", "http://up:9000/base/x?y", "https://gw.example.test/x?y"),
    ("http://up:9000/base/", "http://up:9000/base", "https://gw.example.test/"),
    ("http://up:9000/base", "http://up:9000/basement", "http://up:9000/basement"),
    ("http://up:9000/base", "http://up:9000/other", "http://up:9000/other"),
    ("http://up:9000/base", "http://up:9000/BASE/x", "http://up:9000/BASE/x"),
    ("http://[::1]:9000", "http://[::1]:9000/v6", "https://gw.example.test/v6"),
    ("http://up:9000", "//up:9000/a", "//up:9000/a"),
    ("http://up:9000", "/a", "/a"),
])
def test_location_rewrite(upstream: str, location: str, expected: str) -> None:
    headers, _ = _rules(upstream).apply([(b"Location", location.encode())], gated=False)
    assert headers == [(b"location", expected.encode())]


@pytest.mark.parametrize(("cookie", "dropped"), [
    ("__Host-gw_session=x; Path=/", True),
    ("gw_session=x", True),
    ("GW_Session=x", True),
    ("__secure-__host-gw_session=x", True),
    ("=__Host-gw_session=x", True),
    ("  = gw_idp=x", True),
    ("__Secure-gw-login-abc=x", True),
    ("gw-login-=x", True),
    ("__Secure-gw-stash=x", True),
    ("gw_session", True),  # nameless: the browser sends "gw_session"
    ("gw_sessions=x", False),
    ("xgw-login-abc=x", False),
    ("theme=gw_session", False),
])
def test_own_cookies_are_not_set_by_upstreams(cookie: str, dropped: bool) -> None:
    headers, _ = _rules("http://up").apply([(b"Set-Cookie", cookie.encode())], gated=False)
    assert headers == ([] if dropped else [(b"set-cookie", cookie.encode())])
