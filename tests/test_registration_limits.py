"""Gateway-wide limits of the registration gate, over real sockets: new registrations per
hour (past it a 503 with Retry-After, nothing stored), and confirmation mails per
mailbox (a ``+tag`` or another case is the same mailbox) and per hour for everyone, with
a real SMTP server (aiosmtpd on loopback). Clients post from several loopback addresses,
so the per-client limit is not what stops them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import pytest

from tests.conftest import Inbox, Stack, TLSFiles
from tests.test_registration_gate import COOKIE, FREE, gateway, pending, smtp_config


def from_address(stack: Stack, address: str) -> httpx.Client:
    """A client whose connections come from ``address`` (a loopback address)."""
    transport = httpx.HTTPTransport(local_address=address, verify=stack.tls.client_context())
    return httpx.Client(transport=transport, timeout=20)


def register(http: httpx.Client, stack: Stack, email: str, *,
             accept: str = "text/html") -> httpx.Response:
    return http.post(stack.url + "/_gateway/register",
                     data={"email": email, "consent": "yes", "next": FREE},
                     headers={"origin": stack.url, "accept": accept})


def stored(stack: Stack) -> tuple[int, int]:
    """(registrations, sessions) in the gateway's store file."""
    with sqlite3.connect(stack.db) as db:
        registrations = db.execute("SELECT count(*) FROM registrations").fetchone()[0]
        sessions = db.execute("SELECT count(*) FROM sessions").fetchone()[0]
    return int(registrations), int(sessions)


def limits(**values: int) -> str:
    merged = {"logins": 100000, "logouts": 100000, "registrations": 10, **values}
    return "\n[limits]\n" + "".join(f"{k} = {v}\n" for k, v in merged.items())


@pytest.mark.stack(extra_config=limits(registrations_total=5))
def test_registrations_stop_at_the_gateway_wide_cap(stack: Stack,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    codes = []
    for n in range(2, 5):  # three client addresses, four posts each: under 10 a minute
        with from_address(stack, f"127.0.0.{n}") as http:
            for i in range(4):
                done = register(http, stack, f"x{n}-{i}@example.org")
                codes.append(done.status_code)
                if done.status_code == 503:
                    refused = done
                    assert "set-cookie" not in done.headers
    assert codes == [303] * 5 + [503] * 7
    assert refused.headers["retry-after"] == "3600"
    assert "Please try again later" in refused.text and "Traceback" not in refused.text
    with from_address(stack, "127.0.0.5") as http:
        api = register(http, stack, "api@example.org", accept="application/json")
    assert api.status_code == 503 and api.headers["retry-after"] == "3600"
    assert api.json()["error"] == "Temporarily unavailable"
    assert stored(stack) == (5, 5)
    assert "registration refused: over 5 new registrations this hour" in caplog.text


@pytest.mark.stack(extra_config=limits(registrations_total=2))
def test_invalid_forms_do_not_use_up_the_cap(stack: Stack) -> None:
    with from_address(stack, "127.0.0.6") as http:
        bad = [register(http, stack, "not an address").status_code for _ in range(3)]
        good = [register(http, stack, f"r{i}@example.org").status_code for i in range(3)]
    assert bad == [400] * 3 and good == [303, 303, 503]
    assert stored(stack) == (2, 2)


def test_the_cap_counts_requests_for_a_link_too(tmp_path: Path, tls: TLSFiles,
                                                inbox: tuple[Inbox, int]) -> None:
    """With verification, each kept registration needs a mailed link: the cap stops the
    mails (and the pending requests) as it stops registrations."""
    mails, port = inbox
    config = smtp_config(port, limits=limits(registrations_total=2))
    with gateway(tmp_path, tls, config) as stack, from_address(stack, "127.0.0.7") as http:
        codes = [register(http, stack, f"r{i}@example.org").status_code for i in range(4)]
        assert codes == [200, 200, 503, 503]
        assert len(mails.messages) == 2 and pending(stack) == 2


def test_plus_tags_and_case_reach_one_mailbox_allowance(tmp_path: Path, tls: TLSFiles,
                                                        inbox: tuple[Inbox, int],
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    mails, port = inbox
    config = smtp_config(port, limits=limits(verification_mails=3))
    addresses = [f"victim+{i}@example.org" for i in range(6)] + [
        "VICTIM@Example.org", "Victim+x@EXAMPLE.ORG"]
    with gateway(tmp_path, tls, config) as stack, from_address(stack, "127.0.0.8") as http:
        answers = [register(http, stack, a) for a in addresses]
        other = register(http, stack, "someone.else@example.org")
        # The same neutral answer whether a mail went or not: nothing is revealed.
        assert {a.status_code for a in answers} == {200}
        assert all("Check your inbox" in a.text for a in answers)
        assert other.status_code == 200 and COOKIE not in http.cookies
        assert len(mails.messages) == 4 and pending(stack) == 4
        assert [m["To"] for m in mails.messages] == [
            "victim+0@example.org", "victim+1@example.org", "victim+2@example.org",
            "someone.else@example.org"]
        assert stored(stack) == (0, 0)
    assert caplog.text.count("confirmation mail not sent: the mailbox had 3") == 5
    assert "victim" not in caplog.text.lower()  # the log names no address


def test_confirmation_mails_stop_at_the_gateway_wide_cap(tmp_path: Path, tls: TLSFiles,
                                                         inbox: tuple[Inbox, int],
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    mails, port = inbox
    config = smtp_config(port, limits=limits(verification_mails_total=3))
    with gateway(tmp_path, tls, config) as stack:
        answers = []
        for n in (9, 10):
            with from_address(stack, f"127.0.0.{n}") as http:
                answers += [register(http, stack, f"r{n}-{i}@example.org") for i in range(4)]
        assert [a.status_code for a in answers] == [200] * 8
        assert all("Check your inbox" in a.text for a in answers)
        assert len(mails.messages) == 3 and pending(stack) == 3
    assert caplog.text.count("confirmation mail not sent: over 3 mails this hour") == 5


def test_the_mailbox_key_ignores_a_plus_tag_and_case() -> None:
    from gateway.flows.registration import mailbox_key

    base = mailbox_key("victim@example.org")
    assert mailbox_key("Victim+news@Example.ORG") == base
    assert mailbox_key("VICTIM+a+b@example.org") == base
    assert mailbox_key("victim@example.com") != base
    assert mailbox_key("victim-1@example.org") != base  # a hyphen is part of the name
    assert mailbox_key("+tag@example.org") == mailbox_key("+other@example.org")
    assert "victim" not in base  # a hash: the store holds no address
