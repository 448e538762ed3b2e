"""Streaming forward of an allowed request to its upstream: the hot path's last step.

Raw ASGI in, one pooled aiohttp ``ClientSession`` out; no framework objects per request.
Everything that depends on configuration (routes, header sets, timeouts) is compiled in
``Proxy.__init__``; per-request code only compares bytes.

Request side: the hot path reads the request's headers once (``HeadReader.read``, in
``gateway.proxy_headers``); ``forward`` sends the headers that pass the drop rules and
appends the gateway's own ``X-Forwarded-*`` and identity headers, after the
``Connection`` filter ran, so no client can remove them. The target is sent verbatim:
the path policy decided on is the path the upstream sees.

Response side: status, headers and body bytes are relayed as they come
(``auto_decompress=False``: compressed bodies stay compressed, Content-Length stays
right). Each upstream's ``ResponseRules`` drop a ``Set-Cookie`` for the gateway's own
cookies and point the upstream's absolute redirects at the public URL; gated responses
are made private to the member.

Errors before ``http.response.start`` raise (``UpstreamError`` 502, ``UpstreamTimeout``
504, ``BadRequest`` 400, ``BodyTooLarge`` 413) so the caller can render a page; after it,
the failure is logged and the response is left incomplete, so the server drops the
connection and the client can tell the body was cut.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import aiohttp
from starlette.types import Receive, Scope, Send
from yarl import URL

from gateway.config import Upstream
from gateway.errors import BadRequest, BodyTooLarge, ConfigError, UpstreamError, UpstreamTimeout
from gateway.proxy_headers import HeadReader, RequestHead, ResponseRules, header_text
from gateway.telemetry import response_cut

log = logging.getLogger("gateway.proxy")

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
    base_url: str
    timeout: aiohttp.ClientTimeout
    responses: ResponseRules


class Proxy:
    """Forwards requests to upstreams over one pooled connection set.

    ``strip_headers`` must name every header the caller may pass in ``add_headers``
    (besides the ``x-member-*`` / ``x-gateway-*`` families, which are always stripped),
    and may name more (with ``strip_prefixes``: ``[proxy]``), on top of the
    authentication headers always stripped (``proxy_headers.AUTH_HEADERS``);
    ``strip_cookies`` (and ``strip_cookie_prefixes``) name the gateway's own cookies,
    which upstreams never see nor set. ``head_reader`` compiles the request rules for
    the hot path.
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
            route = Route(up.name, up.url.rstrip("/"), timeout, responses)
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
        self._session: aiohttp.ClientSession | None = None

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
        session = self._session
        if session is None:
            raise RuntimeError("Proxy.start() was not awaited")
        if head.refused is not None:
            raise head.refused
        headers = head.upstream.copy()
        client = scope.get("client")
        if client:
            headers.append(("X-Forwarded-For", client[0]))
        headers.extend(self._forwarded)
        for name, value in add_headers:
            headers.append((name.decode("latin-1"), header_text(value)))
        body = _Body(receive, self._max_body) if head.has_body else None
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
                    return
            if isinstance(exc, TimeoutError):
                if self._pool_full(session):
                    raise UpstreamTimeout(
                        f"{route.name}: no free upstream connection within "
                        f"{route.timeout.connect:g} s: all {self._max_connections} of this "
                        "process are in use ([proxy] max_connections)") from None
                raise UpstreamTimeout(f"{route.name}: {_describe(exc)}") from None
            raise UpstreamError(f"{route.name}: {_describe(exc)}") from None
        except ValueError as exc:  # a header value aiohttp will not write (control character)
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

    # -- response ---------------------------------------------------------------------------

    async def _relay(self, resp: aiohttp.ClientResponse, receive: Receive, send: Send,
                     route: Route, gated: bool, watch: bool, cache: bytes = b"") -> bool:
        """Relay the answer; False if its body was cut (upstream failure, client gone).
        ``cache``: a public rule's Cache-Control (``ResponseHeaders.apply``)."""
        headers, length = route.responses.apply(resp.raw_headers, gated, cache)
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



def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
