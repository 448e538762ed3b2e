"""Step-up sign-in over real sockets (issue 16): a rule that needs REFEDS MFA or a recent
authentication sends a member's session through a sign-in that asks the dev IdP for it,
accepts only an answer that carries it, replaces the session (same subject only), and
answers a 403 naming what was missing when the IdP cannot give it: never a loop."""

from __future__ import annotations

import base64
import time
import zlib
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest
from lxml import etree

from gateway.devidp.users import DEMO_CODE
from tests.browser import (
    IdPAnswer,
    client,
    form_action,
    form_fields,
    login,
    post_to_acs,
)
from tests.conftest import Stack
from tests.forge import PAGE, Forge, acs, begin

MFA = "https://refeds.org/profile/mfa"
PPT = "urn:oasis:names:tc:SAML:2.0:ac:classes:PasswordProtectedTransport"
SAMLP = "{urn:oasis:names:tc:SAML:2.0:protocol}"
SAML = "{urn:oasis:names:tc:SAML:2.0:assertion}"
RULES = f"""
[[rules]]
path = "/mfa/**"
access = "member"
require = {{ authn_context = "{MFA}" }}
[[rules]]
path = "/fresh/**"
access = "member"
max_auth_age = 600
"""
pytestmark = pytest.mark.stack(extra_config=RULES)


def authn_request(location: str) -> etree._Element:
    """The AuthnRequest of a redirect to the IdP."""
    query = parse_qs(urlsplit(location).query)
    return etree.fromstring(zlib.decompress(base64.b64decode(query["SAMLRequest"][0]), -15))


def requested_contexts(request: etree._Element) -> tuple[str | None, list[str]]:
    requested = request.find(f"{SAMLP}RequestedAuthnContext")
    if requested is None:
        return None, []
    return requested.get("Comparison"), [
        ref.text or "" for ref in requested.findall(f"{SAML}AuthnContextClassRef")]


def step_up_to_idp(http: httpx.Client, stack: Stack, path: str) -> httpx.Response:
    """A member opens ``path``: the step-up redirect, the sign-in URL, the IdP's redirect."""
    first = http.get(stack.url + path)
    assert first.status_code == 302, first.text
    sign_in = http.get(urljoin(stack.url, first.headers["location"]))
    assert sign_in.status_code == 302, sign_in.text
    assert sign_in.headers["location"].startswith(stack.demo.idp.sso_url)
    return sign_in


def answer_of(page: httpx.Response) -> IdPAnswer:
    """The IdP's auto-post form back to the gateway."""
    fields = form_fields(page.text)
    return IdPAnswer(form_action(page.text), fields["SAMLResponse"], fields["RelayState"])


def continue_with_code(http: httpx.Client, idp_page: httpx.Response,
                       code: str = DEMO_CODE) -> httpx.Response:
    """At the IdP: "continue as" with the IdP session, then the one-time code."""
    fields = form_fields(idp_page.text)
    posted = http.post(urljoin(str(idp_page.url), form_action(idp_page.text)),
                       data={"pending": fields["pending"], "use_session": "1"})
    assert posted.status_code == 200, posted.text
    assert "One-time code" in posted.text
    step = form_fields(posted.text)["step"]
    return http.post(urljoin(str(idp_page.url), form_action(posted.text)),
                     data={"step": step, "code": code})


def step_up_with_code(http: httpx.Client, stack: Stack, path: str) -> httpx.Response:
    """A member with an IdP session opens ``path`` and steps up with the one-time code;
    returns the gateway's answer to the IdP's post."""
    idp_page = http.get(step_up_to_idp(http, stack, path).headers["location"])
    return post_to_acs(http, answer_of(continue_with_code(http, idp_page)))


def test_a_single_factor_session_steps_up_to_mfa_and_keeps_its_place(stack: Stack) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "alice")  # a password: PasswordProtectedTransport
        old_cookie = http.cookies.get("__Host-gw_session")
        first = http.get(stack.url + "/mfa/report?year=2024")
        assert first.status_code == 302
        location = first.headers["location"]
        assert parse_qs(urlsplit(location).query) == {
            "next": ["/mfa/report?year=2024"], "authn_context": [MFA]}
        assert stack.upstream.requests == []  # nothing went up

        to_idp = http.get(urljoin(stack.url, location))
        assert to_idp.status_code == 302
        request = authn_request(to_idp.headers["location"])
        assert requested_contexts(request) == ("exact", [MFA])
        assert request.get("ForceAuthn") is None

        idp_page = http.get(to_idp.headers["location"])
        assert "Continue as Alice Archer" in idp_page.text
        done = post_to_acs(http, answer_of(continue_with_code(http, idp_page)))
        assert done.status_code == 302
        assert done.headers["location"] == "/mfa/report?year=2024"  # the member's place

        page = http.get(stack.url + "/mfa/report?year=2024")
        assert page.status_code == 200
        assert "Upstream page /mfa/report" in page.text
        # The new session replaced the old one, which is over.
        assert stack.session_count() == 1
        assert http.cookies.get("__Host-gw_session") != old_cookie
    with client(stack) as other:
        assert other.get(stack.url + PAGE, headers={
            "cookie": f"__Host-gw_session={old_cookie}",
            "accept": "application/json"}).status_code == 401


