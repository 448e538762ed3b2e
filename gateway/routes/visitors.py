"""``/_gateway/register``: the registration gate's form, and the confirmation link it
mails (``flows.registration``). Without a ``registered`` rule both answer 404.

The mailed link opens a page with one button; only that same-origin POST uses the
link, so a mail scanner that opens links cannot use it up (or sign itself in). Past the
gateway's ``[limits] registrations_total`` the form answers 503 with ``Retry-After``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from gateway.errors import N_
from gateway.flows.registration import CONFIRM_PATH, HOUR, RegistrationFlow
from gateway.paths import safe_next
from gateway.routes.common import field, rate_limit, read_form, require_same_origin
from gateway.web import error_answer, render, to_response
from gateway.web.forms import client_ip

if TYPE_CHECKING:
    from gateway.app import Gateway

PATH = "/_gateway/register"
TOKEN_FIELD_LIMIT = 100  # characters of a token read from a request; real ones are 43


def routes(gw: Gateway) -> list[Route]:
    def closed(request: Request) -> Response | None:
        """The 404 every registration path answers while no rule lets readers in."""
        if gw.flows.registration.open:
            return None
        return to_response(error_answer(404, N_("Not found"),
                                        N_("There is nothing here for that request."),
                                        accept=request.headers.get("accept", "")))

    async def register(request: Request) -> Response:
        if (refused := closed(request)) is not None:
            return refused
        flow = gw.flows.registration
        if request.method == "GET":
            next_url = safe_next(request.query_params.get("next"))
            return page(flow, next_url, email="", consent=False, errors={})
        require_same_origin(gw, request)
        await rate_limit(gw.stores.keys, request, "registrations",
                         gw.settings.limits.registrations)
        form = await read_form(request)
        next_url = safe_next(field(form, "next"))
        typed = field(form, "email")[:300]
        consent = field(form, "consent") == "yes"
        done = await flow.register(
            typed, consent, next_url=next_url, user_agent=request.headers.get("user-agent", ""),
            client_ip=client_ip(request))
        if done.errors:
            return page(flow, next_url, email=typed, consent=consent, errors=done.errors,
                        status=400)
        if done.paused:
            return paused(request)
        if done.mailed:
            return to_response(render(
                "register_sent.html", title="Check your inbox",
                minutes=gw.settings.registration.link_lifetime // 60))
        return signed_in(next_url, done.cookie)

    async def confirm(request: Request) -> Response:
        if (refused := closed(request)) is not None:
            return refused
        flow = gw.flows.registration
        if request.method == "GET":
            token = request.query_params.get("token", "")[:TOKEN_FIELD_LIMIT]
            if not await flow.link_is_live(token):
                return link_gone(request)
            return to_response(render("register_confirm.html", title="Confirm your address",
                                      token=token, action=CONFIRM_PATH))
        require_same_origin(gw, request)
        await rate_limit(gw.stores.keys, request, "registrations",
                         gw.settings.limits.registrations)
        form = await read_form(request)
        done = await flow.confirm(field(form, "token")[:TOKEN_FIELD_LIMIT],
                                  user_agent=request.headers.get("user-agent", ""),
                                  client_ip=client_ip(request))
        if done is None:
            return link_gone(request)
        return signed_in(done.next_url, done.cookie)

    def signed_in(next_url: str, cookie: str) -> Response:
        response = RedirectResponse(next_url, status_code=303)
        response.headers["cache-control"] = "no-store"
        response.headers.append("set-cookie", gw.cookies.session(cookie))
        return response

    def paused(request: Request) -> Response:
        """Over the gateway's registrations this hour: nothing was kept, try later."""
        response = to_response(error_answer(
            503, N_("Temporarily unavailable"),
            N_("Many people registered in the last hour, so registration is paused for "
               "now. Please try again later."),
            accept=request.headers.get("accept", "")))
        response.headers["retry-after"] = str(HOUR)
        return response

    def link_gone(request: Request) -> Response:
        return to_response(error_answer(
            410, N_("Link used or expired"),
            N_("This confirmation link was used already or has expired. Each link works "
               "once. You can register again to get a new one."),
            accept=request.headers.get("accept", ""), template="register_gone.html",
            register_url=PATH))

    def page(flow: RegistrationFlow, next_url: str, *, email: str, consent: bool,
             errors: dict[str, str], status: int = 200) -> Response:
        settings = gw.settings.registration
        return to_response(render(
            "register.html", status, title="Read the free issue", next=next_url,
            email=email, consent=consent, errors=errors, consent_text=flow.consent_text,
            verify=flow.verify,
            privacy_url=settings.privacy_url, retention_days=settings.retention_days,
            sign_in_url=gw.sign_in_url(next_url)))

    return [Route(PATH, register, methods=["GET", "POST"]),
            Route(CONFIRM_PATH, confirm, methods=["GET", "POST"])]
