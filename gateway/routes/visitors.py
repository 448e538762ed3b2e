"""``/_gateway/register``: the registration gate's form (``flows.registration``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from gateway.flows.registration import CONSENT
from gateway.paths import safe_next
from gateway.routes.common import field, rate_limit, read_form, require_same_origin
from gateway.web import render, to_response
from gateway.web.forms import client_ip

if TYPE_CHECKING:
    from gateway.app import Gateway

PATH = "/_gateway/register"


def routes(gw: Gateway) -> list[Route]:
    async def register(request: Request) -> Response:
        if request.method == "GET":
            next_url = safe_next(request.query_params.get("next"))
            return page(next_url, email="", consent=False, errors={})
        require_same_origin(gw, request)
        await rate_limit(gw.stores.keys, request, "registrations",
                         gw.settings.limits.registrations)
        form = await read_form(request)
        next_url = safe_next(field(form, "next"))
        typed = field(form, "email")[:300]
        consent = field(form, "consent") == "yes"
        done = await gw.flows.registration.register(
            typed, consent, user_agent=request.headers.get("user-agent", ""),
            client_ip=client_ip(request))
        if done.errors:
            return page(next_url, email=typed, consent=consent, errors=done.errors, status=400)
        response = RedirectResponse(next_url, status_code=303)
        response.headers["cache-control"] = "no-store"
        response.headers.append("set-cookie", gw.cookies.session(done.cookie))
        return response

    def page(next_url: str, *, email: str, consent: bool, errors: dict[str, str],
             status: int = 200) -> Response:
        return to_response(render("register.html", status, title="Read the free issue",
                                  next=next_url, email=email, consent=consent, errors=errors,
                                  consent_text=CONSENT, sign_in_url=gw.sign_in_url(next_url)))

    return [Route(PATH, register, methods=["GET", "POST"])]