def test_an_api_client_gets_a_401_naming_the_step_up(stack: Stack) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        answer = http.get(stack.url + "/mfa/x", headers={"accept": "application/json"})
    assert answer.status_code == 401
    assert "authn_context=https%3A%2F%2Frefeds.org%2Fprofile%2Fmfa" in answer.json()["retry_url"]


def test_a_member_without_a_second_factor_gets_a_403_naming_mfa(stack: Stack) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "dave")
        idp_page = http.get(step_up_to_idp(http, stack, "/mfa/x").headers["location"])
        fields = form_fields(idp_page.text)
        refused = http.post(urljoin(str(idp_page.url), form_action(idp_page.text)),
                            data={"pending": fields["pending"], "use_session": "1"})
        # The dev IdP answers NoAuthnContext; the gateway says what the page needed.
        done = post_to_acs(http, answer_of(refused))
        assert done.status_code == 403
        assert MFA in done.text
        assert "A stronger sign-in is needed" in done.text
        # No loop, no new session: dave's password session is as it was.
        assert stack.session_count() == 1
        assert http.get(stack.url + PAGE).status_code == 200
        assert http.get(stack.url + "/mfa/x").status_code == 302


def test_a_forged_answer_without_the_mfa_context_is_refused(stack: Stack,
                                                             forge: Forge) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        to_idp = step_up_to_idp(http, stack, "/mfa/x")
        rid = authn_request(to_idp.headers["location"]).get("ID")
        relay = parse_qs(urlsplit(to_idp.headers["location"]).query)["RelayState"][0]
        forged = forge.xml(rid, authn_context=PPT)  # signed by the IdP: only the class lacks
        refused = acs(http, stack.url, base64.b64encode(forged.encode()).decode(), relay)
        assert refused.status_code == 403
        assert MFA in refused.text
        assert stack.session_count() == 1
        assert http.get(stack.url + "/mfa/x").status_code == 302  # still not good enough


def test_the_sign_in_url_cannot_lower_what_the_rule_needs(stack: Stack, forge: Forge) -> None:
    with client(stack) as http:
        # Asking for a context no rule names asks the IdP for nothing at all.
        odd = http.get(stack.url + "/saml/login", params={
            "next": "/mfa/x", "authn_context": "urn:evil:weak", "idp": stack.demo.idp.entity_id})
        assert requested_contexts(authn_request(odd.headers["location"])) == (None, [])
        # An anonymous sign-in that did not ask for MFA gives a password session: the
        # rule still sends it through a step-up.
        pending = begin(http, stack.url, stack.demo.idp.entity_id, "/mfa/x")
        signed_in = acs(http, stack.url, base64.b64encode(
            forge.xml(pending.request_id, authn_context=PPT).encode()).decode(),
            pending.relay_state)
        assert signed_in.status_code == 302
        again = http.get(stack.url + "/mfa/x")
        assert again.status_code == 302
        assert "authn_context=" in again.headers["location"]


def test_a_step_up_that_brings_back_someone_else_is_refused(stack: Stack) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        idp_page = http.get(step_up_to_idp(http, stack, "/mfa/x").headers["location"])
        fields = form_fields(idp_page.text)
        password = http.post(urljoin(str(idp_page.url), form_action(idp_page.text)), data={
            "pending": fields["pending"], "username": "carol", "password": "demo"})
        step = form_fields(password.text)["step"]
        coded = http.post(urljoin(str(idp_page.url), form_action(password.text)),
                          data={"step": step, "code": DEMO_CODE})
        done = post_to_acs(http, answer_of(coded))
        assert done.status_code == 400
        assert "__Host-gw_session" not in done.headers.get("set-cookie", "")
        # Alice's session is still hers, and carol got none.
        assert stack.session_count() == 1
        page = http.get(stack.url + PAGE)
        assert page.status_code == 200
        assert "Alice Archer" in page.text


def test_max_auth_age_forces_a_fresh_authentication(stack: Stack, forge: Forge) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "alice")  # a real IdP session for alice
        # Then a session whose authentication is an hour old.
        pending = begin(http, stack.url, stack.demo.idp.entity_id, PAGE)
        old = forge.xml(pending.request_id, authn_instant=time.time() - 3600)
        assert acs(http, stack.url, base64.b64encode(old.encode()).decode(),
                   pending.relay_state).status_code == 302
        assert http.get(stack.url + PAGE).status_code == 200  # no age bound there

        first = http.get(stack.url + "/fresh/x")
        assert first.status_code == 302
        assert parse_qs(urlsplit(first.headers["location"]).query) == {
            "next": ["/fresh/x"], "force": ["1"]}
        to_idp = http.get(urljoin(stack.url, first.headers["location"]))
        assert authn_request(to_idp.headers["location"]).get("ForceAuthn") == "true"
        idp_page = http.get(to_idp.headers["location"])
        assert "Continue as" not in idp_page.text  # the IdP asks for the password again
        fields = form_fields(idp_page.text)
        posted = http.post(urljoin(str(idp_page.url), form_action(idp_page.text)), data={
            "pending": fields["pending"], "username": "alice", "password": "demo"})
        done = post_to_acs(http, answer_of(posted))
        assert (done.status_code, done.headers["location"]) == (302, "/fresh/x")
        assert http.get(stack.url + "/fresh/x").status_code == 200


