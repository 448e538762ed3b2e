"""Live reload over real processes and sockets: ``sso-gateway serve --workers 2`` in a
subprocess, a steady stream of requests from concurrent clients, and ``sso-gateway
reload`` (or SIGHUP) while they run.

* A reload that makes a member-only page public and adds an IdP (a new metadata file)
  takes effect in both workers with zero failed requests; ``/readyz`` shows the new
  fingerprint, the audit log has one ``config_reload`` line per worker, ``/metrics``
  counts them.
* A broken configuration is refused by ``reload`` (exit 2, reasons printed) and, sent
  by SIGHUP, by every worker (reasons logged and audited); a change that needs a
  restart is refused too; the old rules keep applying.
* Twenty reloads in one process leave open files, threads and tasks where they were.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import load_settings
from gateway.demo.stack import prepare
from gateway.keys import generate_identity_key, pem_body, write_keypair
from gateway.reload import LiveGateway
from tests.conftest import (
    EchoUpstream,
    bound_socket,
    port_of,
    seed_demo_keys,
    serving,
    wait_until_healthy,
)

NEW_IDP = "http://127.0.0.1:19/metadata"  # the dev IdP's metadata with another address
MEMBER_PAGE = "/news/today"  # no rule matches: the default (member) applies


@dataclass
class Served:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    workdir: Path
    verify: Any = True

    @property
    def config(self) -> Path:
        return self.workdir / "gateway.toml"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def audit_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.workdir / "audit.log").read_text()
                .splitlines()]

    def reload(self, *extra: str) -> subprocess.CompletedProcess[str]:
        """``sso-gateway reload`` for this gateway, as an admin runs it."""
        return subprocess.run(
            [sys.executable, "-m", "gateway.cli", "reload", "--config", str(self.config),
             *extra], capture_output=True, text=True, timeout=60, check=False,
            env=_env(self.workdir))

    def readyz(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(self.url + "/readyz", verify=self.verify,
                                         timeout=5).json()
        return body


def _env(workdir: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(workdir / "tmp")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop("GATEWAY_CONFIG", None)
    return env


@contextmanager
def serve_process(workdir: Path, upstream: str, *, extra: str = "", workers: int = 2,
                  scheme: str = "http", verify: Any = True) -> Iterator[Served]:
    """``sso-gateway serve`` on the demo configuration (plus ``extra``), with a pid file
    and an audit log file, in a subprocess; killed afterwards."""
    with bound_socket() as sock:
        port = port_of(sock)
    url = f"{scheme}://127.0.0.1:{port}"
    seed_demo_keys(workdir)
    prepare(workdir, gateway_url=url, idp_url="http://127.0.0.1:9", reader_url=upstream,
            extra_config='\n[logging]\naudit = "audit.log"\n' + extra)
    text = (workdir / "gateway.toml").read_text()
    if "[server]" in extra:
        text = text.replace("[server]\n", '[server]\npid_file = "gateway.pid"\n', 1)
    else:
        text += '\n[server]\npid_file = "gateway.pid"\n'
    (workdir / "gateway.toml").write_text(text)
    (workdir / "tmp").mkdir()
    log = workdir / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config",
             str(workdir / "gateway.toml"), "--workers", str(workers)],
            cwd=workdir, env=_env(workdir), stdout=out, stderr=subprocess.STDOUT)
    served = Served(url, process, log, workdir, verify)
    try:
        _wait_healthy(served)
        deadline = time.monotonic() + 60  # every worker, not just the first, serves
        while served.log_text().count("Application startup complete") < workers:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"not every worker started:\n{served.log_text()}")
            time.sleep(0.1)
        yield served
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _wait_healthy(served: Served) -> None:
    if served.verify is True:
        wait_until_healthy(served.url, served.process, served.log)
        return
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(served.url + "/healthz", verify=served.verify, timeout=2).status_code \
                    == 200:
                return
        except httpx.TransportError:
            pass
        if served.process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the gateway process did not start:\n{served.log_text()}")
        time.sleep(0.1)


@dataclass
class Load:
    """Concurrent clients sending requests until stopped; every answer is checked."""

    url: str
    paths: dict[str, set[int]]  # path -> the statuses that are right for it
    clients: int = 4
    verify: Any = True
    answered: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for n in range(self.clients):
            thread = threading.Thread(target=self._run, args=(n,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=20)

    def _run(self, n: int) -> None:
        # Half the clients keep their connection (a swap happens between its requests),
        # half open a new one for each request (spread over both workers).
        keep = n % 2 == 0
        client = httpx.Client(verify=self.verify, timeout=10)
        try:
            while not self._stop.is_set():
                for path, good in self.paths.items():
                    try:
                        if keep:
                            status = client.get(self.url + path).status_code
                        else:
                            status = httpx.get(self.url + path, verify=self.verify,
                                               timeout=10).status_code
                    except httpx.HTTPError as exc:
                        self.failures.append(f"{path}: {type(exc).__name__} {exc}")
                        continue
                    self.answered += 1
                    if status not in good:
                        self.failures.append(f"{path}: {status}")
        finally:
            client.close()


def _add_idp(workdir: Path) -> None:
    metadata = workdir / "idp_metadata"
    text = (metadata / "devidp.xml").read_text()
    second = text.replace("http://127.0.0.1:9", "http://127.0.0.1:19")
    (metadata / "second.xml").write_text(second)


def _gated(status: int) -> bool:
    return status in (302, 303, 401)


@pytest.fixture
def upstream() -> Iterator[str]:
    echo = EchoUpstream()
    with serving(echo.app(), bound_socket()) as server:
        yield server.url


def test_reload_under_load_makes_a_page_public_and_adds_an_idp(tmp_path: Path,
                                                               upstream: str) -> None:
    with serve_process(tmp_path, upstream) as served:
        assert _gated(httpx.get(served.url + MEMBER_PAGE, timeout=5).status_code)
        assert httpx.get(served.url + "/saml/login", params={"idp": NEW_IDP},
                         timeout=5).status_code == 400
        before = served.readyz()["config"]["sha256"]
        paths = {"/public/ping": {200}, "/healthz": {200}, "/readyz": {200},
                 MEMBER_PAGE: {200, 302, 303, 401}}
        with Load(served.url, paths) as load:
            time.sleep(1.0)
            with served.config.open("a") as fh:
                fh.write('\n[[rules]]\npath = "/news/**"\naccess = "public"\n')
            _add_idp(tmp_path)
            done = served.reload()
            time.sleep(1.0)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "reloaded: config_sha256" in done.stdout
        assert load.failures == [], load.failures[:10]
        assert load.answered > 100
        # Every new connection (both workers) serves the new rule and the new IdP.
        for _ in range(10):
            page = httpx.get(served.url + MEMBER_PAGE, timeout=5)
            assert page.status_code == 200 and "Upstream page /news/today" in page.text
            start = httpx.get(served.url + "/saml/login", params={"idp": NEW_IDP}, timeout=5)
            assert start.status_code in (302, 303)
            assert start.headers["location"].startswith("http://127.0.0.1:19/")
            config = served.readyz()["config"]
            assert config["sha256"] != before
            assert config["last_reload"]["result"] == "ok"
            assert config["last_reload"]["sha256"] == config["sha256"]
        reloads = [line for line in served.audit_lines()
                   if line["event"] == "config_reload" and line["trigger"] == "reload"]
        assert len(reloads) == 2  # one per worker
        assert {line["result"] for line in reloads} == {"ok"}
        assert {line["config_sha256"] for line in reloads} == {config["sha256"]}
        metrics = httpx.get(served.url + "/metrics", timeout=5).text
        assert 'gateway_config_reloads_total{result="ok"} 2.0' in metrics
        assert f'gateway_config_info{{sha256="{config["sha256"]}"}} 1.0' in metrics


def test_a_broken_config_is_refused_and_the_old_rules_still_apply(tmp_path: Path,
                                                                  upstream: str) -> None:
    with serve_process(tmp_path, upstream) as served:
        good = served.config.read_text()
        before = served.readyz()["config"]["sha256"]
        paths = {"/public/ping": {200}, MEMBER_PAGE: {302, 303, 401}}
        with Load(served.url, paths, clients=2) as load:
            # Broken: `reload` refuses it before signalling anyone.
            served.config.write_text(good + '\n[[rules]]\npath = "/news/**"\naccess = "open"\n')
            refused = served.reload()
            assert refused.returncode == 2
            assert "rules[" in refused.stderr and "access ('open')" in refused.stderr
            assert "not reloaded" in refused.stderr
            # The same file, sent by SIGHUP: each worker refuses it, logs and audits why.
            os.kill(int((tmp_path / "gateway.pid").read_text()), signal.SIGHUP)
            deadline = time.monotonic() + 10
            while served.log_text().count("reload of") < 2:
                assert time.monotonic() < deadline, served.log_text()
                time.sleep(0.1)
            # A change the running server cannot take live: refused by the workers, and
            # `reload` (which waits for /readyz) says so with exit 1.
            served.config.write_text(good.replace("[server]\n", "[server]\nheader_limit = "
                                                  "70000\n"))
            restart = served.reload()
            assert restart.returncode == 1, restart.stdout + restart.stderr
            assert "[server] header_limit changed: needs a restart" in restart.stderr
        assert load.failures == [], load.failures[:10]
        assert "access ('open')" in served.log_text()
        assert "refused, the previous configuration keeps serving" in served.log_text()
        for _ in range(10):  # the old rules, in every worker
            assert _gated(httpx.get(served.url + MEMBER_PAGE, timeout=5).status_code)
            config = served.readyz()["config"]
            assert config["sha256"] == before
            assert config["last_reload"]["result"] == "refused"
        lines = [line for line in served.audit_lines() if line["event"] == "config_reload"
                 and line["trigger"] == "reload"]
        assert {line["result"] for line in lines} == {"refused"}
        assert any("access ('open')" in line["reason"] for line in lines)
        metrics = httpx.get(served.url + "/metrics", timeout=5).text
        assert 'gateway_config_reloads_total{result="refused"} 4.0' in metrics


async def _lifespan(app: LiveGateway) -> tuple[asyncio.Task[None], asyncio.Queue[Any]]:
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    outbox: asyncio.Queue[Any] = asyncio.Queue()
    task = asyncio.get_running_loop().create_task(
        app({"type": "lifespan"}, inbox.get, outbox.put))  # type: ignore[arg-type]
    await inbox.put({"type": "lifespan.startup"})
    assert (await outbox.get())["type"] == "lifespan.startup.complete"
    return task, inbox


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_twenty_reloads_leak_no_files_threads_or_tasks(tmp_path: Path, upstream: str) -> None:
    """Each reload starts a gateway (store connections and their threads, the upstream
    pool, the purge timer) and closes the previous one: nothing piles up."""
    seed_demo_keys(tmp_path)
    prepare(tmp_path, gateway_url="http://127.0.0.1:9", idp_url="http://127.0.0.1:9",
            reader_url=upstream)
    app = LiveGateway(load_settings(tmp_path / "gateway.toml", environ={}))

    async def main() -> list[tuple[int, int, int]]:
        task, inbox = await _lifespan(app)
        transport = httpx.ASGITransport(app=app)
        counts = []
        async with httpx.AsyncClient(transport=transport,
                                     base_url="http://127.0.0.1:9") as client:
            for n in range(20):
                answer = await client.get("/public/ping")  # through the upstream pool
                assert answer.status_code == 200
                outcome = await app.reload()
                assert outcome.result == "ok", outcome.problems
                for _ in range(200):  # the previous gateway closes once it is idle
                    await asyncio.sleep(0.01)
                    if not app._retiring:
                        break
                if n in (2, 19):  # not the default executor's threads: a bounded pool
                    threads = [t for t in threading.enumerate()
                               if not t.name.startswith("asyncio_")]
                    counts.append((_open_files(), len(threads), len(asyncio.all_tasks())))
        await inbox.put({"type": "lifespan.shutdown"})
        await task
        return counts

    after_three, after_twenty = asyncio.run(main())
    assert after_twenty[0] <= after_three[0] + 2, (after_three, after_twenty)
    assert after_twenty[1] <= after_three[1], (after_three, after_twenty)
    assert after_twenty[2] == after_three[2], (after_three, after_twenty)


def test_reload_takes_an_sp_key_rollover_and_a_new_identity_key(tmp_path: Path) -> None:
    """The rollover steps of docs/operations.md, each followed by a reload: the next SP
    key is published beside the current one, then promoted; a new identity-token key
    signs and is in the JWKS."""
    seed_demo_keys(tmp_path)
    prepare(tmp_path, gateway_url="http://127.0.0.1:9", idp_url="http://127.0.0.1:9",
            reader_url="http://127.0.0.1:9")
    toml = tmp_path / "gateway.toml"
    app = LiveGateway(load_settings(toml, environ={}))
    certs = tmp_path / "certs"

    def published(metadata: str) -> set[str]:
        return {pem_body(c) for c in re.findall(r"<ds:X509Certificate>([^<]+)<", metadata)}

    async def main() -> None:
        task, inbox = await _lifespan(app)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://127.0.0.1:9") as client:
            current = pem_body((certs / "sp.crt").read_text())
            assert published((await client.get("/saml/metadata")).text) == {current}
            kids = {k["kid"] for k in (await client.get("/.well-known/jwks.json")).json()["keys"]}
            # 1. the next pair: published for signing and encryption beside the current
            write_keypair(certs / "sp-next.key", certs / "sp-next.crt", "next SP")
            nxt = pem_body((certs / "sp-next.crt").read_text())
            toml.write_text(toml.read_text().replace(
                "[session]", '[sp]\nnext_key_file = "certs/sp-next.key"\n'
                'next_cert_file = "certs/sp-next.crt"\n\n[session]', 1))
            new_kid = generate_identity_key(certs / "identity").kid
            assert (await app.reload()).result == "ok"
            assert published((await client.get("/saml/metadata")).text) == {current, nxt}
            jwks = (await client.get("/.well-known/jwks.json")).json()["keys"]
            assert {k["kid"] for k in jwks} == kids | {new_kid}
            assert app.gateway.upstream_identity.jwks["keys"][0]["kid"] == new_kid
            # 2. promoted: the next pair becomes the current one, next_* removed
            (certs / "sp-next.key").replace(certs / "sp.key")
            (certs / "sp-next.crt").replace(certs / "sp.crt")
            toml.write_text(toml.read_text().replace(
                '[sp]\nnext_key_file = "certs/sp-next.key"\n'
                'next_cert_file = "certs/sp-next.crt"\n', ""))
            assert (await app.reload()).result == "ok"
            assert published((await client.get("/saml/metadata")).text) == {nxt}
        await inbox.put({"type": "lifespan.shutdown"})
        await task

    asyncio.run(main())


def _workers(pid: int) -> list[int]:
    """The worker processes of the ``serve`` process ``pid`` (not multiprocessing's
    resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children
            if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]


