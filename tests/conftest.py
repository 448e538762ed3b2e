"""Shared fixtures: real servers on loopback ports, the demo stack, a TLS certificate.

Servers run with uvicorn in background threads on sockets bound before the app
is built, so each app knows its own URL (``public_url``) without a port race.
The gateway runs over https in these tests, as in production, so the cookies
carry their real attributes (``__Host-``, ``Secure``, ``SameSite``).
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import ipaddress
import json
import logging
import os
import re
import socket
import sqlite3
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.app import create_app
from gateway.config import Settings, load_settings
from gateway.demo.reader import create_reader
from gateway.demo.stack import DemoStack, prepare
from gateway.devidp import create_app as create_idp_app
from gateway.devidp.settings import CERT_FILE as IDP_CERT_FILE
from gateway.devidp.settings import KEY_FILE as IDP_KEY_FILE
from gateway.keys import generate_self_signed
from gateway.protocol import LoginProtocol
from gateway.server import uvicorn_options
from gateway.sessions.manager import SYNC_INTERVAL
from tests.forge import Forge, forge_for_demo


def bound_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock


class ThreadServer:
    """A uvicorn server in a daemon thread, on a socket bound in advance."""

    def __init__(self, app: Any, sock: socket.socket, **config: Any) -> None:
        self.sock = sock
        self.config = uvicorn.Config(app, **{"log_level": "warning", "lifespan": "on",
                                             **config})
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{port_of(self.sock)}"

    @property
    def app(self) -> Any:
        """The application this server runs."""
        return self.config.app

    def start(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def stop_together(*servers: ThreadServer) -> None:
    """Ask every server to stop at once, so that they shut down side by side (uvicorn
    takes about 0.2 s each); each ``serving`` block then waits for its own."""
    for server in servers:
        server.server.should_exit = True


@contextmanager
def serving(app: Any, sock: socket.socket, **config: Any) -> Iterator[ThreadServer]:
    server = ThreadServer(app, sock, **config).start()
    try:
        yield server
    finally:
        server.stop()


def audit_lines(records: list[logging.LogRecord]) -> list[dict[str, Any]]:
    """The audit lines among captured log records, parsed."""
    return [json.loads(r.getMessage()) for r in records if r.name == "gateway.audit"]


@pytest.fixture
def audit_records() -> Iterator[list[logging.LogRecord]]:
    """Every record the audit logger writes during the test (see ``audit_lines``)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("gateway.audit")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def memory_sees_it() -> None:
    """Wait until every gateway that keeps sessions in memory (``[session] memory``) has
    read the store's change log since now: for a change made behind its back (by the
    test itself, the CLI or another replica), which reaches it within that bound."""
    time.sleep(SYNC_INTERVAL + 0.05)


