"""The edge mode behind a real nginx: ``sso-gateway nginx-config --full`` writes nginx's
configuration, nginx carries the bytes and asks the gateway (answers cached per Cookie
header, method, host and URI for one second), the gateway answers everything else.

The attacks of the proxy path run against it too: spoofed identity headers and the header
families of other auth proxies, forged forward-auth headers, ambiguous paths, the
gateway's own cookies, a revoked session served from nginx's cache (gone within the
one-second bound).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from starlette.types import Receive, Scope, Send

from gateway.cli import main
from gateway.demo.stack import DemoStack
from gateway.identity import verify_token
from gateway.logs import JsonFormatter
from gateway.nginx_config import COOKIE_PASSES, EdgeConfigError, EdgeOptions, nginx_config
from tests.browser import login
from tests.conftest import (
    Stack,
    TLSFiles,
    bound_socket,
    nginx_process,
    port_of,
    run_stack,
    serving,
)
from tests.test_audit import all_log_records

PAGE = "/issues/2023-03/pages/14"
SESSION = "gw_session"  # plain http: no __Host- prefix


# The front proxy's secret for /auth/check: nginx must send it (characters nginx would
# read specially in a bare value, to show it is quoted).
SECRET = "edge-secret;{#} " + "k" * 32
TRICKY = "/tricky/page"


def _trust_nginx(demo: DemoStack) -> None:
    path = demo.workdir / "gateway.toml"
    text = path.read_text()
    path.write_text('trusted_proxies = ["127.0.0.1"]\n' + text)


async def _steering_upstream(scope: Scope, receive: Receive, send: Send) -> None:
    """An upstream whose answers try to steer nginx: into the reader's location
    (X-Accel-Redirect), down to 100 bytes a second, into another charset."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"text/plain"), (b"x-accel-redirect", PAGE.encode()),
        (b"x-accel-limit-rate", b"100"), (b"x-accel-charset", b"koi8-r"),
        (b"x-accel-expires", b"3600")]})
    await send({"type": "http.response.body", "body": b"the tricky upstream's own answer"})


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, tls: TLSFiles) -> Iterator[Stack]:
    """The demo stack with nginx in edge mode in front (``url`` is nginx's), with a shared
    secret for forward-auth and a second upstream that tries to steer nginx."""
    tmp = tmp_path_factory.mktemp("edge")
    probe = bound_socket()
    port = port_of(probe)
    probe.close()
    tricky = bound_socket()
    extra = (f'[forward_auth]\nshared_secret = "{SECRET}"\n'
             f'[[upstreams]]\nname = "tricky"\nprefix = "/tricky"\n'
             f'url = "http://127.0.0.1:{port_of(tricky)}"\n'
             '[[rules]]\npath = "/tricky/**"\naccess = "member"\n')
    with serving(_steering_upstream, tricky, lifespan="off"), \
            run_stack(tmp / "stack", tls, gateway_tls=False, extra_config=extra,
                      public_url=f"http://127.0.0.1:{port}", setup=_trust_nginx) as stack:
        config = tmp / "stack" / "gateway.toml"
        gateway = stack.direct_url.removeprefix("http://")
        assert main(["nginx-config", "--config", str(config), "--full", "--listen",
                     f"127.0.0.1:{port}", "--gateway", gateway, "--cache-dir",
                     str(tmp / "cache"), "--out", str(tmp / "nginx.conf")]) == 0
        # One process in the foreground (stopped with the test), as the test's user (the
        # work directory is private to it).
        text = (tmp / "nginx.conf").read_text().replace("/var/lib/nginx", str(tmp)).replace(
            "worker_processes auto;", "daemon off; master_process off; worker_processes 1;")
        (tmp / "nginx.conf").write_text(text)
        with nginx_process(tmp, f"http://127.0.0.1:{port}/healthz"):
            yield stack


