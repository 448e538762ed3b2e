"""The development IdP as a Starlette app: metadata, SSO over HTTP-Redirect, a login form,
and Single Logout (``gateway.devidp.slo``).

Sign-in keeps no server-side state (logout remembers the SessionIndexes it issued, in
memory). The pending AuthnRequest (ID, ACS URL, RelayState, what it asks for) rides
in a hidden form field signed with a per-instance secret, so two tabs with two
concurrent sign-ins each complete on their own; the IdP "session" is a signed cookie
naming the user, when they authenticated and how. Restarting the IdP invalidates both,
which is fine for development.

What an SP may ask for, as real IdPs answer it:

* ``RequestedAuthnContext`` (exact): ``PasswordProtectedTransport`` is a password;
  ``https://refeds.org/profile/mfa`` is a password plus the one-time code ``DEMO_CODE``,
  for users with a second factor (``NoAuthnContext`` for the others, and for any class
  the IdP does not know). Without a request the IdP says how the user authenticated;
* ``ForceAuthn``: the password is asked again even with an IdP session;
* ``IsPassive``: no page at all. With an IdP session that satisfies the request the
  Response is posted straight back; otherwise ``NoPassive``;
* ``AuthnInstant`` is when the user last typed their password (or code).
"""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote_plus

import jinja2
from itsdangerous import BadSignature, URLSafeTimedSerializer
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C
from onelogin.saml2.utils import OneLogin_Saml2_Utils
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from gateway.config import is_loopback
from gateway.devidp.authn_request import ALLOWED_SIG_ALGS
from gateway.devidp.metadata import MEDIA_TYPE, idp_metadata
from gateway.devidp.response import (
    NO_AUTHN_CONTEXT,
    NO_PASSIVE,
    PASSWORD_PROTECTED_TRANSPORT,
    REFEDS_MFA,
    AuthnRequestError,
    build_response,
    build_status_response,
    new_id,
    parse_authn_request,
    parse_redirect_query,
    verify_redirect_signature,
)
from gateway.devidp.settings import DevIdPSettings, ensure_keys
from gateway.devidp.slo import Logouts
from gateway.devidp.users import (
    DEMO_CODE,
    DEMO_PASSWORD,
    NAMEID_PERSISTENT,
    DemoUser,
    authenticate,
    find_user,
    persistent_name_id,
)

__all__ = ["DevIdPSettings", "create_app", "ensure_keys", "run"]

PENDING_MAX_AGE: Final = 600
REQUEST_MAX_AGE: Final = 600  # how old an AuthnRequest's IssueInstant may be
CLOCK_SKEW: Final = 120
SESSION_COOKIE: Final = "devidp_session"
CODE_MAX_AGE: Final = 300  # seconds between the password and the one-time code
KNOWN_CONTEXTS: Final = frozenset({PASSWORD_PROTECTED_TRANSPORT, REFEDS_MFA})
_TEMPLATES: Final = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=True,
)