def wait_until_healthy(url: str, process: subprocess.Popen[bytes], log: Path,
                       timeout: float = 60) -> None:
    """Wait until a gateway started as a process answers ``/healthz``; fail the test with
    its log if it exits or does not answer in ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the gateway process did not start:\n{log.read_text()}")
        time.sleep(0.1)


@contextmanager
def nginx_process(directory: Path, probe_url: str) -> Iterator[None]:
    """Debian's nginx on ``directory/nginx.conf`` (``-p directory``), until ``probe_url``
    answers; stopped afterwards. Fails with nginx's error log if it does not start."""
    nginx = "/usr/sbin/nginx"
    assert Path(nginx).exists(), "Debian's nginx is required (`make test` installs it)"
    # Daemonised, nginx would outlive the test: this process could not stop it.
    assert "daemon off;" in (directory / "nginx.conf").read_text(), "nginx.conf: daemon off;"
    proc = subprocess.Popen([nginx, "-c", str(directory / "nginx.conf"), "-p", str(directory)])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(probe_url, timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, (directory / "error.log").read_text()
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


@dataclass
class TLSFiles:
    key: Path
    cert: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


@contextmanager
def serve_gateway(settings: Settings, sock: socket.socket, *,
                  clock: Callable[[], float] | None = None, tls: TLSFiles | None = None,
                  protocols: Sequence[LoginProtocol] | None = None,
                  **config: Any) -> Iterator[ThreadServer]:
    """The gateway for ``settings`` on ``sock`` (over https with ``tls``), started as the
    ``serve`` command starts it: the one place tests build and start a gateway. The
    server's ``app`` is the ``Gateway``; ``config`` goes to uvicorn."""
    app = create_app(settings, clock=clock or time.time, protocols=protocols)
    # trusted_proxies and [server] (head limit and timeout, idle cap), as `serve` does
    config = {**settings.proxy_header_options,
              **uvicorn_options(settings.server, settings.websocket), **config}
    if tls is not None:
        config = {"ssl_keyfile": str(tls.key), "ssl_certfile": str(tls.cert), **config}
    with serving(app, sock, **config) as server:
        yield server


_DEMO_KEYS: dict[str, tuple[str, str]] = {}


def seed_demo_keys(workdir: Path) -> None:
    """Give a new demo work directory the test session's SP and dev IdP key pairs, which
    ``prepare`` keeps as it keeps an admin's: each pair is a real RSA-3072 key and
    certificate made once per session, instead of two new ones for every stack."""
    if not _DEMO_KEYS:
        _DEMO_KEYS["sp"] = generate_self_signed("sso-gateway demo SP")
        _DEMO_KEYS["idp"] = generate_self_signed("sso-gateway development IdP")
    certs = workdir / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    for which, key_name, cert_name in (("sp", "sp.key", "sp.crt"),
                                       ("idp", IDP_KEY_FILE, IDP_CERT_FILE)):
        key_path, cert_path = certs / key_name, certs / cert_name
        if key_path.exists() or cert_path.exists():
            continue
        key_pem, cert_pem = _DEMO_KEYS[which]
        with os.fdopen(os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
                       "w") as fh:
            fh.write(key_pem)
        cert_path.write_text(cert_pem)


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A self-signed server certificate for 127.0.0.1 and localhost."""
    directory = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    files = TLSFiles(directory / "key.pem", directory / "cert.pem")
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


@dataclass
class EchoUpstream:
    """An upstream that records every request it gets and answers with a page."""

    requests: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> Starlette:
        async def handle(request: Request) -> Response:
            body = await request.body()
            self.requests.append({
                "method": request.method, "path": request.url.path,
                "raw_path": request.scope.get("raw_path", b"").decode("latin-1"),
                "query": request.url.query, "headers": list(request.headers.items()),
                "body": body,
            })
            if request.url.path == "/echo.json":
                return JSONResponse({"headers": dict(request.headers)})
            who = request.headers.get("x-member-name", "")
            return Response(f"<h1>Upstream page {request.url.path}</h1><p>{who}</p>",
                            media_type="text/html")

        return Starlette(routes=[Route("/{path:path}", handle,
                                       methods=["GET", "POST", "PUT", "DELETE", "HEAD"])])

    def header_values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for r in self.requests for k, v in r["headers"] if k.lower() == name]


@dataclass
class Stack:
    demo: DemoStack
    upstream: EchoUpstream
    tls: TLSFiles
    direct_url: str = ""  # where the gateway itself listens (``url`` unless a proxy fronts it)

    @property
    def url(self) -> str:
        return self.demo.gateway_url

    @property
    def db(self) -> Path:
        return Path(self.demo.settings.store.url.removeprefix("sqlite://"))

    def session_count(self) -> int:
        with sqlite3.connect(self.db) as db:
            return int(db.execute("SELECT count(*) FROM sessions").fetchone()[0])


@contextmanager
def run_stack(workdir: Path, tls: TLSFiles, *, idp_host: str = "127.0.0.1",
              extra_config: str = "", gateway_tls: bool = True, reader: bool = False,
              setup: Callable[[DemoStack], None] | None = None,
              public_url: str | None = None) -> Iterator[Stack]:
    """The demo stack with an echo upstream (or, with ``reader``, the sample reader as in
    ``make demo``); ``setup`` may add files before the gateway loads. ``public_url`` is
    the gateway's public address when a proxy in front of it owns that address (the
    stack's ``direct_url`` is then the gateway's own)."""
    gw_sock, idp_sock, up_sock = bound_socket(), bound_socket(), bound_socket()
    scheme = "https" if gateway_tls else "http"
    direct_url = f"{scheme}://127.0.0.1:{port_of(gw_sock)}"
    if "[limits]" not in extra_config:  # tests sign in far more often than people do
        extra_config += "\n[limits]\nlogins = 100000\nregistrations = 100000\nlogouts = 100000\n"
    seed_demo_keys(workdir)
    demo = prepare(workdir, gateway_url=public_url or direct_url,
                   idp_url=f"http://{idp_host}:{port_of(idp_sock)}",
                   reader_url=f"http://127.0.0.1:{port_of(up_sock)}",
                   extra_config=extra_config)
    if setup is not None:
        setup(demo)
        demo = replace(demo, settings=load_settings(workdir / "gateway.toml", environ={}))
    upstream = EchoUpstream()
    upstream_app = upstream.app() if not reader else create_reader(
        gateway_url=demo.gateway_url, data_dir=workdir / "reader",
        jwks_verify=tls.client_context() if gateway_tls else True)
    with (serving(upstream_app, up_sock) as up_server,
          serving(create_idp_app(demo.idp), idp_sock) as idp_server,
          serve_gateway(demo.settings, gw_sock, tls=tls if gateway_tls else None) as gateway):
        try:
            yield Stack(demo, upstream, tls, direct_url)
        finally:
            stop_together(gateway, idp_server, up_server)


@dataclass
class SharedStacks:
    """The stacks one test module shares, stopped when the module is done."""

    exits: ExitStack
    stacks: dict[tuple[tuple[str, str], ...], Stack] = field(default_factory=dict)


@pytest.fixture(scope="module")
def _shared_stacks() -> Iterator[SharedStacks]:
    with ExitStack() as exits:
        yield SharedStacks(exits)


@pytest.fixture
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          tls: TLSFiles, _shared_stacks: SharedStacks) -> Iterator[Stack]:
    """The demo stack (gateway over https, dev IdP, echo upstream or the reader).

    Options come from the ``stack`` marker (on the test or the module's ``pytestmark``),
    with ``run_stack``'s keywords; ``shared=True`` gives every test of the module that
    asks for the same options one stack, for tests that need no fresh store.
    """
    marker = request.node.get_closest_marker("stack")
    options = dict(marker.kwargs) if marker else {}
    shared = options.pop("shared", False)
    name = request.module.__name__ if shared else request.node.name
    label = "stack-" + "".join(c for c in name if c.isalnum())[:40]
    if not shared:
        with run_stack(tmp_path_factory.mktemp(label), tls, **options) as running:
            yield running
        return
    key = tuple(sorted((k, repr(v)) for k, v in options.items()))
    shared_stacks = _shared_stacks.stacks
    if key not in shared_stacks:
        running = run_stack(tmp_path_factory.mktemp(label), tls, **options)
        shared_stacks[key] = _shared_stacks.exits.enter_context(running)
    yield shared_stacks[key]


@pytest.fixture
def forge(stack: Stack) -> Forge:
    """A forging toolkit that signs as the stack's dev IdP and addresses its gateway."""
    return forge_for_demo(stack.demo)


# -- Redis ------------------------------------------------------------------------------

REDIS_SERVER = Path("/usr/bin/redis-server")


class RedisServer:
    """A real ``redis-server`` on a loopback port, in its own directory, persisting nothing."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        if not REDIS_SERVER.exists():
            pytest.fail(f"{REDIS_SERVER} is missing: `make test` installs the Debian package "
                        "redis-server (apt-get install -y redis-server)", pytrace=False)
        self.directory = directory
        if port is None:
            with bound_socket() as sock:
                port = port_of(sock)
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [str(REDIS_SERVER), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.directory),
             "--daemonize", "no", "--logfile", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def command(self, *args: str) -> bytes:
        """One command over a raw socket (RESP); returns the raw reply."""
        payload = f"*{len(args)}\r\n".encode() + b"".join(
            f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn:
            conn.sendall(payload)
            return conn.recv(65536)

    def ping(self) -> bool:
        try:
            return self.command("PING").startswith(b"+PONG")
        except OSError:
            return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session; tests clear it (FLUSHALL) before use."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


# -- SMTP (the registration gate's confirmation mails) ----------------------------------


class Inbox:
    """An aiosmtpd handler that keeps every mail it is given."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.arrived = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append(message)
        self.arrived.set()
        return "250 Message accepted for delivery"

    def link(self) -> str:
        """The confirmation link of the latest mail."""
        assert self.arrived.wait(10), "no mail arrived"
        body = self.messages[-1].get_body(("plain",))
        assert body is not None
        found = re.search(r"https://\S+/_gateway/register/confirm\?token=\S+",
                          body.get_content())
        assert found is not None, body.get_content()
        return found.group(0)


@pytest.fixture
def inbox() -> Iterator[tuple[Inbox, int]]:
    """A real SMTP server on a loopback port (aiosmtpd), and its inbox."""
    handler = Inbox()
    with bound_socket() as sock:  # a free port for the controller (it binds itself)
        port = port_of(sock)
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


# -- Certificates -----------------------------------------------------------------------

_CERTIFICATE_KEY: list[rsa.RSAPrivateKey] = []


def certificate(common_name: str, days: int = 3650) -> str:
    """A new self-signed RSA-3072 certificate (PEM), for an IdP in metadata whose key never
    signs in the test: each call gives a certificate of its own (name, serial, validity),
    all over one key made once per session rather than a new key each time."""
    if not _CERTIFICATE_KEY:
        _CERTIFICATE_KEY.append(rsa.generate_private_key(public_exponent=65537, key_size=3072))
    key = _CERTIFICATE_KEY[0]
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()
