"""The HTTP server that runs the gateway: uvicorn with httptools, plus a request-head limit
(431), a head timeout and an idle-connection cap.

uvicorn's httptools protocol bounds neither the size of a request head nor the time a
client takes to send it: llhttp hands each header over in pieces and httptools appends
them until the header ends, so an 8 MB header sits in memory before the application
sees a byte (a check in the ASGI application comes too late to bound memory), and a
connection that sends nothing, or one byte a second, stays open for good.
``GuardedHttpTools`` adds, per connection:

* a head limit: the bytes of each request head (request line and headers) are counted
  before the parser sees them; past ``header_limit`` the client gets 431 and nothing
  more is parsed. A head that begins in the same read as the previous request ends is
  counted from the next read on, so what one connection holds stays under
  ``header_limit`` plus one read (at most 256 KiB);
* a head timeout: a request head not complete within ``header_timeout`` of the
  connection's opening (or of the first byte of a later request) closes the connection,
  with 408 if part of a head came; the timer stops once the head is complete, so slow
  answers and uploads are not affected;
* an idle-connection cap: at ``limit_concurrency`` open connections, a new one closes
  the connection that has waited longest for a request head (with no request in
  progress), so idle and slow clients cannot lock others out; uvicorn itself answers 503
  once that many requests are in progress.

Between requests uvicorn's own keep-alive timeout applies. ``uvicorn_options`` gives
the uvicorn options for ``[server]``: every server that runs the gateway (``serve``,
``demo``, the tests) starts with them.

Shutdown (SIGTERM or SIGINT): ``run`` is ``uvicorn.run`` with a supervisor for
``--workers N`` that closes the master's copy of the listening socket at once, so new
connections are refused instead of queueing in a backlog no worker reads (uvicorn's own
supervisor keeps it open until every worker has exited). Each worker stops accepting,
marks its requests as draining (``telemetry.draining``: ``/readyz`` answers 503), closes
its idle connections, lets requests in progress finish for up to ``shutdown_timeout``
seconds, then cancels the rest; the supervisor kills a worker still alive a few seconds
after that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Any

from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import Server, ServerState
from uvicorn.supervisors.multiprocess import Multiprocess

from gateway import telemetry
from gateway.config import ServerSettings

log = logging.getLogger("gateway.server")

# Seconds a refused connection keeps reading (and dropping) what the client still sends,
# so the client reads the 431 instead of a connection reset.
LINGER = 2.0


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What ``GuardedHttpTools`` bounds: bytes of a request head, seconds to send it."""

    header_limit: int
    header_timeout: float


@dataclass(frozen=True, slots=True)
class GuardedProtocols:
    """uvicorn's ``http`` option: makes a ``GuardedHttpTools`` per connection. An object,
    not a class made on the fly, so a ``Config`` holding it can be pickled to worker
    processes (``serve --workers``)."""

    limits: ServerLimits

    def __call__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> GuardedHttpTools:
        return GuardedHttpTools(config, server_state, app_state, _loop, limits=self.limits)


def uvicorn_options(server: ServerSettings) -> dict[str, Any]:
    """The uvicorn options that apply ``[server]``: the guarded protocol, keep-alive and
    concurrency limits, and no ``Server`` header (it only names the software)."""
    return {"http": GuardedProtocols(ServerLimits(server.header_limit, server.header_timeout)),
            "server_header": False,
            "timeout_keep_alive": server.keepalive_timeout,
            "limit_concurrency": server.limit_concurrency,
            "timeout_graceful_shutdown": server.shutdown_timeout}


# Seconds the supervisor waits for a worker beyond its graceful-shutdown timeout (the
# lifespan shutdown: store and pool closing) before it kills the worker.
KILL_MARGIN = 5.0


