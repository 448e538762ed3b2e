"""Streaming forward of an allowed request to its upstream: the hot path's last step.

Raw ASGI in, one pooled upstream client out: ``gateway.upstream_client`` (the default,
``[proxy] client = "lean"``) or aiohttp's ``ClientSession`` (``client = "aiohttp"``); no
framework objects per request. Everything that depends on configuration (routes, header
sets, timeouts) is compiled in ``Proxy.__init__``; per-request code only compares bytes.

Request side: the hot path reads the request's headers once (``HeadReader.read``, in
``gateway.proxy_headers``); ``forward`` sends the headers that pass the drop rules and
appends the gateway's own ``X-Forwarded-*`` and identity headers, after the
``Connection`` filter ran, so no client can remove them. The target is sent verbatim:
the path policy decided on is the path the upstream sees.

Response side: status, headers and body bytes are relayed as they come (neither client
decompresses: compressed bodies stay compressed, Content-Length stays right). Each
upstream's ``ResponseRules`` drop a ``Set-Cookie`` for the gateway's own cookies and
point the upstream's absolute redirects at the public URL; gated responses are made
private to the member.

Errors before ``http.response.start`` raise (``UpstreamError`` 502, ``UpstreamTimeout``
504, ``BadRequest`` 400, ``BodyTooLarge`` 413) so the caller can render a page; after it,
the failure is logged and the response is left incomplete, so the server drops the
connection and the client can tell the body was cut.

WebSockets (``open_websocket``, for ``gateway.websocket``): the same request headers,
``X-Forwarded-*`` and identity headers on the upgrade request, with the client's own
handshake headers (key, version, extensions) left out; the client's subprotocols are
offered, no compression is (``permessage-deflate`` off: a message's size on the wire is
its size in memory). WebSocket connections live long, so they have a client session of
their own: they never take a connection from the pool HTTP requests share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import urlsplit

import aiohttp
from starlette.types import Receive, Scope, Send
from yarl import URL

from gateway.config import Upstream
from gateway.errors import (
    BadRequest,
    BodyTooLarge,
    ConfigError,
    UpgradeRefused,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.proxy_headers import HeadReader, RequestHead, ResponseRules, header_text
from gateway.telemetry import response_cut
from gateway.upstream_client import Origin, UpstreamClient

log = logging.getLogger("gateway.proxy")

# aiohttp would add these when absent; the upstream must see only what the client sent.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
# The client's WebSocket handshake headers: the upgrade request upstream has its own.
_WS_HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version",
                           "sec-websocket-extensions", "sec-websocket-protocol",
                           "sec-websocket-accept"})
# Seconds to wait for an upstream's answer to our close frame.
WS_CLOSE_TIMEOUT = 5.0
# A response with a known length up to this size is read to the end even if the client
# leaves: cheaper than a disconnect watcher task, and the connection stays reusable.
_WATCH_ABOVE = 64 * 1024


class _ClientGone(Exception):
    """The client disconnected while its request body was being streamed upstream."""


@dataclass(frozen=True, slots=True)
class Route:
    """One upstream, ready to use: ``base_url`` has no trailing slash."""

    name: str
    base_url: str
    timeout: aiohttp.ClientTimeout
    responses: ResponseRules
    origin: Origin
    base_path: str  # the path of the upstream's URL, before every target ("" for none)
    connect_timeout: float
    read_timeout: float  # the response head, and each wait for body bytes


class Proxy:
    """Forwards requests to upstreams over one pooled connection set.

    ``strip_headers`` must name every header the caller may pass in ``add_headers``
    (besides the ``x-member-*`` / ``x-gateway-*`` families, which are always stripped),
    and may name more (with ``strip_prefixes``: ``[proxy]``), on top of the
    authentication headers always stripped (``proxy_headers.AUTH_HEADERS``);
    ``strip_cookies`` (and ``strip_cookie_prefixes``) name the gateway's own cookies,
    which upstreams never see nor set. ``head_reader`` compiles the request rules for
    the hot path. ``client``: the HTTP client for the upstream hop (WebSockets always
    use aiohttp's).
    """

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        *,
        strip_headers: Iterable[str],
        strip_cookies: Iterable[str],
        strip_cookie_prefixes: Iterable[str] = (),
        strip_prefixes: Iterable[str] = (),
        public_host: str,
        public_scheme: str,
        max_body_bytes: int,
        max_connections: int = 1024,
        keepalive_timeout: float = 4.0,
        client: Literal["lean", "aiohttp"] = "lean",
    ) -> None:
        self._strip_headers = tuple(strip_headers)
        self._strip_prefixes = tuple(strip_prefixes)
        self._strip_cookies = tuple(strip_cookies)
        self._strip_cookie_prefixes = tuple(strip_cookie_prefixes)
        public_url = f"{public_scheme}://{public_host}"
        seen: dict[str, str] = {}
        problems = []
        routes = []
        for up in upstreams:
            prefix = up.prefix.rstrip("/") or "/"
            if prefix in seen:
                problems.append(f"upstreams: prefix {prefix!r} is used by both "
                                f"{seen[prefix]!r} and {up.name!r}")
            seen[prefix] = up.name
            timeout = aiohttp.ClientTimeout(total=None, connect=up.connect_timeout,
                                            sock_read=up.timeout)
            responses = ResponseRules(name=up.name, upstream_url=up.url, public_url=public_url,
                                      own_cookies=self._strip_cookies,
                                      own_cookie_prefixes=self._strip_cookie_prefixes)
            route = Route(up.name, up.url.rstrip("/"), timeout, responses,
                          Origin.from_url(up.url), urlsplit(up.url).path.rstrip("/"),
                          up.connect_timeout, up.timeout)
            routes.append((prefix, "/" if prefix == "/" else prefix + "/", route))
        if problems:
            raise ConfigError(problems)
        routes.sort(key=lambda r: len(r[0]), reverse=True)  # longest prefix first
        self._routes = tuple(routes)
        self._forwarded = (("X-Forwarded-Proto", public_scheme),
                           ("X-Forwarded-Host", public_host))
        self._max_body = max_body_bytes
        self._max_connections = max_connections
        self._keepalive_timeout = keepalive_timeout
        self._client_kind = client
        self._lean: UpstreamClient | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws_session: aiohttp.ClientSession | None = None
        self._before_close: list[Callable[[], Awaitable[None]]] = []

    @property
    def client(self) -> str:
        """The HTTP client for the upstream hop: ``"lean"`` or ``"aiohttp"``."""
        return self._client_kind

    def head_reader(self, session_value: Callable[[bytes], str | None] | None = None,
                    ) -> HeadReader:
        """This proxy's request-header rules, for the hot path's one pass over the headers;
        ``session_value`` reads the session cookie in the same pass."""
        return HeadReader(strip_headers=self._strip_headers, max_body_bytes=self._max_body,
                          strip_prefixes=self._strip_prefixes,
                          strip_cookies=self._strip_cookies,
                          strip_cookie_prefixes=self._strip_cookie_prefixes,
                          session_value=session_value)

    async def start(self) -> None:
        """Create the pooled client; must run inside the serving event loop."""
        if self._session is not None or self._lean is not None:
            return
        if self._client_kind == "lean":
            # Below the idle timeout of common upstream servers (uvicorn: 5 s), as below.
            self._lean = UpstreamClient(max_connections=self._max_connections,
                                        keepalive_timeout=self._keepalive_timeout)
            return
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            limit_per_host=0,
            # Below the idle timeout of common upstream servers (uvicorn: 5 s), so the
            # pool does not hand out a connection the upstream is just closing.
            keepalive_timeout=self._keepalive_timeout,
            ttl_dns_cache=60,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            # Upstream Set-Cookie headers belong to the browser: never store or replay
            # them for the next member.
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            timeout=aiohttp.ClientTimeout(total=None),
            trust_env=False,
            max_field_size=16 * 1024,  # long CSP or Set-Cookie values are common
        )

    def before_close(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Await ``callback`` when the proxy closes, before its connections go (open
        WebSockets are ended cleanly, not cut)."""
        self._before_close.append(callback)

    async def close(self) -> None:
        for callback in self._before_close:
            await callback()
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        lean, self._lean = self._lean, None
        if lean is not None:
            await lean.close()
        ws_session, self._ws_session = self._ws_session, None
        if ws_session is not None:
            await ws_session.close()

    def _pool_full(self, session: aiohttp.ClientSession) -> bool:
        """Every pooled connection is in use: a connect timeout was a wait for the pool."""
        connector = session.connector
        acquired = getattr(connector, "_acquired", None)  # aiohttp keeps no public count
        return acquired is not None and len(acquired) >= self._max_connections

    def route(self, path: str) -> Route | None:
        """The route with the longest prefix that matches ``path`` on a segment boundary."""
        for prefix, prefix_slash, route in self._routes:
            if path.startswith(prefix_slash) or path == prefix:
                return route
        return None

    async def forward(self, scope: Scope, head: RequestHead, receive: Receive, send: Send,
                      *, route: Route, target: str, add_headers: Sequence[tuple[bytes, bytes]],
                      gated: bool, cache: bytes = b"") -> None:
        """Send the request to ``route`` and relay the answer.

        ``head`` is the request's headers as ``head_reader`` read them; ``target`` is the
        canonical, already percent-encoded path plus ``?query``, sent byte for byte;
        ``add_headers`` are the gateway's identity headers. If the client leaves before
        the response starts, nothing is sent.
        """
        if self._lean is None and self._session is None:
            raise RuntimeError("Proxy.start() was not awaited")
        if head.refused is not None:
            raise head.refused
        headers = self._upstream_headers(scope, head.upstream, add_headers)
        body = _Body(receive, self._max_body) if head.has_body else None
        try:
            if self._lean is not None:
                resp: _Answer = await self._send_lean(self._lean, scope["method"], route,
                                                      target, headers, body)
            else:
                assert self._session is not None
                resp = await self._send_aiohttp(self._session, scope["method"], route,
                                                target, headers, body)
        except (UpstreamError, BodyTooLarge, _ClientGone):
            if body is not None:
                if body.too_large:
                    raise BodyTooLarge(
                        f"request body over {self._max_body} bytes (streamed)") from None
                if body.gone:
                    log.debug("client left during upload to %s", route.name)
                    return
            raise
        except ValueError as exc:  # a header value the client will not write (control char)
            raise BadRequest(f"header refused by the upstream client: {exc}") from None
        try:
            complete = await self._relay(resp, receive, send, route, gated,
                                         watch=body is None or body.done, cache=cache)
        except BaseException as exc:
            resp.close()
            if isinstance(exc, asyncio.CancelledError):  # the shutdown timeout cut it
                response_cut(scope)
            raise
        if not complete:
            response_cut(scope)  # its access-log line, which no last body message writes

    async def _send_lean(self, lean: UpstreamClient, method: str, route: Route, target: str,
                         headers: list[tuple[str, str]], body: _Body | None) -> _Answer:
        length = None
        if body is not None:  # the client's framing: its Content-Length, else chunked
            length = next((int(v) for n, v in headers if n == "content-length"), None)
        try:
            return await lean.request(route.origin, method, route.base_path + target,
                                      headers, body,
                                      length=length, connect_timeout=route.connect_timeout,
                                      timeout=route.read_timeout)
        except UpstreamError as exc:
            raise type(exc)(f"{route.name}: {exc.reason}") from None

    async def _send_aiohttp(self, session: aiohttp.ClientSession, method: str, route: Route,
                            target: str, headers: list[tuple[str, str]], body: _Body | None,
                            ) -> _Answer:
        try:
            resp = await session.request(
                method, URL(route.base_url + target, encoded=True),
                headers=headers, data=body, allow_redirects=False, timeout=route.timeout)
        except (aiohttp.ClientError, TimeoutError) as exc:
            if body is not None and (body.too_large or body.gone):
                raise _ClientGone from None  # forward tells which
            if isinstance(exc, TimeoutError):
                if self._pool_full(session):
                    raise UpstreamTimeout(
                        f"{route.name}: no free upstream connection within "
                        f"{route.timeout.connect:g} s: all {self._max_connections} of this "
                        "process are in use ([proxy] max_connections)") from None
                raise UpstreamTimeout(f"{route.name}: {_describe(exc)}") from None
            raise UpstreamError(f"{route.name}: {_describe(exc)}") from None
        return _AiohttpAnswer(resp)

    def _upstream_headers(self, scope: Scope, client_headers: list[tuple[str, str]],
                          add_headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
        """The client's forwardable headers, then the gateway's: the client's address, the
        ``X-Forwarded-*`` of the public URL and ``add_headers`` (identity, request ID)."""
        headers = client_headers.copy()
        client = scope.get("client")
        if client:
            headers.append(("X-Forwarded-For", client[0]))
        headers.extend(self._forwarded)
        for name, value in add_headers:
            headers.append((name.decode("latin-1"), header_text(value)))
        return headers

    async def open_websocket(self, scope: Scope, head: RequestHead, *, route: Route,
                             target: str, add_headers: Sequence[tuple[bytes, bytes]],
                             max_message_bytes: int, heartbeat: float | None = None,
                             ) -> UpstreamSocket:
        """Open a WebSocket to ``route`` for the client's upgrade request (``head``, read
        by ``head_reader``; ``target`` and ``add_headers`` as for ``forward``), offering
        the client's subprotocols. Messages larger than ``max_message_bytes`` from the
        upstream close it with 1009; ``heartbeat``: seconds between pings to the upstream
        (one unanswered ends the connection as dropped).

        Raises ``UpgradeRefused`` (the upstream answered without 101), ``UpstreamTimeout``
        (no answer within the route's connect and read timeouts), ``UpstreamError``
        (unreachable), ``BadRequest`` (a header the client library will not send).
        """
        if head.refused is not None:
            raise head.refused
        headers = self._upstream_headers(
            scope, [h for h in head.upstream if h[0].lower() not in _WS_HANDSHAKE], add_headers)
        if self._ws_session is None:
            self._ws_session = aiohttp.ClientSession(
                # No pool limit here: gateway.websocket caps open connections per process.
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60),
                cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=_SKIP_AUTO_HEADERS,
                timeout=aiohttp.ClientTimeout(total=None), trust_env=False,
                max_field_size=16 * 1024)
        wait = (route.timeout.connect or 10.0) + (route.timeout.sock_read or 30.0)
        try:
            async with asyncio.timeout(wait):
                ws = await self._ws_session.ws_connect(
                    URL(route.base_url + target, encoded=True), headers=headers,
                    protocols=scope.get("subprotocols") or (), compress=0,
                    # aiohttp refuses a message of max_msg_size bytes itself: + 1
                    max_msg_size=max_message_bytes + 1, autoclose=True, autoping=True,
                    heartbeat=heartbeat,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None,
                                                    ws_close=WS_CLOSE_TIMEOUT))
        except aiohttp.WSServerHandshakeError as exc:
            raise UpgradeRefused(f"{route.name}: answered {exc.status} to the WebSocket "
                                 f"upgrade ({exc.message})", exc.status) from None
        except TimeoutError:
            raise UpstreamTimeout(f"{route.name}: no WebSocket handshake within "
                                  f"{wait:g} s") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"{route.name}: {_describe(exc)}") from None
        except ValueError as exc:  # a header value aiohttp will not write
            raise BadRequest(f"header refused by the upstream client: {exc}") from None
        return UpstreamSocket(ws)

    # -- response ---------------------------------------------------------------------------

    async def _relay(self, resp: _Answer, receive: Receive, send: Send,
                     route: Route, gated: bool, watch: bool, cache: bytes = b"") -> bool:
        """Relay the answer; False if its body was cut (upstream failure, client gone).
        ``cache``: a public rule's Cache-Control (``ResponseHeaders.apply``)."""
        headers, length = route.responses.apply(resp.headers, gated, cache)
        watcher = None
        if watch and (length is None or length > _WATCH_ABOVE):
            watcher = asyncio.create_task(_watch_disconnect(receive, resp))
        try:
            await send({"type": "http.response.start", "status": resp.status,
                        "headers": headers})
            while True:
                chunk = await resp.read()
                if not chunk:
                    await send({"type": "http.response.body", "body": b"",
                                "more_body": False})
                    break
                # The last chunk carries more_body=False itself when the upstream already
                # signalled the end: one ASGI send fewer for every small response.
                last = resp.at_eof()
                await send({"type": "http.response.body", "body": chunk,
                            "more_body": not last})
                if last:
                    break
        except (aiohttp.ClientError, TimeoutError, UpstreamError) as exc:
            # Never raise once http.response.start is out: leave the response incomplete
            # so the server closes the connection and the client sees a cut body.
            if watcher is not None and watcher.done():
                log.debug("client left during response from %s", route.name)
            else:
                log.warning("upstream %s failed mid-response: %s", route.name, _describe(exc))
            resp.close()
            return False
        except OSError as exc:  # servers other than uvicorn raise on send to a gone client
            log.debug("client left during response from %s: %s", route.name, _describe(exc))
            resp.close()
            return False
        finally:
            if watcher is not None:
                watcher.cancel()
        resp.release()
        return True


