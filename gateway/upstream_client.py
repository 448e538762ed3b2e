"""A lean HTTP/1.1 client for the upstream hop (``[proxy] client = "lean"``).

One job: send one request to an upstream origin over a pooled keep-alive connection and
hand back the response head and a body reader. It is built on asyncio protocols and
httptools' llhttp parser, with none of a general client's per-request work (no header
merging, cookie jar, redirects or decompression).

Rules it keeps:

* **Pool**: per origin, all origins together bounded by ``max_connections``; a request
  that finds every connection in use waits for one up to its connect timeout. A
  connection goes back to the pool only after its response was read to the end and the
  upstream did not say ``close`` (nor spoke HTTP/1.0); idle connections close after
  ``keepalive_timeout``. One request at a time per connection (no pipelining).
* **Strict framing**: llhttp refuses a bad status line, duplicate Content-Length,
  Content-Length with Transfer-Encoding, invalid chunk sizes, bare LF, obsolete line
  folding and control characters; on top of it this module refuses a head over
  ``HEAD_LIMIT`` bytes, a field over ``FIELD_LIMIT``, more than ``MAX_FIELDS`` fields, a
  Transfer-Encoding other than one ``chunked``, an HTTP version other than 1.0/1.1, a
  status outside 100-599 and an unasked-for ``101``. A HEAD answer, 204 and 304 have no
  body whatever they declare; 1xx interim answers are skipped. A body cut short is an
  error, never a short answer; bytes after the end of an answer (a second answer to one
  request, a body after a HEAD answer) drop the connection.
* **Timeouts**: connecting (and waiting for a pooled connection) within
  ``connect_timeout``; the upstream must read what we send, answer the head, and keep
  the body coming, each within ``timeout``.
* **Backpressure both ways**: request bodies are written with ``drain`` semantics
  (``pause_writing``); the response body buffer pauses reading above ``HIGH_WATER``.

Failures raise ``UpstreamError`` (502) or ``UpstreamTimeout`` (504); the caller names the
upstream.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

from gateway.errors import UpstreamError, UpstreamTimeout

HEAD_LIMIT = 64 * 1024  # bytes of status line and header fields together
FIELD_LIMIT = 16 * 1024  # one header field (name and value); long CSP or Set-Cookie values
MAX_FIELDS = 128
HIGH_WATER = 256 * 1024  # response bytes buffered before reading from the upstream pauses
_NO_BODY_STATUS = frozenset({204, 304})


@dataclass(frozen=True, slots=True)
class Origin:
    """Where requests go: ``key`` names the pool; ``host_header`` is sent as ``Host``."""

    key: str
    host: str
    port: int
    tls: bool
    host_header: str

    @classmethod
    def from_url(cls, url: str) -> Origin:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        default = 443 if scheme == "https" else 80
        port = parts.port or default
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        header = shown if port == default else f"{shown}:{port}"
        return cls(f"{scheme}://{shown}:{port}", host, port, scheme == "https", header)


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Connection(asyncio.Protocol):
    """One connection to an upstream and the response being read on it."""

    def __init__(self, client: UpstreamClient, origin: Origin) -> None:
        self._client = client
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._writable: asyncio.Future[None] | None = None
        self._paused_writing = False
        self.idle_timer: asyncio.TimerHandle | None = None
        self.idle_since = 0.0
        self.used = False  # has carried a request before
        self.checked_out = False
        self._parser = httptools.HttpResponseParser(self)
        self._head_request = False
        self._reset(False)
        self.complete = True  # nothing asked yet: any byte the upstream sends is junk

    # -- per response state -------------------------------------------------------------

    def _reset(self, head_request: bool) -> None:
        if head_request or self._head_request:
            # After a HEAD answer llhttp still expects its body: a new parser. After any
            # other answer read to its end it is ready for the next one.
            self._parser = httptools.HttpResponseParser(self)
        self._head_request = head_request
        self._head_bytes = 0  # header fields parsed
        self._pending_head = 0  # bytes received while the head is not complete
        self._error: Exception | None = None
        self._refused = False  # the answer broke a rule (not merely cut)
        self.headers: list[tuple[bytes, bytes]] = []
        self.status = 0
        self.keep_alive = False
        self.head_done = False
        self.complete = False
        self._framed = False  # Content-Length or chunked: the end is known
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused_reading = False
        self._waiter: asyncio.Future[None] | None = None
        self.got_bytes = False
        self.extra = False  # bytes after the end of a response: never reuse

    def begin(self, head_request: bool) -> None:
        """Get ready to read the answer to a new request."""
        self._reset(head_request)
        self.used = True

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self.complete:
            self.extra = True  # unasked-for bytes (after a HEAD answer, or on an idle line)
            self._discard()
            return
        if not self.head_done:
            self._pending_head += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            if self.extra:
                return  # a second answer after the first: the connection was dropped
            if self._error is None:
                self._fail(UpstreamError(f"malformed response: {exc}"))
            else:
                self._wake()
            return
        # llhttp keeps no limit of its own: a head still incomplete after HEAD_LIMIT bytes
        if not self.head_done and self._pending_head > HEAD_LIMIT and self._error is None:
            self._fail(UpstreamError(f"response head over {HEAD_LIMIT} bytes"))

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.head_done and not self.complete and not self._framed and self._error is None:
            self.complete = True  # a body delimited by the end of the connection
        elif not self.complete and self._error is None:
            self._error = UpstreamError("connection closed by the upstream" + (
                f" ({exc})" if exc else "") + (" mid-body" if self.head_done else ""))
        self._client._forget(self)
        self._wake()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # a second answer to one request: response smuggling, or junk
            self.extra = True
            self._discard()
            raise _Junk

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._error is not None:
            return
        size = len(name) + len(value)
        self._head_bytes += size + 4
        if size > FIELD_LIMIT:
            self._fail(UpstreamError(f"response header field over {FIELD_LIMIT} bytes"))
        elif self._head_bytes > HEAD_LIMIT:
            self._fail(UpstreamError(f"response head over {HEAD_LIMIT} bytes"))
        elif len(self.headers) >= MAX_FIELDS:
            self._fail(UpstreamError(f"response with more than {MAX_FIELDS} header fields"))
        else:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._error is not None:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                self._fail(UpstreamError("unasked-for 101 Switching Protocols"))
            self.headers = []  # an interim answer (103 Early Hints): the real one follows
            return
        if self._parser.get_http_version() not in ("1.1", "1.0"):
            self._fail(UpstreamError("response in an HTTP version other than 1.0 or 1.1"))
            return
        if status > 599 or status < 100:
            self._fail(UpstreamError(f"invalid status {status}"))
            return
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"transfer-encoding":
                if value.strip().lower() != b"chunked" or self._framed:
                    # another coding (its bytes would be relayed as if plain), or chunked
                    # twice (never valid): the body's end is not certain
                    self._fail(UpstreamError(f"unsupported Transfer-Encoding {value[:64]!r}"))
                    return
                self._framed = True
            elif lower == b"content-length":
                self._framed = True
        self.status = status
        self.keep_alive = self._parser.should_keep_alive()
        self.head_done = True
        if self._head_request or status in _NO_BODY_STATUS:
            self._framed = True
            self.complete = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete or self._error is not None:
            self.extra = True
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused_reading and self.transport:
            self._paused_reading = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status == 0 and not self.head_done:
            return  # the end of an interim (1xx) answer
        if not self.complete:
            self.complete = True
            self._wake()

    # -- used by the client --------------------------------------------------------------

    def _fail(self, error: Exception) -> None:
        self._error = error
        self._refused = True
        self._discard()
        self._wake()

    def _discard(self) -> None:
        """Drop the connection now, unsent bytes and all (it will not be reused)."""
        self.keep_alive = False
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, timeout: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        # A timer that fails the one future awaited here: cheaper than asyncio.timeout's
        # context per wait, and the same effect.
        timer = loop.call_later(timeout, _time_out, waiter)
        try:
            await waiter
        except TimeoutError:
            self._discard()
            raise UpstreamTimeout(f"no {what} within {timeout:g} s") from None
        finally:
            timer.cancel()
            self._waiter = None

    def write(self, data: bytes) -> None:
        if self.transport is None or self.lost:
            raise self._error or UpstreamError("connection closed by the upstream")
        self.transport.write(data)

    async def drain(self, timeout: float) -> None:
        """Wait until the upstream has taken what was written (within ``timeout``)."""
        if self._paused_writing and not self.lost:
            self._writable = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._writable
            except TimeoutError:
                self._discard()
                raise UpstreamTimeout(f"the upstream read nothing for {timeout:g} s") from None
            finally:
                self._writable = None
        if self.lost:
            raise self._error or UpstreamError("connection closed by the upstream")

    async def read_head(self, timeout: float) -> None:
        while not self.head_done:
            if self._error is not None:
                raise self._error
            if self.lost:
                raise UpstreamError("connection closed by the upstream before answering")
            await self._wait(timeout, "response head")
        if self._refused:  # a framing error in the bytes that came with the head
            raise self._error or UpstreamError("malformed response")

    async def read(self, timeout: float) -> bytes:
        """The next body bytes; ``b""`` at the end of the body."""
        while not self._chunks:
            if self.complete:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait(timeout, "response body bytes")
        chunk = self._chunks.popleft()
        if len(self._chunks) > 4:  # many small pieces: hand them over together
            chunk = b"".join((chunk, *self._chunks))
            self._chunks.clear()
        self._buffered -= len(chunk)
        if self._paused_reading and self._buffered < HIGH_WATER // 4 and self.transport:
            self._paused_reading = False
            self.transport.resume_reading()
        return chunk

    def at_eof(self) -> bool:
        return self.complete and not self._chunks

    def reusable(self) -> bool:
        return (self.complete and self.keep_alive and not self.extra and not self.lost
                and self._error is None)

    def close(self) -> None:
        self._discard()


class Response:
    """An upstream's answer: ``status``, ``headers`` (raw name/value pairs as sent), and the
    body through ``read``. ``release`` gives the connection back (to the pool if the body
    was read to its end and it may be reused); ``close`` drops it."""

    __slots__ = ("_conn", "_timeout", "headers", "status")

    def __init__(self, conn: _Connection, timeout: float) -> None:
        self._conn = conn
        self._timeout = timeout
        self.status = conn.status
        self.headers = conn.headers

    async def read(self) -> bytes:
        """The next bytes of the body, as they come; ``b""`` at its end."""
        return await self._conn.read(self._timeout)

    def at_eof(self) -> bool:
        """The whole body has been read."""
        return self._conn.at_eof()

    def release(self) -> None:
        self._conn._client._release(self._conn)

    def close(self) -> None:
        self._conn.close()
        self._conn._client._release(self._conn)


class UpstreamClient:
    """Pooled HTTP/1.1 connections to upstreams (see the module docstring).

    ``ssl_context`` verifies TLS upstreams (default: the system's trust store,
    certificate and host name checked, SNI sent).
    """

    def __init__(self, *, max_connections: int, keepalive_timeout: float,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._max = max_connections
        self._keepalive = keepalive_timeout
        self._ssl = ssl_context
        self._idle: dict[str, list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._busy = 0  # connections being opened or in use
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    @property
    def in_use(self) -> int:
        return self._busy

    async def request(self, origin: Origin, method: str, target: str,
                      headers: Sequence[tuple[str, str]], body: AsyncIterator[bytes] | None,
                      *, length: int | None, connect_timeout: float, timeout: float,
                      ) -> Response:
        """Send one request and return once the response head is in.

        ``target`` is sent verbatim; ``headers`` follow ``Host``. With a ``body``,
        ``length`` is the Content-Length the headers already carry, or ``None`` to send it
        chunked (``Transfer-Encoding: chunked`` is added).
        """
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {origin.host_header}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers]
        if body is not None and length is None:
            lines.append("Transfer-Encoding: chunked\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode()
        # One line per header and one CRLF each: a CR, LF or NUL inside a value would
        # start another header upstream (response splitting); refuse it.
        count = len(lines) + 1  # the request line and Host share the first
        if head.count(b"\n") != count or head.count(b"\r") != count or b"\0" in head:
            raise ValueError("a header contains a control character")
        retry = body is None
        while True:
            conn = await self._acquire(origin, connect_timeout)
            reused = conn.used
            conn.begin(method == "HEAD")
            try:
                conn.write(head)
                if body is not None:
                    await self._send_body(conn, body, length, timeout)
                await conn.read_head(timeout)
            except UpstreamTimeout:
                self._drop(conn)
                raise
            except UpstreamError:
                self._drop(conn)
                # A kept-alive connection the upstream closed just as we reused it: the
                # request (with no body) went nowhere; send it once more on a new one.
                if retry and reused and not conn.got_bytes:
                    retry = False
                    continue
                raise
            except BaseException:
                self._drop(conn)
                raise
            return Response(conn, timeout)

    async def _send_body(self, conn: _Connection, body: AsyncIterator[bytes],
                         length: int | None, timeout: float) -> None:
        sent = 0
        async for chunk in body:
            sent += len(chunk)
            if length is not None and sent > length:
                raise UpstreamError("request body longer than its Content-Length")
            try:
                conn.write(chunk if length is not None
                           else b"%x\r\n%b\r\n" % (len(chunk), chunk))
                await conn.drain(timeout)
            except UpstreamError:
                if conn.head_done:  # it answered early (413 …) and closed: relay that
                    return
                raise
        if length is None:
            conn.write(b"0\r\n\r\n")
        elif sent != length:
            raise UpstreamError("request body shorter than its Content-Length")

    # -- the pool -------------------------------------------------------------------------

    async def _acquire(self, origin: Origin, timeout: float) -> _Connection:
        if self._closed:
            raise UpstreamError("the upstream client is closed")
        deadline = time.monotonic() + timeout
        while True:
            idle = self._idle.get(origin.key)
            while idle:
                conn = idle.pop()
                if conn.idle_timer is not None:
                    conn.idle_timer.cancel()
                    conn.idle_timer = None
                if not conn.lost and not conn.extra:
                    self._busy += 1
                    conn.checked_out = True
                    return conn
                conn.close()
            if self._busy + self._idle_count() < self._max or self._close_one_idle():
                break
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                    await waiter
            except TimeoutError:
                raise _PoolTimeout(
                    f"no free upstream connection within {timeout:g} s: all {self._max} of "
                    "this process are in use ([proxy] max_connections)") from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self._busy += 1
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.001)):
                conn = await self._connect(origin)
        except TimeoutError:
            self._busy -= 1
            self._wake_one()
            raise UpstreamTimeout(f"no connection within {timeout:g} s") from None
        except OSError as exc:
            self._busy -= 1
            self._wake_one()
            raise UpstreamError(f"cannot connect: {_describe(exc)}") from None
        except BaseException:
            self._busy -= 1
            self._wake_one()
            raise
        conn.checked_out = True
        return conn

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        context = None
        if origin.tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        _, conn = await loop.create_connection(
            lambda: _Connection(self, origin), origin.host, origin.port, ssl=context,
            server_hostname=origin.host if context else None)
        self._open.add(conn)
        return conn

    def _idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def _close_one_idle(self) -> bool:
        """Make room for another origin's connection: close the longest-idle one."""
        oldest: _Connection | None = None
        for conns in self._idle.values():
            if conns and (oldest is None or conns[0].idle_since < oldest.idle_since):
                oldest = conns[0]
        if oldest is None:
            return False
        self._idle[oldest.origin.key].remove(oldest)
        self._expire(oldest)
        return True

    def _release(self, conn: _Connection) -> None:
        if not conn.checked_out:
            return  # released twice
        conn.checked_out = False
        self._busy -= 1
        if conn.reusable() and not self._closed:
            conn.idle_since = time.monotonic()
            conn.idle_timer = asyncio.get_running_loop().call_later(
                self._keepalive, self._expire_idle, conn)
            self._idle.setdefault(conn.origin.key, []).append(conn)
        else:
            conn.close()
        self._wake_one()

    def _drop(self, conn: _Connection) -> None:
        conn.close()
        self._release(conn)

    def _expire_idle(self, conn: _Connection) -> None:
        conns = self._idle.get(conn.origin.key)
        if conns and conn in conns:
            conns.remove(conn)
        self._expire(conn)

    def _expire(self, conn: _Connection) -> None:
        if conn.idle_timer is not None:
            conn.idle_timer.cancel()
            conn.idle_timer = None
        if conn.transport is not None:  # idle, nothing unsent: an orderly close
            conn.transport.close()

    def _forget(self, conn: _Connection) -> None:
        """A connection closed (by either side)."""
        self._open.discard(conn)
        conns = self._idle.get(conn.origin.key)
        if conns and conn in conns:
            conns.remove(conn)
            if conn.idle_timer is not None:
                conn.idle_timer.cancel()
                conn.idle_timer = None

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        """Close every connection, idle or in use."""
        self._closed = True
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
        await asyncio.sleep(0)


class _Junk(Exception):
    """Raised inside the parser to stop it at bytes that follow a complete answer."""


class _PoolTimeout(UpstreamTimeout):
    """Every pooled connection was in use for the whole connect timeout."""


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
