"""The admin console names a session by its session tag — the reference of the logs,
the audit log and ``sso-gateway sessions`` — and revokes one by it, audited with the
tag; its registrations CSV export is audited too."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gateway.audit import validate
from gateway.cli import main
from tests.browser import client, login
from tests.conftest import TLSFiles, run_stack
from tests.test_audit import csrf_of

PAGE = "/issues/2023-03/pages/14"


def test_console_revokes_one_session_by_its_tag(tmp_path: Path, tls: TLSFiles,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    audit_file = tmp_path / "audit.log"
    extra = f'\n[logging]\naudit = "{audit_file}"\n'
    with (run_stack(tmp_path / "stack", tls, extra_config=extra) as stack,
          client(stack) as alice, client(stack) as carol):
        login(alice, stack, PAGE, "alice")
        login(carol, stack, PAGE, "carol")
        assert main(["sessions", "list", "--subject", "M1001",
                     "--config", str(stack.demo.workdir / "gateway.toml")]) == 0
        listed = capsys.readouterr().out
        tag = listed.split()[0]
        assert re.fullmatch(r"[0-9a-f]{12}", tag)
        page = carol.get(stack.url + "/_gateway/admin/sessions", params={"subject": "M1001"})
        assert f"<code>{tag}</code>" in page.text  # the same reference as the CLI's
        assert f'name="end" value="{tag}"' in page.text
        done = carol.post(stack.url + "/_gateway/admin/sessions", headers={"origin": stack.url},
                          data={"csrf": csrf_of(page), "subject": "M1001", "end": tag})
        assert done.status_code == 303 and "ended=1" in done.headers["location"]
        assert alice.get(stack.url + PAGE).status_code in (302, 401)
        csv = carol.get(stack.url + "/_gateway/admin/registrations.csv")
        assert csv.status_code == 200
    lines = [json.loads(t) for t in audit_file.read_text().splitlines()]
    assert [p for line in lines for p in validate(line)] == []
    revoked = [line for line in lines if line["event"] == "session_revoked"]
    assert revoked == [{**revoked[0], "by": "M1003", "subject": "M1001", "scope": "one",
                        "sessions_ended": 1, "session": tag}]
    logins = [line for line in lines if line["event"] == "login_success"
              and line["subject"] == "M1001"]
    assert logins[0]["session"] == tag  # the audit log's reference is the same tag
    exported = [line for line in lines if line["event"] == "registrations_exported"]
    assert exported and exported[0]["by"] == "M1003"
