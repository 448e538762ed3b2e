"""Day-two admin ergonomics: ``serve --host/--port``, the one session reference (the
12-hex session tag of the logs, audit log and console) in ``sessions list``/``revoke``,
CLI actions audited like the console's, ``--help`` for admins, and the repository
hygiene an admin meets first (.gitignore, README's metadata URL)."""

from __future__ import annotations

import asyncio
import getpass
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import cli_admin
from gateway.audit import log as audit_log
from gateway.audit import validate
from gateway.cli import main
from gateway.config import load_settings
from gateway.logs import session_hash
from gateway.principal import Principal
from gateway.sessions import open_store
from gateway.sessions.store import Registration
from tests.test_cli import example_site

ROOT = Path(__file__).resolve().parent.parent
IDP = "https://idp.example.org/metadata"


@pytest.fixture(autouse=True)
def _audit_handlers_restored() -> Iterator[None]:
    """The CLI points the audit log at its configured place: undone after each test."""
    before = list(audit_log.handlers)
    yield
    for handler in list(audit_log.handlers):
        audit_log.removeHandler(handler)
        if handler not in before:
            handler.close()
    for handler in before:
        audit_log.addHandler(handler)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The example config with keys, its audit log in a file."""
    example_site(tmp_path)
    monkeypatch.setenv("GATEWAY_LOGGING__AUDIT", str(tmp_path / "audit.log"))
    return tmp_path


def audit_lines(site: Path) -> list[dict[str, Any]]:
    path = site / "audit.log"
    lines = [json.loads(t) for t in path.read_text().splitlines()] if path.exists() else []
    assert [p for line in lines for p in validate(line)] == []
    return lines


def seed(site: Path, *, registrations: int = 0) -> list[str]:
    """Two live sessions (Alice's, Dave's) and ``registrations`` registrations; the
    store keys of the sessions."""
    settings = load_settings(str(site / "gateway.toml"))
    stores = open_store(settings.store.url, cli_admin._now, **settings.store.options())
    manager = cli_admin._manager(settings, stores)

    async def go() -> list[str]:
        await stores.backend.open()
        try:
            keys = []
            for number, name, ip in (("1001", "Alice Archer", "192.0.2.10"),
                                     ("1004", "Dave Doe", "2001:db8::4")):
                principal = Principal(subject=f"{IDP}!{number}", idp=IDP,
                                      attributes={"member_id": (number,),
                                                  "display_name": (name,)})
                record, _ = await manager.create(principal, client_ip=ip)
                keys.append(record.key)
            for n in range(registrations):
                await stores.records.add_registration(
                    Registration(f"reader{n}@example.org", 1.7e9, "free issue"))
            return keys
        finally:
            await stores.backend.close()

    return asyncio.run(go())


def test_serve_host_and_port_override_listen(site: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.logs
    import gateway.server

    seen: dict[str, Any] = {}
    monkeypatch.setattr(gateway.server, "run", lambda app, **kw: seen.update(kw))
    # What serve changes for the whole process, kept to this test.
    monkeypatch.setattr(gateway.logs, "configure_logging", lambda *a, **kw: None)
    config = str(site / "gateway.toml")
    monkeypatch.setenv("GATEWAY_CONFIG", config)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert main(["serve", "--config", config, "--host", "0.0.0.0", "--port", "8443"]) == 0
    assert (seen["host"], seen["port"]) == ("0.0.0.0", 8443)
    assert main(["serve", "--config", config, "--port", "9001"]) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 9001)  # host from listen
    assert main(["serve", "--config", config]) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8000)  # listen as configured
    assert main(["serve", "--config", config, "--port", "70000"]) == 2


def test_help_is_for_admins_and_names_host_and_port() -> None:
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "--help"],
                          capture_output=True, text=True, check=True)
    assert "cli*.py" not in done.stdout and "only ones that print" not in done.stdout
    assert "Exit codes" in done.stdout
    serve = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--help"],
                           capture_output=True, text=True, check=True)
    assert "--host" in serve.stdout and "--port" in serve.stdout


def test_sessions_list_shows_the_session_tag_idp_name_address_and_times(
        site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    alice, dave = seed(site)
    assert main(["sessions", "list", "--config", str(site / "gateway.toml")]) == 0
    out = capsys.readouterr().out
    rows = out.splitlines()
    assert rows[-1] == "2 session(s)"
    row = rows[0]
    assert row.startswith(session_hash(alice) + "  ")  # the logs' and console's tag
    assert alice[:16] not in out  # no second reference form
    for part in (f"{IDP}!1001", f"idp {IDP}", "name Alice Archer", "address 192.0.2.10"):
        assert part in row
    assert re.search(r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d  last seen \d{4}-", row)
    assert "address 2001:db8::4" in rows[1] and session_hash(dave) in rows[1]


def test_revoke_by_session_tag_is_audited_with_the_os_user(
        site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    alice, dave = seed(site)
    config = str(site / "gateway.toml")
    assert main(["sessions", "revoke", session_hash(alice), "--config", config]) == 0
    assert "revoked 1 session(s)" in capsys.readouterr().out
    assert main(["sessions", "revoke", session_hash(alice), "--config", config]) == 1
    assert main(["sessions", "revoke", "--subject", f"{IDP}!1004", "--config", config]) == 0
    assert main(["sessions", "list", "--config", config]) == 0
    assert capsys.readouterr().out.endswith("0 session(s)\n")
    revoked = [line for line in audit_lines(site) if line["event"] == "session_revoked"]
    by = f"cli:{getpass.getuser()}"
    assert revoked == [
        {**revoked[0], "by": by, "subject": f"{IDP}!1001", "sessions_ended": 1,
         "scope": "one", "session": session_hash(alice)},
        {**revoked[1], "by": by, "subject": f"{IDP}!1004", "sessions_ended": 1,
         "scope": "all"}]
    assert dave not in (site / "audit.log").read_text()  # tags only, never store keys


def test_revoke_all_is_audited_per_session(site: Path) -> None:
    keys = seed(site)
    assert main(["sessions", "revoke", "--all", "--config", str(site / "gateway.toml")]) == 0
    revoked = [line for line in audit_lines(site) if line["event"] == "session_revoked"]
    assert sorted(str(line["session"]) for line in revoked) == sorted(map(session_hash, keys))
    assert {line["scope"] for line in revoked} == {"everyone"}


def test_registrations_export_is_audited_and_stdout_stays_csv(
        site: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    seed(site, registrations=3)
    monkeypatch.setenv("GATEWAY_LOGGING__AUDIT", "stdout")  # the default: then stderr
    assert main(["registrations", "export", "--config", str(site / "gateway.toml")]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "email,registered_at,consent,subject,verified_at"
    assert len(out.splitlines()) == 4
    line = json.loads(err.strip().splitlines()[-1])
    assert validate(line) == []
    assert line == {**line, "event": "registrations_exported",
                    "by": f"cli:{getpass.getuser()}", "count": 3}
    assert "reader0@example.org" not in err


def test_gitignore_covers_build_and_runtime_files() -> None:
    ignored = set((ROOT / ".gitignore").read_text().split())
    assert {"build/", "dist/", "*.egg-info", "audit.log", ".demo/", ".cache/",
            "metadata_cache/", "gateway.db*"} <= ignored


def test_readme_writes_the_metadata_url_from_public_url() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "https://<public_url>" not in readme
    assert "<public_url>/saml/metadata" in readme
