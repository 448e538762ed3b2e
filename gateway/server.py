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

Both protocols (HTTP, and ``PeerWebSockets`` for WebSocket upgrades) keep the TCP peer
in each request's scope (``telemetry.PEER``): uvicorn's proxy-header handling replaces
``client`` with the address a trusted proxy names, and the request ID is believed by
who connected.

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

Reload (SIGHUP): the supervisor of ``--workers N`` forwards SIGHUP to every worker once
it has started; each worker reloads on its own (``gateway.reload``). uvicorn's own
supervisor would restart the workers instead, which loses the in-process checks (a
broken configuration would take the workers down). A worker that dies is replaced, and
its values of the gauges summed over live workers (prometheus' ``livesum``: open
WebSocket connections) are removed from the metrics directory with it.

TLS of its own (``[server] tls_*``): every worker listens with a context from
``gateway.tls`` (TLS 1.2+, modern ciphers) that a reload can load a new certificate
into. ``[server] http_redirect_listen`` adds a plain-HTTP listener, run in the main
process, that answers every request with a redirect to the same path and query at
``public_url`` (``RedirectApp``) and never proxies anything; it has the same head limit,
head timeout and connection cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import sys
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client.multiprocess import mark_process_dead
from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import Server, ServerState
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from gateway import telemetry
from gateway import tls as gateway_tls
from gateway.config import ServerSettings

if TYPE_CHECKING:
    from websockets.http11 import Request

    from gateway.config_schema import WebSocketSettings

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


def uvicorn_options(server: ServerSettings,
                    websocket: WebSocketSettings | None = None) -> dict[str, Any]:
    """The uvicorn options that apply ``[server]``: the guarded protocol, keep-alive and
    concurrency limits, and no ``Server`` header (it only names the software); with
    ``websocket`` (``[websocket]``), the server's own message limit and ping interval.
    WebSocket compression is off (``gateway.websocket`` relays messages as they are)."""
    options = {"http": GuardedProtocols(ServerLimits(server.header_limit,
                                                     server.header_timeout)),
               "server_header": False,
               "timeout_keep_alive": server.keepalive_timeout,
               "limit_concurrency": server.limit_concurrency,
               "timeout_graceful_shutdown": server.shutdown_timeout,
               "ws": PeerWebSockets,
               "ws_per_message_deflate": False}
    if websocket is not None:
        options["ws_max_size"] = websocket.max_message_bytes
        options["ws_ping_interval"] = websocket.ping_interval or None
    return options


# Seconds the supervisor waits for a worker beyond its graceful-shutdown timeout (the
# lifespan shutdown: store and pool closing) before it kills the worker.
KILL_MARGIN = 5.0
# Seconds a worker may take to answer the supervisor's liveness ping before it is killed
# as hung and replaced (uvicorn's default, 5 s, kills workers that are merely slow to
# start on a busy host; a replacement reads the configuration files as they are now).
WORKER_HEALTHCHECK = 30


@dataclass(frozen=True, slots=True)
class TLSContextFactory:
    """uvicorn's ``ssl_context_factory``: the gateway's TLS context for ``files``, made
    in each worker process and remembered there for reloads (``gateway.tls.live``). An
    object, so the ``Config`` holding it can be pickled to workers."""

    files: gateway_tls.TLSFiles

    def __call__(self, _config: Config, _default: Any) -> ssl.SSLContext:
        context = gateway_tls.server_context(self.files)
        gateway_tls.install(context, self.files)
        return context


@dataclass(frozen=True, slots=True)
class Redirect:
    """``[server] http_redirect_listen``: where to listen, and the https origin to send to."""

    host: str
    port: int
    public_url: str


def run(app: str, *, redirect: Redirect | None = None, **options: Any) -> None:
    """``uvicorn.run(app, factory=True, **options)``, with ``Supervisor`` for workers and
    the plain-HTTP redirect listener when ``redirect`` is given."""
    import signal

    options.setdefault("timeout_worker_healthcheck", WORKER_HEALTHCHECK)
    config = Config(app, factory=True, **options)
    fit_to_file_limit(config)
    with contextlib.ExitStack() as stack:
        if redirect is not None:
            stack.enter_context(redirect_listener(redirect, options))
        if config.workers > 1:
            sock = config.bind_socket()
            with contextlib.suppress(KeyboardInterrupt):
                Supervisor(config, sockets=[sock]).run()
            return
        # Until the application takes SIGHUP over (gateway.reload), it must not end us.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        # uvicorn raises SIGTERM again once it has shut down: leave by SystemExit then, so
        # serve's cleanup (pid file, metrics directory) runs.
        signal.signal(signal.SIGTERM, _exit_quietly)
        server = Server(config=config)
        with contextlib.suppress(KeyboardInterrupt):
            server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def _exit_quietly(_sig: int, _frame: object) -> None:
    raise SystemExit(0)