# -- WebSocket ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SocketClosed:
    """The upstream's side of a WebSocket ended: its close ``code`` (1006 when the
    connection dropped without one) and ``reason``; ``too_large``: it sent a message over
    the limit (the connection was closed with 1009)."""

    code: int
    reason: str = ""
    too_large: bool = False


class UpstreamSocket:
    """An open WebSocket to an upstream: text (``str``) and binary (``bytes``) messages,
    pings answered by the client library."""

    __slots__ = ("_ws",)

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws

    @property
    def subprotocol(self) -> str | None:
        """The subprotocol the upstream chose among the client's, if any."""
        return self._ws.protocol

    async def receive(self) -> str | bytes | SocketClosed:
        """The next message, or how the upstream's side ended."""
        while True:
            message = await self._ws.receive()
            if message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                data: str | bytes = message.data
                return data
            if message.type == aiohttp.WSMsgType.ERROR:
                exc = message.data
                if (isinstance(exc, aiohttp.WebSocketError)
                        and exc.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG):
                    return SocketClosed(1009, "message too large", too_large=True)
                return SocketClosed(1006, _describe(exc) if exc else "")
            if message.type == aiohttp.WSMsgType.CLOSE:
                return SocketClosed(self._ws.close_code or 1005, message.extra or "")
            if message.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                return SocketClosed(self._ws.close_code or 1006)
            # PING / PONG: answered by the client library (autoping)

    async def send(self, data: str | bytes) -> None:
        """Send one message; ``ConnectionError`` when the upstream is gone."""
        try:
            if isinstance(data, str):
                await self._ws.send_str(data)
            else:
                await self._ws.send_bytes(data)
        except (aiohttp.ClientError, OSError) as exc:
            raise ConnectionError(_describe(exc)) from None

    async def close(self, code: int, reason: str = "") -> None:
        """Close with ``code`` (waits up to ``WS_CLOSE_TIMEOUT`` for the upstream's
        answer); nothing happens if it is closed already."""
        with contextlib.suppress(aiohttp.ClientError, OSError):
            await self._ws.close(code=code, message=close_reason(reason))


