"""The registration gate, over real sockets: address confirmation through a real SMTP
server (aiosmtpd on loopback), deletion by the CLI, the console and the reader, the
gate closed without a ``registered`` rule, SMTP failure, rate limits and retention."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from pydantic import ValidationError

from gateway.config import load_settings
from gateway.config_schema import RegistrationSettings, Settings, SmtpSettings
from gateway.demo.stack import DemoStack
from gateway.errors import MailError
from gateway.flows.registration import RegistrationFlow
from gateway.mail import Mailer
from gateway.sessions import CookieSigner, SessionManager, open_store
from tests.browser import client, login
from tests.conftest import (
    Inbox,
    Stack,
    TLSFiles,
    bound_socket,
    memory_sees_it,
    port_of,
    run_stack,
)

FREE = "/issues/free-2024/pages/1"
COOKIE = "__Host-gw_session"
REGISTERED_RULE = '[[rules]]\npath = "/issues/free-2024/**"\naccess = "registered"\n'


def smtp_config(port: int, *, limits: str = "", registration: str = "") -> str:
    return (f'\n[registration]\nverify = true\nlink_lifetime = 600\n'
            f'privacy_url = "https://example.org/privacy"\n{registration}'
            f'\n[smtp]\nhost = "127.0.0.1"\nport = {port}\nsecurity = "none"\n'
            f'from_address = "Magazine <no-reply@example.org>"\ntimeout = 5\n{limits}')


@contextmanager
def gateway(tmp_path: Path, tls: TLSFiles, extra: str = "",
            edit: dict[str, str] | None = None) -> Iterator[Stack]:
    """The demo stack with ``extra`` config; ``edit`` replaces text in its gateway.toml."""
    def setup(demo: DemoStack) -> None:
        path = demo.workdir / "gateway.toml"
        text = path.read_text()
        for old, new in (edit or {}).items():
            assert old in text
            text = text.replace(old, new)
        path.write_text(text)

    with run_stack(tmp_path, tls, extra_config=extra, setup=setup) as running:
        yield running


def origin(stack: Stack) -> dict[str, str]:
    return {"origin": stack.url}


def register(http: httpx.Client, stack: Stack, address: str) -> httpx.Response:
    return http.post(stack.url + "/_gateway/register",
                     data={"email": address, "consent": "yes", "next": FREE},
                     headers=origin(stack))


def registrations(stack: Stack) -> list[tuple[Any, ...]]:
    with sqlite3.connect(stack.db) as db:
        return db.execute("SELECT email, subject, verified_at, consent FROM registrations"
                          " ORDER BY rowid").fetchall()


def pending(stack: Stack) -> int:
    with sqlite3.connect(stack.db) as db:
        return int(db.execute("SELECT count(*) FROM once WHERE key LIKE 'confirm:%'")
                   .fetchone()[0])


def can_read(cookie: str, stack: Stack) -> bool:
    """Whether this session cookie (in a fresh client) still opens the free issue."""
    with client(stack) as other:
        answer = other.get(stack.url + FREE, headers={"cookie": f"{COOKIE}={cookie}"})
    return answer.status_code == 200


def registered_cookie(stack: Stack, address: str) -> str:
    with client(stack) as http:
        done = register(http, stack, address)
        assert done.status_code == 303, done.text
        return str(http.cookies[COOKIE])


def test_the_link_signs_the_reader_in_once(tmp_path: Path, tls: TLSFiles,
                                           inbox: tuple[Inbox, int],
                                           caplog: pytest.LogCaptureFixture) -> None:
    mails, port = inbox
    with gateway(tmp_path, tls, smtp_config(port)) as stack, client(stack) as http:
        sent = register(http, stack, "Reader@Example.ORG")
        assert sent.status_code == 200 and "Check your inbox" in sent.text
        assert COOKIE not in http.cookies and stack.session_count() == 0
        assert registrations(stack) == [] and pending(stack) == 1
        # An unconfirmed address gets nothing: the free issue still asks to register.
        still = http.get(stack.url + FREE)
        assert still.status_code == 302 and still.headers["location"].startswith(
            "/_gateway/register?")

        link = mails.link()
        message = mails.messages[-1]
        assert message["To"] == "Reader@example.org"
        host = "127.0.0.1"
        assert host in message["Subject"]
        text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert "within 10 minutes" in text and "works once" in text
        assert "https://example.org/privacy" in text
        token = link.rpartition("token=")[2]
        # Opening the link (a mail scanner does too) uses nothing up: a button does.
        for _ in range(2):
            page = http.get(link)
            assert page.status_code == 200 and 'name="token"' in page.text
        assert stack.session_count() == 0
        confirmed = http.post(stack.url + "/_gateway/register/confirm",
                              data={"token": token}, headers=origin(stack))
        assert confirmed.status_code == 303 and confirmed.headers["location"] == FREE
        reading = http.get(stack.url + FREE)
        assert reading.status_code == 200
        seen = dict(stack.upstream.requests[-1]["headers"])
        assert seen["x-member-status"] == "registered"
        assert seen["x-member-email-verified"] == "true"  # confirmed through the link
        [(address, subject, verified_at, consent)] = registrations(stack)
        assert address == "Reader@example.org" and subject == seen["x-member-id"]
        assert verified_at is not None and consent.startswith("I agree that the publisher")
        assert pending(stack) == 0 and stack.session_count() == 1
    assert token not in caplog.text  # never in a log or audit line


def test_a_used_or_unknown_link_gets_no_session(tmp_path: Path, tls: TLSFiles,
                                                inbox: tuple[Inbox, int]) -> None:
    mails, port = inbox
    with gateway(tmp_path, tls, smtp_config(port)) as stack:
        with client(stack) as http:
            register(http, stack, "once@example.org")
            token = mails.link().rpartition("token=")[2]
            assert http.post(stack.url + "/_gateway/register/confirm", data={"token": token},
                             headers=origin(stack)).status_code == 303
        assert stack.session_count() == 1
        with client(stack) as replay:
            again = replay.post(stack.url + "/_gateway/register/confirm",
                                data={"token": token}, headers=origin(stack))
            opened = replay.get(mails.link())
            forged = replay.post(stack.url + "/_gateway/register/confirm",
                                 data={"token": "A" * 43}, headers=origin(stack))
            cross = replay.post(stack.url + "/_gateway/register/confirm",
                                data={"token": token}, headers={"origin": "https://evil.example"})
            assert COOKIE not in replay.cookies
        assert again.status_code == 410 and "used already or has expired" in again.text
        assert opened.status_code == 410 and forged.status_code == 410
        assert cross.status_code == 403
        assert stack.session_count() == 1 and len(registrations(stack)) == 1


def test_registrations_delete_erases_it_and_ends_its_sessions(tmp_path: Path,
                                                              tls: TLSFiles) -> None:
    with gateway(tmp_path, tls) as stack:
        with client(stack) as http:  # the gate is on: the sign-in page offers it
            assert "/_gateway/register?next=" in http.get(stack.url + "/saml/login").text
        first = registered_cookie(stack, "gone@example.org")
        second = registered_cookie(stack, "GONE@Example.org")
        kept = registered_cookie(stack, "kept@example.org")
        assert all(can_read(c, stack) for c in (first, second, kept))
        config = str(stack.demo.workdir / "gateway.toml")
        done = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "registrations", "delete", "gone@EXAMPLE.org",
             "--config", config], capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert "deleted 2 registration(s)" in done.stdout and "ended 2 session(s)" in done.stdout
        memory_sees_it()  # the CLI is another process
        assert not can_read(first, stack) and not can_read(second, stack)
        assert can_read(kept, stack)
        assert [r[0] for r in registrations(stack)] == ["kept@example.org"]
        audit = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
        deleted = [a for a in audit if a["event"] == "registration_deleted"]
        assert len(deleted) == 2 and all(a["by"].startswith("cli:") for a in deleted)
        assert "gone@" not in done.stderr.lower()  # the audit names subjects, not addresses
        again = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "registrations", "delete", "gone@example.org",
             "--config", config], capture_output=True, text=True, timeout=60, check=False)
        assert again.returncode == 1 and "no registration" in again.stderr


def test_the_console_deletes_a_registration_with_csrf(tmp_path: Path, tls: TLSFiles) -> None:
    with gateway(tmp_path, tls) as stack:
        cookie = registered_cookie(stack, "reader@example.org")
        with client(stack) as admin:
            login(admin, stack, "/issues/2023-03/pages/14", "carol")
            console = admin.get(stack.url + "/_gateway/admin")
            token = re.search(r'name="csrf" value="([^"]+)"', console.text)
            assert token is not None
            url = stack.url + "/_gateway/admin/registrations/delete"
            forged = admin.post(url, data={"email": "reader@example.org", "csrf": "x"},
                                headers=origin(stack))
            cross = admin.post(url, data={"email": "reader@example.org",
                                          "csrf": token.group(1)},
                               headers={"origin": "https://evil.example"})
            assert (forged.status_code, cross.status_code) == (403, 403)
            empty = admin.post(url, data={"email": "", "csrf": token.group(1)},
                               headers=origin(stack))
            assert empty.status_code == 303 and "deleted=0" in empty.headers["location"]
            assert can_read(cookie, stack) and len(registrations(stack)) == 1
            done = admin.post(url, data={"email": "reader@example.org", "csrf": token.group(1)},
                              headers=origin(stack))
            assert done.status_code == 303
            shown = admin.get(stack.url + done.headers["location"])
            assert "1 registration deleted, 1 session ended" in shown.text
        with client(stack) as member:  # a member without the admin entitlement: refused
            login(member, stack, "/issues/2023-03/pages/14", "alice")
            assert member.post(url, data={"email": "x@example.org"},
                               headers=origin(stack)).status_code == 403
        assert registrations(stack) == [] and not can_read(cookie, stack)


def test_a_reader_deletes_their_own_registration(tmp_path: Path, tls: TLSFiles) -> None:
    wording = "Keep my address for the free issue only; I may withdraw at any time."
    extra = f'\n[registration]\nconsent_text = "{wording}"\nretention_days = 90\n'
    with gateway(tmp_path, tls, extra) as stack:
        with client(stack) as http:  # the form shows the configured wording and retention
            form = http.get(stack.url + "/_gateway/register?next=/")
            assert wording in form.text and "kept for 90 days" in form.text
        other = registered_cookie(stack, "other@example.org")
        assert registrations(stack)[0][3] == wording  # what was agreed to is kept
        with client(stack) as http:
            register(http, stack, "mine@example.org")
            page = http.get(stack.url + "/_gateway/sessions")
            assert "Delete my registration" in page.text
            token = re.search(r'name="csrf" value="([^"]+)"', page.text)
            assert token is not None
            url = stack.url + "/_gateway/sessions/registration"
            assert http.post(url, data={"csrf": "x"}, headers=origin(stack)).status_code == 403
            cookie = str(http.cookies[COOKIE])
            done = http.post(url, data={"csrf": token.group(1)}, headers=origin(stack))
            assert done.status_code == 200 and "Registration deleted" in done.text
        assert not can_read(cookie, stack) and can_read(other, stack)
        assert [r[0] for r in registrations(stack)] == ["other@example.org"]
        with client(stack) as member:  # a member has no registration to delete
            login(member, stack, "/issues/2023-03/pages/14", "alice")
            assert "Delete my registration" not in member.get(
                stack.url + "/_gateway/sessions").text


def test_without_a_registered_rule_there_is_no_registration(tmp_path: Path,
                                                           tls: TLSFiles) -> None:
    with gateway(tmp_path, tls, edit={REGISTERED_RULE: ""}) as stack, client(stack) as http:
        sign_in = http.get(stack.url + "/saml/login?next=/issues")
        assert sign_in.status_code == 200 and "/_gateway/register" not in sign_in.text
        base = stack.url + "/_gateway/register"
        answers = [http.get(base), register(http, stack, "reader@example.org"),
                   http.get(base + "/confirm?token=" + "A" * 43),
                   http.post(base + "/confirm", data={"token": "A" * 43},
                             headers=origin(stack))]
        assert [a.status_code for a in answers] == [404] * 4
        assert COOKIE not in http.cookies
    assert stack.session_count() == 0 and registrations(stack) == []
    assert not stack.demo.settings.registration_open


def test_smtp_down_is_a_503_and_leaves_nothing(tmp_path: Path, tls: TLSFiles,
                                               caplog: pytest.LogCaptureFixture) -> None:
    with bound_socket() as closed:  # bound, never listening: connections are refused
        extra = smtp_config(port_of(closed))
        with gateway(tmp_path, tls, extra) as stack, client(stack) as http:
            answer = register(http, stack, "reader@example.org")
            assert answer.status_code == 503 and "could not send the mail" in answer.text
            assert COOKIE not in http.cookies
            assert http.get(stack.url + FREE).status_code == 302
        assert stack.session_count() == 0 and registrations(stack) == []
        assert pending(stack) == 0  # no link waits that never went out
    assert "MailError" in caplog.text and "reader@example.org" not in caplog.text


def test_mail_rate_limits_per_address_and_per_client(tmp_path: Path, tls: TLSFiles,
                                                     inbox: tuple[Inbox, int]) -> None:
    mails, port = inbox
    limits = ("\n[limits]\nlogins = 100000\nlogouts = 100000\nregistrations = 5\n"
              "verification_mails = 2\n")
    with gateway(tmp_path, tls, smtp_config(port, limits=limits)) as stack, \
            client(stack) as http:
        same = [register(http, stack, "target@example.org") for _ in range(3)]
        # Past the mailbox's limit the answer is the same "Check your inbox": it tells
        # nothing about the address, and no mail goes.
        assert [a.status_code for a in same] == [200, 200, 200]
        assert "Check your inbox" in same[2].text
        assert register(http, stack, "TARGET@example.org").status_code == 200  # any case
        # The per-client limit (5 a minute) ends this client's attempts for any address.
        assert register(http, stack, "new@example.org").status_code == 200
        assert register(http, stack, "newer@example.org").status_code == 429
    assert len(mails.messages) == 3 and pending(stack) == 3
    assert [m["To"] for m in mails.messages] == ["target@example.org"] * 2 + ["new@example.org"]


def test_registrations_past_retention_are_purged(tmp_path: Path, tls: TLSFiles) -> None:
    """The gateway's own purge timer deletes them, and their sessions end."""
    days = 4 / 86400  # four seconds
    extra = f"\n[registration]\nretention_days = {days}\n"
    edit = {'url = "sqlite:///gateway.db"\n':
            'url = "sqlite:///gateway.db"\npurge_interval = 1\n'}
    with gateway(tmp_path, tls, extra, edit=edit) as stack:
        cookie = registered_cookie(stack, "brief@example.org")
        assert can_read(cookie, stack) and len(registrations(stack)) == 1
        deadline = time.monotonic() + 15
        while registrations(stack) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert registrations(stack) == []
        assert not can_read(cookie, stack)