def test_an_idp_that_ignores_force_authn_gets_a_403_not_a_loop(stack: Stack,
                                                                forge: Forge) -> None:
    with client(stack) as http:
        pending = begin(http, stack.url, stack.demo.idp.entity_id, PAGE)
        assert acs(http, stack.url, base64.b64encode(forge.xml(
            pending.request_id, authn_instant=time.time() - 3600).encode()).decode(),
            pending.relay_state).status_code == 302
        to_idp = step_up_to_idp(http, stack, "/fresh/x")
        rid = authn_request(to_idp.headers["location"]).get("ID")
        relay = parse_qs(urlsplit(to_idp.headers["location"]).query)["RelayState"][0]
        stale = forge.xml(rid, authn_instant=time.time() - 3600)  # the old authentication
        refused = acs(http, stack.url, base64.b64encode(stale.encode()).decode(), relay)
        assert refused.status_code == 403
        assert "fresh sign-in" in refused.text
        assert stack.session_count() == 1


def test_forward_auth_answers_a_step_up_like_a_sign_in(stack: Stack) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        headers = [("X-Original-Method", "GET"), ("X-Original-URI", "/mfa/x?a=1"),
                   ("X-Original-Host", urlsplit(stack.url).netloc)]
        json_401 = http.get(stack.url + "/auth/check", headers=headers)
        redirect = http.get(stack.url + "/auth/check", params={"mode": "redirect"},
                            headers=headers)
    assert json_401.status_code == 401
    location = json_401.headers["location"]
    assert location.startswith(stack.url + "/saml/login?next=%2Fmfa%2Fx%3Fa%3D1")
    assert parse_qs(urlsplit(location).query)["authn_context"] == [MFA]
    assert (redirect.status_code, redirect.headers["location"]) == (302, location)


def _admin_needs_mfa(demo: object) -> None:
    """The demo's admin rule, with REFEDS MFA required (the worked example of the docs)."""
    path = demo.workdir / "gateway.toml"  # type: ignore[attr-defined]
    text = path.read_text()
    old = 'path = "/_gateway/admin/**"\naccess = "member"\nrequire = { entitlement = "'
    assert old in text
    path.write_text(text.replace(old, old.replace("require = { ",
                                                  f'require = {{ authn_context = "{MFA}", ')))


@pytest.mark.stack(setup=_admin_needs_mfa)
def test_the_admin_console_can_require_mfa(stack: Stack) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "carol")  # the demo's admin, with a password only
        first = http.get(stack.url + "/_gateway/admin")
        assert first.status_code == 302
        assert parse_qs(urlsplit(first.headers["location"]).query) == {
            "next": ["/_gateway/admin"], "authn_context": [MFA]}
        to_idp = http.get(urljoin(stack.url, first.headers["location"]))
        idp_page = http.get(to_idp.headers["location"])
        done = post_to_acs(http, answer_of(continue_with_code(http, idp_page)))
        assert (done.status_code, done.headers["location"]) == (302, "/_gateway/admin")
        console = http.get(stack.url + "/_gateway/admin")
        assert console.status_code == 200
        assert "<h1>Admin console</h1>" in console.text


def test_a_form_posted_before_the_step_up_is_sent_after_it(stack: Stack) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        posted = http.post(stack.url + "/mfa/settings", data={"limit": "42"},
                           headers={"origin": stack.url})
        assert posted.status_code == 303
        assert stack.upstream.requests == []
        location = posted.headers["location"]
        query = parse_qs(urlsplit(location).query)
        stash_path = query["next"][0]
        assert stash_path.startswith("/_gateway/replay/")
        assert query["authn_context"] == [MFA]
        to_idp = http.get(urljoin(stack.url, location))
        idp_page = http.get(to_idp.headers["location"])
        done = post_to_acs(http, answer_of(continue_with_code(http, idp_page)))
        assert done.headers["location"] == stash_path
        replay = http.get(stack.url + stash_path)
        assert replay.status_code == 200
        fields = form_fields(replay.text)
        sent = http.post(urljoin(stack.url, form_action(replay.text)), data=fields,
                         headers={"origin": stack.url})
        assert sent.status_code == 200
    posts = [r for r in stack.upstream.requests if r["method"] == "POST"]
    assert [(p["path"], p["body"]) for p in posts] == [("/mfa/settings", b"limit=42")]
