"""Hostile calls to ``/auth/check`` over real sockets (issue 14, items 1 and 6).

The gateway reads the original method, URI and host only from the headers the configured
front proxy sets (``[forward_auth]``); anything missing, repeated, conflicting or
malformed is refused with a 403 and a reason, and a token is only ever minted for the
upstream that serves the path the policy just allowed. The nginx-fronted versions of
these attacks are in ``tests/test_forward_auth_nginx.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from gateway.config import load_settings
from gateway.errors import ConfigError
from gateway.identity import InvalidToken, verify_token
from tests.browser import client, login
from tests.conftest import Stack

MEMBER = "urn:mace:example.org:entitlement:member"
PAGE = "/issues/2023-03/pages/14"
BILLING = f"""
[[upstreams]]
name = "billing"
prefix = "/billing"
url = "http://127.0.0.1:9"
[[rules]]
path = "/billing/**"
access = "member"
require = {{ entitlement = "{MEMBER}", status = "active" }}
"""

pytestmark = pytest.mark.stack(shared=True, extra_config=BILLING)


def original(stack: Stack, uri: str, method: str = "GET") -> list[tuple[str, str]]:
    """The three headers nginx's ``auth_request`` convention (the default) sets."""
    return [("X-Original-Method", method), ("X-Original-URI", uri),
            ("X-Original-Host", urlsplit(stack.url).netloc)]


def check(stack: Stack, headers: list[tuple[str, str]], *, cookie: str = "",
          params: list[tuple[str, str]] | None = None) -> httpx.Response:
    with client(stack) as http:
        if cookie:
            http.cookies.set("__Host-gw_session", cookie)
        return http.get(stack.url + "/auth/check", params=params or [], headers=headers)


def session_of(stack: Stack, username: str) -> str:
    with client(stack) as http:
        login(http, stack, PAGE, username)
        return http.cookies["__Host-gw_session"]


def audiences(stack: Stack, answer: httpx.Response) -> list[str]:
    """The audience of every identity token in an answer (verified against the JWKS)."""
    jwks = httpx.get(stack.url + "/.well-known/jwks.json",
                     verify=stack.tls.client_context()).json()
    out = []
    for token in answer.headers.get_list("x-gateway-identity"):
        for audience in ("reader", "billing"):
            try:
                verify_token(token, jwks, audience, issuer=stack.url)
            except InvalidToken:  # another audience
                continue
            out.append(audience)
    return out


# -- item 6: no token for an upstream whose rule did not just allow this request --------------

def test_lapsed_member_gets_no_token_for_another_upstream(stack: Stack) -> None:
    """bob (lapsed) names a public path and asks for a billing token: refused, no token."""
    bob = session_of(stack, "bob")
    forged = check(stack, original(stack, "/public/about"), cookie=bob,
                   params=[("upstream", "billing")])
    assert forged.status_code == 403
    assert forged.json()["reason"] == \
        "upstream 'billing' does not serve /public/about (its upstream is 'reader')"
    assert "x-gateway-identity" not in forged.headers and "x-member-id" not in forged.headers
    honest = check(stack, original(stack, "/billing/invoices"), cookie=bob,
                   params=[("upstream", "billing")])
    assert honest.status_code == 403 and "x-gateway-identity" not in honest.headers
    # Without the parameter the upstream comes from the path: a public page, a reader token.
    public = check(stack, original(stack, "/public/about"), cookie=bob)
    assert public.status_code == 200
    assert audiences(stack, public) == ["reader"]


def test_member_token_audience_is_the_upstream_of_the_checked_path(stack: Stack) -> None:
    alice = session_of(stack, "alice")
    billing = check(stack, original(stack, "/billing/invoices"), cookie=alice)
    named = check(stack, original(stack, "/billing/invoices"), cookie=alice,
                  params=[("upstream", "billing")])
    page = check(stack, original(stack, PAGE), cookie=alice)
    assert (billing.status_code, named.status_code, page.status_code) == (200, 200, 200)
    assert audiences(stack, billing) == audiences(stack, named) == ["billing"]
    assert audiences(stack, page) == ["reader"]
    for params in ([("upstream", "billing")],
                   [("upstream", "reader"), ("upstream", "billing")]):
        refused = check(stack, original(stack, PAGE), cookie=alice, params=params)
        assert refused.status_code == 403, params
        assert "x-gateway-identity" not in refused.headers


# -- item 1: what the front proxy says, and only that -----------------------------------------

def test_missing_headers_are_refused_not_guessed(stack: Stack) -> None:
    """Before, a missing URI header meant "/" (public): every gated path passed."""
    full = original(stack, PAGE)
    for dropped in range(3):
        headers = [h for i, h in enumerate(full) if i != dropped]
        answer = check(stack, headers)
        assert answer.status_code == 403, full[dropped]
        assert answer.json()["reason"].startswith(f"no {full[dropped][0]} header"), answer.json()


