"""Forward-auth with the real peer: Debian's nginx, ``auth_request`` → the gateway's /auth/check.

nginx is the public face here (``public_url`` is nginx's address): it routes
``/saml/`` to the gateway, asks ``/auth/check`` before every other request, copies
the identity headers and token from the answer to the upstream, and turns a 401
into a redirect to the login URL the gateway names. The ``/auth/check`` answers on
their own run against the shared demo stack.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from gateway.identity import verify_token
from tests.browser import client, login
from tests.conftest import Stack, TLSFiles, bound_socket, nginx_process, port_of, run_stack

pytestmark = pytest.mark.stack(shared=True)

PAGE = "/issues/2023-03/pages/14"
IDENTITY = ["X-Member-Id", "X-Member-Email", "X-Member-Email-Verified", "X-Member-Name",
            "X-Member-Entitlements", "X-Member-Status", "X-Member-Idp", "X-Gateway-Identity"]


# The two ways a front proxy tells the gateway what was asked: nginx's ``auth_request``
# convention (X-Original-*) and the X-Forwarded-* one of Traefik, Caddy and many nginx
# configurations. Each names the gateway's [forward_auth] section, the headers nginx sets
# on the auth subrequest, and the other convention's URI header, which a client forges.
SECRET = "front-proxy-secret-" + "k" * 24


@dataclass(frozen=True)
class Convention:
    name: str
    gateway_config: str
    method: str
    uri: str
    host: str
    forged: str
    secret: str = ""


CONVENTIONS = {
    "nginx": Convention("nginx", "", "X-Original-Method", "X-Original-URI",
                        "X-Original-Host", forged="X-Forwarded-Uri"),
    "forwarded": Convention(
        "forwarded", f'[forward_auth]\nfront_proxy = "traefik"\nshared_secret = "{SECRET}"\n',
        "X-Forwarded-Method", "X-Forwarded-Uri", "X-Forwarded-Host", forged="X-Original-URI",
        secret=SECRET),
}


def nginx_config(tmp: Path, port: int, gateway: int, upstream: int,
                 convention: Convention = CONVENTIONS["nginx"]) -> str:
    copy = "\n".join(
        f"      auth_request_set $id_{i} $upstream_http_{h.lower().replace('-', '_')};\n"
        f"      proxy_set_header {h} $id_{i};" for i, h in enumerate(IDENTITY))
    secret = (f'      proxy_set_header X-Gateway-Auth-Secret "{convention.secret}";\n'
              if convention.secret else "")
    return f"""
