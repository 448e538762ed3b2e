"""Hostile logins and requests against the running stack: each refused, no session created.

Forged responses are built with the dev IdP's own builder and key, so the only
difference from a valid login is the one attack under test.
"""

from __future__ import annotations

import base64
import socket
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from lxml import etree

from gateway.devidp.response import build_response
from gateway.devidp.users import NAMEID_PERSISTENT
from gateway.keys import generate_self_signed
from tests.browser import IdPAnswer, client, login, post_to_acs, sign_in_at_idp, start_login
from tests.conftest import Stack, TLSFiles, run_stack

PAGE = "/issues/2023-03/pages/14"
ALICE = {"memberId": ["M1001"], "mail": ["alice@members.example.org"],
         "displayName": ["Alice Archer"], "memberStatus": ["active"],
         "eduPersonEntitlement": ["urn:mace:example.org:entitlement:member"]}


@dataclass
class Pending:
    request_id: str
    relay_state: str


def begin(http: httpx.Client, stack: Stack) -> Pending:
    """Start a login in this browser; return the AuthnRequest ID and RelayState."""
    answer = http.get(stack.url + "/saml/login",
                      params={"next": PAGE, "idp": stack.demo.idp.entity_id})
    assert answer.status_code == 302
    query = parse_qs(urlsplit(answer.headers["location"]).query)
    xml = zlib.decompress(base64.b64decode(query["SAMLRequest"][0]), -15)
    return Pending(etree.fromstring(xml).get("ID"), query["RelayState"][0])


def forge(stack: Stack, pending: Pending | None, **changes: Any) -> str:
    certs = stack.demo.workdir / "certs"
    options: dict[str, Any] = {
        "idp_entity_id": stack.demo.idp.entity_id,
        "key_pem": (certs / "devidp-key.pem").read_text(),
        "cert_pem": (certs / "devidp-cert.pem").read_text(),
        "acs_url": stack.url + "/saml/acs",
        "sp_entity_id": stack.url + "/saml/metadata",
        "in_response_to": pending.request_id if pending else None,
        "name_id": "alice-persistent-id", "name_id_format": NAMEID_PERSISTENT,
        "attributes": ALICE, "session_index": "_s1",
    }
    options.update(changes)
    return base64.b64encode(build_response(**options).encode()).decode()


def acs(http: httpx.Client, stack: Stack, saml_response: str, relay_state: str) -> httpx.Response:
    return http.post(stack.url + "/saml/acs",
                     data={"SAMLResponse": saml_response, "RelayState": relay_state})


def assert_refused(answer: httpx.Response, stack: Stack) -> None:
    assert answer.status_code == 400, answer.text
    assert "Sign-in failed" in answer.text
    assert "reference" in answer.text
    assert not any(c.startswith("__Host-gw_session=")
                   for c in answer.headers.get_list("set-cookie"))
    assert stack.session_count() == 0


def test_valid_forge_is_accepted(stack: Stack) -> None:
    """The control: the toolkit's unmodified response logs in, so each attack below is the cause."""
    with client(stack) as http:
        pending = begin(http, stack)
        answer = acs(http, stack, forge(stack, pending), pending.relay_state)
    assert answer.status_code == 302
    assert stack.session_count() == 1


@pytest.mark.parametrize("attack", [
    pytest.param({"in_response_to": None}, id="no-InResponseTo"),
    pytest.param({"in_response_to": "_not-the-request"}, id="other-InResponseTo"),
    pytest.param({"sign_assertion": False, "sign_response": False}, id="unsigned"),
    pytest.param({"audience": "https://other-sp.example/saml/metadata"}, id="other-audience"),
    pytest.param({"now": time.time() - 3600}, id="expired"),
    pytest.param({"now": time.time() + 3600}, id="not-yet-valid"),
    pytest.param({"destination": "https://evil.example/saml/acs"}, id="other-destination"),
])
def test_forged_response_is_refused(stack: Stack, attack: dict[str, Any]) -> None:
    with client(stack) as http:
        pending = begin(http, stack)
        answer = acs(http, stack, forge(stack, pending, **attack), pending.relay_state)
    assert_refused(answer, stack)


def test_response_signed_by_a_key_not_in_metadata_is_refused(stack: Stack) -> None:
    key, cert = generate_self_signed("attacker")
    with client(stack) as http:
        pending = begin(http, stack)
        forged = forge(stack, pending, key_pem=key, cert_pem=cert)
        assert_refused(acs(http, stack, forged, pending.relay_state), stack)


def test_replayed_response_is_refused(stack: Stack) -> None:
    with client(stack) as http:
        answer: IdPAnswer = sign_in_at_idp(http, start_login(http, stack, PAGE), "alice")
        assert post_to_acs(http, answer).status_code == 302
    assert stack.session_count() == 1
    with client(stack) as attacker:  # same bytes, another browser
        again = attacker.post(answer.acs, data={"SAMLResponse": answer.saml_response,
                                                "RelayState": answer.relay_state})
    assert again.status_code == 400
    assert stack.session_count() == 1


def test_replayed_assertion_in_a_fresh_response_is_refused(stack: Stack) -> None:
    """Same Assertion ID, new Response answering a new request: the replay cache stops it."""
    with client(stack) as http:
        first = begin(http, stack)
        assert acs(http, stack, forge(stack, first, assertion_id="_a-once"),
                   first.relay_state).status_code == 302
    with client(stack) as http:
        second = begin(http, stack)
        again = acs(http, stack, forge(stack, second, assertion_id="_a-once"),
                    second.relay_state)
    assert again.status_code == 400
    assert stack.session_count() == 1


