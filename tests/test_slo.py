"""Single Logout end to end over real sockets: gateway ⇄ dev IdP, both bindings, hostile input.

Redirects are followed by hand so every hop is visible: gateway → IdP ``/slo`` → gateway
``/saml/sls`` (SP-initiated), IdP ``/slo/initiate`` → gateway ``/saml/sls`` → IdP ``/slo``
(IdP-initiated).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import ExitStack
from urllib.parse import urlsplit

import httpx
import pytest
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C
from onelogin.saml2.utils import OneLogin_Saml2_Utils

from gateway.devidp.logout import (
    build_logout_request,
    build_logout_response,
    redirect_query,
    sign_enveloped,
)
from gateway.devidp.users import NAMEID_PERSISTENT, persistent_name_id
from gateway.keys import generate_self_signed
from tests.browser import client, form_action, form_fields, login
from tests.conftest import Stack

PAGE = "/issues/2023-03/pages/14"
SESSION = "__Host-gw_session"


@pytest.fixture(scope="module")
def other_key() -> tuple[str, str]:
    return generate_self_signed("not the IdP")


@pytest.fixture
def browsers(stack: Stack) -> Iterator[ExitStack]:
    with ExitStack() as stack_of_clients:
        yield stack_of_clients


def signed_in(stack: Stack, clients: ExitStack, username: str) -> httpx.Client:
    http = clients.enter_context(client(stack))
    login(http, stack, PAGE, username)
    return http


def is_anonymous(http: httpx.Client, stack: Stack) -> bool:
    page = http.get(stack.url + PAGE)
    return page.status_code == 302 and page.headers["location"].startswith("/saml/login")


def sls(stack: Stack) -> str:
    return stack.url + "/saml/sls"


def logout_request(stack: Stack, username: str = "alice", **override: object) -> str:
    idp = stack.demo.idp
    fields: dict[str, object] = {
        "issuer": idp.entity_id, "destination": sls(stack),
        "name_id": persistent_name_id(idp.entity_id, username),
        "name_id_format": NAMEID_PERSISTENT, "now": time.time(),
    }
    fields.update(override)
    return build_logout_request(**fields)  # type: ignore[arg-type]


def redirect(stack: Stack, kind: str, xml: str, key: str | None = "idp", **kw: str) -> str:
    key_pem = stack.demo.idp.key_pem if key == "idp" else key
    return f"{sls(stack)}?{redirect_query(kind, xml, key_pem=key_pem, **kw)}"


def sign_out_at_gateway(http: httpx.Client, stack: Stack) -> httpx.Response:
    confirm = http.get(stack.url + "/saml/logout")
    # The form's POST is redirected to the IdP: CSP form-action must allow that origin.
    idp_origin = stack.demo.idp.base_url
    assert f"form-action 'self' {idp_origin};" in confirm.headers["content-security-policy"]
    token = re.search(r'name="csrf" value="([^"]+)"', confirm.text)
    assert token is not None, confirm.text
    return http.post(stack.url + "/saml/logout", data={"csrf": token.group(1)},
                     headers={"origin": stack.url})


# -- SP-initiated --------------------------------------------------------------------------


def test_sp_initiated_logout_ends_gateway_and_idp_sessions(stack: Stack,
                                                           browsers: ExitStack) -> None:
    alice = signed_in(stack, browsers, "alice")
    bob = signed_in(stack, browsers, "bob")
    assert alice.cookies.get("devidp_session") and stack.session_count() == 2

    to_idp = sign_out_at_gateway(alice, stack)
    assert to_idp.status_code == 302 and stack.session_count() == 1  # ended before the IdP
    assert to_idp.headers["location"].startswith(stack.demo.idp.slo_url + "?SAMLRequest=")
    assert "Signature=" in to_idp.headers["location"]
    assert alice.cookies.get(SESSION) is None  # cookie cleared

    back = alice.get(to_idp.headers["location"])  # the IdP verifies and answers
    assert back.status_code == 302, back.text
    assert back.headers["location"].startswith(sls(stack) + "?SAMLResponse=")
    assert alice.cookies.get("devidp_session") is None  # the IdP session is over

    done = alice.get(back.headers["location"])
    assert done.status_code == 200 and "You are signed out" in done.text
    assert is_anonymous(alice, stack) and not is_anonymous(bob, stack)
    idp_page = alice.get(alice.get(stack.url + "/saml/login?idp=" + stack.demo.idp.entity_id)
                         .headers["location"])
    assert "Already signed in" not in idp_page.text  # the IdP asks for the password again

    # The same LogoutResponse again: refused with a reference, nothing else changes.
    replay = alice.get(back.headers["location"])
    assert replay.status_code == 400 and "reference" in replay.text
    assert stack.session_count() == 1 and not is_anonymous(bob, stack)


def test_forged_logout_response_is_refused(stack: Stack, browsers: ExitStack,
                                           other_key: tuple[str, str]) -> None:
    bob = signed_in(stack, browsers, "bob")
    idp = stack.demo.idp

    def response(**override: object) -> str:
        fields: dict[str, object] = {"issuer": idp.entity_id, "destination": sls(stack),
                                     "in_response_to": "_never-sent", "now": time.time()}
        fields.update(override)
        return build_logout_response(**fields)  # type: ignore[arg-type]

    for url in (
        redirect(stack, "SAMLResponse", response()),  # answers nothing we sent
        redirect(stack, "SAMLResponse", response(in_response_to=None)),
        redirect(stack, "SAMLResponse", response(), key=None),
        redirect(stack, "SAMLResponse", response(), key=other_key[0]),
    ):
        answer = bob.get(url)
        assert answer.status_code == 400 and "Sign-out not confirmed" in answer.text, url
    assert stack.session_count() == 1 and not is_anonymous(bob, stack)


# -- IdP-initiated -------------------------------------------------------------------------


@pytest.mark.parametrize("binding", ["redirect", "post"])
def test_idp_initiated_logout_ends_every_session_of_the_member(
        stack: Stack, browsers: ExitStack, binding: str) -> None:
    first, second = signed_in(stack, browsers, "alice"), signed_in(stack, browsers, "alice")
    bob = signed_in(stack, browsers, "bob")
    assert stack.session_count() == 3
    # The browser the IdP talks through: one of alice's, or another one.
    front = first if binding == "redirect" else browsers.enter_context(client(stack))

    started = front.post(stack.demo.idp.slo_url + "/initiate",
                         data={"username": "alice", "binding": binding})
    if binding == "redirect":
        assert started.status_code == 302
        at_sp = front.get(started.headers["location"])
    else:
        assert started.status_code == 200 and "DEVELOPMENT ONLY" in started.text
        fields = form_fields(started.text)
        assert form_action(started.text) == sls(stack) and "SAMLRequest" in fields
        at_sp = front.post(sls(stack), data=fields)
    assert at_sp.status_code == 302, at_sp.text
    answer = at_sp.headers["location"]
    assert answer.startswith(stack.demo.idp.slo_url + "?SAMLResponse=")
    assert "Signature=" in answer and stack.session_count() == 1
    if front is first:
        assert first.cookies.get(SESSION) is None  # the carrying browser's cookie is cleared

    confirmed = front.get(answer)  # the IdP verifies the gateway's signed LogoutResponse
    assert confirmed.status_code == 200 and "confirmed that alice is signed out" in confirmed.text
    assert is_anonymous(first, stack) and is_anonymous(second, stack)
    assert not is_anonymous(bob, stack)


# -- hostile LogoutRequests ----------------------------------------------------------------


def test_hostile_logout_requests_are_refused_and_end_nothing(
        stack: Stack, browsers: ExitStack, other_key: tuple[str, str]) -> None:
    alice = signed_in(stack, browsers, "alice")
    attacker = browsers.enter_context(client(stack))
    idp = stack.demo.idp
    key, cert = other_key
    good = logout_request(stack)
    stale = time.time() - 3600

    def post(xml: str) -> httpx.Response:
        return attacker.post(sls(stack), data={"SAMLRequest": OneLogin_Saml2_Utils.b64encode(xml)})

    cases = {
        "unsigned redirect": lambda: attacker.get(redirect(stack, "SAMLRequest", good, key=None)),
        "unsigned post": lambda: post(good),
        "other key, redirect": lambda: attacker.get(
            redirect(stack, "SAMLRequest", good, key=key)),
        "other key with its cert in KeyInfo, post": lambda: post(sign_enveloped(good, key, cert)),
        "SHA-1": lambda: attacker.get(redirect(stack, "SAMLRequest", good, sig_alg=C.RSA_SHA1)),
        "unknown issuer": lambda: attacker.get(redirect(
            stack, "SAMLRequest", logout_request(stack, issuer="https://evil.example/idp"))),
        "issued long ago": lambda: attacker.get(redirect(
            stack, "SAMLRequest", logout_request(stack, now=stale, lifetime=7200))),
        "past NotOnOrAfter": lambda: attacker.get(redirect(
            stack, "SAMLRequest", logout_request(stack, now=time.time() - 100, lifetime=60))),
        "no Destination": lambda: attacker.get(redirect(
            stack, "SAMLRequest", logout_request(stack, destination=None))),
        "elsewhere": lambda: attacker.get(redirect(
            stack, "SAMLRequest", logout_request(stack, destination=sls(stack) + "x"))),
        "tampered after signing": lambda: post(sign_enveloped(good, idp.key_pem, idp.cert_pem)
                                               .replace("<saml:NameID", "<saml:NameID x=\"1\"")),
        "DOCTYPE": lambda: post(sign_enveloped(good, idp.key_pem, idp.cert_pem)
                                .replace("<samlp:", "<!DOCTYPE x [<!ENTITY a 'b'>]><samlp:", 1)),
        "not base64": lambda: attacker.post(sls(stack), data={"SAMLRequest": "%%%"}),
        "too large": lambda: attacker.post(sls(stack), data={"SAMLRequest": "A" * 200_000}),
        "encoded parameter name": lambda: attacker.get(
            redirect(stack, "SAMLRequest", good).replace("?SAMLRequest=", "?SAML%52equest=")),
        "both kinds": lambda: attacker.get(
            redirect(stack, "SAMLRequest", good) + "&SAMLResponse=x"),
    }
    for name, send in cases.items():
        answer = send()
        assert answer.status_code == 400, (name, answer.status_code, answer.text[:300])
        assert "reference" in answer.text, name
        assert stack.session_count() == 1, name
    assert not is_anonymous(alice, stack)

    # Correctly signed, but for another NameID: answered, and nothing of alice's ends.
    other = attacker.get(redirect(stack, "SAMLRequest", logout_request(stack, "bob")))
    assert other.status_code == 302 and stack.session_count() == 1
    # For alice but another SessionIndex: answered, and her session survives.
    elsewhere = attacker.get(redirect(stack, "SAMLRequest", logout_request(
        stack, session_indexes=("_not-her-login",))))
    assert elsewhere.status_code == 302 and not is_anonymous(alice, stack)

    # The real thing works once; the same request again is refused as a replay.
    url = redirect(stack, "SAMLRequest", good)
    assert attacker.get(url).status_code == 302 and stack.session_count() == 0
    alice_again = signed_in(stack, browsers, "alice")
    replayed = attacker.get(url)
    assert replayed.status_code == 400 and not is_anonymous(alice_again, stack)


def test_redirect_signature_is_checked_on_the_query_as_sent(stack: Stack,
                                                            browsers: ExitStack) -> None:
    """An IdP that percent-encodes in lower case (ADFS) signs those octets; they verify."""
    alice = signed_in(stack, browsers, "alice")
    query = redirect_query("SAMLRequest", logout_request(stack), key_pem=None,
                           relay_state="/x y:z")
    lower = re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), query)
    lower += "&SigAlg=" + OneLogin_Saml2_Utils.escape_url(C.RSA_SHA256, True)
    signature = OneLogin_Saml2_Utils.sign_binary(lower, stack.demo.idp.key_pem)
    lower += "&Signature=" + OneLogin_Saml2_Utils.escape_url(
        OneLogin_Saml2_Utils.b64encode(signature), True)
    assert "%2f" in lower
    upper = lower.replace("%2f", "%2F")  # the same values, other octets: no longer signed
    refused = alice.get(f"{sls(stack)}?{upper}")
    assert refused.status_code == 400 and not is_anonymous(alice, stack)
    answered = alice.get(f"{sls(stack)}?{lower}")
    assert answered.status_code == 302 and is_anonymous(alice, stack)
    assert "RelayState=%2Fx+y%3Az" in urlsplit(answered.headers["location"]).query