daemon off; master_process off; worker_processes 1;
pid {tmp}/nginx.pid; error_log {tmp}/error.log warn;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  server {{
    listen 127.0.0.1:{port};
    proxy_set_header Host $http_host;  # the gateway answers only its public host name
    location /saml/ {{ proxy_pass http://127.0.0.1:{gateway}; }}
    location = /_gateway_auth {{
      internal;
      proxy_pass http://127.0.0.1:{gateway}/auth/check?upstream=reader;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header {convention.uri} $request_uri;
      proxy_set_header {convention.method} $request_method;
      proxy_set_header {convention.host} $http_host;
{secret}      proxy_set_header Host $http_host;
    }}
    location @gateway_login {{ return 302 $gateway_login; }}
    location / {{
      auth_request /_gateway_auth;
      auth_request_set $gateway_login $upstream_http_location;
      error_page 401 = @gateway_login;
{copy}
      proxy_pass http://127.0.0.1:{upstream};
    }}
  }}
}}
"""


@dataclass
class NginxStack:
    """The stack behind nginx, and the convention nginx and the gateway were set up with."""

    stack: Stack
    convention: Convention

    @property
    def url(self) -> str:
        return self.stack.url


@contextmanager
def running_nginx(tmp_path: Path, tls: TLSFiles, convention: Convention) -> Iterator[Stack]:
    """The demo stack behind nginx: ``url`` is nginx's, ``direct_url`` the gateway's own."""
    probe = bound_socket()
    nginx_port = port_of(probe)  # free now; released for nginx to bind
    probe.close()
    with run_stack(tmp_path / "stack", tls, gateway_tls=False,
                   public_url=f"http://127.0.0.1:{nginx_port}",
                   extra_config=convention.gateway_config) as stack:
        gateway, upstream = urlsplit(stack.direct_url).port, urlsplit(stack.demo.reader_url).port
        assert gateway and upstream
        (tmp_path / "nginx.conf").write_text(
            nginx_config(tmp_path, nginx_port, gateway, upstream, convention))
        with nginx_process(tmp_path, f"http://127.0.0.1:{nginx_port}/public/"):
            stack.upstream.requests.clear()
            yield stack


@pytest.fixture
def nginx_stack(tmp_path: Path, tls: TLSFiles) -> Iterator[Stack]:
    """The demo stack behind nginx with ``auth_request`` and the nginx convention."""
    with running_nginx(tmp_path, tls, CONVENTIONS["nginx"]) as stack:
        yield stack


@pytest.fixture(scope="module", params=sorted(CONVENTIONS))
def _both(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          tls: TLSFiles) -> Iterator[NginxStack]:
    convention = CONVENTIONS[request.param]
    with running_nginx(tmp_path_factory.mktemp(f"nginx-{convention.name}"), tls,
                       convention) as stack:
        yield NginxStack(stack, convention)


@pytest.fixture
def both(_both: NginxStack) -> NginxStack:
    """The stack behind nginx in each convention (one per module and convention)."""
    _both.stack.upstream.requests.clear()
    return _both


def test_anonymous_request_is_redirected_to_the_gateway_login(nginx_stack: Stack) -> None:
    answer = httpx.get(nginx_stack.url + PAGE)
    assert answer.status_code == 302
    assert answer.headers["location"] == \
        f"{nginx_stack.url}/saml/login?next=%2Fissues%2F2023-03%2Fpages%2F14"
    assert nginx_stack.upstream.requests == []


def test_member_reaches_the_upstream_with_identity(nginx_stack: Stack) -> None:
    with httpx.Client(timeout=20) as http:
        done = login(http, nginx_stack, PAGE, "alice")
        assert done.headers["location"] == PAGE
        page = http.get(nginx_stack.url + PAGE, headers={
            "X-Member-Id": "M9999", "X-Gateway-Identity": "forged", "X-Member-Status": "x",
            "X-Member-Email-Verified": "forged"})
    assert page.status_code == 200
    assert "Upstream page /issues/2023-03/pages/14" in page.text
    seen = nginx_stack.upstream.requests[-1]["headers"]
    assert [v for k, v in seen if k == "x-member-id"] == ["M1001"]
    assert [v for k, v in seen if k == "x-member-status"] == ["active"]
    assert [v for k, v in seen if k == "x-member-email-verified"] == ["true"]
    token = [v for k, v in seen if k == "x-gateway-identity"]
    assert len(token) == 1 and token[0] != "forged"
    # The service verifies the token against the JWKS fetched from the gateway over HTTP.
    jwks = httpx.get(nginx_stack.direct_url + "/.well-known/jwks.json").json()
    assert verify_token(token[0], jwks, "reader", issuer=nginx_stack.url)["sub"] == "M1001"


def test_lapsed_member_gets_403(nginx_stack: Stack) -> None:
    with httpx.Client(timeout=20) as http:
        login(http, nginx_stack, PAGE, "bob")
        page = http.get(nginx_stack.url + PAGE)
    assert page.status_code == 403
    assert nginx_stack.upstream.requests == []


def test_public_path_passes_without_identity(nginx_stack: Stack) -> None:
    answer = httpx.get(nginx_stack.url + "/public/about", headers={"X-Member-Id": "M9999"})
    assert answer.status_code == 200
    seen = dict(nginx_stack.upstream.requests[-1]["headers"])
    assert "x-member-id" not in seen and "x-gateway-identity" not in seen


def check(stack: Stack, uri: str, *, cookie: str = "", mode: str = "",
          headers: dict[str, str] | None = None) -> httpx.Response:
    params = {"upstream": "reader", **({"mode": mode} if mode else {})}
    sent = {"x-original-uri": uri, "x-original-method": "GET",
            "x-original-host": urlsplit(stack.url).netloc, **(headers or {})}
    with client(stack) as http:
        if cookie:
            http.cookies.set("__Host-gw_session", cookie)
        return http.get(stack.url + "/auth/check", params=params, headers=sent)


def test_auth_check_answers(stack: Stack) -> None:
    anonymous = check(stack, PAGE)
    assert anonymous.status_code == 401
    assert anonymous.headers["location"] == \
        f"{stack.url}/saml/login?next=%2Fissues%2F2023-03%2Fpages%2F14"
    redirect = check(stack, PAGE, mode="redirect")
    assert redirect.status_code == 302 and redirect.headers["location"].startswith(stack.url)
    assert check(stack, "/public/x").status_code == 200
    ambiguous = check(stack, "/members/M1001/notes/%2e%2e/%2e%2e/M1004/notes")
    assert ambiguous.status_code == 403 and "ambiguous" in ambiguous.headers["x-auth-reason"]
    with client(stack) as http:
        sent = {"x-original-uri": "/public/x", "x-original-method": "GET",
                "x-original-host": urlsplit(stack.url).netloc}
        unknown = http.get(stack.url + "/auth/check", params={"upstream": "nope"}, headers=sent)
        odd = http.get(stack.url + "/auth/check", params={"upstream": "n\u00f6pe\u6f22\r\n"},
                       headers=sent)
    assert unknown.status_code == 403
    assert unknown.json()["reason"] == \
        "upstream 'nope' does not serve /public/x (its upstream is 'reader')"
    # Whatever the proxy passes, the reason header stays a valid header value.
    assert odd.status_code == 403
    assert odd.json()["reason"] == \
        "upstream 'n\u00f6pe\u6f22\\r\\n' does not serve /public/x (its upstream is 'reader')"
    assert odd.headers["x-auth-reason"].isascii()


def test_auth_check_for_a_member(stack: Stack) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        cookie = http.cookies["__Host-gw_session"]
    spoof = {"x-member-id": "M9999", "x-gateway-identity": "forged"}
    asked = time.time()
    allowed = check(stack, PAGE, cookie=cookie, headers=spoof)
    assert allowed.status_code == 200
    assert allowed.headers.get_list("x-member-id") == ["M1001"]
    # A caching front proxy (nginx, the edge mode) may keep it to the end of the second
    # the session was read in, never longer: the one-second revocation bound.
    until = allowed.headers["x-accel-expires"]
    assert until.startswith("@") and int(asked) <= int(until[1:]) <= time.time()
    jwks = httpx.get(stack.url + "/.well-known/jwks.json",
                     verify=stack.tls.client_context()).json()
    token = allowed.headers["x-gateway-identity"]
    assert verify_token(token, jwks, "reader", issuer=stack.url)["sub"] == "M1001"
    denied = check(stack, "/members/M1004/notes", cookie=cookie)
    assert denied.status_code == 403
    assert denied.json()["reason"] == "path belongs to another member"


# -- issue 14, item 1: the original request is read only from the configured headers ------

def test_forged_path_header_does_not_decide_for_an_anonymous_client(both: NginxStack) -> None:
    """The client adds the other convention's URI header naming a public page: the gated
    page still needs a sign-in, and nothing reaches the upstream."""
    answer = httpx.get(both.url + PAGE, headers={both.convention.forged: "/public/about"})
    assert answer.status_code == 302
    assert answer.headers["location"] == \
        f"{both.url}/saml/login?next=%2Fissues%2F2023-03%2Fpages%2F14"
    assert both.stack.upstream.requests == []


def test_forged_path_header_does_not_let_a_lapsed_member_in(both: NginxStack) -> None:
    with httpx.Client(timeout=20) as http:
        login(http, both.stack, PAGE, "bob")
        both.stack.upstream.requests.clear()
        page = http.get(both.url + PAGE, headers={both.convention.forged: "/"})
    assert page.status_code == 403
    assert both.stack.upstream.requests == []
    assert not any(page.headers.get(h) for h in IDENTITY)


def test_conflicting_path_header_is_refused_for_a_member(both: NginxStack) -> None:
    """An active member whose request carries a conflicting URI header is refused even where
    both paths would be allowed: the request is not what it says it is."""
    with httpx.Client(timeout=20) as http:
        login(http, both.stack, PAGE, "alice")
        both.stack.upstream.requests.clear()
        page = http.get(both.url + PAGE, headers={both.convention.forged: "/public/about"})
        same = http.get(both.url + PAGE, headers={both.convention.forged: PAGE})
        plain = http.get(both.url + PAGE)
    assert page.status_code == 403
    assert same.status_code == 200 and plain.status_code == 200  # an agreeing copy is harmless
    assert [r["path"] for r in both.stack.upstream.requests] == [PAGE, PAGE]


def test_cross_site_unsafe_method_is_refused_at_forward_auth(both: NginxStack) -> None:
    """nginx hands the original method and the browser's Origin / Sec-Fetch-Site to the
    auth subrequest: a cross-site POST riding on the member's cookie gets no further."""
    with httpx.Client(timeout=20) as http:
        login(http, both.stack, PAGE, "alice")
        both.stack.upstream.requests.clear()
        evil = http.post(both.url + PAGE, data={"x": "1"},
                         headers={"Origin": "https://blog.example.org"})
        fetched = http.post(both.url + PAGE, data={"x": "1"},
                            headers={"Sec-Fetch-Site": "cross-site"})
        deleted = http.delete(both.url + PAGE, headers={"Origin": "https://blog.example.org"})
        own = http.post(both.url + PAGE, data={"x": "2"}, headers={"Origin": both.url})
    assert (evil.status_code, fetched.status_code, deleted.status_code) == (403, 403, 403)
    assert own.status_code == 200
    assert [(r["method"], r["body"]) for r in both.stack.upstream.requests] == [("POST", b"x=2")]


def test_direct_call_without_the_front_proxy_secret_is_refused(both: NginxStack) -> None:
    """With ``shared_secret``, only the front proxy's subrequests are answered (through
    nginx, which adds it, the tests above pass)."""
    c = both.convention
    host = urlsplit(both.url).netloc
    sent = {c.method: "GET", c.uri: "/public/about", c.host: host}
    direct = both.stack.direct_url + "/auth/check"
    without = httpx.get(direct, headers={**sent, "Host": host})
    if not c.secret:  # without a shared secret, whoever reaches the gateway is answered
        assert without.status_code == 200
        return
    wrong = httpx.get(direct, headers={**sent, "Host": host, "X-Gateway-Auth-Secret": "guess"})
    right = httpx.get(direct, headers={**sent, "Host": host, "X-Gateway-Auth-Secret": c.secret})
    assert (without.status_code, wrong.status_code, right.status_code) == (403, 403, 200)
    assert without.json()["reason"] == "the front proxy's shared secret is missing or wrong"
    assert c.secret not in wrong.text + str(wrong.headers)
