"""``GatewayServices``: the gateway's side of the login-protocol seam
(``protocol.SignInServices``), handed to every protocol's routes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.requests import Request

from gateway.errors import LoginFailed
from gateway.principal import Principal
from gateway.protocol import SignedIn
from gateway.routes.common import current_session, rate_limit
from gateway.sessions import SessionRecord
from gateway.web import new_reference
from gateway.web.forms import client_ip

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("gateway")


class GatewayServices:
    """What one gateway offers its login protocols: sign-in and logout through the flows,
    the current session, failures recorded for ``explain``, keys, rate limits, cookies."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway
        self.settings = gateway.settings
        self.cookies = gateway.cookies
        self.keys = gateway.stores.keys

    async def finish_sign_in(self, signed_in: SignedIn, request: Request, *,
                             replaces: SessionRecord | None = None,
                             ) -> tuple[SessionRecord, str]:
        return await self._gw.flows.sign_in.complete(
            signed_in, user_agent=request.headers.get("user-agent", ""),
            client_ip=client_ip(request), replaces=replaces)

    async def current_session(self, request: Request) -> SessionRecord | None:
        return await current_session(self._gw, request)

    async def end_for_logout(self, logout_handle: str, ends: Callable[[Principal], bool],
                             *, idp: str) -> int:
        return await self._gw.flows.sign_out.idp_logout(logout_handle, ends, idp)

    async def rate_limit(self, request: Request, what: str, per_minute: int) -> None:
        await rate_limit(self.keys, request, what, per_minute)

    def login_failed(self, exc: LoginFailed) -> str:
        reference = new_reference()
        log.warning("login failed ref=%s kind=%s reason=%s", reference, exc.kind, exc.reason)
        self._gw.telemetry.login_failed(reference, exc)
        return reference

    def sign_in_url(self, next_url: str) -> str:
        return self._gw.sign_in_url(next_url)
