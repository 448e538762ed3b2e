"""The dev IdP's Single Logout: ``/slo`` for the SP's messages, ``/slo/initiate`` to start one.

SP-initiated: the SP's signed LogoutRequest (HTTP-Redirect) ends the IdP session (the
``devidp_session`` cookie) and the browser goes back to the SP's SLS with a signed
LogoutResponse. IdP-initiated (DEVELOPMENT ONLY, for tests and the demo): ``POST
/slo/initiate`` with ``username`` and ``binding`` (``redirect`` or ``post``) sends a
signed LogoutRequest naming that user's NameID and every SessionIndex the IdP issued
since, and the SP's LogoutResponse comes back to ``/slo``.

The logins (username → SessionIndexes) and the outstanding request IDs are kept in
memory: a restart forgets them, which is fine for development.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import unquote_plus

from onelogin.saml2.constants import OneLogin_Saml2_Constants as C
from onelogin.saml2.utils import OneLogin_Saml2_Utils
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from gateway.devidp.authn_request import (
    ALLOWED_SIG_ALGS,
    AuthnRequestError,
    parse_redirect_query,
    verify_redirect_signature,
)
from gateway.devidp.logout import (
    LogoutMessage,
    build_logout_request,
    build_logout_response,
    read_logout_message,
    redirect_query,
    sign_enveloped,
)
from gateway.devidp.users import NAMEID_PERSISTENT, find_user, persistent_name_id

if TYPE_CHECKING:
    from gateway.devidp.app import _DevIdP

PENDING_MAX = 1000  # outstanding IdP-initiated logouts kept; the oldest are dropped


class Logouts:
    def __init__(self, idp: _DevIdP) -> None:
        self.idp = idp
        self.settings = idp.settings
        self.logins: dict[str, list[str]] = {}  # username → SessionIndexes issued
        self.pending: dict[str, str] = {}  # IdP-initiated LogoutRequest ID → username

    def remember(self, username: str, session_index: str) -> None:
        self.logins.setdefault(username, []).append(session_index)

    def refuse(self, message: str) -> Response:
        return self.idp.page("error.html", 400, heading="Sign-out refused", message=message)

    # -- /slo ------------------------------------------------------------------

    async def slo(self, request: Request) -> Response:
        raw = request.scope["query_string"].decode("latin-1")
        try:
            params = parse_redirect_query(raw)
            kind = "SAMLRequest" if "SAMLRequest" in params else "SAMLResponse"
            if kind not in params:
                raise AuthnRequestError("There is no logout message in this address.")
            if unquote_plus(params.get("SigAlg", "")) not in ALLOWED_SIG_ALGS or not (
                self.settings.sp_cert_pem
                and verify_redirect_signature(raw, self.settings.sp_cert_pem, kind)
            ):
                raise AuthnRequestError("The logout message is not signed by the SP.")
            message = await run_in_threadpool(
                read_logout_message, unquote_plus(params[kind]), deflated=True
            )
            self.check_sender(message)
        except AuthnRequestError as exc:
            return self.refuse(str(exc))
        if message.kind == "LogoutRequest":
            relay = params.get("RelayState")
            return await self.sp_logout(request, message, None if relay is None
                                        else unquote_plus(relay))
        return self.sp_answer(message)

    def check_sender(self, message: LogoutMessage) -> None:
        s = self.settings
        if message.issuer != s.sp_entity_id:
            raise AuthnRequestError(f"The message comes from {message.issuer}, not the SP.")
        if message.destination != s.slo_url:
            raise AuthnRequestError(f"The message is addressed to {message.destination}.")

    async def sp_logout(
        self, request: Request, message: LogoutMessage, relay_state: str | None
    ) -> Response:
        """The SP's LogoutRequest: end the IdP session and answer at the SP's SLS."""
        s = self.settings
        user = next((u for u in s.users
                     if persistent_name_id(s.entity_id, u.username) == message.name_id), None)
        if user is not None:
            indexes = self.logins.get(user.username, [])
            for index in message.session_indexes or tuple(indexes):
                if index in indexes:
                    indexes.remove(index)
        xml = build_logout_response(issuer=s.entity_id, destination=s.sp_sls_url,
                                    in_response_to=message.id, now=s.clock())
        query = await run_in_threadpool(lambda: redirect_query(
            "SAMLResponse", xml, key_pem=s.key_pem, relay_state=relay_state))
        response = RedirectResponse(f"{s.sp_sls_url}?{query}", status_code=302)
        response.headers["cache-control"] = "no-store"
        response.delete_cookie(self.idp.session_cookie)
        return response

    def sp_answer(self, message: LogoutMessage) -> Response:
        """The SP's LogoutResponse to a logout this IdP started."""
        username = self.pending.pop(message.in_response_to or "", None)
        if username is None:
            return self.refuse("This LogoutResponse answers no sign-out this IdP started.")
        if message.status != C.STATUS_SUCCESS:
            return self.refuse(f"The service did not sign {username} out ({message.status}).")
        return self.idp.page("logged_out.html",
                             message=f"The service confirmed that {username} is signed out.")

    # -- /slo/initiate (DEVELOPMENT ONLY) ------------------------------------------

    async def initiate(self, request: Request) -> Response:
        async with request.form() as form:
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
        s = self.settings
        user = find_user(s.users, fields.get("username", ""))
        binding = fields.get("binding", "redirect")
        if user is None or binding not in ("redirect", "post"):
            return self.refuse("Give a known username and binding=redirect or post.")
        indexes = tuple(self.logins.pop(user.username, []))
        xml = build_logout_request(
            issuer=s.entity_id, destination=s.sp_sls_url,
            name_id=persistent_name_id(s.entity_id, user.username),
            name_id_format=NAMEID_PERSISTENT, session_indexes=indexes, now=s.clock())
        message = read_logout_message(OneLogin_Saml2_Utils.b64encode(xml), deflated=False)
        while len(self.pending) >= PENDING_MAX:
            self.pending.pop(next(iter(self.pending)))
        self.pending[message.id] = user.username
        relay = fields.get("relay_state") or None
        if binding == "redirect":
            query = await run_in_threadpool(lambda: redirect_query(
                "SAMLRequest", xml, key_pem=s.key_pem, relay_state=relay))
            response: Response = RedirectResponse(f"{s.sp_sls_url}?{query}", status_code=302)
        else:
            signed = await run_in_threadpool(sign_enveloped, xml, s.key_pem, s.cert_pem)
            response = self.idp.page(
                "logout_post.html", sls_url=s.sp_sls_url, relay_state=relay,
                saml_request=OneLogin_Saml2_Utils.b64encode(signed),
                display_name=user.display_name)
        response.headers["cache-control"] = "no-store"
        session = self.idp.session(request)
        if session is not None and session[0].username == user.username:
            response.delete_cookie(self.idp.session_cookie)
        return response