def test_response_without_the_browser_binding_is_refused(stack: Stack) -> None:
    """A response for a login started in another browser cannot be planted in this one."""
    with client(stack) as victim_side:
        pending = begin(victim_side, stack)
    with client(stack) as other:
        assert_refused(acs(other, stack, forge(stack, pending), pending.relay_state), stack)


def test_unsolicited_response_is_refused(stack: Stack) -> None:
    with client(stack) as http:
        answer = http.post(stack.url + "/saml/acs", data={"SAMLResponse": forge(stack, None)})
    assert_refused(answer, stack)


def test_garbage_and_get_at_acs(stack: Stack) -> None:
    with client(stack) as http:
        pending = begin(http, stack)
        assert_refused(acs(http, stack, "bm90IFhNTA==", pending.relay_state), stack)
        assert http.get(stack.url + "/saml/acs").status_code == 405
        huge = http.post(stack.url + "/saml/acs", content=b"x" * (1024 * 1024),
                         headers={"content-type": "application/x-www-form-urlencoded"})
        assert huge.status_code == 413
    assert stack.session_count() == 0


def test_tampered_session_cookie_is_anonymous(stack: Stack) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        value = http.cookies["__Host-gw_session"]
        http.cookies.clear()
        tampered = value[:-2] + ("AA" if not value.endswith("AA") else "BB")
        answer = http.get(stack.url + PAGE, headers={"cookie": f"__Host-gw_session={tampered}"})
        assert answer.status_code == 302
        assert answer.headers["location"].startswith("/saml/login")
    assert stack.upstream.requests == []


@pytest.mark.parametrize("spelling", ["X-Member-Id", "x-member-id", "X_Member_Id",
                                      "X-MEMBER-ID", "X-Gateway-Identity"])
def test_client_identity_headers_never_reach_upstream(stack: Stack, spelling: str) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        answer = http.get(stack.url + PAGE, headers=[(spelling, "M9999"), (spelling, "M9998"),
                                                      ("connection", "x-member-id")])
        public = http.get(stack.url + "/public/about", headers={spelling: "M9999"})
    assert answer.status_code == 200
    assert public.status_code == 200
    values = [v for r in stack.upstream.requests for k, v in r["headers"]
              if k.lower().replace("_", "-") in {"x-member-id", "x-gateway-identity"}]
    assert "M9999" not in values and "M9998" not in values
    assert stack.upstream.header_values("x-member-id") == ["M1001", "M1001"]


@pytest.mark.parametrize("raw_path", [
    "/members/M1001/notes/..%2f..%2fM1004/notes",
    "/members/M1001/notes/%2e%2e/%2e%2e/M1004/notes",
    "/members/M1001/notes/../../M1004/notes",
    "/members/M1001%2fnotes",
    "/members/M1004;x=1/notes",
    "//members/M1004/notes",
    "/members/M1004/notes/%00",
    "/members/M1004/notes/%c0%ae%c0%ae",
])
def test_ambiguous_paths_are_refused(stack: Stack, raw_path: str) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        cookie = http.cookies["__Host-gw_session"]
    status = raw_request(stack, f"GET {raw_path} HTTP/1.1", f"cookie: __Host-gw_session={cookie}")
    assert status == 400, raw_path
    assert stack.upstream.requests == []


def raw_request(stack: Stack, request_line: str, *headers: str) -> int:
    """Send bytes exactly as given (httpx would normalise dot segments before sending)."""
    host, port = urlsplit(stack.url).hostname, urlsplit(stack.url).port
    lines = [request_line, f"host: {host}:{port}", "connection: close", *headers, "", ""]
    with socket.create_connection((host, port), timeout=10) as sock, \
            stack.tls.client_context().wrap_socket(sock, server_hostname=host) as tls:
        tls.sendall("\r\n".join(lines).encode("latin-1"))
        head = tls.recv(65536).split(b"\r\n", 1)[0]
    return int(head.split()[1])


def test_sign_in_attempts_are_rate_limited(tmp_path: Path, tls: TLSFiles) -> None:
    with run_stack(tmp_path, tls, extra_config="\n[limits]\nlogins = 3\n") as stack, \
            client(stack) as http:
        answers = [http.get(stack.url + "/saml/login",
                            params={"next": PAGE, "idp": stack.demo.idp.entity_id})
                   for _ in range(4)]
        acs_answers = [http.post(stack.url + "/saml/acs", data={"SAMLResponse": "x"})
                       for _ in range(4)]
        register = http.post(stack.url + "/_gateway/register", headers={"origin": stack.url},
                             data={"email": "a@example.org", "consent": "yes"})
    assert [a.status_code for a in answers] == [302, 302, 302, 429]
    assert "Too many attempts" in answers[-1].text
    # ACS posts that answer no sign-in of this browser: the same number, counted apart
    assert [a.status_code for a in acs_answers] == [400, 400, 400, 429]
    assert register.status_code == 303  # counted separately


@pytest.mark.parametrize(("header", "gated"), [
    ("accept: text/\xff\xfe", 302), ("cookie: gw=\xff", 302),
    ("sec-fetch-mode: \xe9", 401),  # not a navigation: no login is started
    ("origin: https://\xe9vil", 302)])
def test_non_utf8_header_bytes_are_no_500(stack: Stack, header: str, gated: int) -> None:
    """Header values are bytes (obs-text is legal on the wire): never a crash."""
    assert raw_request(stack, f"GET {PAGE} HTTP/1.1", header) == gated
    assert raw_request(stack, "GET /public/about HTTP/1.1", header) == 200
