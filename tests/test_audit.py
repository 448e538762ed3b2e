"""The audit log and the request log, over a full scripted run through the real stack.

Every audit line written must validate against the documented schema
(``gateway.audit.EVENTS``); every event kind the gateway produces is produced here; and
nothing written anywhere — audit file, log records, stdout, stderr — contains a session
cookie, a SAMLResponse or an identity token.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from gateway.audit import EVENTS, json_schema, validate
from gateway.demo.stack import DemoStack
from gateway.logs import JsonFormatter, TextFormatter
from tests.browser import client, login, post_to_acs, sign_in_at_idp, start_login
from tests.conftest import Inbox, Stack, TLSFiles, run_stack
from tests.test_step_up import step_up_with_code

PAGE = "/issues/2023-03/pages/14"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
CLIENT_LOGGERS = ("httpx", "httpcore")


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def all_log_records() -> Iterator[Collect]:
    root = logging.getLogger()
    handler, level = Collect(), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def csrf_of(page: httpx.Response) -> str:
    match = _CSRF.search(page.text)
    assert match, page.text
    return match.group(1)


def audit_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_full_run_audit_events_and_no_secrets(tmp_path: Path, tls: TLSFiles,
                                              capfd: pytest.CaptureFixture[str],
                                              inbox: tuple[Inbox, int]) -> None:
    audit_file = tmp_path / "audit.log"
    mails, smtp_port = inbox
    extra = (f'\n[logging]\naudit = "{audit_file}"\n'
             # Registration with confirmation by mail, kept three seconds (then purged).
             f'\n[registration]\nverify = true\nretention_days = {3 / 86400}\n'
             f'\n[smtp]\nhost = "127.0.0.1"\nport = {smtp_port}\nsecurity = "none"\n'
             'from_address = "no-reply@example.org"\n'
             # A page that needs MFA: alice's step-up writes the step_up event.
             '\n[[rules]]\npath = "/mfa/**"\naccess = "member"\n'
             'require = { authn_context = "https://refeds.org/profile/mfa" }\n')

    def purge_often(demo: DemoStack) -> None:
        config = demo.workdir / "gateway.toml"
        config.write_text(config.read_text().replace(
            'url = "sqlite:///gateway.db"\n', 'url = "sqlite:///gateway.db"\npurge_interval = 1\n'))

    secrets: list[str] = []
    with all_log_records() as logs, run_stack(tmp_path / "stack", tls, extra_config=extra,
                                              setup=purge_often) as stack:
        with client(stack) as alice:
            answer = sign_in_at_idp(alice, start_login(alice, stack, PAGE), "alice")
            secrets.append(answer.saml_response)
            assert post_to_acs(alice, answer).status_code == 302
            assert alice.get(stack.url + PAGE).status_code == 200
            assert alice.get(stack.url + "/members/M1002/notes/").status_code == 403
            assert alice.get(stack.url + "/_gateway/admin").status_code == 403
            assert step_up_with_code(alice, stack, "/mfa/x").status_code == 302
            secrets += [c.value for c in alice.cookies.jar]
        with client(stack) as mallory:  # a refused login
            bad = sign_in_at_idp(mallory, start_login(mallory, stack, PAGE), "dave")
            secrets.append(bad.saml_response)
            refused = post_to_acs(mallory, bad, SAMLResponse="bm90IFNBTUw=")
            assert refused.status_code == 400
        with client(stack) as carol:  # the admin revokes alice's sessions
            login(carol, stack, PAGE, "carol")
            page = carol.get(stack.url + "/_gateway/admin/sessions", params={"subject": "M1001"})
            assert page.status_code == 200 and "M1001" in page.text
            done = carol.post(stack.url + "/_gateway/admin/sessions", data={
                "csrf": csrf_of(page), "subject": "M1001", "end": "all"},
                headers={"origin": stack.url})
            assert done.status_code == 303
            assert carol.get(stack.url + "/_gateway/admin/registrations.csv").status_code == 200
            bye = carol.get(stack.url + "/saml/logout")
            out_to_idp = carol.post(stack.url + "/saml/logout", data={"csrf": csrf_of(bye)},
                                    headers={"origin": stack.url})
            assert out_to_idp.status_code == 302  # SP-initiated SLO: to the IdP and back
            back = carol.get(out_to_idp.headers["location"])
            assert carol.get(back.headers["location"]).status_code == 200
            secrets += [c.value for c in carol.cookies.jar]
        with client(stack) as reader:  # two confirmed registrations: one withdrawn, one purged
            for address in ("reader@example.org", "brief@example.org"):
                reader.post(stack.url + "/_gateway/register", headers={"origin": stack.url},
                            data={"email": address, "consent": "yes", "next": "/"})
                token = mails.link().rpartition("token=")[2]
                secrets.append(token)
                assert reader.post(stack.url + "/_gateway/register/confirm",
                                   data={"token": token},
                                   headers={"origin": stack.url}).status_code == 303
            mine = reader.get(stack.url + "/_gateway/sessions")
            assert reader.post(stack.url + "/_gateway/sessions/registration",
                               data={"csrf": csrf_of(mine)},
                               headers={"origin": stack.url}).status_code == 200
            secrets += [c.value for c in reader.cookies.jar]
        deadline = time.monotonic() + 10
        while "registration_purged" not in audit_file.read_text():
            assert time.monotonic() < deadline, "no registration was purged"
            time.sleep(0.2)
        secrets += stack.upstream.header_values("x-gateway-identity")
    out, err = capfd.readouterr()

    lines = audit_lines(audit_file)
    problems = [p for line in lines for p in validate(line)]
    assert problems == []
    produced = {str(line["event"]) for line in lines}
    assert produced >= set(EVENTS), set(EVENTS) - produced
    by_event = {str(line["event"]): line for line in lines}
    assert by_event["login_failure"]["kind"] == "malformed"
    assert by_event["login_failure"]["reference"] in refused.text
    assert by_event["session_revoked"] == {**by_event["session_revoked"], "by": "M1003",
                                           "subject": "M1001", "scope": "all"}
    assert by_event["access_denied"]["rule"]

    secrets = [s for s in secrets if len(s) >= 16]
    assert len(secrets) >= 5 and any(s.startswith("ey") for s in secrets)  # a JWT among them
    written = [audit_file.read_text(), out, err]
    # The test's own HTTP client logs its requests (cookies included): not the gateway's.
    for record in (r for r in logs.records if not r.name.startswith(CLIENT_LOGGERS)):
        written += [JsonFormatter().format(record), TextFormatter().format(record),
                    repr(record.args), repr(getattr(record, "fields", ""))]
    text = "\n".join(written)
    leaked = [s[:12] + "…" for s in secrets if s in text]
    assert leaked == []


def test_schema_is_closed_and_versioned() -> None:
    schema = json_schema()
    assert schema["$id"] == "sso-gateway.audit/2"
    assert len(schema["oneOf"]) == len(EVENTS)
    good = {"schema": "sso-gateway.audit/2", "event": "session_revoked",
            "time": "2024-05-01T12:00:00.000Z", "by": "M1003", "subject": "M1001",
            "sessions_ended": 2, "scope": "all"}
    assert validate(good) == []
    assert validate({**good, "cookie": "x"}) == ["session_revoked: unexpected field 'cookie'"]
    assert validate({**good, "sessions_ended": "2"})
    assert validate({**good, "event": "nope"}) == ["unknown event 'nope'"]


def _trusting(demo: DemoStack) -> None:
    toml = demo.workdir / "gateway.toml"
    toml.write_text('trusted_proxies = ["127.0.0.1"]\n' + toml.read_text()
                    + "\n[logging]\nlog_member_id = true\n")


def test_request_log_lines_and_request_ids(tmp_path: Path, tls: TLSFiles) -> None:
    with all_log_records() as logs, run_stack(tmp_path, tls, setup=_trusting) as stack, \
            client(stack) as http:
        login(http, stack, PAGE, "alice")
        mine = http.get(stack.url + PAGE, headers={"x-request-id": "lb-1234"})
        spoofed = http.get(stack.url + PAGE, headers={"x-request-id": "bad id {}"})
    assert mine.headers["x-request-id"] == "lb-1234"  # from a trusted proxy: kept
    assert re.fullmatch(r"[0-9a-f]{16}", spoofed.headers["x-request-id"])  # unsafe: replaced
    sent = stack.upstream.header_values("x-request-id")
    assert "lb-1234" in sent and spoofed.headers["x-request-id"] in sent
    assert all(v != "bad id {}" for v in sent)
    lines = [json.loads(JsonFormatter().format(r)) for r in logs.records
             if r.name == "gateway.access"]
    proxied = next(line for line in lines if line.get("request_id") == "lb-1234")
    assert proxied["method"] == "GET" and proxied["path"] == PAGE
    assert proxied["status"] == 200 and proxied["upstream"] == "reader"
    assert proxied["member_id"] == "M1001" and re.fullmatch(r"[0-9a-f]{12}", proxied["session"])
    assert isinstance(proxied["duration_ms"], float)


def test_request_ids_are_believed_from_the_proxy_that_connects(tmp_path: Path,
                                                               tls: TLSFiles) -> None:
    """The balancer (127.0.0.1, in trusted_proxies) names the client in X-Forwarded-For:
    its X-Request-Id is still taken over, since the balancer sent it. A client that
    connects from an address not in trusted_proxies (127.0.0.2) never picks its ID, even
    when it claims to come through the balancer."""
    direct = httpx.HTTPTransport(local_address="127.0.0.2", verify=tls.client_context())
    with all_log_records() as logs, run_stack(tmp_path, tls, setup=_trusting) as stack, \
            client(stack) as balancer, httpx.Client(transport=direct, timeout=20) as other:
        relayed = balancer.get(stack.url + "/", headers={
            "x-request-id": "lb-1", "x-forwarded-for": "203.0.113.9"})
        picked = other.get(stack.url + "/", headers={
            "x-request-id": "client-pick", "x-forwarded-for": "127.0.0.1"})
        with pytest.raises(InvalidStatus) as upgrade:  # a WebSocket, refused: no session
            connect(stack.url.replace("https://", "wss://") + PAGE,
                    ssl=tls.client_context(), open_timeout=10, additional_headers={
                        "x-request-id": "lb-ws", "x-forwarded-for": "203.0.113.9"})
    assert upgrade.value.response.headers["x-request-id"] == "lb-ws"
    assert relayed.status_code == 200 and relayed.headers["x-request-id"] == "lb-1"
    assert picked.status_code == 200
    assert re.fullmatch(r"[0-9a-f]{16}", picked.headers["x-request-id"])
    assert stack.upstream.header_values("x-request-id") == ["lb-1",
                                                            picked.headers["x-request-id"]]
    lines = [json.loads(JsonFormatter().format(r)) for r in logs.records
             if r.name == "gateway.access"]
    assert [line["request_id"] for line in lines if line.get("path") == "/"] == [
        "lb-1", picked.headers["x-request-id"]]
    assert stack.upstream.header_values("x-forwarded-for") == ["203.0.113.9", "127.0.0.2"]


def test_untrusted_request_ids_are_replaced_and_shown_on_error_pages(stack: Stack) -> None:
    with client(stack) as http:
        page = http.get(stack.url + "/public/x%2fy", headers={"x-request-id": "client-1"})
    assert page.status_code == 400
    request_id = page.headers["x-request-id"]
    assert request_id != "client-1"
    assert f"request ID <code>{request_id}</code>" in page.text
