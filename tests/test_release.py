"""Release hygiene: one version everywhere, a 0.1.0 store upgraded at startup with no
session lost, and a wheel that installs complete.

``test_the_wheel_installs_complete_in_a_fresh_venv`` (marker ``wheel``) builds the sdist
and the wheel with ``python -m build``, checks them with ``twine check``, installs the
wheel (not editable) into a new venv — pip fetches the dependencies from the configured
index, reusing pip's cache — and runs the installed ``sso-gateway``: ``--version``,
``check`` on the example config, and ``demo`` through a whole sign-in. It takes a minute
or two; ``pytest -m "not wheel"`` leaves it out.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urljoin

import httpx
import pytest
from itsdangerous import Signer

from gateway.cli import main
from gateway.demo.stack import MEMBER, DemoStack
from gateway.devidp.users import persistent_name_id
from gateway.version import VERSION
from tests.browser import client, login
from tests.conftest import Stack, TLSFiles, run_stack, wait_until_healthy
from tests.test_metrics import scrape, value
from tests.test_selftest import three_free_ports

ROOT = Path(__file__).resolve().parent.parent
PAGE = "/issues/2023-03/pages/14"


# -- one version ---------------------------------------------------------------------------

def test_the_version_is_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    import gateway

    assert VERSION == gateway.__version__ == version("sso-gateway")
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"sso-gateway {VERSION}\n"


@pytest.mark.stack(shared=True)
def test_readyz_and_metrics_carry_the_version(stack: Stack) -> None:
    with client(stack) as http:
        ready = http.get(stack.url + "/readyz").json()
        assert (ready["status"], ready["version"]) == ("ok", VERSION)
        assert set(ready) == {"status", "version", "config"}  # config: to local clients
        assert value(scrape(http, stack), "gateway_build_info", version=VERSION) == 1


# -- a 0.1.0 store -------------------------------------------------------------------------

# The store schema of 0.1.0 (gateway/sessions/sqlite.py at 937ae05), verbatim.
SCHEMA_0_1_0 = """
CREATE TABLE IF NOT EXISTS sessions (
    key TEXT PRIMARY KEY,
    member_id TEXT NOT NULL,
    idp TEXT NOT NULL,
    name_id TEXT NOT NULL,
    principal TEXT NOT NULL,
    created REAL NOT NULL,
    last_seen REAL NOT NULL,
    expires REAL NOT NULL,
    user_agent TEXT NOT NULL DEFAULT '',
    client_ip TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS sessions_member ON sessions (member_id);
CREATE INDEX IF NOT EXISTS sessions_name_id ON sessions (idp, name_id);
CREATE TABLE IF NOT EXISTS registrations (
    email TEXT NOT NULL,
    registered_at REAL NOT NULL,
    consent TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS once (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    expires REAL NOT NULL
);
"""


def cookie_0_1_0(secret: str, session_id: str) -> str:
    """A session cookie value as 0.1.0 signed it (gateway/sessions/cookies.py at 937ae05)."""
    signer = Signer([secret], salt="sso-gateway.session", digest_method=hashlib.sha256)
    return signer.sign(session_id).decode("ascii")


def principal_0_1_0(**fields: object) -> dict[str, object]:
    """A principal as 0.1.0 stored it (``Principal.to_dict`` at 937ae05)."""
    return {"member_id": "", "idp": "", "name_id": "", "email": "", "display_name": "",
            "entitlements": [], "status": "", "name_id_format": "", "session_index": "",
            "authn_instant": time.time() - 120, "session_not_on_or_after": None,
            "kind": "member", **fields}


def write_store_0_1_0(demo: DemoStack) -> dict[str, str]:
    """A 0.1.0 store file with a member's and a registered visitor's session, as 0.1.0
    wrote them; returns their cookie values."""
    path = Path(demo.settings.store.url.removeprefix("sqlite://"))
    secret = demo.settings.session_secrets()[0]
    idp = demo.idp.entity_id
    people = {
        "alice": principal_0_1_0(
            member_id="M1001", idp=idp, name_id=persistent_name_id(idp, "alice"),
            email="alice@members.example.org", display_name="Alice Archer",
            entitlements=[MEMBER], status="active",
            name_id_format="urn:oasis:names:tc:SAML:2.0:nameid-format:persistent",
            session_index="_si-0.1.0", session_not_on_or_after=time.time() + 7200),
        "visitor": principal_0_1_0(member_id="reader-7f3a", email="v@example.org",
                                   status="registered", kind="registered"),
    }
    cookies = {}
    now = time.time()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA_0_1_0)
        for who, principal in people.items():
            session_id = secrets.token_urlsafe(32)
            db.execute("INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (hashlib.sha256(session_id.encode()).hexdigest(),
                        principal["member_id"], principal["idp"], principal["name_id"],
                        json.dumps(principal), now - 300, now - 30, now + 3600,
                        "Mozilla/5.0 (0.1.0)", "127.0.0.1"))
            cookies[who] = cookie_0_1_0(secret, session_id)
        db.execute("INSERT INTO registrations VALUES (?, ?, ?)",
                   ("v@example.org", now - 300, "free-issue"))
    db.close()
    return cookies


def test_a_0_1_0_store_is_upgraded_at_startup_with_no_session_lost(
        tmp_path: Path, tls: TLSFiles) -> None:
    cookies: dict[str, str] = {}

    def place_store(demo: DemoStack) -> None:
        cookies.update(write_store_0_1_0(demo))

    with run_stack(tmp_path, tls, setup=place_store) as stack, client(stack) as http:
        name = "__Host-" + stack.demo.settings.session.cookie_name
        assert stack.session_count() == 2
        member = http.get(stack.url + PAGE, headers={"Cookie": f"{name}={cookies['alice']}"})
        assert member.status_code == 200, member.text
        seen = dict(stack.upstream.requests[-1]["headers"])
        assert (seen["x-member-id"], seen["x-member-name"], seen["x-member-status"]) == (
            "M1001", "Alice Archer", "active")
        assert seen["x-member-idp"] == stack.demo.idp.entity_id
        assert MEMBER in seen["x-member-entitlements"]
        # The owner rule knows her by her member number (the dev IdP's are the
        # organisation's own): her notes, and nobody else's.
        own = http.get(stack.url + "/members/M1001/notes/",
                       headers={"Cookie": f"{name}={cookies['alice']}"})
        assert own.status_code == 200
        other = http.get(stack.url + "/members/M1002/notes/",
                         headers={"Cookie": f"{name}={cookies['alice']}"})
        assert other.status_code == 403
        visitor = http.get(stack.url + "/issues/free-2024/pages/1",
                           headers={"Cookie": f"{name}={cookies['visitor']}"})
        assert visitor.status_code == 200, visitor.text
        assert http.get(stack.url + PAGE, headers={"Cookie": f"{name}={cookies['visitor']}"},
                        ).status_code == 302  # a registered visitor must sign in as a member
        assert stack.session_count() == 2
        with sqlite3.connect(stack.db) as db:
            columns = {row[1] for row in db.execute("PRAGMA table_info(sessions)")}
            registrations = db.execute("SELECT count(*) FROM registrations").fetchone()[0]
        db.close()
        assert "subject" in columns and registrations == 1


# -- the wheel -----------------------------------------------------------------------------

def run(*args: str | Path, cwd: Path, timeout: float = 600) -> str:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GATEWAY_", "PYTHONPATH", "VIRTUAL_ENV"))}
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@contextmanager
def demo_running(sso_gateway: Path, workdir: Path) -> Iterator[str]:
    port = three_free_ports()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "PYTHONPATH"))}
    log_path = workdir.parent / "demo.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([str(sso_gateway), "demo", "--dir", str(workdir),
                                    "--port", str(port)], cwd=workdir.parent, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, log_path)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.wheel
def test_the_wheel_installs_complete_in_a_fresh_venv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    # sdist first, then the wheel built from the sdist: both must be complete.
    run(sys.executable, "-m", "build", "--outdir", dist, ROOT, cwd=tmp_path)
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    assert [w.name for w in wheels] == [f"sso_gateway-{VERSION}-py3-none-any.whl"]
    assert [s.name for s in sdists] == [f"sso_gateway-{VERSION}.tar.gz"]
    assert "PASSED" in run(sys.executable, "-m", "twine", "check", "--strict", *wheels,
                           *sdists, cwd=tmp_path)

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    run(venv / "bin" / "python", "-m", "pip", "install", "--quiet",
        "--disable-pip-version-check", wheels[0], cwd=tmp_path)
    sso_gateway = venv / "bin" / "sso-gateway"
    where = run(venv / "bin" / "python", "-c", "import gateway; print(gateway.__file__)",
                cwd=tmp_path)
    assert where.startswith(str(venv)), where  # the installed copy, not this source tree
    assert run(sso_gateway, "--version", cwd=tmp_path) == f"sso-gateway {VERSION}\n"

    # `sso-gateway demo`: SP metadata, the sign-in pages (the gateway's and the dev
    # IdP's: templates and static files from the wheel), a whole sign-in, a reader page.
    demo = tmp_path / "demo"
    with demo_running(sso_gateway, demo) as url, httpx.Client(timeout=20) as http:
        metadata = http.get(url + "/saml/metadata")
        assert metadata.status_code == 200 and "EntityDescriptor" in metadata.text
        idp_entity = next((demo / "idp_metadata").glob("*.xml")).read_text()
        shim = SimpleNamespace(url=url, demo=SimpleNamespace(idp=SimpleNamespace(
            entity_id=_entity_id(idp_entity))))
        first = http.get(url + PAGE)
        assert first.status_code == 302
        sign_in = http.get(urljoin(url, first.headers["location"]))
        assert sign_in.status_code == 200 and "/saml/login?idp=" in sign_in.text
        assert "/_gateway/static/gateway.css" in sign_in.text
        css = http.get(url + "/_gateway/static/gateway.css")
        assert css.status_code == 200 and css.text.strip()
        login(http, shim, PAGE, "alice")  # type: ignore[arg-type]
        page = http.get(url + PAGE)
        assert page.status_code == 200, page.text
        assert "Alice Archer" in page.text

    # `sso-gateway check` on the example config, as README's "Running it for real" says.
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    run(sso_gateway, "certs", "generate", cwd=deploy)
    shutil.copy(ROOT / "gateway.example.toml", deploy / "gateway.toml")
    (deploy / "idp_metadata").mkdir()
    shutil.copy(next((demo / "idp_metadata").glob("*.xml")), deploy / "idp_metadata")
    checked = run(sso_gateway, "check", "--config", "gateway.toml", cwd=deploy)
    assert checked.startswith("OK: gateway.toml"), checked
    assert _entity_id(idp_entity) in checked


def _entity_id(metadata: str) -> str:
    start = metadata.index('entityID="') + len('entityID="')
    return metadata[start:metadata.index('"', start)]
