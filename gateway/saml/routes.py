"""``/saml/*``: SP metadata, the sign-in page and login start, the ACS, and the SLS.

Handlers parse the request, call the SAML login or Single Logout, and answer; sessions
start and end through the gateway's ``SignInServices``. The gateway's sign-out page is
served at ``/saml/logout`` (``SamlProtocol.sign_out_path``) by the gateway itself.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from gateway.audit import audit
from gateway.errors import LogoutFailed, UnknownIdP
from gateway.paths import safe_next
from gateway.protocol import SignInServices
from gateway.saml import sign_in
from gateway.saml.login import SamlLogin
from gateway.saml.slo import (
    MAX_MESSAGE_AGE,
    REQUEST,
    Examined,
    Message,
    read_post,
    read_redirect,
)
from gateway.sessions import Namespace
from gateway.web import error_answer, new_reference, render, to_response
from gateway.web.forms import read_form

if TYPE_CHECKING:
    from gateway.saml.protocol import SamlProtocol

log = logging.getLogger("gateway")
MAX_ACS_BODY = 512 * 1024
MAX_SLS_BODY = 256 * 1024
REMEMBER_PATH = "/saml/"


def routes(saml: SamlProtocol, services: SignInServices) -> list[Route]:
    """The SAML endpoints, bound to one gateway's services."""
    settings, cookies = services.settings, services.cookies
    flow = SamlLogin(saml.sp, saml.registry, services, saml.clock)
    slo = saml.slo

    async def metadata(request: Request) -> Response:
        return Response(saml.metadata_xml, media_type="application/samlmetadata+xml",
                        headers={"cache-control": "public, max-age=3600"})

    async def login(request: Request) -> Response:
        next_url = safe_next(request.query_params.get("next"))
        chosen = request.query_params.get("idp")
        if chosen:
            # Before anything is written: a refused choice is recorded for `explain`, a
            # known one starts a pending sign-in; both count against the client's limit.
            await services.rate_limit(request, "logins", settings.limits.logins)
        try:
            idp = flow.choose_idp(chosen)
        except UnknownIdP as exc:
            return sign_in.unknown_idp(services, request, chosen or "", exc, next_url)
        if idp is None or (not chosen and not settings.idp.auto_redirect):
            if settings.idp.discovery_url and "ds" not in request.query_params:
                return sign_in.discovery(settings, next_url)
            return sign_in.page(cookies, saml.registry, request, next_url)
        if not chosen:  # the one IdP, straight away: the same limit
            await services.rate_limit(request, "logins", settings.limits.logins)
        started = await flow.start(idp, next_url)
        response = RedirectResponse(started.redirect_url, status_code=302)
        response.headers["cache-control"] = "no-store"
        response.headers.append("set-cookie", started.binding_cookie)
        if chosen:
            response.headers.append("set-cookie",
                                    cookies.remember_idp(idp.entity_id, path=REMEMBER_PATH))
        return response

    async def acs(request: Request) -> Response:
        await services.rate_limit(request, "logins", settings.limits.logins)
        form = await read_form(request, MAX_ACS_BODY)
        done = await flow.finish(form, request)
        response = RedirectResponse(done.next_url, status_code=302)
        response.headers["cache-control"] = "no-store"
        response.headers.append("set-cookie", cookies.session(done.session_cookie_value))
        if done.clear_binding is not None:
            response.headers.append("set-cookie", done.clear_binding)
        return response

    def signed_out() -> Response:
        response = to_response(render("signed_out.html", title="Signed out"))
        response.headers.append("set-cookie", cookies.clear_session())
        return response

    async def sls(request: Request) -> Response:
        """The IdP's LogoutResponse to our LogoutRequest, or the IdP's own LogoutRequest.

        Cheapest checks first: the client's rate limit, the size and shape of the message,
        its Destination and age (``SingleLogout.examine``), whether its ID was seen or is
        pending, and only then its signature."""
        await services.rate_limit(request, "logouts", settings.limits.logouts)
        kind = "unknown"
        try:
            message: Message
            if request.method == "GET":
                message = read_redirect(request.scope["query_string"].decode("latin-1"))
            else:
                message = read_post(await read_form(request, MAX_SLS_BODY))
            kind = message.kind
            examined = await run_in_threadpool(slo.examine, message)
            if examined.kind == REQUEST:
                return await idp_logout(request, examined)
            pending_key = Namespace.LOGOUT + examined.in_response_to
            if await services.keys.get(pending_key) != examined.idp.entity_id:
                raise LogoutFailed("in_response_to", "The LogoutResponse answers no pending "
                                   "logout of that IdP (unknown, expired or replayed).")
            answer = await run_in_threadpool(slo.accept_response, examined)
            if await services.keys.take(pending_key) != answer.idp.entity_id:
                raise LogoutFailed("in_response_to", "The LogoutResponse answers no pending "
                                   "logout of that IdP (unknown, expired or replayed).")
        except LogoutFailed as exc:
            return refused(request, exc, kind)
        log.info("logout confirmed by IdP %s", answer.idp.entity_id)
        audit("slo_in", idp=answer.idp.entity_id, result="logout_response")
        return signed_out()

    async def idp_logout(request: Request, examined: Examined) -> Response:
        seen = f"{Namespace.LOGOUT_SEEN}{examined.idp.entity_id}:{examined.message_id}"
        if await services.keys.get(seen) is not None:  # a read: nothing is written yet
            raise LogoutFailed("replayed", "This LogoutRequest was received before.")
        logout = await run_in_threadpool(slo.accept_request, examined)
        current = await services.current_session(request)
        if not await services.keys.add_once(seen, "1", MAX_MESSAGE_AGE * 2 + 360):
            raise LogoutFailed("replayed", "This LogoutRequest was received before.")
        log.info("LogoutRequest %s from IdP %s accepted", logout.request_id,
                 logout.idp.entity_id)
        await services.end_for_logout(logout.handle, logout.ends, idp=logout.idp.entity_id)
        url = await run_in_threadpool(slo.answer, logout)
        if url is None:
            return signed_out()
        response = RedirectResponse(url, status_code=302)
        response.headers["cache-control"] = "no-store"
        if current is not None and logout.ends(current.principal):
            # The browser carrying the request was one of them: its cookie goes too.
            response.headers.append("set-cookie", cookies.clear_session())
        return response

    def refused(request: Request, exc: LogoutFailed, kind: str) -> Response:
        ref = new_reference()
        log.warning("logout refused ref=%s kind=%s reason=%s", ref, exc.kind, exc.reason)
        if kind == REQUEST or kind == "unknown":
            title, text = "Sign-out request refused", (
                "This sign-out request could not be accepted; nothing was changed.")
        else:
            title, text = "Sign-out not confirmed", (
                "Your session on this site has ended, but your identity provider's "
                "confirmation could not be accepted. Close the browser to be sure you are "
                "signed out everywhere.")
        return to_response(error_answer(exc.status, title, text, reference=ref,
                                        accept=request.headers.get("accept", "")))

    return [
        Route("/saml/metadata", metadata),
        Route(sign_in.LOGIN_PATH, login),
        Route("/saml/acs", acs, methods=["POST"]),
        Route("/saml/sls", sls, methods=["GET", "POST"]),
    ]