@pytest.fixture
def member(edge: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(timeout=20) as http:
        login(http, edge, PAGE, "alice")
        edge.upstream.requests.clear()
        yield http


def seen(edge: Stack, name: str) -> list[str]:
    return [v for k, v in edge.upstream.requests[-1]["headers"] if k == name]


def test_anonymous_visitor_is_sent_to_sign_in_by_the_gateway(edge: Stack) -> None:
    edge.upstream.requests.clear()
    answer = httpx.get(edge.url + PAGE, headers={"Accept": "text/html",
                                                 "Sec-Fetch-Mode": "navigate"})
    assert answer.status_code == 302
    assert answer.headers["location"] == "/saml/login?next=%2Fissues%2F2023-03%2Fpages%2F14"
    api = httpx.get(edge.url + PAGE, headers={"Accept": "application/json"})
    assert api.status_code == 401 and api.json()["error"]
    assert edge.upstream.requests == []


def test_member_reaches_the_upstream_with_the_gateway_identity_only(
        edge: Stack, member: httpx.Client) -> None:
    forged = {"X-Member-Id": "M9999", "X-Gateway-Identity": "forged",
              "X-Member-Anything": "x", "Remote-User": "root", "Shib-Identity-Provider": "evil",
              "X-Forwarded-User": "root", "X-Auth-Request-Email": "a@evil.example",
              "Forwarded": "for=1.2.3.4", "X-Original-URI": "/public/about"}
    member.cookies.set("theme", "dark")
    page = member.get(edge.url + PAGE, headers=forged)
    assert page.status_code == 200
    assert "Upstream page /issues/2023-03/pages/14" in page.text
    assert seen(edge, "x-member-id") == ["M1001"]
    token = seen(edge, "x-gateway-identity")
    assert len(token) == 1 and token[0] != "forged"
    jwks = httpx.get(edge.direct_url + "/.well-known/jwks.json").json()
    assert verify_token(token[0], jwks, "reader", issuer=edge.url)["sub"] == "M1001"
    names = {k for k, _ in edge.upstream.requests[-1]["headers"]}
    for name in ("x-member-anything", "remote-user", "shib-identity-provider",
                 "x-forwarded-user", "x-auth-request-email", "forwarded", "x-original-uri"):
        assert name not in names
    cookie = seen(edge, "cookie")
    assert cookie and "theme=dark" in cookie[0] and SESSION not in cookie[0]


def test_the_gateway_cookies_never_reach_the_upstream(edge: Stack,
                                                       member: httpx.Client) -> None:
    value = member.cookies[SESSION]
    tricky = f"a=1; {SESSION}={value}; gw_idp=x; b=2; gw-stash=y"
    page = httpx.get(edge.url + PAGE, headers={"Cookie": tricky})
    assert page.status_code == 200
    upstream_cookie = seen(edge, "cookie")[0]
    assert SESSION not in upstream_cookie and "gw_idp" not in upstream_cookie
    assert "gw-stash" not in upstream_cookie and "a=1" in upstream_cookie
    stuffed = "; ".join([f"{SESSION}={value}"] * (COOKIE_PASSES + 1))
    refused = httpx.get(edge.url + PAGE, headers={"Cookie": stuffed})
    assert refused.status_code == 400


def test_lapsed_member_gets_the_gateway_403_page(edge: Stack) -> None:
    with httpx.Client(timeout=20) as bob:
        login(bob, edge, PAGE, "bob")
        edge.upstream.requests.clear()
        page = bob.get(edge.url + PAGE, headers={"Accept": "text/html",
                                                 "X-Original-URI": "/public/about"})
    assert page.status_code == 403
    assert "<html" in page.text.lower()
    assert edge.upstream.requests == []


@pytest.mark.parametrize("path", [
    "/members/M1001/notes/%2e%2e/%2e%2e/M1004/notes",
    "/issues/2023-03/pages/14/..%2F..%2F..%2Fadmin",
    "/issues%2F2023-03/pages/14",
    "/public/..%2fissues/2023-03/pages/14",
])
def test_ambiguous_paths_are_refused_and_never_proxied(edge: Stack, member: httpx.Client,
                                                       path: str) -> None:
    answer = httpx.get(edge.url + path, cookies={SESSION: member.cookies[SESSION]})
    assert answer.status_code in (400, 403), answer.status_code
    assert edge.upstream.requests == []


def test_forward_auth_is_not_reachable_from_outside(edge: Stack) -> None:
    answer = httpx.get(edge.url + "/auth/check", headers={
        "X-Original-URI": PAGE, "X-Original-Method": "GET", "X-Original-Host": "x"})
    assert answer.status_code == 404


def test_cross_site_write_is_refused_and_never_cached(edge: Stack,
                                                      member: httpx.Client) -> None:
    answer = member.post(edge.url + PAGE, content=b"x=1", headers={
        "Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site",
        "Content-Type": "application/x-www-form-urlencoded"})
    assert answer.status_code == 403
    assert edge.upstream.requests == []


def test_each_member_gets_their_own_cached_answer(edge: Stack, member: httpx.Client) -> None:
    with httpx.Client(timeout=20) as dave:
        login(dave, edge, PAGE, "dave")
        for _ in range(3):
            assert member.get(edge.url + PAGE).status_code == 200
            assert seen(edge, "x-member-id") == ["M1001"]
            assert dave.get(edge.url + PAGE).status_code == 200
            assert seen(edge, "x-member-id") == ["M1004"]
            anonymous = httpx.get(edge.url + PAGE, headers={"Accept": "application/json"})
            assert anonymous.status_code == 401


def test_revocation_is_seen_within_one_second(edge: Stack, member: httpx.Client) -> None:
    """A cached "allowed" lives at most to the end of the second the gateway read the
    session in: every request nginx starts one second after a revocation is refused."""
    for _ in range(20):  # cached, and served from the cache
        assert member.get(edge.url + PAGE).status_code == 200
    config = str(edge.demo.workdir / "gateway.toml")
    assert main(["sessions", "revoke", "--member", "M1001", "--config", config]) == 0
    revoked = time.monotonic()
    time.sleep(max(0.0, revoked + 1.0 - time.monotonic()))
    for _ in range(5):
        answer = member.get(edge.url + PAGE, headers={"Accept": "application/json"})
        assert answer.status_code == 401, answer.status_code


def test_an_https_public_url_needs_nginx_certificates(edge: Stack) -> None:
    settings = edge.demo.settings.model_copy(update={"public_url": "https://reader.example"})
    with pytest.raises(EdgeConfigError, match="--tls-cert"):
        nginx_config(settings)
    text = nginx_config(settings, EdgeOptions(tls_cert=Path("/c.pem"), tls_key=Path("/k.pem")))
    assert "listen 443 ssl;" in text and "ssl_protocols TLSv1.2 TLSv1.3;" in text


def test_nginx_asks_with_the_shared_secret(edge: Stack, member: httpx.Client) -> None:
    """With ``[forward_auth] shared_secret``, nginx's auth subrequest carries it: the
    gateway allows it (no refusal, no detour through the gateway's own proxy)."""
    with all_log_records() as logs:
        page = member.get(edge.url + PAGE + "?asked=1")  # not in nginx's cache yet
    assert page.status_code == 200 and seen(edge, "x-member-id") == ["M1001"]
    assert not [r for r in logs.records if "shared secret" in r.getMessage()]
    lines = [json.loads(JsonFormatter().format(r)) for r in logs.records
             if r.name == "gateway.access"]
    assert [(line["path"], line["status"]) for line in lines] == [("/auth/check", 200)]


def test_the_written_file_is_private(edge: Stack, tmp_path: Path) -> None:
    """The file holds the shared secret: written 0600, also over an existing file."""
    out = tmp_path / "sso-gateway.conf"
    out.write_text("old\n")
    out.chmod(0o644)
    config = str(edge.demo.workdir / "gateway.toml")
    assert main(["nginx-config", "--config", config, "--out", str(out)]) == 0
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    assert f'X-Gateway-Auth-Secret "{SECRET}";' in out.read_text()


def test_an_upstream_cannot_steer_nginx(edge: Stack, member: httpx.Client) -> None:
    """An upstream's X-Accel-Redirect would move the request into the reader's location,
    with the member's identity and a token: nginx relays the answer as it is instead."""
    answer = member.get(edge.url + TRICKY)
    assert answer.status_code == 200
    assert answer.text == "the tricky upstream's own answer"
    assert answer.headers["content-type"] == "text/plain"
    assert not [name for name in answer.headers if name.lower().startswith("x-accel-")]
    assert edge.upstream.requests == []  # the reader never saw it


def test_the_gateway_gets_nginx_request_id_not_the_client_s(edge: Stack) -> None:
    """nginx is a trusted proxy, so the gateway takes its X-Request-Id over: nginx sets
    its own, and a client's never passes through."""
    answer = httpx.get(edge.url + PAGE, headers={"Accept": "application/json",
                                                 "X-Request-Id": "client-pick"})
    assert answer.status_code == 401
    assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["x-request-id"])


def test_a_secret_nginx_cannot_write_is_refused(edge: Stack) -> None:
    """A '$' would be read as a variable, a quote would end the value: refused, named."""
    forward_auth = edge.demo.settings.forward_auth
    for secret in ("$remote_addr" + "k" * 32, 'k" ; more_set_headers "a' + "k" * 32):
        settings = edge.demo.settings.model_copy(update={"forward_auth": forward_auth.model_copy(
            update={"shared_secret": SecretStr(secret)})})
        with pytest.raises(EdgeConfigError, match="shared_secret holds a quote"):
            nginx_config(settings)