def test_repeated_or_respelled_headers_are_refused(stack: Stack, caplog: pytest.LogCaptureFixture
                                                   ) -> None:
    caplog.set_level(logging.INFO, "gateway.forward_auth")
    base = original(stack, PAGE)
    cases = {
        "two URIs": [*base, ("X-Original-URI", "/public/about")],
        "underscore URI": [*base, ("X_Original_URI", "/public/about")],
        "two methods": [*base, ("X-Original-Method", "POST")],
        "conflicting method": [*base, ("X-Forwarded-Method", "POST")],
        "conflicting URI": [*base, ("X-Forwarded-Uri", "/public/about")],
        "conflicting URL": [*base, ("X-Original-URL", "/public/about")],
    }
    alice = session_of(stack, "alice")
    for name, headers in cases.items():
        answer = check(stack, headers, cookie=alice)
        assert answer.status_code == 403, name
        assert "x-gateway-identity" not in answer.headers, name
        assert answer.headers["x-auth-reason"] == answer.json()["reason"], name
    reasons = [r.getMessage() for r in caplog.records if "forward-auth denied" in r.getMessage()]
    assert any("X-Forwarded-Uri" in r and "conflicts" in r for r in reasons), reasons
    # A copy that agrees is harmless (a proxy chain may set both).
    agreeing = check(stack, [*base, ("X-Forwarded-Uri", PAGE)], cookie=alice)
    assert agreeing.status_code == 200


def test_malformed_values_are_refused(stack: Stack) -> None:
    host = urlsplit(stack.url).netloc
    cases = {
        "method": [("X-Original-Method", "GET /x"), ("X-Original-URI", PAGE),
                   ("X-Original-Host", host)],
        "absolute URI": [("X-Original-Method", "GET"),
                         ("X-Original-URI", "https://evil.example/public/x"),
                         ("X-Original-Host", host)],
        "other host": [("X-Original-Method", "GET"), ("X-Original-URI", "/public/x"),
                       ("X-Original-Host", "evil.example")],
        "raw query bytes": [("X-Original-Method", "GET"), ("X-Original-URI", "/public/x?a b"),
                            ("X-Original-Host", host)],
    }
    for name, headers in cases.items():
        answer = check(stack, headers)
        assert answer.status_code == 403, (name, answer.text)


def test_cross_site_unsafe_methods_are_refused_on_gated_paths(stack: Stack) -> None:
    alice = session_of(stack, "alice")
    for method in ("POST", "PUT", "PATCH", "DELETE", "PROPPATCH"):
        evil = check(stack, [*original(stack, PAGE, method),
                             ("Origin", "https://blog.example.org")], cookie=alice)
        site = check(stack, [*original(stack, PAGE, method), ("Sec-Fetch-Site", "cross-site")],
                     cookie=alice)
        own = check(stack, [*original(stack, PAGE, method), ("Origin", stack.url)],
                    cookie=alice)
        assert (evil.status_code, site.status_code, own.status_code) == (403, 403, 200), method
        assert evil.json()["reason"] == f"cross-site {method} refused"
    # A cross-site GET is a link: allowed, as on the proxy path.
    linked = check(stack, [*original(stack, PAGE), ("Sec-Fetch-Site", "cross-site")],
                   cookie=alice)
    assert linked.status_code == 200


@pytest.mark.stack(shared=False, extra_config="""
[forward_auth]
front_proxy = "headers"
method_header = "X-Auth-Method"
uri_header = "X-Auth-Path"
host_header = ""
""")
def test_explicit_header_names(stack: Stack) -> None:
    """``front_proxy = "headers"``: the configured names and nothing else decide; every
    spelling of the well-known conventions conflicts."""
    answer = check(stack, [("X-Auth-Method", "GET"), ("X-Auth-Path", PAGE)])
    assert answer.status_code == 401
    forged = check(stack, [("X-Auth-Method", "GET"), ("X-Auth-Path", PAGE),
                           ("X-Original-URI", "/public/about")])
    assert forged.status_code == 401  # a sign-in grants nothing: still asked to sign in
    public = check(stack, [("X-Auth-Method", "GET"), ("X-Auth-Path", "/public/about"),
                           ("X-Original-URI", PAGE)])
    assert public.status_code == 403
    assert public.json()["reason"] == \
        "X-Original-URI conflicts with X-Auth-Path (the front proxy sets X-Auth-Path)"
    old_style = check(stack, original(stack, "/public/about"))
    assert old_style.status_code == 403


def test_settings_check_the_section(tmp_path: Path, stack: Stack) -> None:
    source = stack.demo.workdir / "gateway.toml"
    base = source.read_text()
    toml = tmp_path / "gateway.toml"
    bad = {
        'front_proxy = "haproxy"': "forward_auth.front_proxy",
        'front_proxy = "headers"': "forward_auth: front_proxy \"headers\" needs",
        'front_proxy = "nginx"\nuri_header = "X-Uri"': "only with front_proxy = \"headers\"",
        'shared_secret = "short-secret-value"': "forward_auth.shared_secret ('**********')",
        'front_proxy = "headers"\nmethod_header = "X-M"\nuri_header = "X M"':
            "not a valid header name",
    }
    for name in ("certs", "idp_metadata", "session-secrets"):  # the demo's files, here
        (tmp_path / name).symlink_to(stack.demo.workdir / name)
    for section, expected in bad.items():
        toml.write_text(base.replace("[store]", f"[forward_auth]\n{section}\n\n[store]"))
        with pytest.raises(ConfigError) as err:
            load_settings(toml, environ={})
        text = str(err.value)
        assert expected in text, (section, text)
        assert "short-secret-value" not in text
    secret = "s" * 48
    toml.write_text(base)
    settings = load_settings(toml, environ={"GATEWAY_FORWARD_AUTH__SHARED_SECRET": secret})
    assert settings.forward_auth.shared_secret is not None
    assert secret not in repr(settings) and secret not in settings.model_dump_json()
