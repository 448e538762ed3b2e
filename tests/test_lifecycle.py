"""Session lifecycle over real sockets: your-sessions page, secret rotation, restarts."""

from __future__ import annotations

import re
import secrets
import sqlite3
from pathlib import Path
from urllib.parse import parse_qs, unquote, urljoin

import pytest

from gateway.cli import main
from tests.browser import (
    client,
    follow_sign_in,
    form_action,
    form_fields,
    login,
    post_to_acs,
    sign_in_at_idp,
)
from tests.conftest import Stack, TLSFiles, memory_sees_it, run_stack

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


def expire_sessions(stack: Stack) -> None:
    """Every session idles out (the usual end of a session whose cookie still lives: only
    such a session's cookie may keep a form across the sign-in)."""
    with sqlite3.connect(stack.db) as db:
        db.execute("UPDATE sessions SET last_seen = last_seen - 86400")
    memory_sees_it()


def test_form_posted_with_an_expired_session_is_sent_after_sign_in(stack: Stack) -> None:
    note = "Page 14: the ferry table — check the 1911 column ✓"
    with client(stack) as http, client(stack) as other:
        login(http, stack, PAGE, "alice")
        expire_sessions(stack)
        posted = http.post(stack.url + "/members/M1001/notes",
                           data={"text": note, "page": PAGE}, headers={"origin": stack.url})
        assert posted.status_code == 303
        assert stack.upstream.requests == []  # nothing sent while signed out
        sign_in_url = posted.headers["location"]
        assert sign_in_url.startswith("/saml/login?next=%2F_gateway%2Freplay%2F")
        stash_path = unquote(sign_in_url.split("next=", 1)[1])

        done = post_to_acs(http, sign_in_at_idp(http, follow_sign_in(http, stack, sign_in_url),
                                                "alice"))
        assert done.headers["location"] == stash_path
        # Another browser, signed in as the same member, cannot pick the form up.
        login(other, stack, PAGE, "alice")
        assert other.get(stack.url + stash_path).status_code == 404

        replay = http.get(stack.url + stash_path)
        assert replay.status_code == 200 and "Sending your form" in replay.text
        fields = form_fields(replay.text)
        assert fields == {"text": note, "page": PAGE}
        sent = http.post(urljoin(stack.url, form_action(replay.text)), data=fields,
                         headers={"origin": stack.url})
        assert sent.status_code == 200
        assert http.get(stack.url + stash_path).status_code == 404  # exactly once
    posts = [r for r in stack.upstream.requests if r["method"] == "POST"]
    assert len(posts) == 1 and posts[0]["path"] == "/members/M1001/notes"
    assert parse_qs(posts[0]["body"].decode()) == {"text": [note], "page": [PAGE]}


def test_json_post_with_an_expired_session_keeps_nothing(stack: Stack) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        expire_sessions(stack)
        answer = http.post(stack.url + "/members/M1001/notes", json={"text": "x"},
                           headers={"accept": "application/json", "origin": stack.url})
    assert answer.status_code == 401 and "set-cookie" not in answer.headers
    with sqlite3.connect(stack.db) as db:
        kept = db.execute("SELECT count(*) FROM once WHERE key LIKE 'stash:%'").fetchone()[0]
    assert kept == 0


def test_note_kept_across_sign_in_is_saved_by_the_reader_once(tmp_path: Path,
                                                              tls: TLSFiles) -> None:
    """The same, through the real sample reader: the note exists once, text intact."""
    note = "Ferry table, 1911 column — «check» the tide ✓"
    with run_stack(tmp_path, tls, reader=True) as stack, client(stack) as http:
        login(http, stack, PAGE, "alice")
        page = http.get(stack.url + PAGE)
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert page.status_code == 200 and csrf is not None
        expire_sessions(stack)
        posted = http.post(stack.url + "/members/M1001/notes",
                           data={"csrf": csrf.group(1), "text": note, "ref": PAGE},
                           headers={"origin": stack.url})
        assert posted.status_code == 303
        sign_in_url = posted.headers["location"]
        done = post_to_acs(http, sign_in_at_idp(http, follow_sign_in(http, stack, sign_in_url),
                                                "alice"))
        replay = http.get(stack.url + done.headers["location"])
        sent = http.post(urljoin(stack.url, form_action(replay.text)),
                         data=form_fields(replay.text), headers={"origin": stack.url})
        assert sent.status_code in (200, 303), sent.text
        assert http.get(stack.url + done.headers["location"]).status_code == 404
        notes = http.get(stack.url + "/members/M1001/notes",
                         headers={"accept": "application/json"}).json()
    texts = [n["text"] for n in (notes["notes"] if isinstance(notes, dict) else notes)]
    assert texts == [note]


def test_admin_revokes_a_member_while_the_gateway_serves(
        tmp_path: Path, tls: TLSFiles, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(tmp_path / "gateway.toml")
    with run_stack(tmp_path, tls) as stack, client(stack) as alice, client(stack) as dave:
        login(alice, stack, PAGE, "alice")
        login(dave, stack, PAGE, "dave")
        assert main(["sessions", "list", "--config", config]) == 0
        listing = capsys.readouterr().out
        assert "M1001" in listing and "M1004" in listing and "2 session(s)" in listing
        assert main(["sessions", "revoke", "--member", "M1001", "--config", config]) == 0
        assert "revoked 1 session(s) of M1001" in capsys.readouterr().out
        memory_sees_it()  # the CLI is another process
        assert not reads(alice, stack) and reads(dave, stack)
        dave_cookie = dave.cookies["__Host-gw_session"]
    with run_stack(tmp_path, tls) as stack, client(stack) as dave:  # restarted
        dave.cookies.set("__Host-gw_session", dave_cookie)
        assert reads(dave, stack)
        key = re.search(r"^([0-9a-f]{12})", _listing(config, capsys), re.M)
        assert key is not None
        assert main(["sessions", "revoke", key.group(1), "--config", config]) == 0
        memory_sees_it()
        assert not reads(dave, stack)
    assert main(["sessions", "revoke", "0" * 16, "--config", config]) == 1
    assert main(["sessions", "purge-expired", "--config", config]) == 0


def _listing(config: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["sessions", "list", "--config", config]) == 0
    return capsys.readouterr().out


def test_expired_session_sends_a_browser_to_sign_in_with_next_kept(stack: Stack) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        assert reads(http, stack)
        expire_sessions(stack)
        page = http.get(stack.url + PAGE)
        api = http.get(stack.url + PAGE, headers={"accept": "application/json"})
    assert page.status_code == 302
    assert page.headers["location"] == "/saml/login?next=%2Fissues%2F2023-03%2Fpages%2F14"
    assert api.status_code == 401 and api.json()["error"] == "Sign-in required"
