"""The upstream client against a hostile upstream: malformed heads, smuggling attempts,
huge headers, early closes. Every case runs through the gateway's proxy with the lean
client and with aiohttp's, and both must end the same way (the refusals the gateway
made before the lean client existed still hold); the pool, TLS and backpressure rules
of ``gateway.upstream_client`` are checked on their own below.

The upstream is a raw socket server (``RawUpstream``): it answers each path with fixed
bytes, so it can say what no well-behaved server library would.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import socketserver
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Literal

import httpx
import pytest

from gateway.app import create_app
from gateway.config_schema import ProxySettings
from gateway.demo.stack import prepare
from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.upstream_client import HEAD_LIMIT, Origin, UpstreamClient
from tests.conftest import TLSFiles, seed_demo_keys, serving
from tests.test_proxy import _bound_socket, gateway_app, make_proxy

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
# path -> the raw answer, and whether the upstream closes the connection after it
ANSWERS: dict[str, tuple[bytes, bool]] = {
    "/plain": (OK, False),
    "/dup-length": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
                    False),
    "/dup-length-same": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n"
                         b"ok", False),
    "/length-and-chunked": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", False),
    "/bad-length": (b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok", False),
    "/bad-status": (b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok", False),
    "/not-http": (b"HTTPX 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
    "/space-in-name": (b"HTTP/1.1 200 OK\r\nContent Length: 2\r\n\r\nok", False),
    "/space-before-colon": (b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok", False),
    "/nul-in-value": (b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok", False),
    "/huge-header": (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (20 * 1024)
                     + b"\r\nContent-Length: 2\r\n\r\nok", False),
    "/many-headers": (b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200))
                      + b"Content-Length: 2\r\n\r\nok", False),
    "/huge-head": (b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 8000)
                                                     for i in range(10))
                   + b"Content-Length: 2\r\n\r\nok", False),
    "/bad-chunk": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
                   False),
    "/early-close": (b"HTTP/1.1 200 OK\r\nContent-Le", True),
    "/no-answer": (b"", True),
    "/truncated": (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789", True),
    "/unframed": (b"HTTP/1.1 200 OK\r\n\r\nuntil close", True),
    "/smuggle": (OK + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil", False),
    "/interim": (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + OK, False),
    "/switching": (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: evil\r\n\r\n", False),
    "/chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"2\r\nok\r\n0\r\n\r\n", False),
    "/http10": (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
    "/status-099": (b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok", False),
    "/status-600": (b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\nok", False),
    "/http2-status": (b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
    "/chunked-twice": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", False),
    "/gzip-chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                      b"2\r\nok\r\n0\r\n\r\n", False),
    "/partial": (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789", False),
}
Outcome = int | Literal["cut"]
# What the gateway's client gets, the same with either upstream client.
EXPECTED: dict[str, Outcome] = {
    "/plain": 200, "/dup-length": 502, "/length-and-chunked": 502, "/bad-length": 502,
    "/bad-status": 502, "/not-http": 502, "/space-in-name": 502,
    "/nul-in-value": 502, "/huge-header": 502, "/early-close": 502, "/no-answer": 502,
    "/truncated": "cut", "/unframed": 200, "/smuggle": 200, "/interim": 200, "/chunked": 200,
    "/http10": 200, "/bad-chunk": 502, "/dup-length-same": 502, "/many-headers": 502,
}
# Where the lean client is stricter than aiohttp (see the module docstring of
# gateway.upstream_client): lean's outcome, aiohttp's outcome.
STRICTER: dict[str, tuple[Outcome, Outcome]] = {
    "/huge-head": (502, 200),  # HEAD_LIMIT over all fields (aiohttp: per field only)
    # aiohttp accepts the field name "Content-Length " and relays it; uvicorn then
    # refuses to write it (RuntimeError, a traceback) and the client sees a cut answer.
    "/space-before-colon": (502, "cut"),
    "/switching": (502, "cut"),
    # a status outside 100-599: aiohttp relays it and uvicorn fails on it (a traceback)
    "/status-099": (502, "cut"), "/status-600": (502, "cut"),
    "/http2-status": (502, 200),  # "HTTP/2.0" in an HTTP/1 status line
    "/chunked-twice": (502, 200),  # chunked applied twice is never valid
    # a transfer coding other than chunked: aiohttp hands on gzip bytes as if plain
    "/gzip-chunked": (502, 200),  # never asked for: aiohttp hands on a 101, then fails
}


class RawUpstream(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        buffer = b""
        drop_next = False  # "/drop-next": hang up on the next request of this connection
        while True:
            while b"\r\n\r\n" not in buffer:
                data = sock.recv(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            method, path = head.split(b" ", 2)[:2]
            if drop_next:
                sock.shutdown(socket.SHUT_RDWR)
                return
            drop_next = path == b"/drop-next"
            answer, close = ANSWERS.get(path.decode(), (OK, False))
            if method == b"HEAD" and path == b"/head-body":
                answer, close = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra", False
            sock.sendall(answer)
            if close:
                sock.shutdown(socket.SHUT_RDWR)
                return


@pytest.fixture(scope="module")
def raw_upstream() -> Iterator[str]:
    server = RawUpstream(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module", params=["lean", "aiohttp"])
def gateway(request: pytest.FixtureRequest, raw_upstream: str) -> Iterator[tuple[str, str]]:
    proxy = make_proxy(raw_upstream, client=request.param)
    with serving(gateway_app(proxy), _bound_socket(), proxy_headers=False) as server:
        yield server.url, request.param


async def _outcome(client: httpx.AsyncClient, path: str, method: str = "GET",
                   ) -> tuple[Outcome, bytes]:
    try:
        r = await client.request(method, path)
    except httpx.RemoteProtocolError:
        return "cut", b""
    return r.status_code, r.content


@pytest.mark.parametrize("path", [*EXPECTED, *STRICTER])
async def test_hostile_answers_end_the_same_with_either_client(
        gateway: tuple[str, str], path: str) -> None:
    url, kind = gateway
    expected = EXPECTED.get(path) or STRICTER[path][0 if kind == "lean" else 1]
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        status, body = await _outcome(client, path)
        assert status == expected
        if status == 502:
            assert body.startswith(b"UpstreamError: main: ")
        if status == 200:
            assert body in (b"ok", b"until close")
        # Whatever came before, the next answer is the upstream's own, not left-overs.
        assert await _outcome(client, "/plain") == (200, b"ok")
        assert await _outcome(client, "/plain") == (200, b"ok")


async def test_a_head_answer_has_no_body_and_its_extra_bytes_are_not_reused(
        gateway: tuple[str, str]) -> None:
    """An upstream that sends a body after a HEAD answer: the lean client relays the head
    and never reads those bytes as the next answer; aiohttp answers the HEAD with 502."""
    url, kind = gateway
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        r = await client.head("/head-body")
        if kind == "aiohttp":
            assert r.status_code == 502
            return
        assert r.status_code == 200 and r.content == b""
        assert r.headers["content-length"] == "5"
        assert await _outcome(client, "/plain") == (200, b"ok")


def test_the_client_setting_reaches_the_proxy(tmp_path: Path) -> None:
    seed_demo_keys(tmp_path)
    demo = prepare(tmp_path, extra_config='\n[proxy]\nclient = "aiohttp"\n')
    assert create_app(demo.settings).proxy.client == "aiohttp"
    default = demo.settings.model_copy(update={"proxy": ProxySettings()})
    assert create_app(default).proxy.client == "lean"


# -- the client on its own ---------------------------------------------------------------


async def _body(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _read_all(client: UpstreamClient, origin: Origin, path: str) -> tuple[int, bytes]:
    resp = await client.request(origin, "GET", path, [], None, length=None,
                                connect_timeout=2, timeout=2)
    data = b""
    while chunk := await resp.read():
        data += chunk
    resp.release()
    return resp.status, data


async def test_pool_reuses_only_complete_keep_alive_connections(raw_upstream: str) -> None:
    client = UpstreamClient(max_connections=4, keepalive_timeout=5)
    origin = Origin.from_url(raw_upstream)
    try:
        assert await _read_all(client, origin, "/plain") == (200, b"ok")
        first = next(iter(client._open))
        assert await _read_all(client, origin, "/chunked") == (200, b"ok")
        assert client._open == {first}  # kept alive and reused
        assert await _read_all(client, origin, "/http10") == (200, b"ok")
        await asyncio.sleep(0.05)
        assert first not in client._open  # HTTP/1.0 without keep-alive: closed
        resp = await client.request(origin, "GET", "/partial", [], None, length=None,
                                    connect_timeout=2, timeout=2)
        resp.release()  # released before its body was read: not reused
        await asyncio.sleep(0.05)
        assert client._open == set() and client.in_use == 0
    finally:
        await client.close()


async def test_a_kept_alive_connection_closed_under_a_request_is_retried_once(
        raw_upstream: str) -> None:
    """The upstream hangs up on the second request of a kept-alive connection (as a server
    closing an idle connection just then): a request without a body goes again on a new
    connection; one with a body is not sent twice."""
    client = UpstreamClient(max_connections=4, keepalive_timeout=5)
    origin = Origin.from_url(raw_upstream)
    try:
        assert await _read_all(client, origin, "/drop-next") == (200, b"ok")
        assert await _read_all(client, origin, "/plain") == (200, b"ok")
        assert await _read_all(client, origin, "/drop-next") == (200, b"ok")
        with pytest.raises(UpstreamError, match="closed by the upstream"):
            await client.request(origin, "POST", "/plain", [("content-length", "4")],
                                 _body([b"form"]), length=4, connect_timeout=2, timeout=2)
    finally:
        await client.close()


async def test_idle_connections_close_after_the_keepalive_timeout(raw_upstream: str) -> None:
    client = UpstreamClient(max_connections=4, keepalive_timeout=0.2)
    origin = Origin.from_url(raw_upstream)
    try:
        await _read_all(client, origin, "/plain")
        assert len(client._open) == 1
        await asyncio.sleep(0.5)
        assert client._open == set()
    finally:
        await client.close()


async def test_a_full_pool_waits_then_times_out(raw_upstream: str) -> None:
    client = UpstreamClient(max_connections=1, keepalive_timeout=5)
    origin = Origin.from_url(raw_upstream)
    try:
        held = await client.request(origin, "GET", "/plain", [], None, length=None,
                                    connect_timeout=2, timeout=2)
        with pytest.raises(UpstreamTimeout, match=r"max_connections"):
            await client.request(origin, "GET", "/plain", [], None, length=None,
                                 connect_timeout=0.2, timeout=2)
        assert await held.read() == b"ok"
        held.release()
        assert await _read_all(client, origin, "/plain") == (200, b"ok")
    finally:
        await client.close()


async def test_head_limit_counts_the_whole_head(raw_upstream: str) -> None:
    client = UpstreamClient(max_connections=4, keepalive_timeout=5)
    try:
        with pytest.raises(UpstreamError, match=f"over {HEAD_LIMIT} bytes"):
            await _read_all(client, Origin.from_url(raw_upstream), "/huge-head")
    finally:
        await client.close()


async def test_control_characters_in_headers_are_refused() -> None:
    client = UpstreamClient(max_connections=4, keepalive_timeout=5)
    origin = Origin.from_url("http://127.0.0.1:9")
    try:
        for value in ("a\r\nX-Member-Id: evil", "a\nb", "a\rb", "a\0b"):
            with pytest.raises(ValueError, match="control character"):
                await client.request(origin, "GET", "/", [("X-A", value)], None, length=None,
                                     connect_timeout=1, timeout=1)
        assert client._open == set()  # refused before connecting
    finally:
        await client.close()


async def test_request_body_streams_with_its_framing_and_backpressure() -> None:
    """The upstream reads slowly: the client waits (drain) instead of buffering 8 MB."""
    received = bytearray()
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head.lower()
        while not received.endswith(b"0\r\n\r\n"):
            received.extend(await reader.read(65536))
            await asyncio.sleep(0.001)
        writer.write(OK)
        await writer.drain()
        writer.close()
        done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = UpstreamClient(max_connections=4, keepalive_timeout=5)
    parts = [b"x" * 65536] * 128
    try:
        resp = await client.request(Origin.from_url(f"http://127.0.0.1:{port}"), "POST", "/",
                                    [], _body(parts), length=None, connect_timeout=2,
                                    timeout=5)
        assert resp.status == 200 and await resp.read() == b"ok"
        resp.release()
        await done.wait()
        assert received.count(b"10000\r\n") == 128  # 64 KiB chunks, as sent
    finally:
        await client.close()
        server.close()


async def test_an_early_answer_during_the_upload_is_relayed() -> None:
    """An upstream that refuses a large body with 413 without reading it and hangs up:
    the client hands on that answer, not a connection error."""
    finished = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\n"
                     b"Content-Length: 3\r\n\r\nbig")
        await writer.drain()
        with contextlib.suppress(TimeoutError):  # the client reads the answer meanwhile
            async with asyncio.timeout(0.3):
                while await reader.read(65536):
                    pass
        writer.close()  # with the body unread: a reset, the client's upload fails
        finished.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = UpstreamClient(max_connections=4, keepalive_timeout=5)
    try:
        resp = await client.request(Origin.from_url(f"http://127.0.0.1:{port}"), "POST", "/",
                                    [], _body([b"x" * 65536] * 256), length=None,
                                    connect_timeout=2, timeout=5)
        assert resp.status == 413 and await resp.read() == b"big"
        resp.release()
        assert client.in_use == 0
        await asyncio.wait_for(finished.wait(), 5)
    finally:
        await client.close()
        server.close()


async def test_tls_upstream_is_verified(tls: TLSFiles) -> None:
    """A certificate the client's context trusts, for the name it connects to, is
    accepted; with the system's trust store (the default) the same server is refused."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(OK)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    origin = Origin.from_url(f"https://127.0.0.1:{port}")
    trusting = UpstreamClient(max_connections=4, keepalive_timeout=5,
                              ssl_context=tls.client_context())
    default = UpstreamClient(max_connections=4, keepalive_timeout=5)
    try:
        assert await _read_all(trusting, origin, "/") == (200, b"ok")
        with pytest.raises(UpstreamError, match="CERTIFICATE_VERIFY_FAILED"):
            await _read_all(default, origin, "/")
    finally:
        await trusting.close()
        await default.close()
        server.close()
