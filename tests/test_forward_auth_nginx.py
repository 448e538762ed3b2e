"""Forward-auth with the real peer: Debian's nginx, ``auth_request`` → the gateway's /auth/check.

nginx is the public face here (``public_url`` is nginx's address): it routes
``/saml/`` to the gateway, asks ``/auth/check`` before every other request, copies
the identity headers and token from the answer to the upstream, and turns a 401
into a redirect to the login URL the gateway names. The ``/auth/check`` answers on
their own run against the shared demo stack.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from gateway.identity import verify_token
from tests.browser import client, login
from tests.conftest import Stack, TLSFiles, bound_socket, port_of, run_stack

pytestmark = pytest.mark.stack(shared=True)

NGINX = "/usr/sbin/nginx"
PAGE = "/issues/2023-03/pages/14"
IDENTITY = ["X-Member-Id", "X-Member-Email", "X-Member-Name", "X-Member-Entitlements",
            "X-Member-Status", "X-Member-Idp", "X-Gateway-Identity"]


def nginx_config(tmp: Path, port: int, gateway: int, upstream: int) -> str:
    copy = "\n".join(
        f"      auth_request_set $id_{i} $upstream_http_{h.lower().replace('-', '_')};\n"
        f"      proxy_set_header {h} $id_{i};" for i, h in enumerate(IDENTITY))
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
      proxy_set_header X-Original-URI $request_uri;
      proxy_set_header X-Forwarded-Method $request_method;
      proxy_set_header X-Forwarded-Host $host;
      proxy_set_header Host $http_host;
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


@pytest.fixture
def nginx_stack(tmp_path: Path, tls: TLSFiles) -> Iterator[Stack]:
    """The demo stack behind nginx: ``url`` is nginx's, ``direct_url`` the gateway's own."""
    assert shutil.which(NGINX) or Path(NGINX).exists(), "Debian's nginx is required"
    probe = bound_socket()
    nginx_port = port_of(probe)  # free now; released for nginx to bind
    probe.close()
    with run_stack(tmp_path / "stack", tls, gateway_tls=False,
                   public_url=f"http://127.0.0.1:{nginx_port}") as stack:
        gateway, upstream = urlsplit(stack.direct_url).port, urlsplit(stack.demo.reader_url).port
        assert gateway and upstream
        (tmp_path / "nginx.conf").write_text(nginx_config(tmp_path, nginx_port, gateway, upstream))
        proc = subprocess.Popen([NGINX, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)])
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    httpx.get(f"http://127.0.0.1:{nginx_port}/public/", timeout=1)
                    break
                except httpx.TransportError:
                    assert proc.poll() is None, (tmp_path / "error.log").read_text()
                    assert time.monotonic() < deadline, "nginx did not start"
                    time.sleep(0.05)
            stack.upstream.requests.clear()
            yield stack
        finally:
            proc.terminate()
            proc.wait(timeout=10)


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
            "X-Member-Id": "M9999", "X-Gateway-Identity": "forged", "X-Member-Status": "x"})
    assert page.status_code == 200
    assert "Upstream page /issues/2023-03/pages/14" in page.text
    seen = nginx_stack.upstream.requests[-1]["headers"]
    assert [v for k, v in seen if k == "x-member-id"] == ["M1001"]
    assert [v for k, v in seen if k == "x-member-status"] == ["active"]
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
    sent = {"x-original-uri": uri, "x-forwarded-method": "GET", **(headers or {})}
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
        unknown = http.get(stack.url + "/auth/check", params={"upstream": "nope"},
                           headers={"x-original-uri": "/public/x"})
        odd = http.get(stack.url + "/auth/check", params={"upstream": "n\u00f6pe\u6f22\r\n"},
                       headers={"x-original-uri": "/public/x"})
    assert unknown.status_code == 403
    # Whatever the proxy passes, the reason header stays a valid header value.
    assert odd.status_code == 403
    assert odd.json()["reason"] == "no upstream named 'n\u00f6pe\u6f22\\r\\n'"
    assert odd.headers["x-auth-reason"].isascii()


def test_auth_check_for_a_member(stack: Stack) -> None:
    with client(stack) as http:
        login(http, stack, PAGE, "alice")
        cookie = http.cookies["__Host-gw_session"]
    spoof = {"x-member-id": "M9999", "x-gateway-identity": "forged"}
    allowed = check(stack, PAGE, cookie=cookie, headers=spoof)
    assert allowed.status_code == 200
    assert allowed.headers.get_list("x-member-id") == ["M1001"]
    jwks = httpx.get(stack.url + "/.well-known/jwks.json",
                     verify=stack.tls.client_context()).json()
    token = allowed.headers["x-gateway-identity"]
    assert verify_token(token, jwks, "reader")["sub"] == "M1001"
    denied = check(stack, "/members/M1004/notes", cookie=cookie)
    assert denied.status_code == 403
    assert denied.json()["reason"] == "path belongs to another member"
