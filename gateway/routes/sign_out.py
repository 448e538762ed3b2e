"""The sign-out page, at each login protocol's ``sign_out_path`` (SAML: ``/saml/logout``).

GET asks for confirmation (a link must never sign anyone out); a same-origin POST with
the session's CSRF token signs out (``flows.sign_out``): the session ends here first,
then the browser goes to the IdP's logout when the protocol has one (for a SAML IdP with
POST-only Single Logout, first to the gateway's own page that posts it). The
confirmation page's CSP lets its form end in a redirect to that IdP (browsers apply
``form-action`` to the redirects after a submission too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

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


def sign_out_path(gw: Gateway) -> str:
    """Where the sign-out page is: the first protocol's that has one ("/" if none)."""
    return next((p.sign_out_path for p in gw.protocols if p.sign_out_path), "/")


def routes(gw: Gateway) -> list[Route]:
    def signed_out() -> Response:
        response = to_response(render("signed_out.html", title="Signed out"))
        response.headers.append("set-cookie", gw.cookies.clear_session())
        return response

    async def sign_out(request: Request) -> Response:
        record = await current_session(gw, request)
        if request.method == "GET":
            if record is None:
                return to_response(render("signed_out.html", title="Signed out"))
            page = to_response(render("sign_out.html", title="Sign out",
                                      csrf=csrf_token(gw, record), action=request.url.path,
                                      display_name=record.principal.display_name))
            origin = gw.flows.sign_out.logout_origin(record.principal)
            if origin is not None:
                csp = page.headers["content-security-policy"].replace(
                    "form-action 'self'", f"form-action 'self' {origin}")
                page.headers["content-security-policy"] = csp
            return page
        require_same_origin(gw, request)
        form = await read_form(request)
        if record is None:
            return signed_out()
        check_csrf(gw, record, field(form, "csrf"))
        url = await gw.flows.sign_out.sign_out(record)
        if url is None:
            return signed_out()
        response = RedirectResponse(url, status_code=302)
        response.headers["cache-control"] = "no-store"
        response.headers.append("set-cookie", gw.cookies.clear_session())
        return response

    paths = dict.fromkeys(p.sign_out_path for p in gw.protocols if p.sign_out_path)
    return [Route(path, sign_out, methods=["GET", "POST"]) for path in paths]