@contextlib.contextmanager
def redirect_listener(redirect: Redirect, options: dict[str, Any]) -> Iterator[None]:
    """The plain-HTTP listener that only redirects, in a thread of this process, with
    the same ``[server]`` limits (``options``) as the gateway's own listener."""
    import threading

    limits = {k: options[k] for k in ("http", "server_header", "timeout_keep_alive",
                                       "limit_concurrency") if k in options}
    config = Config(RedirectApp(redirect.public_url), host=redirect.host, port=redirect.port,
                    lifespan="off", log_config=None, access_log=False, **limits)
    sock = config.bind_socket()
    server = Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="http-redirect", daemon=True)
    thread.start()
    log.info("plain HTTP on %s:%d redirects to %s", redirect.host, redirect.port,
             redirect.public_url)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


#: Bytes a redirected path and query may hold: visible ASCII (percent-encoded otherwise).
_VISIBLE = frozenset(range(0x21, 0x7F))


class RedirectApp:
    """Every request → a redirect to the same path and query at ``public_url`` (301 for
    GET and HEAD, 308 for other methods, so a form is posted again over https). The
    request's Host is never used; a target that is not an origin-form path of visible
    ASCII gets 400."""

    def __init__(self, public_url: str) -> None:
        self._origin = public_url.rstrip("/").encode("ascii")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        target = scope.get("raw_path") or scope["path"].encode("utf-8")
        query = scope.get("query_string", b"")
        if not target.startswith(b"/") or not _VISIBLE.issuperset(target + query):
            await _plain(send, 400, [], b"Bad request.\n", scope["method"])
            return
        location = self._origin + target + (b"?" + query if query else b"")
        status = 301 if scope["method"] in ("GET", "HEAD") else 308
        await _plain(send, status, [(b"location", location)],
                     b"This site is served over https: " + location + b"\n", scope["method"])


async def _plain(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
                 method: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


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

    def handle_hup(self) -> None:
        """Forward SIGHUP to every worker, each once it has started (its application
        handles SIGHUP from then on): each reloads its configuration in place. Workers
        that could not start (below) are started again, with the files as they are now."""
        import os
        import signal

        log.info("SIGHUP: reloading the configuration in %d workers", len(self.processes))
        for process in self.processes:
            if process.pid is None or self.should_exit.is_set():
                continue
            if not process.wait_until_ready(self.config.timeout_worker_healthcheck,
                                            self.should_exit):
                log.warning("worker %s is not serving: not reloaded", process.pid)
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGHUP)
        while len(self.processes) < self.processes_num and not self.should_exit.is_set():
            process = Process(self.config, self.sockets)
            process.start()
            self.processes.append(process)

    def keep_subprocess_alive(self) -> None:
        """uvicorn's, except for a worker that fails to start while others serve: a
        replacement for a worker that died reads the configuration files as they are now,
        and while an admin edits them they may not load. uvicorn would stop every worker
        then; here the others keep serving with what they loaded, and the next SIGHUP
        (``sso-gateway reload``) starts the missing worker again."""
        if self.should_exit.is_set():
            return
        for process in list(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()
            process.join()
            _forget_worker_gauges(process.pid)
            if self.should_exit.is_set():
                return
            index = self.processes.index(process)
            if process.exitcode == STARTUP_FAILURE:
                del self.processes[index]
                if not self.processes:
                    log.error("no worker could start: stopping")
                    self.should_exit.set()
                    return
                log.error("a worker could not start (its log lines say why); %d workers keep "
                          "serving; fix the configuration and run `sso-gateway reload` to "
                          "start it again", len(self.processes))
                continue
            log.info("worker %s died: starting another", process.pid)
            replacement = Process(self.config, self.sockets)
            replacement.start()
            self.processes[index] = replacement

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

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # The TCP peer, kept before uvicorn's proxy-header handling replaces "client"
        # with the address a trusted proxy names (telemetry.PEER).
        self.scope[telemetry.PEER] = self.client  # type: ignore[literal-required]

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


class PeerWebSockets(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol (the one it picks itself), keeping the TCP peer in
    the scope as ``GuardedHttpTools`` does (``telemetry.PEER``)."""

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        if self.response.status_code == 101:  # the application is called with this scope
            self.scope[telemetry.PEER] = self.client  # type: ignore[literal-required]


def _forget_worker_gauges(pid: int | None) -> None:
    """A dead worker's values of the gauges summed over live workers only (open WebSocket
    connections), removed from prometheus' multiprocess directory: no scrape counts
    them any more."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path and pid is not None:
        mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"