def run(app: str, **options: Any) -> None:
    """``uvicorn.run(app, factory=True, **options)``, with ``Supervisor`` for workers."""
    config = Config(app, factory=True, **options)
    fit_to_file_limit(config)
    if config.workers > 1:
        sock = config.bind_socket()
        with contextlib.suppress(KeyboardInterrupt):
            Supervisor(config, sockets=[sock]).run()
        return
    server = Server(config=config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


# File descriptors a worker needs besides its client connections: the listening socket,
# the store, log and metric files, upstream connections in use, the event loop's own.
FD_RESERVE = 64


def fit_to_file_limit(config: Config) -> None:
    """Keep ``limit_concurrency`` under the open-file limit, so the idle-connection cap
    acts before ``accept`` fails with EMFILE (clients would see resets, and no line says
    why): raise the soft limit towards the hard one if needed; if that is not enough,
    lower ``limit_concurrency`` and say so."""
    import resource

    limit = config.limit_concurrency
    if limit is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = limit + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < want:
        raised = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if raised > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
                soft = raised
            except (ValueError, OSError):
                pass
    if soft != resource.RLIM_INFINITY and soft < want:
        fitted = max(2, soft - FD_RESERVE)
        log.warning("[server] limit_concurrency = %d does not fit the open-file limit "
                    "(%d): using %d; raise the limit (ulimit -n, LimitNOFILE=) to serve more",
                    limit, soft, fitted)
        config.limit_concurrency = fitted


class Supervisor(Multiprocess):
    """uvicorn's worker supervisor with a bounded, refusing shutdown: on SIGTERM or SIGINT
    the listening socket closes in this process at once (the workers close theirs as they
    begin to drain, so the kernel refuses new connections), and a worker that has not
    exited ``timeout_graceful_shutdown`` + ``KILL_MARGIN`` seconds later is killed."""

    def __init__(self, config: Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        # uvicorn queues the signal and looks every 0.5 s; stopping must not wait for that.
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_stop_signal)

    def _on_stop_signal(self, sig: int, _frame: object) -> None:
        self.signal_queue.append(sig)
        self.should_exit.set()

    def terminate_all(self) -> None:
        for sock in self.sockets:
            sock.close()
        log.info("shutting down: listening socket closed, %d workers draining (up to %g s)",
                 len(self.processes), self.config.timeout_graceful_shutdown or 0)
        super().terminate_all()

    def join_all(self) -> None:
        deadline = time.monotonic() + (self.config.timeout_graceful_shutdown or 0) + KILL_MARGIN
        for process in self.processes:
            process.process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                log.error("worker %s did not exit within the shutdown timeout: killed",
                          process.pid)
                process.kill()
                process.process.join()


# Per server: the connections waiting for a request head, oldest first.
_WAITING: weakref.WeakKeyDictionary[ServerState, dict[GuardedHttpTools, None]] = (
    weakref.WeakKeyDictionary())


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head limit, a head timeout and an idle cap."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *,
                 limits: ServerLimits) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._limits = limits
        self._in_head = True  # the next bytes belong to a request head
        self._head_bytes = 0
        self._messages = 0  # requests read to their end
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._waiting = _WAITING.setdefault(server_state, {})
        self._drain = telemetry.drain_of(app_state)

    # -- connection -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._make_room()
        self._waiting[self] = None
        self._arm_head_timer()

    def shutdown(self) -> None:
        """The server begins a graceful shutdown: from now on this process drains."""
        self._drain.active = True  # seen by every request, in progress or still to come
        super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        self._waiting.pop(self, None)
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # the 431 is out: what still comes is read and dropped
        if not self._in_head:
            super().data_received(data)
            return
        if self._head_timer is None and self._idle():  # a later request's first bytes
            self._arm_head_timer()
        room = self._limits.header_limit - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            super().data_received(data)
            return
        # This read crosses the limit: the parser gets what fits. If the head ends in
        # there, the rest is body (or the next request); if not, the head is too large.
        messages = self._messages
        self._head_bytes += room
        super().data_received(data[:room])
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return  # refused by the parser, or handed over (upgrade)
        if self._in_head and self._messages == messages:
            self._refuse_head()
            return
        self.data_received(data[room:])

    # -- parser callbacks -------------------------------------------------------------

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        self._waiting.pop(self, None)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0
        self._messages += 1

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._idle():
            self._waiting.pop(self, None)
            self._waiting[self] = None  # waits again, as the newest

    # -- the limits ---------------------------------------------------------------------

    def _idle(self) -> bool:
        """No request of this connection is being answered."""
        return self.cycle is None or self.cycle.response_complete

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self._limits.header_timeout,
                                                self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._in_head or not self._idle():
            return
        self._waiting.pop(self, None)
        if self._head_bytes:
            log.info("dropped connection from %s: request head not complete in %g s (408)",
                     _peer(self.client), self._limits.header_timeout)
            self._write_answer(408, b"Request Timeout",
                               "The request head did not arrive in time.\n")
        else:
            log.debug("closed idle connection from %s after %g s", _peer(self.client),
                      self._limits.header_timeout)
        self.transport.close()

    def _refuse_head(self) -> None:
        self._refused = True
        self._cancel_head_timer()
        self._waiting.pop(self, None)
        limit = self._limits.header_limit
        log.warning("refused request head over %d bytes from %s (431)", limit,
                    _peer(self.client))
        self._write_answer(431, b"Request Header Fields Too Large",
                           f"The request line and headers may take at most {limit} bytes.\n")
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the client sees the answer, then the end
        self.loop.call_later(LINGER, self.transport.close)

    def _make_room(self) -> None:
        """At the connection cap, close the connection waiting longest for a head."""
        limit = self.limit_concurrency
        if limit is None or len(self.connections) < limit:
            return
        oldest = next((c for c in self._waiting
                       if c is not self and not c.transport.is_closing()), None)
        if oldest is None:
            return
        self._waiting.pop(oldest)
        oldest._cancel_head_timer()
        log.info("closed idle connection from %s: %d connections open (limit_concurrency)",
                 _peer(oldest.client), len(self.connections))
        oldest.transport.close()
        # Out of the count now, not when the loop gets to connection_lost: a request on
        # this new connection may be read first, and must not find the server full.
        self.connections.discard(oldest)

    def _write_answer(self, status: int, reason: bytes, text: str) -> None:
        body = text.encode("ascii")
        head = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        head += [name + b": " + value + b"\r\n"
                 for name, value in self.server_state.default_headers]
        head.append(b"content-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                    b"connection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"
