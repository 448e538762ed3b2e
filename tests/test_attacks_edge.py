"""Attacks at the edges of a login, end to end against a running stack.

* a deflate bomb in the one Redirect-binding message the gateway inflates (SLO at
  ``/saml/sls``): refused with 400 while inflating stays within its cap;
* open redirects through ``next`` (a completed login lands on ``/``) and through RelayState
  (the gateway's RelayState is an opaque state: a forged one is refused, no session);
* a client ``Connection:`` header naming the headers the gateway sets: they still arrive
  upstream (and at ``/auth/check``) with the gateway's values.

One stack serves the module (``stack`` marker ``shared=True``); tests compare session
counts before and after.
"""

from __future__ import annotations

import base64
import tracemalloc
import zlib
from urllib.parse import quote, urlsplit

import httpx
import pytest

from gateway.selftest.client import Browser, Target
from tests.browser import client, login
from tests.conftest import Stack
from tests.forge import PAGE, Forge, acs, begin, encode, now_id

pytestmark = pytest.mark.stack(shared=True)

SESSION = "__Host-gw_session"
EVIL_NEXTS = ["//evil.example", "/\\evil.example", "https:evil.example", "/\t/evil.example",
              "/%09/evil.example", "/%2F%2Fevil.example", "%2F%2Fevil.example",
              "/%5Cevil.example", "\t//evil.example", "https://evil.example/"]
EVIL_RELAY_STATES = ["//evil.example", "/\\evil.example", "https:evil.example",
                     "/\t/evil.example", "%2F%2Fevil.example", "https://evil.example/"]


def no_session_cookie(answer: httpx.Response) -> bool:
    return not any(c.startswith(SESSION + "=") for c in answer.headers.get_list("set-cookie"))


def test_deflate_bomb_in_a_redirect_binding_message(stack: Stack,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """~40 MB of XML deflated into ~40 KB (a query uvicorn still accepts): the gateway stops
    inflating at its cap (256 KiB)."""
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = b" " * (1 << 20)
    bomb = squeeze.compress(b'<samlp:LogoutRequest xmlns:samlp="urn:oasis:names:tc:SAML:'
                            b'2.0:protocol" ID="_bomb">')
    bomb += b"".join(squeeze.compress(chunk) for _ in range(40)) + squeeze.flush()
    query = "SAMLRequest=" + quote(base64.b64encode(bomb).decode(), safe="")
    assert len(query) < 64000  # small enough for the server, the size check, then inflated
    before = stack.session_count()
    tracemalloc.start()
    try:
        # Raw, through the self-test's client: httpx refuses URLs over 64 KiB.
        answer = Browser(Target(stack.url, str(stack.tls.cert))).get(
            "/saml/sls?" + query)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert answer.status == 400, answer.text
    assert "reference" in answer.text
    assert "inflates past" in caplog.text  # refused by the cap, not by something earlier
    assert peak < 16 * 1024 * 1024  # the whole request, both ends: nowhere near 40 MB
    assert stack.session_count() == before


def test_open_redirects_via_next_land_on_root(stack: Stack, forge: Forge) -> None:
    for evil in EVIL_NEXTS:
        with client(stack) as http:
            pending = begin(http, stack.url, forge.idp_entity_id, next_path=evil)
            done = acs(http, stack.url, encode(forge.valid(pending.request_id,
                                                                assertion_id=now_id())),
                       pending.relay_state)
        assert done.status_code == 302, (evil, done.text)
        assert done.headers["location"] == "/", evil


def test_open_redirects_via_relay_state_are_refused(stack: Stack, forge: Forge) -> None:
    """RelayState names a pending login, never a URL: a forged one is refused outright, even
    one that starts with this browser's real state."""
    before = stack.session_count()
    with client(stack) as http:
        for evil in [*EVIL_RELAY_STATES, "<real state>/\\evil.example"]:
            pending = begin(http, stack.url, forge.idp_entity_id)
            relay = evil.replace("<real state>", pending.relay_state)
            answer = acs(http, stack.url,
                         encode(forge.valid(pending.request_id, assertion_id=now_id())), relay)
            assert answer.status_code == 400, (evil, answer.status_code)
            assert "Sign-in failed" in answer.text, evil
            assert "evil.example" not in answer.headers.get("location", ""), evil
            assert no_session_cookie(answer), evil
    assert stack.session_count() == before


GATEWAY_SET = ["x-member-id", "x-member-email", "x-member-status", "x-member-entitlements",
               "x-gateway-identity", "x-forwarded-for", "x-forwarded-proto", "x-request-id"]


def test_connection_header_cannot_remove_what_the_gateway_sets(stack: Stack) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        stack.upstream.requests.clear()
        page = http.get(stack.url + PAGE, headers=[
            ("connection", ", ".join(GATEWAY_SET)), ("connection", "X_Member_Id"),
            ("X-Member-Id", "M1004"), ("X_Member_Id", "M1004")])
        check = http.get(stack.url + "/auth/check", headers=[
            ("x-original-uri", PAGE), ("x-original-method", "GET"),
            ("x-original-host", urlsplit(stack.url).netloc), ("x-member-id", "M1004"),
            ("connection", "x-member-id, x-gateway-identity")])
    assert page.status_code == 200
    [seen] = stack.upstream.requests
    headers: dict[str, list[str]] = {}
    for name, value in seen["headers"]:
        headers.setdefault(name.lower(), []).append(value)
    for name in GATEWAY_SET:
        if name == "x-request-id" and name not in headers:
            continue  # only when the gateway forwards request IDs
        assert name in headers, (name, seen["headers"])
    assert headers["x-member-id"] == ["M1001"]
    assert "x_member_id" not in headers
    assert check.status_code == 200
    assert check.headers.get_list("x-member-id") == ["M1001"]


def test_next_is_quoted_whole_wherever_a_sign_in_is_asked(stack: Stack) -> None:
    """The proxied path, the admin guard and forward-auth build ``next`` one way: a query
    in the target cannot add parameters to the sign-in URL."""
    target = "/_gateway/admin/sessions?subject=x&next=//evil.example"
    quoted = quote(target, safe="")
    with client(stack) as http:
        admin = http.get(stack.url + target)
        page = http.get(stack.url + PAGE + "?a=1&next=//evil.example")
        check = http.get(stack.url + "/auth/check", params={"mode": "redirect"},
                         headers={"x-original-uri": PAGE + "?a=1&next=//evil.example",
                                  "x-original-method": "GET",
                                  "x-original-host": urlsplit(stack.url).netloc})
    assert admin.status_code == 302
    assert admin.headers["location"].endswith(f"?next={quoted}")
    for answer in (page, check):
        assert answer.status_code == 302
        location = answer.headers["location"]
        assert location.endswith("?next=" + quote(PAGE + "?a=1&next=//evil.example", safe=""))
        assert location.count("?") == 1 and "&" not in location
