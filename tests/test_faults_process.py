"""Faults over real processes and sockets: ``sso-gateway serve`` in a subprocess.

* SIGTERM during a slow download with two workers: new connections are answered or
  refused within 1 s (never left hanging in a backlog nobody reads), a short request in
  flight finishes, the slow download is cut at ``[server] shutdown_timeout`` and the
  process exits within that timeout plus a small margin; the metrics directory of the
  workers is removed.
* 2,000 idle sockets plus slow-header clients against an open-file limit of 1,024: other
  clients are still served, and the idle ones are closed after the head timeout (a
  ``limit_concurrency`` the limit cannot hold is fitted under it, with a warning).
* Requests in progress when a server begins to shut down see it draining (``/readyz``).
* A full upstream pool (``[proxy] max_connections``) is a 504 that names the pool.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from gateway.demo.stack import prepare
from tests.conftest import bound_socket, port_of, seed_demo_keys

CHUNK = 1024


class SlowUpstream(BaseHTTPRequestHandler):
    """``/public/slow?seconds=S``: 20 KB a second for S seconds, with a Content-Length;
    anything else: a short 200."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if not url.path.startswith("/public/slow"):
            body = b"ok\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        seconds = float(parse_qs(url.query).get("seconds", ["20"])[0])
        chunks = int(seconds / 0.05)
        self.send_response(200)
        self.send_header("Content-Length", str(chunks * CHUNK))
        self.end_headers()
        try:
            for _ in range(chunks):
                self.wfile.write(b"x" * CHUNK)
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def slow_upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowUpstream)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Served:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    tmp: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serve(tmp_path: Path, upstream: str, extra: str, *, workers: int = 1,
          nofile: int | None = None) -> Iterator[Served]:
    """``sso-gateway serve`` in a subprocess on a demo config, its own temp directory."""
    with bound_socket() as sock:
        port = port_of(sock)
    url = f"http://127.0.0.1:{port}"
    seed_demo_keys(tmp_path)
    prepare(tmp_path, gateway_url=url, idp_url="http://127.0.0.1:9", reader_url=upstream,
            extra_config=extra)
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(temp)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)

    def limit_files() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config",
             str(tmp_path / "gateway.toml"), "--workers", str(workers)],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=limit_files)
    served = Served(url, process, log, temp)
    try:
        deadline = time.monotonic() + 30
        while get(url, "/healthz") != 200:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("serve did not start:\n" + served.log_text())
            time.sleep(0.1)
        yield served
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def connect(url: str, timeout: float = 5) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=timeout)


