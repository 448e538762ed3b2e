"""A second login protocol, written here, plugs into the gateway through the seam alone.

``TicketProtocol`` is as small as a login protocol gets: ``GET /ticket/login?user=alice``
shows nothing and signs a fixed test identity in at once (``SignInServices.
finish_sign_in``). It is passed to ``create_app`` next to SAML, first, so visitors are
sent to it. Over real sockets, a member signs in through it, reads a gated page through
the proxy (the upstream gets the identity headers and token), sees the session on
"your sessions", and signs out through the gateway's sign-out page — with nothing in
routes, sessions, policy or the proxy knowing the protocol.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import jwt
import pytest
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.demo.stack import MEMBER, prepare
from gateway.errors import LoginFailed
from gateway.paths import safe_next
from gateway.principal import Principal
from gateway.protocol import LoginProtocol, SignedIn, SignInServices
from gateway.saml import SamlProtocol
from tests.conftest import (
    EchoUpstream,
    TLSFiles,
    bound_socket,
    port_of,
    seed_demo_keys,
    serve_gateway,
    serving,
)

PAGE = "/issues/2023-03/pages/14"
ISSUER = "urn:test:ticket-office"
SUBJECT = f"{ISSUER}!T-1"  # the issuer's member numbers are scoped (the default)


@dataclass
class TicketProtocol:
    """A login protocol for tests: one fixed identity, no IdP round trip."""

    name: str = "ticket"
    sign_in_path: str = "/ticket/login"
    sign_out_path: str = "/ticket/logout"
    events: list[str] = field(default_factory=list)

    def routes(self, services: SignInServices) -> Sequence[BaseRoute]:
        async def login(request: Request) -> Response:
            next_url = safe_next(request.query_params.get("next"))
            user = request.query_params.get("user", "")
            if user != "alice":
                raise LoginFailed("unknown_user", f"no ticket for {user[:40]!r}",
                                  {"idp": ISSUER})
            signed_in = SignedIn(
                idp=ISSUER, protocol=self.name,
                released={"memberId": ["T-1"], "displayName": ["Alice Ticket"],
                          "mail": ["alice@tickets.example"], "memberStatus": ["active"],
                          "eduPersonEntitlement": [MEMBER]},
                authn_context="urn:test:ticket", authn_instant=time.time(),
                logout_handle="ticket-alice", protocol_data={"ticket": "T-1-0001"})
            _, cookie = await services.finish_sign_in(signed_in, request)
            response = RedirectResponse(next_url, status_code=302)
            response.headers.append("set-cookie", services.cookies.session(cookie))
            return response

        return [Route(self.sign_in_path, login)]

    async def start(self) -> None:
        self.events.append("start")

    async def stop(self) -> None:
        self.events.append("stop")

    def owns(self, principal: Principal) -> bool:
        return principal.protocol == self.name

    def logout_origin(self, principal: Principal) -> str | None:
        return None

    async def start_logout(self, principal: Principal) -> str | None:
        self.events.append(f"logout {principal.subject} {principal.protocol_data['ticket']}")
        return None


@dataclass
class Running:
    url: str
    upstream: EchoUpstream
    ticket: TicketProtocol
    tls: TLSFiles

    def client(self) -> httpx.Client:
        return httpx.Client(verify=self.tls.client_context(), timeout=20)


@pytest.fixture
def running(tmp_path: Path, tls: TLSFiles) -> Iterator[Running]:
    gw_sock, up_sock = bound_socket(), bound_socket()
    url = f"https://127.0.0.1:{port_of(gw_sock)}"
    # The dev IdP is configured (SAML stays available) but never visited.
    seed_demo_keys(tmp_path)
    demo = prepare(tmp_path, gateway_url=url, idp_url="http://127.0.0.1:9",
                   reader_url=f"http://127.0.0.1:{port_of(up_sock)}")
    ticket = TicketProtocol()
    protocols: list[LoginProtocol] = [ticket, SamlProtocol(demo.settings)]
    upstream = EchoUpstream()
    with (serving(upstream.app(), up_sock),
          serve_gateway(demo.settings, gw_sock, tls=tls, protocols=protocols)):
        yield Running(url, upstream, ticket, tls)
    assert ticket.events[0] == "start" and ticket.events[-1] == "stop"


def test_a_member_signs_in_through_a_second_protocol(running: Running) -> None:
    with running.client() as http:
        first = http.get(running.url + PAGE)
        assert first.status_code == 302
        assert first.headers["location"] == \
            "/ticket/login?next=%2Fissues%2F2023-03%2Fpages%2F14"
        done = http.get(running.url + first.headers["location"] + "&user=alice")
        assert (done.status_code, done.headers["location"]) == (302, PAGE)
        page = http.get(running.url + PAGE)
        assert page.status_code == 200 and "Alice Ticket" in page.text

        seen = dict(running.upstream.requests[-1]["headers"])
        assert (seen["x-member-id"], seen["x-member-idp"]) == (SUBJECT, ISSUER)
        assert seen["x-member-entitlements"] == MEMBER
        claims = jwt.decode(seen["x-gateway-identity"], options={"verify_signature": False})
        assert claims["sub"] == SUBJECT

        sessions = http.get(running.url + "/_gateway/sessions")
        assert sessions.status_code == 200 and sessions.text.count("(this browser)") == 1

        confirm = http.get(running.url + "/ticket/logout")
        assert confirm.status_code == 200 and "Alice Ticket" in confirm.text
        assert "form-action 'self';" in confirm.headers["content-security-policy"]
        token = re.search(r'name="csrf" value="([^"]+)"', confirm.text)
        assert token is not None
        out = http.post(running.url + "/ticket/logout", data={"csrf": token.group(1)},
                        headers={"origin": running.url})
        assert out.status_code == 200 and "You are signed out" in out.text
        assert http.get(running.url + PAGE).status_code == 302
    assert running.ticket.events[-1] == f"logout {SUBJECT} T-1-0001"


def test_a_refused_sign_in_is_answered_and_recorded_by_the_gateway(
        running: Running, caplog: pytest.LogCaptureFixture) -> None:
    with running.client() as http:
        refused = http.get(running.url + "/ticket/login?next=/&user=mallory")
        assert refused.status_code == 400 and "Sign-in failed" in refused.text
        assert re.search(r"<code>[0-9A-F]{8}</code>", refused.text)
        assert http.get(running.url + PAGE).status_code == 302
    assert "kind=unknown_user" in caplog.text
    assert running.upstream.requests == []
