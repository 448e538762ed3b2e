"""Session lifecycle over real sockets: your-sessions page, secret rotation, restarts."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from tests.browser import client, login
from tests.conftest import Stack, TLSFiles, run_stack

PAGE = "/issues/2023-03/pages/14"


def reads(http: object, stack: Stack) -> bool:
    answer = http.get(stack.url + PAGE)  # type: ignore[attr-defined]
    return bool(answer.status_code == 200)


def test_member_ends_one_session_then_all(stack: Stack) -> None:
    with client(stack) as laptop, client(stack) as phone, client(stack) as other_member:
        login(laptop, stack, PAGE, "alice")
        login(phone, stack, PAGE, "alice")
        login(other_member, stack, PAGE, "dave")  # another member's session stays apart
        page = laptop.get(stack.url + "/_gateway/sessions")
        assert page.status_code == 200
        handles = re.findall(r'name="end" value="([0-9a-f]{16})"', page.text)
        assert len(handles) == 2 and page.text.count("(this browser)") == 1
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        # The handle in the row not marked "this browser" is the phone's.
        rows = page.text.split("<tr>")[2:]
        other = next(re.search(r'value="([0-9a-f]{16})"', r).group(1)  # type: ignore[union-attr]
                     for r in rows if "(this browser)" not in r)
        origin = {"origin": stack.url}
        ended = laptop.post(stack.url + "/_gateway/sessions",
                            data={"csrf": csrf.group(1), "end": other}, headers=origin)
        assert ended.status_code == 303
        assert reads(laptop, stack) and not reads(phone, stack)
        assert stack.session_count() == 2  # the laptop's and dave's

        login(phone, stack, PAGE, "alice")
        everywhere = laptop.post(stack.url + "/_gateway/sessions",
                                 data={"csrf": csrf.group(1), "end": "all"}, headers=origin)
        assert everywhere.status_code == 303
        assert not reads(laptop, stack) and not reads(phone, stack)
        assert stack.session_count() == 1  # dave's


def test_secret_rotation(tmp_path: Path, tls: TLSFiles) -> None:
    with run_stack(tmp_path, tls) as stack, client(stack) as http:
        login(http, stack, PAGE, "alice")
        cookie = http.cookies["__Host-gw_session"]
    secrets_file = tmp_path / "session-secrets"
    old = secrets_file.read_text().strip()
    new = secrets.token_urlsafe(48)
    secrets_file.write_text(f"{new}\n{old}\n")  # newest first: signs; the old one verifies
    with run_stack(tmp_path, tls) as stack, client(stack) as http:
        http.cookies.set("__Host-gw_session", cookie)
        assert reads(http, stack)  # signed with the previous secret: still valid
    secrets_file.write_text(f"{new}\n")  # the old secret dropped
    with run_stack(tmp_path, tls) as stack, client(stack) as http:
        http.cookies.set("__Host-gw_session", cookie)
        assert not reads(http, stack)


def test_sessions_survive_a_restart(tmp_path: Path, tls: TLSFiles) -> None:
    with run_stack(tmp_path, tls) as stack, client(stack) as http:
        login(http, stack, PAGE, "alice")
        cookie = http.cookies["__Host-gw_session"]
    with run_stack(tmp_path, tls) as stack, client(stack) as http:
        http.cookies.set("__Host-gw_session", cookie)
        assert reads(http, stack)
