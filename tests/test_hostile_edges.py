"""Hostile input at the edges, over real sockets (issue 14, items 5, 10 and 12).

* item 5: registering a victim's e-mail address gives a new, separate identity: the
  attacker's sessions page lists only the attacker's own session, and "end all" ends
  nothing of the victim's;
* item 10: ``/saml/sls`` refuses a large bogus LogoutRequest by a cheap check
  (Destination, IssueInstant, replayed ID) before any signature is verified, and is
  rate-limited per client;
* item 12: a WebSocket upgrade never gets a 500 nor an ERROR log line: the gateway's own
  paths refuse it with 501, a gated path without a session with 401, a public path
  passes the upstream's own refusal on (tests/test_websocket.py proxies real ones); a
  request with two ``Host`` headers is a 400 on every path.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import time
from urllib.parse import urlsplit

import httpx
import pytest
from onelogin.saml2.utils import OneLogin_Saml2_Utils

from gateway.devidp.logout import build_logout_request, redirect_query, sign_enveloped
from gateway.devidp.users import NAMEID_PERSISTENT, persistent_name_id
from gateway.saml import logout_message
from tests.browser import client, login
from tests.conftest import Stack

FREE = "/issues/free-2024/pages/1"
PAGE = "/issues/2023-03/pages/14"
VICTIM_AGENT = "Mozilla/5.0 (Windows NT 10.0) Firefox/128.0 victim-browser"
ATTACKER_AGENT = "Mozilla/5.0 (X11; Linux) Chrome/126.0 attacker-browser"


def raw_exchange(stack: Stack, request: bytes) -> bytes:
    """Send ``request`` as raw bytes over TLS to the gateway; the whole answer head."""
    parts = urlsplit(stack.url)
    context = stack.tls.client_context()
    with (socket.create_connection((parts.hostname, parts.port), timeout=10) as sock,
          context.wrap_socket(sock, server_hostname=parts.hostname) as tls):
        tls.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            try:
                chunk = tls.recv(65536)
            except (ssl.SSLError, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
        return data


def status_of(answer: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert match is not None, answer[:200]
    return int(match.group(1))


# -- item 5: registration never reaches another reader's identity ----------------------------


def test_registering_a_victims_address_neither_lists_nor_ends_their_sessions(
        stack: Stack) -> None:
    address = "victim@example.org"
    with (client(stack) as victim, client(stack) as attacker):
        victim.headers["user-agent"] = VICTIM_AGENT
        attacker.headers["user-agent"] = ATTACKER_AGENT
        origin = {"origin": stack.url}
        for http in (victim, attacker):  # the victim first; then the attacker, same address
            done = http.post(stack.url + "/_gateway/register", headers=origin,
                             data={"email": address, "consent": "yes", "next": FREE})
            assert done.status_code == 303, done.text
        assert victim.get(stack.url + FREE).status_code == 200
        assert attacker.get(stack.url + FREE).status_code == 200

        page = attacker.get(stack.url + "/_gateway/sessions")
        assert page.status_code == 200
        handles = re.findall(r'name="end" value="([0-9a-f]{16})"', page.text)
        assert len(handles) == 1 and "(this browser)" in page.text
        assert "Firefox" not in page.text and "Windows" not in page.text  # the victim's device
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        ended = attacker.post(stack.url + "/_gateway/sessions", headers=origin,
                              data={"csrf": csrf.group(1), "end": "all"})
        assert ended.status_code == 303
        # Only the attacker's own session ended; the victim still reads.
        assert attacker.get(stack.url + FREE).status_code == 302
        assert victim.get(stack.url + FREE).status_code == 200
    subjects = {dict(r["headers"])["x-member-id"] for r in stack.upstream.requests
                if r["path"] == FREE}
    assert len(subjects) == 2  # two registrations, two identities


# -- item 10: /saml/sls checks the cheap things first, and is rate-limited -------------------


def bogus_logout_request(stack: Stack, *, size: int, **override: object) -> str:
    """A LogoutRequest padded to about ``size`` bytes of XML, signed by a key the IdP does
    not have (its signature would fail, if anyone looked)."""
    idp = stack.demo.idp
    fields: dict[str, object] = {
        "issuer": idp.entity_id, "destination": stack.url + "/saml/sls",
        "name_id": persistent_name_id(idp.entity_id, "alice"),
        "name_id_format": NAMEID_PERSISTENT, "now": time.time(),
        "session_indexes": tuple(f"_pad{i:06d}{'x' * 40}" for i in range(size // 94)),
    }
    fields.update(override)
    return build_logout_request(**fields)  # type: ignore[arg-type]


def refusal_kinds(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [m.group(1) for r in caplog.records
            if (m := re.match(r"logout refused ref=\S+ kind=(\S+)", r.getMessage()))]


@pytest.mark.stack(extra_config="\n[limits]\nlogins = 100000\nlogouts = 5\n")
def test_large_bogus_logout_request_is_refused_before_its_signature(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    """A 90 KB LogoutRequest with a signature that would not verify: each one is refused by
    the check that costs least, and the log line names that check, not ``signature``."""
    idp = stack.demo.idp
    from gateway.keys import generate_self_signed

    other_key, other_cert = generate_self_signed("not the IdP")
    stale = time.time() - 3600
    elsewhere = stack.url + "/saml/slsx"
    cases = {
        "destination": bogus_logout_request(stack, size=90_000, destination=elsewhere),
        "expired": bogus_logout_request(stack, size=90_000, now=stale, lifetime=7200),
    }
    with caplog.at_level(logging.INFO, logger="gateway"), client(stack) as http:
        for kind, xml in cases.items():
            signed = sign_enveloped(xml, other_key, other_cert)
            assert 85_000 < len(signed) < 100_000
            caplog.clear()
            answer = http.post(stack.url + "/saml/sls",
                               data={"SAMLRequest": OneLogin_Saml2_Utils.b64encode(signed)})
            assert answer.status_code == 400, (kind, answer.text[:300])
            assert refusal_kinds(caplog) == [kind], (kind, caplog.text[-2000:])
        # A replayed ID is refused before the signature too: the first, genuine request
        # (signed by the IdP) is accepted, a 90 KB copy with the same ID and a foreign
        # signature is refused as a replay.
        genuine = bogus_logout_request(stack, size=0, request_id="_replayed-id-1")
        url = (stack.url + "/saml/sls?"
               + redirect_query("SAMLRequest", genuine, key_pem=idp.key_pem))
        assert http.get(url).status_code == 302
        copy = sign_enveloped(bogus_logout_request(stack, size=90_000,
                                                   request_id="_replayed-id-1"),
                              other_key, other_cert)
        caplog.clear()
        answer = http.post(stack.url + "/saml/sls",
                           data={"SAMLRequest": OneLogin_Saml2_Utils.b64encode(copy)})
        assert answer.status_code == 400 and refusal_kinds(caplog) == ["replayed"]
        # The rate limit: 5 per client and minute, and 4 were used above.
        answers = [http.post(stack.url + "/saml/sls",
                             data={"SAMLRequest": OneLogin_Saml2_Utils.b64encode(copy)})
                   for _ in range(3)]
    assert [a.status_code for a in answers] == [400, 429, 429]
    assert "Too many requests" in answers[-1].text


def test_logout_message_size_limit_is_checked_before_decoding() -> None:
    """The encoded size is the first check (no base64 decoding past the limit)."""
    from gateway.errors import LogoutFailed

    with pytest.raises(LogoutFailed) as refused:
        logout_message.decode("A" * (logout_message.MAX_ENCODED + 1), inflate=False)
    assert refused.value.kind == "too_large"


# -- item 12: WebSocket upgrades and duplicate Host headers -------------------------------


pytestmark_shared = pytest.mark.stack(shared=True)


@pytestmark_shared
def test_websocket_upgrade_never_gets_a_5xx(stack: Stack,
                                            caplog: pytest.LogCaptureFixture) -> None:
    host = urlsplit(stack.url).netloc
    sessions = stack.session_count()
    with caplog.at_level(logging.INFO):
        # The echo upstream takes no WebSocket: its 403 is passed on for the public path.
        for path, status in ((PAGE, 401), ("/public/about", 403),
                             ("/_gateway/sessions", 501), ("/saml/login", 501)):
            answer = raw_exchange(stack, (
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n").encode())
            assert status_of(answer) == status, (path, answer[:300])
            assert b"upgrade: websocket" not in answer.lower()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert any("refused WebSocket" in r.getMessage() for r in caplog.records)
    assert stack.upstream.requests == [] or all(
        r["path"] != PAGE for r in stack.upstream.requests)
    assert stack.session_count() == sessions


@pytestmark_shared
def test_two_host_headers_are_refused(stack: Stack) -> None:
    host = urlsplit(stack.url).netloc
    before = len(stack.upstream.requests)
    for path in ("/public/about", "/healthz", "/saml/login", PAGE):
        for first, second in ((host, "evil.example"), ("evil.example", host), (host, host)):
            answer = raw_exchange(stack, (
                f"GET {path} HTTP/1.1\r\nHost: {first}\r\nHost: {second}\r\n"
                "Connection: close\r\n\r\n").encode())
            assert status_of(answer) == 400, (path, first, second, answer[:300])
    assert len(stack.upstream.requests) == before  # nothing reached the upstream
    # One Host still works.
    with httpx.Client(verify=stack.tls.client_context()) as http:
        assert http.get(stack.url + "/public/about").status_code == 200


def test_one_rule_for_two_session_cookies_on_the_hot_path_and_in_routes(stack: Stack) -> None:
    """Item 15: with two session cookies the hot path and the gateway's own routes read
    the same one (the first): a junk cookie first makes both anonymous, alice's first
    makes both alice — never alice on one path and nobody on the other."""
    with client(stack) as alice:
        login(alice, stack, PAGE, "alice")
        name = "__Host-gw_session"
        value = alice.cookies.get(name)
        assert value
    junk = "junk.signature"
    with httpx.Client(verify=stack.tls.client_context(), timeout=20) as http:
        for first, second, member in ((junk, value, False), (value, junk, True)):
            cookie = {"cookie": f"{name}={first}; {name}={second}"}
            page = http.get(stack.url + PAGE, headers=cookie)
            sessions = http.get(stack.url + "/_gateway/sessions", headers=cookie)
            assert (page.status_code == 200) is member, page.status_code
            assert (sessions.status_code == 200) is member, sessions.status_code
            if not member:
                assert page.status_code == sessions.status_code == 302
