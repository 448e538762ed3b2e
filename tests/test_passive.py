"""Passive sign-in over real sockets (issue 16): an anonymous visitor of a ``passive``
public page is sent once to the dev IdP with IsPassive. Known there, they come back
signed in; unknown, they come back to the page anonymous, with no prompt and no error
page; a marker cookie stops the next try, and only a browser's own page load is sent."""

from __future__ import annotations

import base64
import zlib
from urllib.parse import parse_qs, quote, urljoin, urlsplit

import httpx
import pytest
from lxml import etree

from gateway.demo.stack import DemoStack
from gateway.devidp import DevIdPSettings
from gateway.devidp.metadata import idp_metadata
from gateway.keys import generate_self_signed
from tests.browser import client, form_action, form_fields, login
from tests.conftest import Stack
from tests.forge import PAGE

RULES = """
[[rules]]
path = "/welcome"
access = "public"
passive = true
"""
pytestmark = pytest.mark.stack(extra_config=RULES)
BROWSER = {"sec-fetch-mode": "navigate", "accept": "text/html,*/*;q=0.8",
           "user-agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0"}
SESSION = "__Host-gw_session"
MARKER = "__Secure-gw_passive"


def through_the_idp(http: httpx.Client, stack: Stack) -> httpx.Response:
    """A browser opens /welcome and follows every redirect and auto-post form back to the
    gateway's answer; the IdP must never show a page that asks for anything."""
    first = http.get(stack.url + "/welcome", headers=BROWSER)
    assert first.status_code == 302, first.text
    assert first.headers["location"] == "/saml/login?next=%2Fwelcome&passive=1"
    assert MARKER in first.headers["set-cookie"]
    to_idp = http.get(urljoin(stack.url, first.headers["location"]), headers=BROWSER)
    assert to_idp.status_code == 302
    query = parse_qs(urlsplit(to_idp.headers["location"]).query)
    request = etree.fromstring(zlib.decompress(base64.b64decode(query["SAMLRequest"][0]), -15))
    assert request.get("IsPassive") == "true"
    at_idp = http.get(to_idp.headers["location"], headers=BROWSER)
    assert at_idp.status_code == 200
    assert 'name="password"' not in at_idp.text  # no prompt
    fields = form_fields(at_idp.text)
    assert set(fields) == {"SAMLResponse", "RelayState"}  # only the auto-post form
    return http.post(form_action(at_idp.text), data=fields)


def test_unknown_at_the_idp_comes_back_anonymous_without_a_prompt(stack: Stack) -> None:
    with client(stack) as http:
        back = through_the_idp(http, stack)
        assert back.status_code == 302
        assert back.headers["location"] == "/welcome"
        assert SESSION not in back.headers.get("set-cookie", "")
        assert stack.session_count() == 0
        page = http.get(stack.url + "/welcome", headers=BROWSER)  # the marker: no retry
        assert page.status_code == 200
        assert "Upstream page /welcome" in page.text
        assert http.get(stack.url + "/welcome", headers=BROWSER).status_code == 200


def test_known_at_the_idp_comes_back_signed_in(stack: Stack) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "alice")  # an IdP session, and a gateway session
        http.cookies.delete(SESSION)  # the gateway session is gone, the IdP's is not
        back = through_the_idp(http, stack)
        assert (back.status_code, back.headers["location"]) == (302, "/welcome")
        assert SESSION in back.headers["set-cookie"]
        page = http.get(stack.url + "/welcome", headers=BROWSER)
        assert page.status_code == 200
        assert "Alice Archer" in page.text  # the upstream saw the member


@pytest.mark.parametrize("headers", [
    {"accept": "text/html"},  # no Sec-Fetch-Mode: maybe not a browser
    {**BROWSER, "sec-fetch-mode": "no-cors"},  # an image, a script
    {**BROWSER, "accept": "application/json"},
    {**BROWSER, "user-agent": "Mozilla/5.0 (compatible; bingbot/2.0)"},
    {**BROWSER, "sec-purpose": "prefetch"},
])
def test_only_a_browsers_page_load_is_sent(stack: Stack, headers: dict[str, str]) -> None:
    with client(stack) as http:
        page = http.get(stack.url + "/welcome", headers=headers)
        assert page.status_code == 200
        assert MARKER not in page.headers.get("set-cookie", "")
        assert http.head(stack.url + "/welcome", headers=BROWSER).status_code == 200


def test_a_signed_in_member_is_not_sent_and_the_login_url_never_shows_a_page(
        stack: Stack) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        assert http.get(stack.url + "/welcome", headers=BROWSER).status_code == 200
        # Followed by hand with a session, a passive sign-in goes straight back.
        back = http.get(stack.url + "/saml/login?next=%2Fwelcome&passive=1")
        assert (back.status_code, back.headers["location"]) == (302, "/welcome")


def _second_idp(demo: DemoStack) -> None:
    """A second IdP in the metadata directory (never contacted in this test)."""
    key, cert = generate_self_signed("second dev IdP")
    other = DevIdPSettings(base_url="http://127.0.0.1:9", key_pem=key, cert_pem=cert,
                           sp_entity_id=demo.settings.sp_entity_id,
                           sp_acs_url=demo.settings.public_url + "/saml/acs",
                           require_signed_requests=False)
    (demo.workdir / "idp_metadata" / "second.xml").write_text(idp_metadata(other))


@pytest.mark.stack(extra_config=RULES, setup=_second_idp)
def test_with_several_idps_only_the_remembered_one_is_tried(stack: Stack) -> None:
    with client(stack) as http:
        first = http.get(stack.url + "/welcome", headers=BROWSER)
        assert first.status_code == 302
        # No remembered choice: no IdP is guessed, the visitor is back on the page.
        back = http.get(urljoin(stack.url, first.headers["location"]), headers=BROWSER)
        assert (back.status_code, back.headers["location"]) == (302, "/welcome")
        assert http.get(stack.url + "/welcome", headers=BROWSER).status_code == 200
    with client(stack) as http:
        http.cookies.set("__Secure-gw_idp", quote(stack.demo.idp.entity_id, safe=""),
                         domain="127.0.0.1", path="/saml/")
        first = http.get(stack.url + "/welcome", headers=BROWSER)
        to_idp = http.get(urljoin(stack.url, first.headers["location"]), headers=BROWSER)
        assert to_idp.headers["location"].startswith(stack.demo.idp.sso_url)
