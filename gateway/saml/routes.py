"""``/saml/*``: SP metadata, the sign-in page and login start, the ACS, the SLS, and
the DiscoFeed (the IdP list as JSON for an external discovery service).

Handlers parse the request, call the SAML login or Single Logout, and answer; sessions
start and end through the gateway's ``SignInServices``. The gateway's sign-out page is
served at ``/saml/logout`` (``SamlProtocol.sign_out_path``) by the gateway itself.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from gateway.answers import step_up_refusal
from gateway.audit import audit
from gateway.errors import (
    N_,
    BadRequest,
    LogoutFailed,
    SignInsBusy,
    StepUpFailed,
    TooManyRequests,
    UnknownIdP,
)
from gateway.paths import safe_next
from gateway.protocol import SignInOptions, SignInServices
from gateway.saml import sign_in
from gateway.saml.discovery import Discovery
from gateway.saml.login import SamlLogin
from gateway.saml.slo import (
    MAX_MESSAGE_AGE,
    REQUEST,
    Examined,
    Message,
    Outgoing,
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


def post_page(message: Outgoing) -> Response:
    """A logout message sent by HTTP-POST: a form that submits itself (a button without
    scripts); the page's CSP lets a form go to that IdP's origin only."""
    page = to_response(render("saml_post.html", title=N_("Signing you out"),
                              message=N_("Your identity provider is being told that you "
                                         "signed out."), action=message.url,
                              fields=message.fields))
    target = urlsplit(message.url)
    page.headers["content-security-policy"] = page.headers["content-security-policy"].replace(
        "form-action 'self'", f"form-action {target.scheme}://{target.netloc}")
    return page


def not_a_page_load(request: Request) -> str:
    """Why ``request`` is not a browser's top-level page load, or "" when it is (or the
    client sends no Fetch Metadata). An image, a script, a fetch or a prefetch that a web
    page fires must not start a sign-in: it would spend the sign-in limit of everyone
    behind the visitor's address and store a pending sign-in for nothing."""
    mode = request.headers.get("sec-fetch-mode", "navigate")
    dest = request.headers.get("sec-fetch-dest", "document")
    purpose = request.headers.get("sec-purpose", "")
    if mode == "navigate" and dest == "document" and "prefetch" not in purpose:
        return ""
    return (f"Sec-Fetch-Mode {mode[:40]!r}, Sec-Fetch-Dest {dest[:40]!r}, "
            f"Sec-Purpose {purpose[:40]!r}")


