"""Drive a login the way a browser does, with httpx, over real sockets.

Every step is a real HTTP exchange: the gateway redirects to the dev IdP with a
signed AuthnRequest, the IdP's login form is posted, and the IdP's auto-post
form is submitted to the gateway's ACS.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx

from tests.conftest import Stack

_INPUT = re.compile(r'<input[^>]*name="([^"]+)"[^>]*value="([^"]*)"', re.S)
_FORM = re.compile(r'<form[^>]*action="([^"]+)"', re.S)


def form_fields(page: str) -> dict[str, str]:
    return {name: html.unescape(value) for name, value in _INPUT.findall(page)}


def form_action(page: str) -> str:
    match = _FORM.search(page)
    assert match, "no form on the page"
    return html.unescape(match.group(1))


def client(stack: Stack) -> httpx.Client:
    return httpx.Client(verify=stack.tls.client_context(), timeout=20)


@dataclass
class IdPAnswer:
    """The IdP's auto-post form: where it posts and what."""

    acs: str
    saml_response: str
    relay_state: str


_IDP_LINK = re.compile(r'href="(/saml/login\?idp=[^"]+)"')


def start_login(http: httpx.Client, stack: Stack, path: str) -> httpx.Response:
    """Request a gated page anonymously and follow the gateway to the IdP's login page.

    The gateway's sign-in page lists the IdPs; like a member, pick the dev IdP's link.
    """
    first = http.get(stack.url + path)
    assert first.status_code == 302, first.text
    return follow_sign_in(http, stack, first.headers["location"])


def follow_sign_in(http: httpx.Client, stack: Stack, sign_in_url: str) -> httpx.Response:
    """From the gateway's sign-in page, choose the dev IdP; returns the IdP's login page."""
    sign_in = http.get(urljoin(stack.url, sign_in_url))
    assert sign_in.status_code == 200, sign_in.text
    links = [html.unescape(href) for href in _IDP_LINK.findall(sign_in.text)]
    chosen = next(href for href in links
                  if parse_qs(urlsplit(href).query)["idp"] == [stack.demo.idp.entity_id])
    login = http.get(urljoin(stack.url, chosen))
    assert login.status_code == 302, login.text
    idp_page = http.get(login.headers["location"])
    assert idp_page.status_code == 200, idp_page.text
    return idp_page


def sign_in_at_idp(http: httpx.Client, idp_page: httpx.Response, username: str) -> IdPAnswer:
    fields = form_fields(idp_page.text)
    fields.update(username=username, password="demo")
    posted = http.post(urljoin(str(idp_page.url), form_action(idp_page.text)),
                       data={k: v for k, v in fields.items() if k != "use_session"})
    assert posted.status_code == 200, posted.text
    answer = form_fields(posted.text)
    return IdPAnswer(form_action(posted.text), answer["SAMLResponse"], answer["RelayState"])


def post_to_acs(http: httpx.Client, answer: IdPAnswer, **overrides: str) -> httpx.Response:
    data = {"SAMLResponse": answer.saml_response, "RelayState": answer.relay_state}
    data.update(overrides)
    return http.post(answer.acs, data=data)


def login(http: httpx.Client, stack: Stack, path: str, username: str) -> httpx.Response:
    """The whole login; returns the ACS answer (a redirect back to ``path``)."""
    answer = sign_in_at_idp(http, start_login(http, stack, path), username)
    done = post_to_acs(http, answer)
    assert done.status_code == 302, done.text
    return done