def request(url: str, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {urlsplit(url).netloc}\r\n\r\n".encode()


def get(url: str, path: str, timeout: float = 2) -> int | None:
    """The status of ``GET path`` on a new connection; None if refused, reset or silent."""
    try:
        with connect(url, timeout) as sock:
            sock.sendall(request(url, path))
            head = sock.recv(4096)
    except OSError:
        return None
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else None


@dataclass
class Download:
    """A download in a thread: what arrived, and when."""

    sock: socket.socket
    status: int = 0
    length: int = 0
    received: int = 0
    ended: float | None = None  # monotonic time the connection ended
    marks: list[tuple[float, int]] = field(default_factory=list)

    def run(self) -> None:
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                data = self.sock.recv(65536)
                if not data:
                    return
                buf += data
            head, _, rest = buf.partition(b"\r\n\r\n")
            self.status = int(head.split(b" ", 2)[1])
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    self.length = int(line.split(b":", 1)[1])
            self.received = len(rest)
            while self.received < self.length:
                data = self.sock.recv(65536)
                if not data:
                    return
                self.received += len(data)
                self.marks.append((time.monotonic(), self.received))
        except OSError:
            return
        finally:
            self.ended = time.monotonic()
            self.sock.close()

    @property
    def complete(self) -> bool:
        return self.status == 200 and self.received == self.length


def download(url: str, path: str) -> tuple[Download, threading.Thread]:
    sock = connect(url, timeout=60)
    sock.sendall(request(url, path))
    job = Download(sock)
    thread = threading.Thread(target=job.run, daemon=True)
    thread.start()
    return job, thread


# -- SIGTERM with two workers -------------------------------------------------------------

SHUTDOWN_TIMEOUT = 3.0


def test_sigterm_during_slow_download_with_two_workers(tmp_path: Path) -> None:
    with slow_upstream() as upstream, serve(
            tmp_path, upstream, f"\n[server]\nshutdown_timeout = {SHUTDOWN_TIMEOUT}\n",
            workers=2) as gw:
        metrics_dirs = list(gw.tmp.glob("sso-gateway-metrics-*"))
        assert len(metrics_dirs) == 1
        slow, slow_thread = download(gw.url, "/public/slow?seconds=30")
        short, short_thread = download(gw.url, "/public/slow?seconds=1.5")
        time.sleep(0.5)
        assert slow.status == 200 and short.status == 200 and slow.received > 0

        gw.process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        # New connections, from the signal on: each is answered or refused within 1 s.
        outcomes = []
        while time.monotonic() - stopped < 2.5:
            began = time.monotonic()
            status = get(gw.url, "/healthz", timeout=1.5)
            took = time.monotonic() - began
            outcomes.append((round(began - stopped, 2), status, round(took, 2)))
            assert took < 1.0, outcomes
            time.sleep(0.1)
        assert outcomes[-1][1] is None, outcomes  # refused once the workers drain

        gw.process.wait(timeout=SHUTDOWN_TIMEOUT + 7)
        exited = time.monotonic() - stopped
        short_thread.join(5)
        slow_thread.join(5)
        log = gw.log_text()
        assert exited < SHUTDOWN_TIMEOUT + 4, (exited, log)
        assert short.complete, (short, log)  # in flight at the signal: finished
        # The slow download went on after the signal, and was cut at the timeout.
        assert not slow.complete and slow.ended is not None
        assert any(at > stopped + 1 for at, _ in slow.marks), slow.marks[-3:]
        assert SHUTDOWN_TIMEOUT - 0.5 < slow.ended - stopped < SHUTDOWN_TIMEOUT + 3
        assert "listening socket closed" in log, log
        assert '"cut":true' in log.replace(" ", ""), log  # the cut download's log line
        assert not any(gw.tmp.glob("sso-gateway-metrics-*"))  # removed at exit



def test_a_dead_workers_live_gauges_leave_with_it(tmp_path: Path) -> None:
    """A worker that dies is replaced, and its values of the gauges summed over live
    workers only (open WebSocket connections) are removed with it: a scrape does not
    go on counting a dead worker's connections."""
    with slow_upstream() as upstream, serve(tmp_path, upstream, "", workers=2) as gw:
        (metrics,) = gw.tmp.glob("sso-gateway-metrics-*")

        def live() -> set[int]:
            return {int(f.stem.rpartition("_")[2]) for f in metrics.glob("gauge_livesum_*.db")}

        deadline = time.monotonic() + 20
        while len(live()) < 2:  # both workers made their gauges
            assert time.monotonic() < deadline, sorted(metrics.iterdir())
            time.sleep(0.1)
        victim = min(live())
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while victim in live() or len(live()) < 2:  # gone, and a replacement started
            assert time.monotonic() < deadline, (victim, live(), gw.log_text()[-2000:])
            time.sleep(0.1)
        assert get(gw.url, "/healthz") == 200
        assert f"worker {victim} died: starting another" in gw.log_text()


# -- connection limits against a file-descriptor limit -------------------------------------


def raised_file_limit(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"this test needs {want} open files (hard limit {hard})")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def test_idle_and_slow_clients_against_a_file_limit(tmp_path: Path) -> None:
    raised_file_limit(4096)
    header_timeout = 3
    # A limit_concurrency the open-file limit cannot hold: serve fits it under the limit
    # (without that, accept fails with EMFILE and every new client gets nothing).
    extra = f"\n[server]\nheader_timeout = {header_timeout}\nlimit_concurrency = 4000\n"
    with slow_upstream() as upstream, serve(tmp_path, upstream, extra, nofile=1024) as gw:
        assert "does not fit the open-file limit" in gw.log_text()
        idle: list[socket.socket] = []
        slow: list[socket.socket] = []
        try:
            opened = time.monotonic()
            for i in range(2000):
                idle.append(connect(gw.url, timeout=10))
                if i % 40 == 0:
                    sock = connect(gw.url, timeout=10)
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
                    slow.append(sock)
            served = [get(gw.url, "/healthz", timeout=5) for _ in range(20)]
            assert served.count(200) >= 18, served
            assert get(gw.url, "/public/page", timeout=5) == 200

            # Every idle and slow socket is closed by the server within the head timeout
            # of its opening (or earlier, to make room), plus a margin.
            deadline = opened + header_timeout + 10
            open_socks = idle + slow
            while open_socks and time.monotonic() < deadline:
                still = []
                for sock in open_socks:
                    sock.settimeout(0)
                    try:
                        if sock.recv(65536):
                            still.append(sock)  # a 408 answer: the close follows
                    except BlockingIOError:
                        still.append(sock)
                    except OSError:
                        pass  # reset: closed
                open_socks = still
                time.sleep(0.2)
            assert not open_socks, f"{len(open_socks)} sockets still open"
            assert get(gw.url, "/healthz") == 200
            assert gw.process.poll() is None
        finally:
            for sock in idle + slow:
                sock.close()


# -- draining: what a request in progress sees once shutdown begins ------------------------


def test_requests_in_progress_see_the_server_draining() -> None:
    """Once the server begins shutting down, ``telemetry.draining`` is true for requests
    in progress (``/readyz`` answers 503 with it), and only for that server."""
    from gateway.config_schema import ServerSettings
    from gateway.server import uvicorn_options
    from gateway.telemetry import draining
    from tests.conftest import ThreadServer

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        before = draining(scope)
        await asyncio.sleep(0.6)
        body = f"{before} {draining(scope)}".encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    options = {**uvicorn_options(ServerSettings()), "lifespan": "off"}
    stopping = ThreadServer(app, bound_socket(), **options).start()
    staying = ThreadServer(app, bound_socket(), **options).start()
    try:
        answers: dict[str, bytes] = {}

        def ask(name: str, url: str) -> None:
            with connect(url) as sock:
                sock.sendall(request(url, "/"))
                data = b""
                while chunk := sock.recv(4096):
                    data += chunk
                    if data.endswith((b"True", b"False")):
                        break
                answers[name] = data

        threads = [threading.Thread(target=ask, args=(name, server.url))
                   for name, server in (("stopping", stopping), ("staying", staying))]
        for thread in threads:
            thread.start()
        time.sleep(0.2)
        stopping.server.should_exit = True
        for thread in threads:
            thread.join(5)
        assert answers["stopping"].endswith(b"False True"), answers
        assert answers["staying"].endswith(b"False False"), answers
    finally:
        stopping.stop()
        staying.stop()


# -- the upstream pool -----------------------------------------------------------------------


def test_a_full_upstream_pool_is_a_504_that_says_so() -> None:
    """With every pooled upstream connection in use ([proxy] max_connections), a request
    waits its upstream's connect_timeout, then gets 504 whose reason names the pool, not
    "Connection timeout" against a healthy upstream."""
    from gateway.config import Upstream
    from gateway.errors import UpstreamTimeout
    from gateway.proxy import Proxy

    async def scenario(upstream: str) -> str:
        proxy = Proxy([Upstream(name="reader", prefix="/", url=upstream, connect_timeout=0.5)],
                      strip_headers=[], strip_cookies=[], public_host="127.0.0.1",
                      public_scheme="http", max_body_bytes=1024, max_connections=2)
        await proxy.start()
        started = asyncio.Event()
        starts = []

        async def receive() -> dict[str, Any]:
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                starts.append(message)
                if len(starts) == 2:
                    started.set()

        def fetch(path: str) -> Any:
            scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(),
                     "query_string": b"", "headers": [], "client": ("127.0.0.1", 1)}
            head = proxy.head_reader().read([])
            route = proxy.route(path)
            assert route is not None
            return proxy.forward(scope, head, receive, send, route=route, target=path,
                                 add_headers=[], gated=False)

        busy = [asyncio.create_task(fetch("/public/slow?seconds=5")) for _ in range(2)]
        try:
            await asyncio.wait_for(started.wait(), 5)
            with pytest.raises(UpstreamTimeout) as info:
                await fetch("/public/page")
            return info.value.reason
        finally:
            for task in busy:
                task.cancel()
            await asyncio.gather(*busy, return_exceptions=True)
            await proxy.close()

    with slow_upstream() as upstream:
        reason = asyncio.run(scenario(upstream))
    assert "max_connections" in reason and "all 2" in reason, reason