def test_purge_keeps_registrations_within_retention(tmp_path: Path, tls: TLSFiles) -> None:
    """The flow's purge, against the gateway's store file, by the retention period."""
    with gateway(tmp_path, tls) as stack:
        cookie = registered_cookie(stack, "stays@example.org")
        settings = load_settings(stack.demo.workdir / "gateway.toml", environ={})
        retention = settings.registration.retention_days * 86400

        async def purge_at(offset: float) -> int:
            def now() -> float:
                return time.time() + offset

            stores = open_store(settings.store.url, now)
            await stores.backend.open()
            try:
                sessions = SessionManager(
                    stores.sessions, CookieSigner(settings.session_secrets(), "session"),
                    lifetime=settings.session.lifetime,
                    idle_timeout=settings.session.idle_timeout, clock=now)
                flow = RegistrationFlow(settings, stores.records, stores.keys, sessions, now)
                return await flow.purge_expired()
            finally:
                await stores.backend.close()

        assert asyncio.run(purge_at(retention - 3600)) == 0
        assert can_read(cookie, stack) and len(registrations(stack)) == 1
        assert asyncio.run(purge_at(retention + 3600)) == 1
        memory_sees_it()  # the purge ran in another store client
        assert registrations(stack) == [] and not can_read(cookie, stack)


