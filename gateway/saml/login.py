"""The SP-initiated SAML sign-in: start a login, finish it at the ACS.

What python3-saml leaves to the application lives here:

* every AuthnRequest ID is stored as *pending* (single use, short expiry) under a
  random ``state`` that travels as RelayState; the post-login destination is kept
  server-side with it, so RelayState never carries a URL;
* the browser that started the login holds a signed binding cookie for that ``state``
  (one cookie per login, so two tabs never overwrite each other), and the ACS refuses a
  response that arrives in a browser without it — a Response captured elsewhere cannot
  be planted in a victim's browser;
* the Response is validated against exactly the pending request ID (a Response without
  InResponseTo is unsolicited and refused);
* each Assertion ID is accepted once, until its NotOnOrAfter (replay cache).

IdP-initiated SSO (off by default, ``[[idps]] allow_unsolicited`` per IdP): a Response
that arrives without a login state of this browser *and* without InResponseTo is
validated for the IdP named by its Issuer, if that IdP opted in, with InResponseTo
required to be absent everywhere; its RelayState is only ever a local path
(``safe_next``) and the replay cache applies as for any login. (An IdP-initiated login
cannot be bound to the browser: that is the risk an admin accepts by opting in.)

The binding cookie must survive the IdP's cross-site POST, so on https it is
``SameSite=None; Secure`` and scoped to ``/saml/``; it carries nothing but the signed
state and is deleted at the ACS. A validated Response becomes a ``SignedIn`` that the
gateway turns into a session (``SignInServices.finish_sign_in``).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from gateway.errors import LoginFailed
from gateway.paths import safe_next
from gateway.protocol import SignInServices
from gateway.saml.registry import IdP, IdPRegistry
from gateway.saml.sp import LoginResult, ServiceProvider
from gateway.sessions import CookieSigner, Namespace, SessionRecord

log = logging.getLogger("gateway.login")
#: The binding cookie's path: the ACS is below it.
BINDING_PATH = "/saml/"
# The state is 24 characters; the slice bounds what a client can make us look up.
_STATE_LENGTH = 24


@dataclass(frozen=True, slots=True)
class LoginStarted:
    """Where to send the browser, and the ``Set-Cookie`` value binding it to the login."""

    redirect_url: str
    binding_cookie: str


@dataclass(frozen=True, slots=True)
class LoginFinished:
    """A session started: its cookie value, where to go, and the binding cookie to clear
    (``None`` for an IdP-initiated login, which has none)."""

    record: SessionRecord
    session_cookie_value: str
    next_url: str
    clear_binding: str | None


class SamlLogin:
    """Starts and finishes SAML sign-ins for one gateway."""

    def __init__(self, sp: ServiceProvider, registry: IdPRegistry, services: SignInServices,
                 clock: Callable[[], float]) -> None:
        self._sp = sp
        self._clock = clock
        self._registry = registry
        self._services = services
        self._keys = services.keys
        self._cookies = services.cookies
        self._signer = CookieSigner(services.settings.session_secrets(), "login")
        self._ttl = services.settings.idp.login_timeout

    def choose_idp(self, entity_id: str | None) -> IdP | None:
        """The IdP to use, or ``None`` when the user must choose. Raises ``UnknownIdP``."""
        if entity_id:
            return self._registry.get(entity_id)
        return self._registry.default()

    async def start(self, idp: IdP, next_url: str | None) -> LoginStarted:
        """An AuthnRequest for ``idp``, kept as pending under a fresh state."""
        state = secrets.token_urlsafe(18)
        request = await run_in_threadpool(self._sp.start_login, idp, state)
        pending = json.dumps({"rid": request.request_id, "idp": idp.entity_id,
                              "next": safe_next(next_url)})
        if not await self._keys.add_once(Namespace.LOGIN_STATE + state, pending, self._ttl):
            raise RuntimeError("login state collision")  # 144 random bits: never expected
        return LoginStarted(request.url, self._binding(state, self._signer.sign(state),
                                                       self._ttl))

    async def finish(self, form: Mapping[str, Sequence[str]],
                     request: Request) -> LoginFinished:
        """Validate the POSTed Response and start the session; raises ``LoginFailed``."""
        responses = form.get("SAMLResponse", [])
        if len(responses) != 1 or not responses[0]:
            raise LoginFailed("malformed", "the POST must carry exactly one SAMLResponse")
        relay = form.get("RelayState", [])
        if len(relay) > 1:
            raise LoginFailed("malformed", "the POST carries more than one RelayState")
        state = relay[0] if relay else ""
        cookie = (self._cookies.read(request.scope["headers"],
                                     self._cookies.login_prefix + state[:_STATE_LENGTH])
                  if state else None)
        if not state or self._signer.unsign(cookie) != state:
            return await self._without_login_state(responses[0], state, cookie, request)
        raw = await self._keys.take(Namespace.LOGIN_STATE + state)
        if raw is None:
            raise LoginFailed(
                "in_response_to", "the login request is unknown, used or expired",
                {"relay_state": state[:_STATE_LENGTH],
                 "login_timeout_seconds": str(self._ttl)})
        pending = json.loads(raw)
        idp = self._registry.get(pending["idp"])
        try:
            result = await run_in_threadpool(
                self._sp.finish_login, responses[0], request_id=pending["rid"], idp=idp)
        except LoginFailed as exc:
            exc.details.setdefault("idp", idp.entity_id)  # labels the failure's metrics
            raise
        return await self._complete(result, idp, pending["next"],
                                    self._binding(state, "", 0), request)

    async def _without_login_state(self, saml_response: str, state: str, cookie: str | None,
                                   request: Request) -> LoginFinished:
        """No login of this browser: IdP-initiated (if allowed) or a lost login state."""
        peek = await run_in_threadpool(self._sp.peek, saml_response)
        if peek.in_response_to:
            raise LoginFailed(
                "login_state", "this browser did not start the login the response answers "
                f"(RelayState {'present' if state else 'missing'}, binding cookie "
                f"{'invalid' if cookie else 'missing'})",
                {"relay_state": "present" if state else "missing",
                 "binding_cookie": "invalid" if cookie else "missing",
                 "in_response_to": peek.in_response_to[:80]})
        if peek.issuer not in self._registry:
            raise LoginFailed(
                "unknown_idp", f"an unsolicited response from {peek.issuer[:200]!r}, which is "
                "not a configured IdP", {"issuer": peek.issuer[:200] or "(none)"})
        idp = self._registry.get(peek.issuer)
        try:
            result = await run_in_threadpool(self._sp.finish_unsolicited, saml_response,
                                             idp=idp)
        except LoginFailed as exc:
            exc.details.setdefault("idp", idp.entity_id)
            raise
        log.info("IdP-initiated login from %s", idp.entity_id)
        return await self._complete(result, idp, safe_next(state), None, request)

    async def _complete(self, result: LoginResult, idp: IdP, next_url: str,
                        clear_binding: str | None, request: Request) -> LoginFinished:
        ttl = max(result.not_on_or_after - self._clock(), 0) + 300
        key = f"{Namespace.ASSERTION}{idp.entity_id}:{result.assertion_id}"
        if not await self._keys.add_once(key, "1", ttl):
            raise LoginFailed("replay", f"assertion {result.assertion_id} was already used",
                              {"idp": idp.entity_id})
        record, value = await self._services.finish_sign_in(result.signed_in, request)
        return LoginFinished(record, value, next_url, clear_binding)

    def _binding(self, state: str, value: str, max_age: int) -> str:
        return self._cookies.login_binding(state[:_STATE_LENGTH], value, path=BINDING_PATH,
                                           max_age=max_age)
