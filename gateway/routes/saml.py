"""``/saml/*``: SP metadata, the sign-in page and login start, the ACS, sign-out."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from gateway.paths import safe_next
from gateway.routes.common import (
    check_csrf,
    csrf_token,
    current_session,
    field,
    read_form,
    require_same_origin,
)
from gateway.web import render, to_response

if TYPE_CHECKING:
    from gateway.app import Gateway

MAX_ACS_BODY = 512 * 1024


def routes(gw: Gateway) -> list[Route]:
    async def metadata(request: Request) -> Response:
        return Response(gw.metadata_xml, media_type="application/samlmetadata+xml",
                        headers={"cache-control": "public, max-age=3600"})

    async def login(request: Request) -> Response:
        next_url = safe_next(request.query_params.get("next"))
        chosen = request.query_params.get("idp")
        idp = gw.login.choose_idp(chosen)
        if idp is None or (not chosen and not gw.settings.idp.auto_redirect):
            return to_response(render("sign_in.html", title="Sign in", next=next_url,
                                      idps=gw.registry.all()))
        started = await gw.login.start(idp, next_url)
        response = RedirectResponse(started.redirect_url, status_code=302)
        response.headers["cache-control"] = "no-store"
        response.headers.append("set-cookie", started.cookie.header().decode("latin-1"))
        return response

    async def acs(request: Request) -> Response:
        form = await read_form(request, MAX_ACS_BODY)
        client = request.client.host if request.client else ""
        done = await gw.login.finish(form, request.cookies,
                                     user_agent=request.headers.get("user-agent", ""),
                                     client_ip=client)
        response = RedirectResponse(done.next_url, status_code=302)
        response.headers["cache-control"] = "no-store"
        response.headers.append("set-cookie", gw.session_cookie_header(done.session_cookie_value))
        response.headers.append("set-cookie", done.clear_cookie.header().decode("latin-1"))
        return response

    async def logout(request: Request) -> Response:
        """GET asks for confirmation (a link must never sign anyone out); POST signs out."""
        record = await current_session(gw, request)
        if request.method == "GET":
            if record is None:
                return to_response(render("signed_out.html", title="Signed out"))
            return to_response(render("sign_out.html", title="Sign out",
                                      csrf=csrf_token(gw, record),
                                      display_name=record.principal.display_name))
        require_same_origin(gw, request)
        form = await read_form(request)
        if record is not None:
            check_csrf(gw, record, field(form, "csrf"))
            await gw.sessions.revoke(record.key)
        response = to_response(render("signed_out.html", title="Signed out"))
        response.headers.append("set-cookie", gw.clear_session_cookie_header())
        return response

    return [
        Route("/saml/metadata", metadata),
        Route("/saml/login", login),
        Route("/saml/acs", acs, methods=["POST"]),
        Route("/saml/logout", logout, methods=["GET", "POST"]),
    ]