def test_mail_goes_over_starttls_with_a_login(tmp_path: Path, tls: TLSFiles,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``security = "starttls"``: the relay's certificate is verified, the login happens
    only inside TLS; a relay that offers no STARTTLS is refused, never used in clear."""
    inbox = Inbox()
    logins: list[tuple[bytes, bytes]] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                      data: Any) -> AuthResult:
        assert session.ssl is not None  # aiosmtpd: the login came inside TLS
        logins.append((data.login, data.password))
        return AuthResult(success=data.password == b"s3cret")

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    with bound_socket() as sock:
        port = port_of(sock)
    relay = Controller(inbox, hostname="127.0.0.1", port=port, tls_context=context,
                       require_starttls=True, auth_required=True,
                       authenticator=authenticator)
    relay.start()
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.cert))  # trust the test's certificate
    (tmp_path / "smtp-password").write_text("s3cret\n")
    try:
        smtp = SmtpSettings(host="127.0.0.1", port=port, security="starttls",
                            username="gateway", password_file=Path("smtp-password"),
                            from_address="Magazine <no-reply@example.org>", timeout=5)
        asyncio.run(Mailer(smtp, tmp_path).send("r@example.org", "Hello", "Body\n"))
        assert logins == [(b"gateway", b"s3cret")]
        assert inbox.messages[-1]["From"] == "Magazine <no-reply@example.org>"
        assert inbox.messages[-1]["Auto-Submitted"] == "auto-generated"
        (tmp_path / "smtp-password").write_text("wrong\n")
        with pytest.raises(MailError) as refused:
            asyncio.run(Mailer(smtp, tmp_path).send("r@example.org", "Hello", "Body\n"))
        assert "wrong" not in refused.value.reason and len(inbox.messages) == 1
    finally:
        relay.stop()

    plain = Inbox()
    with bound_socket() as sock:
        port = port_of(sock)
    no_tls = Controller(plain, hostname="127.0.0.1", port=port)
    no_tls.start()
    try:
        smtp = SmtpSettings(host="127.0.0.1", port=port, security="starttls",
                            from_address="no-reply@example.org", timeout=5)
        with pytest.raises(MailError, match=r"(?i)starttls"):
            asyncio.run(Mailer(smtp, tmp_path).send("r@example.org", "Hello", "Body\n"))
        assert plain.messages == []
    finally:
        no_tls.stop()


def test_verification_without_a_relay_or_plain_credentials_is_refused() -> None:
    with pytest.raises(ValidationError, match="needs \\[smtp\\] host"):
        Settings(public_url="https://reader.example.org",
                 registration=RegistrationSettings(verify=True))
    with pytest.raises(ValidationError, match="clear text"):
        SmtpSettings(host="smtp.example.org", security="none", username="u",
                     password_file=Path("p"))
