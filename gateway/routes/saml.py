"""``/saml/*``: SP metadata, the sign-in page and login start, the ACS, sign-out and SLO."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from gateway.audit import audit
from gateway.errors import LogoutFailed, UnknownIdP
from gateway.logs import session_hash
from gateway.paths import safe_next
from gateway.routes import sign_in
from gateway.routes.common import (
    check_csrf,
    csrf_token,
    current_session,
    field,
    rate_limit,
    read_form,
    require_same_origin,
)
from gateway.saml import IdP
from gateway.saml.slo import (
    MAX_MESSAGE_AGE,
    PENDING_TTL,
    REQUEST,
    IdPLogout,
    Message,
    SingleLogout,
    read_post,
    read_redirect,
)
from gateway.sessions import SessionRecord
from gateway.web import error_answer, new_reference, render, to_response

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("gateway")
MAX_ACS_BODY = 512 * 1024
MAX_SLS_BODY = 256 * 1024


def routes(gw: Gateway) -> list[Route]:
    async def metadata(request: Request) -> Response:
        return Response(gw.metadata_xml, media_type="application/samlmetadata+xml",
                        headers={"cache-control": "public, max-age=3600"})

    async def login(request: Request) -> Response:
        next_url = safe_next(request.query_params.get("next"))
        chosen = request.query_params.get("idp")
        try:
            idp = gw.login.choose_idp(chosen)
        except UnknownIdP as exc:
            return sign_in.unknown_idp(gw, request, chosen or "", exc, next_url)
        if idp is None or (not chosen and not gw.settings.idp.auto_redirect):
            if gw.settings.idp.discovery_url and "ds" not in request.query_params:
                return sign_in.discovery(gw, next_url)
            return sign_in.page(gw, request, next_url)
        await rate_limit(gw, request, "logins", gw.settings.limits.logins)
        started = await gw.login.start(idp, next_url)
        response = RedirectResponse(started.redirect_url, status_code=302)
        response.headers["cache-control"] = "no-store"
        response.headers.append("set-cookie", started.cookie.header().decode("latin-1"))
        if chosen:
            response.headers.append("set-cookie", sign_in.remember(gw, idp))
        return response

    async def acs(request: Request) -> Response:
        await rate_limit(gw, request, "logins", gw.settings.limits.logins)
        form = await read_form(request, MAX_ACS_BODY)
        client = request.client.host if request.client else ""
        done = await gw.login.finish(form, request.cookies,
                                     user_agent=request.headers.get("user-agent", ""),
                                     client_ip=client)
        response = RedirectResponse(done.next_url, status_code=302)
        response.headers["cache-control"] = "no-store"
        response.headers.append("set-cookie", gw.session_cookie_header(done.session_cookie_value))
        if done.clear_cookie is not None:
            response.headers.append("set-cookie", done.clear_cookie.header().decode("latin-1"))
        return response

    slo = SingleLogout(gw.sp, gw.registry, gw.clock)

    def signed_out() -> Response:
        response = to_response(render("signed_out.html", title="Signed out"))
        response.headers.append("set-cookie", gw.clear_session_cookie_header())
        return response

    async def logout(request: Request) -> Response:
        """GET asks for confirmation (a link must never sign anyone out); POST signs out:
        the session ends here first, then (for a member whose IdP has SLO) at the IdP."""
        record = await current_session(gw, request)
        if request.method == "GET":
            if record is None:
                return to_response(render("signed_out.html", title="Signed out"))
            page = to_response(render("sign_out.html", title="Sign out",
                                      csrf=csrf_token(gw, record),
                                      display_name=record.principal.display_name))
            idp = slo_idp(record)
            if idp is not None:
                # Browsers apply form-action to the redirects after a submission too: the
                # form's POST ends in a redirect to the IdP's SLO endpoint.
                parts = urlsplit(idp.slo_url)
                csp = page.headers["content-security-policy"].replace(
                    "form-action 'self'", f"form-action 'self' {parts.scheme}://{parts.netloc}")
                page.headers["content-security-policy"] = csp
            return page
        require_same_origin(gw, request)
        form = await read_form(request)
        if record is None:
            return signed_out()
        check_csrf(gw, record, field(form, "csrf"))
        await gw.sessions.revoke(record.key)
        audit("logout", member_id=record.principal.member_id, session=session_hash(record.key),
              idp=record.principal.idp)
        url = await start_idp_logout(record)
        if url is None:
            return signed_out()
        response = RedirectResponse(url, status_code=302)
        response.headers["cache-control"] = "no-store"
        response.headers.append("set-cookie", gw.clear_session_cookie_header())
        return response

    def slo_idp(record: SessionRecord) -> IdP | None:
        """The IdP to send a LogoutRequest to: a member's, if it has an SLO endpoint."""
        principal = record.principal
        if not principal.is_member or principal.idp not in gw.registry:
            return None
        idp = gw.registry.get(principal.idp)
        return idp if idp.slo_url else None

    async def start_idp_logout(record: SessionRecord) -> str | None:
        """The IdP's SLO URL with a signed LogoutRequest, or None when there is none to send."""
        principal = record.principal
        idp = slo_idp(record)
        if idp is None:
            return None
        try:
            started = await run_in_threadpool(slo.start, idp, principal)
        except Exception:  # the local session is gone already; the IdP leg is best effort
            log.exception("could not build a LogoutRequest for IdP %s", idp.entity_id)
            return None
        await gw.store.add_once(f"slo:{started.request_id}", idp.entity_id, PENDING_TTL)
        audit("slo_out", idp=idp.entity_id, member_id=principal.member_id, result="sent")
        log.info("logout member=%s sent to IdP %s", principal.member_id, idp.entity_id)
        return started.url

    async def sls(request: Request) -> Response:
        """The IdP's LogoutResponse to our LogoutRequest, or the IdP's own LogoutRequest."""
        kind = "unknown"
        try:
            message: Message
            if request.method == "GET":
                message = read_redirect(request.scope["query_string"].decode("latin-1"))
            else:
                message = read_post(await read_form(request, MAX_SLS_BODY))
            kind = message.kind
            if message.kind == REQUEST:
                return await idp_logout(request, message)
            answer = await run_in_threadpool(slo.accept_response, message)
            pending = await gw.store.take(f"slo:{answer.in_response_to}")
            if pending != answer.idp.entity_id:
                raise LogoutFailed("in_response_to", "The LogoutResponse answers no pending "
                                   "logout of that IdP (unknown, expired or replayed).")
        except LogoutFailed as exc:
            return refused(request, exc, kind)
        log.info("logout confirmed by IdP %s", answer.idp.entity_id)
        audit("slo_in", idp=answer.idp.entity_id, result="logout_response")
        return signed_out()

    async def idp_logout(request: Request, message: Message) -> Response:
        logout: IdPLogout = await run_in_threadpool(slo.accept_request, message)
        current = await current_session(gw, request)
        seen = f"slo-in:{logout.idp.entity_id}:{logout.request_id}"
        if not await gw.store.add_once(seen, "1", MAX_MESSAGE_AGE * 2 + 360):
            raise LogoutFailed("replayed", "This LogoutRequest was received before.")
        ended = 0
        for record in await gw.store.sessions_for_name_id(logout.idp.entity_id, logout.name_id):
            if logout.ends(record.principal) and await gw.store.delete_session(record.key):
                ended += 1
        log.info("IdP %s ended %d session(s) by LogoutRequest %s", logout.idp.entity_id,
                 ended, logout.request_id)
        audit("slo_in", idp=logout.idp.entity_id, sessions_ended=ended,
              result="logout_request")
        url = await run_in_threadpool(slo.answer, logout)
        if url is None:
            return signed_out()
        response = RedirectResponse(url, status_code=302)
        response.headers["cache-control"] = "no-store"
        if current is not None and logout.ends(current.principal):
            # The browser carrying the request was one of them: its cookie goes too.
            response.headers.append("set-cookie", gw.clear_session_cookie_header())
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
        return to_response(error_answer(400, title, text, reference=ref,
                                        accept=request.headers.get("accept", "")))

    return [
        Route("/saml/metadata", metadata),
        Route("/saml/login", login),
        Route("/saml/acs", acs, methods=["POST"]),
        Route("/saml/logout", logout, methods=["GET", "POST"]),
        Route("/saml/sls", sls, methods=["GET", "POST"]),
    ]