def close_reason(reason: str) -> bytes:
    """A close frame's reason: at most 123 bytes of UTF-8, cut on a character boundary."""
    return reason.encode()[:123].decode("utf-8", "ignore").encode()


# -- helpers ------------------------------------------------------------------------------


class _Answer(Protocol):
    """An upstream's answer as ``_relay`` reads it, from either client."""

    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> Sequence[tuple[bytes, bytes]]: ...
    async def read(self) -> bytes: ...
    def at_eof(self) -> bool: ...
    def release(self) -> None: ...
    def close(self) -> None: ...


class _AiohttpAnswer:
    """aiohttp's ``ClientResponse`` as an ``_Answer``."""

    __slots__ = ("_resp", "headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = resp.raw_headers

    async def read(self) -> bytes:
        return await self._resp.content.readany()

    def at_eof(self) -> bool:
        return self._resp.content.at_eof()

    def release(self) -> None:
        self._resp.release()

    def close(self) -> None:
        self._resp.close()


class _Body:
    """The client's request body as an async iterator for aiohttp, with a size limit.

    A plain iterator object rather than an async generator: aiohttp may stop iterating at
    any point (upstream gone, response finished early), and an object needs no
    finalisation. The flags tell ``forward`` why aiohttp's upload failed.
    """

    __slots__ = ("_limit", "_receive", "_received", "done", "gone", "too_large")

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self._received = 0
        self.done = False
        self.gone = False
        self.too_large = False

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        while not self.done:
            message = await self._receive()
            if message["type"] != "http.request":
                self.gone = True
                raise _ClientGone
            chunk: bytes = message.get("body", b"")
            if not message.get("more_body", False):
                self.done = True
            if chunk:
                self._received += len(chunk)
                if self._received > self._limit:
                    self.too_large = True
                    raise BodyTooLarge(f"request body over {self._limit} bytes")
                return chunk
        raise StopAsyncIteration


async def _watch_disconnect(receive: Receive, resp: _Answer) -> None:
    """Close the upstream response when the client goes away mid-stream.

    Closing wakes the relay loop's pending read with an error. Without
    this the relay would read a long or endless upstream body to its end, since uvicorn
    silently discards sends after a disconnect.
    """
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # the server failed to tell us; the relay goes on regardless
        return
    resp.close()



def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