def routes(saml: SamlProtocol, services: SignInServices) -> list[Route]:
    """The SAML endpoints, bound to one gateway's services."""
    settings, cookies = services.settings, services.cookies
    flow = SamlLogin(saml.sp, saml.registry, services, saml.clock, mdq=saml.mdq)
    slo = saml.slo
    discovery = Discovery(saml.registry)

    async def metadata(request: Request) -> Response:
        return Response(saml.metadata_xml, media_type="application/samlmetadata+xml",
                        headers={"cache-control": "public, max-age=3600"})

    async def count_start(request: Request) -> None:
        """A sign-in start: refused unless it is a page load, then counted against the
        client's limit (``TooManyRequests``)."""
        why = not_a_page_load(request)
        if why:
            raise BadRequest(f"a sign-in start must be a page load, not a subresource ({why})")
        await services.rate_limit(request, "logins", settings.limits.logins)

    async def login(request: Request) -> Response:
        next_url = safe_next(request.query_params.get("next"))
        options = flow.options(request.query_params.multi_items())
        if options.passive:
            return await passive_login(request, next_url, options)
        chosen = request.query_params.get("idp")
        if chosen:
            # Before anything is written: a refused choice is recorded for `explain`, a
            # known one starts a pending sign-in; both count against the client's limit.
            await count_start(request)
        try:
            idp = await flow.find_idp(chosen, request)
        except UnknownIdP as exc:
            return sign_in.unknown_idp(services, request, chosen or "", exc, next_url)
        at_session_idp = False
        if options.step_up and not chosen:  # a step-up goes to the member's own IdP
            session_idp = flow.session_idp(await services.current_session(request))
            if session_idp is not None:
                idp, at_session_idp = session_idp, True
        if idp is None or (not chosen and not at_session_idp and not settings.idp.auto_redirect):
            if settings.idp.discovery_url and "ds" not in request.query_params:
                return sign_in.discovery(settings, next_url)
            catalogue = await run_in_threadpool(discovery.catalogue)
            return sign_in.page(settings, cookies, saml.registry, catalogue, request, next_url)
        if not chosen:  # the one IdP, straight away: the same limit
            await count_start(request)
        started = await flow.start(idp, next_url, options)
        response = RedirectResponse(started.redirect_url, status_code=302)
        response.headers["cache-control"] = "no-store"
        response.headers.append("set-cookie", started.binding_cookie)
        if chosen:
            response.headers.append("set-cookie",
                                    cookies.remember_idp(idp.entity_id, path=REMEMBER_PATH))
        return response

    async def passive_login(request: Request, next_url: str,
                            options: SignInOptions) -> Response:
        """IsPassive at the remembered (or only) IdP; straight back to ``next_url`` when
        there is none, the visitor has a session, or the client is over its limit. Never
        a page: a passive sign-in must not be seen."""
        idp = flow.passive_idp(cookies.remembered_idp(request.scope["headers"]))
        back = RedirectResponse(next_url, status_code=302)
        back.headers["cache-control"] = "no-store"
        if idp is None or await services.current_session(request) is not None:
            return back
        try:
            await count_start(request)
            started = await flow.start(idp, next_url, options)
        except (BadRequest, TooManyRequests, SignInsBusy):
            return back
        response = RedirectResponse(started.redirect_url, status_code=302)
        response.headers["cache-control"] = "no-store"
        response.headers.append("set-cookie", started.binding_cookie)
        return response

    async def acs(request: Request) -> Response:
        """The IdP's answer. A post that answers a sign-in this browser started and that
        is still pending is not counted (``SamlLogin.answers_pending``); every other post
        counts against the client's ACS limit, apart from its sign-in starts, so neither
        can be spent for the other."""
        form = await read_form(request, MAX_ACS_BODY)
        if not await flow.answers_pending(form, request):
            await services.rate_limit(request, "acs", settings.limits.logins)
        try:
            done = await flow.finish(form, request)
        except StepUpFailed as exc:  # the page needs what the IdP did not give: say what
            reference = services.login_failed(exc)
            return to_response(step_up_refusal(
                exc.authn_context, fresh=exc.fresh, reference=reference,
                accept=request.headers.get("accept", "")))
        response = RedirectResponse(done.next_url, status_code=302)
        response.headers["cache-control"] = "no-store"
        if done.record is not None:  # None: a passive sign-in came back without one
            response.headers.append("set-cookie", cookies.session(done.session_cookie_value))
        if done.clear_binding is not None:
            response.headers.append("set-cookie", done.clear_binding)
        return response

    async def discofeed(request: Request) -> Response:
        catalogue = await run_in_threadpool(discovery.catalogue)
        await run_in_threadpool(catalogue.feed)  # built once per registry generation
        return sign_in.feed(catalogue, request)

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
        outgoing = await run_in_threadpool(slo.answer, logout)
        if outgoing is None:
            return signed_out()
        response = post_page(outgoing) if outgoing.is_post else RedirectResponse(
            outgoing.url, status_code=302, headers={"cache-control": "no-store"})
        if current is not None and logout.ends(current.principal):
            # The browser carrying the request was one of them: its cookie goes too.
            response.headers.append("set-cookie", cookies.clear_session())
        return response

    async def logout_form(request: Request) -> Response:
        """The page that posts a kept LogoutRequest to an IdP with POST-only Single Logout
        (``SamlProtocol.start_logout``); the gateway session has ended already."""
        await services.rate_limit(request, "logouts", settings.limits.logouts)
        outgoing = await saml.take_logout_form(request.path_params["token"])
        return signed_out() if outgoing is None else post_page(outgoing)

    def refused(request: Request, exc: LogoutFailed, kind: str) -> Response:
        ref = new_reference()
        log.warning("logout refused ref=%s kind=%s reason=%s", ref, exc.kind, exc.reason)
        if kind == REQUEST or kind == "unknown":
            title, text = N_("Sign-out request refused"), N_(
                "This sign-out request could not be accepted; nothing was changed.")
        else:
            title, text = N_("Sign-out not confirmed"), N_(
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
        Route("/saml/slo/post/{token}", logout_form),
        *([Route(sign_in.FEED_PATH, discofeed)] if settings.idp.discofeed else []),
    ]
