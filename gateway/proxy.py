"""Streaming forward of an allowed request to its upstream: the hot path's last step.

Raw ASGI in, one pooled aiohttp ``ClientSession`` out; no framework objects per request.
Everything that depends on configuration (routes, header sets, timeouts) is compiled in
``Proxy.__init__``; per-request code only compares bytes.

Request side: hop-by-hop headers (and those named in the client's ``Connection``) are
dropped, and so is every header that could carry a spoofed identity or forwarding chain
(names compared after lower-casing and ``_`` → ``-``, because many upstream frameworks
treat ``X_Member_Id`` like ``X-Member-Id``). The gateway then appends its own
``X-Forwarded-*`` and identity headers, after the ``Connection`` filter ran, so no
client can remove them. The target is sent verbatim: the path policy decided on is the
path the upstream sees.

Response side: status, headers and body bytes are relayed as they come
(``auto_decompress=False``: compressed bodies stay compressed, Content-Length stays
right). Gated responses are made private to the member.

Errors before ``http.response.start`` raise (``UpstreamError`` 502, ``UpstreamTimeout``
504, ``BadRequest`` 400, ``BodyTooLarge`` 413) so the caller can render a page; after it,
the failure is logged and the response is left incomplete, so the server drops the
connection and the client can tell the body was cut.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import aiohttp
from starlette.types import Receive, Scope, Send
from yarl import URL

from gateway.config import Upstream
from gateway.errors import (
    BadRequest,
    BodyTooLarge,
    ConfigError,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.proxy_headers import HOP_BY_HOP, norm, response_headers, strip_cookies

log = logging.getLogger("gateway.proxy")

#: Returned by ``Proxy.forward`` when the client left before a response could start
#: (nginx's convention); nothing was sent.
CLIENT_CLOSED = 499

# Client headers never forwarded besides the hop-by-hop ones: the upstream gets its own
# Host from the URL; forwarding chains are rebuilt by the gateway (uvicorn applies
# trusted_proxies to the client address); Expect was answered on the client's hop.
_ALWAYS_DROP = HOP_BY_HOP | {b"host", b"forwarded", b"x-real-ip", b"expect"}
_DROP_PREFIXES = (b"x-member-", b"x-gateway-", b"x-forwarded-")
# aiohttp would add these when absent; the upstream must see only what the client sent.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
# A response with a known length up to this size is read to the end even if the client
# leaves: cheaper than a disconnect watcher task, and the connection stays reusable.
_WATCH_ABOVE = 64 * 1024


class _ClientGone(Exception):
    """The client disconnected while its request body was being streamed upstream."""


@dataclass(frozen=True, slots=True)
class Route:
    """One upstream, ready to use: ``base_url`` has no trailing slash."""

    name: str
    prefix: str
    base_url: str
    timeout: aiohttp.ClientTimeout


class Proxy:
    """Forwards requests to upstreams over one pooled connection set.

    ``strip_headers`` must name every header the caller may pass in ``add_headers``
    (besides the ``x-member-*`` / ``x-gateway-*`` families, which are always stripped);
    ``strip_cookies`` names the gateway's own cookies, which upstreams never see.
    """

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        *,
        strip_headers: Iterable[str],
        strip_cookies: Iterable[str],
        public_host: str,
        public_scheme: str,
        max_body_bytes: int,
        max_connections: int = 1024,
        keepalive_timeout: float = 4.0,
    ) -> None:
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
            route = Route(up.name, prefix, up.url.rstrip("/"), timeout)
            routes.append((prefix, "/" if prefix == "/" else prefix + "/", route))
        if problems:
            raise ConfigError(problems)
        routes.sort(key=lambda r: len(r[0]), reverse=True)  # longest prefix first
        self._routes = tuple(routes)
        self._drop = _ALWAYS_DROP | {norm(n.encode("latin-1")) for n in strip_headers}
        self._cookies = tuple(n.encode("latin-1") for n in strip_cookies)
        self._forwarded = (("X-Forwarded-Proto", public_scheme),
                           ("X-Forwarded-Host", public_host))
        self._max_body = max_body_bytes
        self._max_connections = max_connections
        self._keepalive_timeout = keepalive_timeout
        self._session: aiohttp.ClientSession | None = None

    @property
    def routes(self) -> tuple[Route, ...]:
        return tuple(r[2] for r in self._routes)

    async def start(self) -> None:
        """Create the pooled client; must run inside the serving event loop."""
        if self._session is not None:
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

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def route(self, path: str) -> Route | None:
        """The route with the longest prefix that matches ``path`` on a segment boundary."""
        for prefix, prefix_slash, route in self._routes:
            if path.startswith(prefix_slash) or path == prefix:
                return route
        return None

    async def forward(self, scope: Scope, receive: Receive, send: Send, *, route: Route,
                      target: str, add_headers: Sequence[tuple[bytes, bytes]],
                      gated: bool) -> int:
        """Send the request to ``route`` and relay the answer; returns the upstream status.

        ``target`` is the canonical, already percent-encoded path plus ``?query``; it is
        sent byte for byte. ``add_headers`` are the gateway's identity headers.
        Returns ``CLIENT_CLOSED`` if the client left before the response started.
        """
        session = self._session
        if session is None:
            raise RuntimeError("Proxy.start() was not awaited")
        headers, has_body = self._request_headers(scope, add_headers)
        body = _Body(receive, self._max_body) if has_body else None
        try:
            resp = await session.request(
                scope["method"], URL(route.base_url + target, encoded=True),
                headers=headers, data=body, allow_redirects=False, timeout=route.timeout)
        except (aiohttp.ClientError, TimeoutError) as exc:
            if body is not None:
                if body.too_large:
                    raise BodyTooLarge(
                        f"request body over {self._max_body} bytes (streamed)") from None
                if body.gone:
                    log.debug("client left during upload to %s", route.name)
                    return CLIENT_CLOSED
            if isinstance(exc, TimeoutError):
                raise UpstreamTimeout(f"{route.name}: {_describe(exc)}") from None
            raise UpstreamError(f"{route.name}: {_describe(exc)}") from None
        try:
            await self._relay(resp, receive, send, route, gated,
                              watch=body is None or body.done)
        except BaseException:
            resp.close()
            raise
        return resp.status

    # -- request ----------------------------------------------------------------------------

    def _request_headers(self, scope: Scope, add_headers: Sequence[tuple[bytes, bytes]]
                         ) -> tuple[list[tuple[str, str]], bool]:
        """The headers to send upstream, and whether the request has a body."""
        drop, cookies = self._drop, self._cookies
        out: list[tuple[str, str]] = []
        connection: list[bytes] = []
        length: bytes | None = None
        chunked: bytes | None = None
        for name, value in scope["headers"]:
            key = name.replace(b"_", b"-")
            if key in drop or key.startswith(_DROP_PREFIXES):
                if name == b"connection":
                    connection.append(value)
                elif name == b"transfer-encoding":
                    if chunked is not None:
                        raise BadRequest("more than one Transfer-Encoding header")
                    chunked = value
                continue
            if name == b"content-length":
                if length is not None:
                    if value != length:
                        raise BadRequest("conflicting Content-Length headers")
                    continue
                length = value
            elif name == b"cookie" and cookies:
                value = strip_cookies(value, cookies)
                if not value:
                    continue
            out.append((name.decode("latin-1"), _text(value)))
        if connection:
            named = {t.strip().lower() for v in connection for t in v.split(b",")}
            # Content-Length frames the body we stream; it is ours to keep or drop.
            named -= drop | {b"close", b"content-length", b""}
            if named:
                names = {n.decode("latin-1") for n in named}
                out = [h for h in out if h[0] not in names]
        client = scope.get("client")
        if client:
            out.append(("X-Forwarded-For", client[0]))
        out.extend(self._forwarded)
        for name, value in add_headers:
            out.append((name.decode("latin-1"), _text(value)))
        if chunked is not None:
            if length is not None:
                raise BadRequest("both Content-Length and Transfer-Encoding")
            if chunked.strip().lower() != b"chunked":
                raise BadRequest(f"unsupported Transfer-Encoding {chunked!r}")
            return out, True
        if length is None:
            return out, False
        if not length.isdigit():
            raise BadRequest(f"invalid Content-Length {length!r}")
        size = int(length)
        if size > self._max_body:
            raise BodyTooLarge(f"Content-Length {size} over {self._max_body} bytes")
        return out, size > 0

    # -- response ---------------------------------------------------------------------------

    async def _relay(self, resp: aiohttp.ClientResponse, receive: Receive, send: Send,
                     route: Route, gated: bool, watch: bool) -> None:
        headers, length = response_headers(resp.raw_headers, gated)
        watcher = None
        if watch and (length is None or length > _WATCH_ABOVE):
            watcher = asyncio.create_task(_watch_disconnect(receive, resp))
        content = resp.content
        try:
            await send({"type": "http.response.start", "status": resp.status,
                        "headers": headers})
            while True:
                chunk = await content.readany()
                if not chunk:
                    await send({"type": "http.response.body", "body": b"",
                                "more_body": False})
                    break
                # The last chunk carries more_body=False itself when the upstream already
                # signalled the end: one ASGI send fewer for every small response.
                last = content.at_eof()
                await send({"type": "http.response.body", "body": chunk,
                            "more_body": not last})
                if last:
                    break
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Never raise once http.response.start is out: leave the response incomplete
            # so the server closes the connection and the client sees a cut body.
            if watcher is not None and watcher.done():
                log.debug("client left during response from %s", route.name)
            else:
                log.warning("upstream %s failed mid-response: %s", route.name, _describe(exc))
            resp.close()
            return
        except OSError as exc:  # servers other than uvicorn raise on send to a gone client
            log.debug("client left during response from %s: %s", route.name, _describe(exc))
            resp.close()
            return
        finally:
            if watcher is not None:
                watcher.cancel()
        resp.release()


# -- helpers ------------------------------------------------------------------------------


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


async def _watch_disconnect(receive: Receive, resp: aiohttp.ClientResponse) -> None:
    """Close the upstream response when the client goes away mid-stream.

    Closing wakes the relay loop's pending read with a ClientConnectionError. Without
    this the relay would read a long or endless upstream body to its end, since uvicorn
    silently discards sends after a disconnect.
    """
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # the server failed to tell us; the relay goes on regardless
        return
    resp.close()


def _text(value: bytes) -> str:
    """A header value as aiohttp wants it (it encodes str values as UTF-8 on the wire).

    UTF-8 round-trips byte for byte; anything else (rare obs-text) falls back to Latin-1.
    """
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