def test_a_worker_that_cannot_start_leaves_the_others_serving(tmp_path: Path,
                                                              upstream: str) -> None:
    """A worker that died is replaced; while the files do not load (an admin mid-edit)
    the replacement cannot start, and the other worker keeps serving instead of the
    whole gateway stopping. The next reload starts the missing worker."""
    with serve_process(tmp_path, upstream) as served:
        good = served.config.read_text()
        workers = _workers(served.process.pid)
        assert len(workers) == 2
        served.config.write_text(good + '\n[[rules]]\npath = "/x"\naccess = "open"\n')
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while "a worker could not start" not in served.log_text():
            assert time.monotonic() < deadline and served.process.poll() is None, \
                served.log_text()
            time.sleep(0.2)
        assert "cannot start: " in served.log_text() and "access ('open')" in served.log_text()
        assert _workers(served.process.pid) == workers[1:]
        for _ in range(10):
            assert httpx.get(served.url + "/public/ping", timeout=5).status_code == 200
        served.config.write_text(good)
        done = served.reload()
        assert done.returncode == 0, done.stdout + done.stderr
        deadline = time.monotonic() + 60
        while len(_workers(served.process.pid)) < 2:
            assert time.monotonic() < deadline, served.log_text()
            time.sleep(0.2)
        wait_until_healthy(served.url, served.process, served.log)