class _DevIdP:
    session_cookie: Final = SESSION_COOKIE

    def __init__(self, settings: DevIdPSettings) -> None:
        self.settings = settings
        secret = secrets.token_urlsafe(32)
        self.pending = URLSafeTimedSerializer(secret, salt="devidp-pending")
        self.sessions = URLSafeTimedSerializer(secret, salt="devidp-session")
        self.codes = URLSafeTimedSerializer(secret, salt="devidp-code")
        self.logouts = Logouts(self)

    # -- pages -----------------------------------------------------------------

    def page(self, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        html = _TEMPLATES.get_template(template).render(nonce=nonce, **context)
        return HTMLResponse(
            html,
            status_code=status,
            headers={
                "Cache-Control": "no-store",
                "Content-Security-Policy": (
                    f"default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; "
                    "frame-ancestors 'none'; base-uri 'none'"
                ),
                "X-Content-Type-Options": "nosniff",
            },
        )

    def error(self, message: str, status: int = 400) -> HTMLResponse:
        return self.page("error.html", status, heading="Sign-in request refused", message=message)

    def login_page(
        self, request: Request, pending: str, *, username: str = "", error: str | None = None,
        reprompt: bool = False,
    ) -> HTMLResponse:
        return self.page(
            "login.html",
            401 if error else 200,
            pending=pending,
            username=username,
            error=error,
            # ForceAuthn: the user must authenticate again, an IdP session is not enough.
            current_user=None if reprompt else (self.session(request) or (None,))[0],
            reprompt=reprompt,
            users=self.settings.users,
            password_hint=DEMO_PASSWORD,
            sp_entity_id=self.settings.sp_entity_id,
            login_url=self.settings.base_url + "/login",
        )

    def code_page(self, step: str, user: DemoUser, *, error: str | None = None) -> HTMLResponse:
        return self.page("code.html", 401 if error else 200, step=step, error=error,
                         display_name=user.display_name, code_hint=DEMO_CODE,
                         code_url=self.settings.base_url + "/login/code")

    def refuse(self, pending: dict[str, Any], sub_status: str, message: str) -> HTMLResponse:
        """Answer the SP with a refusal (a Response without an Assertion), as IdPs do."""
        xml = build_status_response(
            idp_entity_id=self.settings.entity_id, acs_url=pending["acs"],
            in_response_to=pending["id"], sub_status=sub_status, message=message,
            now=self.settings.clock())
        return self.page("post.html", acs_url=pending["acs"],
                         saml_response=OneLogin_Saml2_Utils.b64encode(xml),
                         relay_state=pending.get("relay"), display_name="",
                         heading="Returning you to the service")

    def session(self, request: Request) -> tuple[DemoUser, float, str] | None:
        """The signed-in user, when they last authenticated and how (the context class),
        from the IdP cookie."""
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        try:
            data = self.sessions.loads(token, max_age=self.settings.session_lifetime)
        except BadSignature:
            return None
        user = find_user(self.settings.users, str(data.get("u", "")))
        started = data.get("t")
        if user is None or not isinstance(started, int | float):
            return None
        return user, float(started), str(data.get("c") or PASSWORD_PROTECTED_TRANSPORT)

    # -- the AuthnRequest ------------------------------------------------------

    def accept_request(self, query_string_raw: str) -> dict[str, Any]:
        """Check the redirect-bound AuthnRequest; return what the login form must carry."""
        s = self.settings
        params = parse_redirect_query(query_string_raw)
        if "SAMLRequest" not in params:
            raise AuthnRequestError("There is no SAMLRequest in this address.")
        if "Signature" in params or s.require_signed_requests:
            if "Signature" not in params or "SigAlg" not in params:
                raise AuthnRequestError("The AuthnRequest is not signed; this IdP requires it.")
            algorithm = unquote_plus(params["SigAlg"])
            if algorithm not in ALLOWED_SIG_ALGS:
                raise AuthnRequestError(f"The signature algorithm {algorithm} is not accepted.")
            if not s.sp_cert_pem or not verify_redirect_signature(query_string_raw, s.sp_cert_pem):
                raise AuthnRequestError("The AuthnRequest signature does not verify.")
        info = parse_authn_request(unquote_plus(params["SAMLRequest"]))
        if info.issuer != s.sp_entity_id:
            raise AuthnRequestError(
                f"The request comes from {info.issuer}, "
                f"not from the configured SP {s.sp_entity_id}."
            )
        if info.acs_url is not None and info.acs_url != s.sp_acs_url:
            raise AuthnRequestError(
                f"The request asks for the response at {info.acs_url}, "
                f"but the SP's assertion consumer service is {s.sp_acs_url}."
            )
        if info.protocol_binding not in (None, C.BINDING_HTTP_POST):
            raise AuthnRequestError(f"Response binding {info.protocol_binding} is not supported.")
        if info.destination is not None and info.destination != s.sso_url:
            raise AuthnRequestError(f"The request is addressed to {info.destination}.")
        try:
            issued = OneLogin_Saml2_Utils.parse_SAML_to_time(info.issue_instant)
        except ValueError as exc:
            raise AuthnRequestError("The request's IssueInstant is not a date.") from exc
        now = s.clock()
        if not now - REQUEST_MAX_AGE <= issued <= now + CLOCK_SKEW:
            raise AuthnRequestError("The request is too old, or dated in the future.")
        if info.requested_contexts and info.comparison != "exact":
            raise AuthnRequestError(f"RequestedAuthnContext Comparison={info.comparison} is "
                                    "not supported; this IdP answers exact only.")
        relay = params.get("RelayState")
        return {
            "id": info.id,
            "acs": s.sp_acs_url,
            "relay": None if relay is None else unquote_plus(relay),
            "ctx": list(info.requested_contexts),
            "force": info.force_authn,
            "passive": info.is_passive,
        }

    # -- endpoints -------------------------------------------------------------

    async def metadata(self, request: Request) -> Response:
        return Response(idp_metadata(self.settings), media_type=MEDIA_TYPE)

    async def sso(self, request: Request) -> Response:
        raw = request.scope["query_string"].decode("latin-1")
        try:
            pending = await run_in_threadpool(self.accept_request, raw)
        except AuthnRequestError as exc:
            return self.error(str(exc))
        if pending["ctx"] and not KNOWN_CONTEXTS & set(pending["ctx"]):
            return self.refuse(pending, NO_AUTHN_CONTEXT,
                               "This IdP offers none of the requested authentication contexts.")
        if pending["passive"]:
            session = self.session(request)
            answered = None if session is None else _answered(pending["ctx"], session[2])
            if session is None or pending["force"] or answered is None:
                return self.refuse(pending, NO_PASSIVE, "The user would have to sign in.")
            return await self.post_response(session[0], pending, self.settings.clock(),
                                            session[1], answered)
        return self.login_page(request, self.pending.dumps(pending), reprompt=pending["force"])

    async def login(self, request: Request) -> Response:
        async with request.form() as form:
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
        token = fields.get("pending", "")
        try:
            pending = self.pending.loads(token, max_age=PENDING_MAX_AGE)
        except BadSignature:
            return self.error(
                "This sign-in form has expired or was altered. Start again at the service."
            )
        now = self.settings.clock()
        if fields.get("use_session"):
            session = self.session(request)
            if session is None or pending.get("force"):
                return self.login_page(
                    request, token, error="Your IdP session has ended; sign in again."
                    if session is None else "The service asks you to sign in again.",
                    reprompt=bool(pending.get("force")))
            user, session_started, context = session
        else:
            username = fields.get("username", "")
            found = authenticate(self.settings.users, username, fields.get("password", ""))
            if found is None:
                return self.login_page(
                    request, token, username=username, error="Unknown user or wrong password",
                    reprompt=bool(pending.get("force")))
            user, session_started, context = found, now, PASSWORD_PROTECTED_TRANSPORT
        answered = _answered(pending.get("ctx", []), context)
        if answered is not None:
            return await self.post_response(user, pending, now, session_started, answered)
        if not user.second_factor:  # MFA was asked for, and this user has no second factor
            return self.refuse(pending, NO_AUTHN_CONTEXT,
                               f"{user.username} has no second factor.")
        step = self.codes.dumps({"p": token, "u": user.username})
        return self.code_page(step, user)

    async def code(self, request: Request) -> Response:
        """The one-time code after the password: a multi-factor authentication."""
        async with request.form() as form:
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
        try:
            step = self.codes.loads(fields.get("step", ""), max_age=CODE_MAX_AGE)
            pending = self.pending.loads(step["p"], max_age=PENDING_MAX_AGE)
        except (BadSignature, KeyError, TypeError):
            return self.error("This sign-in form has expired or was altered. Start again at "
                              "the service.")
        user = find_user(self.settings.users, str(step.get("u", "")))
        if user is None or not user.second_factor:
            return self.error("This user has no second factor.")
        if not hmac.compare_digest(fields.get("code", "").encode(), DEMO_CODE.encode()):
            return self.code_page(fields.get("step", ""), user, error="Wrong code")
        now = self.settings.clock()
        return await self.post_response(user, pending, now, now, REFEDS_MFA)

    async def post_response(
        self, user: DemoUser, pending: dict[str, Any], now: float, session_started: float,
        authn_context: str = PASSWORD_PROTECTED_TRANSPORT,
    ) -> Response:
        s = self.settings
        session_index = new_id()
        self.logouts.remember(user.username, session_index)
        xml = await run_in_threadpool(
            lambda: build_response(
                idp_entity_id=s.entity_id,
                key_pem=s.key_pem,
                cert_pem=s.cert_pem,
                acs_url=pending["acs"],
                sp_entity_id=s.sp_entity_id,
                in_response_to=pending["id"],
                name_id=persistent_name_id(s.entity_id, user.username),
                name_id_format=NAMEID_PERSISTENT,
                attributes=user.attributes,
                session_index=session_index,
                now=now,
                lifetime=s.assertion_lifetime,
                session_not_on_or_after=session_started + s.session_lifetime,
                authn_instant=session_started,
                authn_context=authn_context,
            )
        )
        page = self.page(
            "post.html",
            acs_url=pending["acs"],
            saml_response=OneLogin_Saml2_Utils.b64encode(xml),
            relay_state=pending.get("relay"),
            display_name=user.display_name,
        )
        remaining = int(session_started + s.session_lifetime - now)
        page.set_cookie(
            SESSION_COOKIE,
            self.sessions.dumps({"u": user.username, "t": session_started,
                                 "c": authn_context}),
            max_age=max(remaining, 0),
            httponly=True,
            samesite="lax",
            secure=s.base_url.startswith("https://"),
        )
        return page


def _answered(requested: list[str], context: str) -> str | None:
    """The context class to report for an authentication of class ``context`` (password
    or MFA), or ``None`` when it does not satisfy ``requested`` (exact: one of them)."""
    if not requested:
        return context
    if context in requested:
        return context
    if context == REFEDS_MFA and PASSWORD_PROTECTED_TRANSPORT in requested:
        return PASSWORD_PROTECTED_TRANSPORT  # a password was typed too
    return None


def create_app(settings: DevIdPSettings) -> Starlette:
    """The dev IdP's ASGI app. Serve it on loopback only (see :func:`run`)."""
    idp = _DevIdP(settings)
    return Starlette(
        routes=[
            Route("/metadata", idp.metadata, methods=["GET"]),
            Route("/sso", idp.sso, methods=["GET"]),
            Route("/login", idp.login, methods=["POST"]),
            Route("/login/code", idp.code, methods=["POST"]),
            Route("/slo", idp.logouts.slo, methods=["GET"]),
            Route("/slo/initiate", idp.logouts.initiate, methods=["POST"]),
        ]
    )


def run(settings: DevIdPSettings, host: str, port: int) -> None:
    """Serve the dev IdP with uvicorn; refuse any host that is not loopback."""
    if not is_loopback(host):
        raise ValueError(f"the development IdP binds to loopback only, not {host!r}")
    import uvicorn  # only the CLI needs it; tests drive uvicorn themselves

    uvicorn.run(create_app(settings), host=host, port=port)
