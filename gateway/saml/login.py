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

A sign-in may ask the IdP for more (``protocol.SignInOptions``, from the sign-in URL):
an authentication context class and a fresh authentication for a step-up, or no
interaction at all (passive). They are kept with the pending state and checked on the
answer: a step-up that comes back without what it asked for is a ``StepUpFailed`` (a
403 naming it), never a second round; a step-up replaces the browser's session (same
subject only); a passive sign-in the IdP refuses comes back without a session and
without an error.

The binding cookie must survive the IdP's cross-site POST, so on https it is
``SameSite=None; Secure`` and scoped to ``/saml/``; it carries nothing but the signed
state and is deleted at the ACS. A validated Response becomes a ``SignedIn`` that the
gateway turns into a session (``SignInServices.finish_sign_in``).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from gateway.errors import LoginFailed, SignInsBusy, StepUpFailed
from gateway.paths import safe_next
from gateway.protocol import SignInOptions, SignInServices
from gateway.saml.mdq import PER_CLIENT_PER_MINUTE, MdqResolver
from gateway.saml.registry import IdP, IdPRegistry
from gateway.saml.sp import LoginResult, Refusal, ServiceProvider
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
    (``None`` for an IdP-initiated login, which has none). ``record`` is ``None`` (and
    the cookie value "") when a passive sign-in comes back without a session."""

    record: SessionRecord | None
    session_cookie_value: str
    next_url: str
    clear_binding: str | None


class SamlLogin:
    """Starts and finishes SAML sign-ins for one gateway."""

    def __init__(self, sp: ServiceProvider, registry: IdPRegistry, services: SignInServices,
                 clock: Callable[[], float], mdq: MdqResolver | None = None) -> None:
        self._sp = sp
        self._mdq = mdq
        self._clock = clock
        self._registry = registry
        self._services = services
        self._keys = services.keys
        self._cookies = services.cookies
        self._signer = CookieSigner(services.settings.session_secrets(), "login")
        self._ttl = services.settings.idp.login_timeout
        self._most_pending = services.settings.limits.pending_logins
        self._skew = services.settings.idp.clock_skew
        # The only authentication contexts a sign-in URL can make us ask an IdP for.
        self._contexts = frozenset(c for rule in services.settings.rules
                                   for c in rule.require.authn_context)

    def options(self, query: Iterable[tuple[str, str]]) -> SignInOptions:
        """What a sign-in URL's query asks of the sign-in (contexts no rule names are
        dropped)."""
        return SignInOptions.read(query, self._contexts)

    def passive_idp(self, remembered: str) -> IdP | None:
        """The IdP a passive sign-in may try: the remembered one if it is configured, else
        the only one; ``None`` when there is no such IdP (no IdP is ever guessed)."""
        if remembered and remembered in self._registry:
            return self._registry.get(remembered)
        return self._registry.default()

    def session_idp(self, record: SessionRecord | None) -> IdP | None:
        """The IdP a step-up of ``record`` goes to: the one it signed in at, if known."""
        if record is None or record.principal.idp not in self._registry:
            return None
        return self._registry.get(record.principal.idp)

    async def find_idp(self, entity_id: str | None, request: Request) -> IdP | None:
        """``choose_idp``, after asking the MDQ services (if any) for an IdP not seen yet;
        each client may cause only a few MDQ fetches a minute (``TooManyRequests``)."""
        if entity_id:
            await self._ask_mdq(entity_id, request)
        return self.choose_idp(entity_id)

    async def _ask_mdq(self, entity_id: str, request: Request) -> None:
        if self._mdq and entity_id not in self._registry and self._mdq.would_fetch(entity_id):
            await self._services.rate_limit(request, "mdq", PER_CLIENT_PER_MINUTE)
        if self._mdq and entity_id not in self._registry:
            await self._mdq.lookup(entity_id, self._keys)

    def choose_idp(self, entity_id: str | None) -> IdP | None:
        """The IdP to use, or ``None`` when the user must choose. Raises ``UnknownIdP``."""
        if entity_id:
            return self._registry.get(entity_id)
        return self._registry.default()

    async def start(self, idp: IdP, next_url: str | None,
                    options: SignInOptions | None = None) -> LoginStarted:
        """An AuthnRequest for ``idp`` (asking for ``options``), kept as pending under a
        fresh state; the options are kept with it and checked when the answer comes.
        Raises ``SignInsBusy`` (before signing or storing anything) when the gateway holds
        ``[limits] pending_logins`` sign-ins in progress already."""
        options = options or SignInOptions()
        pending_now = await self._keys.count_keys(Namespace.LOGIN_STATE)
        if pending_now >= self._most_pending:
            log.warning("sign-in not started: %d sign-ins in progress ([limits] "
                        "pending_logins = %d)", pending_now, self._most_pending)
            raise SignInsBusy(f"{pending_now} sign-ins in progress, the most "
                              "[limits] pending_logins allows")
        state = secrets.token_urlsafe(18)
        request = await run_in_threadpool(
            partial(self._sp.start_login, idp, state, authn_context=options.authn_context,
                    force_authn=options.force, is_passive=options.passive))
        pending = json.dumps({"rid": request.request_id, "idp": idp.entity_id,
                              "next": safe_next(next_url), "ctx": options.authn_context,
                              "force": options.force, "passive": options.passive,
                              "at": self._clock()})
        if not await self._keys.add_once(Namespace.LOGIN_STATE + state, pending, self._ttl):
            raise RuntimeError("login state collision")  # 144 random bits: never expected
        return LoginStarted(request.url, self._binding(state, self._signer.sign(state),
                                                       self._ttl))

    async def answers_pending(self, form: Mapping[str, Sequence[str]],
                              request: Request) -> bool:
        """Does this ACS post answer a sign-in this browser started and that is still
        pending (its RelayState, the binding cookie for it, the state in the store)?

        Such a post need not count against the client's limit: ``finish`` takes the
        pending state before any signature check, so each costs one (limited) sign-in
        start, and a failed one cannot be repeated."""
        relay = form.get("RelayState", [])
        if len(relay) != 1 or not relay[0]:
            return False
        state = relay[0]
        if self._signer.unsign(self._binding_cookie(state, request)) != state:
            return False
        return await self._keys.get(Namespace.LOGIN_STATE + state) is not None

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
        cookie = self._binding_cookie(state, request) if state else None
        if not state or self._signer.unsign(cookie) != state:
            return await self._without_login_state(responses[0], state, cookie, request)
        raw = await self._keys.take(Namespace.LOGIN_STATE + state)
        if raw is None:
            raise LoginFailed(
                "in_response_to", "the login request is unknown, used or expired",
                {"relay_state": state[:_STATE_LENGTH],
                 "login_timeout_seconds": str(self._ttl)})
        pending = json.loads(raw)
        if self._mdq and pending["idp"] not in self._registry:  # evicted since the start
            await self._mdq.lookup(pending["idp"], self._keys)
        idp = self._registry.get(pending["idp"])
        options = SignInOptions(tuple(pending.get("ctx", ())), pending.get("force", False),
                                pending.get("passive", False))
        clear = self._binding(state, "", 0)
        try:
            result = await run_in_threadpool(
                self._sp.finish_login, responses[0], request_id=pending["rid"], idp=idp)
        except LoginFailed as exc:
            exc.details.setdefault("idp", idp.entity_id)  # labels the failure's metrics
            if not options.passive and not options.step_up:
                raise
            refusal = await run_in_threadpool(self._sp.refusal, responses[0])
            if (refusal is None or refusal.issuer != idp.entity_id
                    or refusal.in_response_to != pending["rid"]):
                raise
            if options.passive:  # the IdP does not know the visitor: back, anonymous
                log.info("passive sign-in at %s: %s", idp.entity_id, _status(refusal))
                return LoginFinished(None, "", pending["next"], clear)
            raise StepUpFailed(
                "step_up_refused", f"IdP {idp.entity_id} refused the step-up sign-in "
                f"({_status(refusal)})", authn_context=options.authn_context,
                fresh=options.force, details={"idp": idp.entity_id,
                                              "status": _status(refusal)}) from exc
        self._check_step_up(options, result, float(pending.get("at", 0.0)), idp)
        replaces = (await self._services.current_session(request) if options.step_up
                    else None)
        return await self._complete(result, idp, pending["next"], clear, request,
                                    replaces=replaces)

    def _check_step_up(self, options: SignInOptions, result: LoginResult, started: float,
                       idp: IdP) -> None:
        """A sign-in that asked for an authentication context or a fresh authentication
        must have got it, else the page that needed it would send the member round
        again: the answer is a 403 that names what was missing, never a loop."""
        got = result.signed_in
        if options.authn_context and got.authn_context not in options.authn_context:
            raise StepUpFailed(
                "step_up_context", f"IdP {idp.entity_id} answered a request for "
                f"{' or '.join(options.authn_context)} with "
                f"{got.authn_context or 'no authentication context'}",
                authn_context=options.authn_context, fresh=options.force,
                details={"idp": idp.entity_id, "requested": " ".join(options.authn_context),
                         "authn_context": got.authn_context})
        if options.force and got.authn_instant < started - self._skew:
            raise StepUpFailed(
                "step_up_stale", f"IdP {idp.entity_id} was asked to authenticate again "
                f"(ForceAuthn) but reports an authentication {started - got.authn_instant:.0f}"
                " s before the request", authn_context=options.authn_context, fresh=True,
                details={"idp": idp.entity_id})

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
        if peek.issuer and self._services.settings.idp_options(peek.issuer).allow_unsolicited:
            await self._ask_mdq(peek.issuer, request)  # an IdP that may send one, first seen
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
                        clear_binding: str | None, request: Request, *,
                        replaces: SessionRecord | None = None) -> LoginFinished:
        ttl = max(result.not_on_or_after - self._clock(), 0) + 300
        key = f"{Namespace.ASSERTION}{idp.entity_id}:{result.assertion_id}"
        if not await self._keys.add_once(key, "1", ttl):
            raise LoginFailed("replay", f"assertion {result.assertion_id} was already used",
                              {"idp": idp.entity_id})
        record, value = await self._services.finish_sign_in(result.signed_in, request,
                                                            replaces=replaces)
        return LoginFinished(record, value, next_url, clear_binding)

    def _binding_cookie(self, state: str, request: Request) -> str | None:
        """The value of the binding cookie for ``state`` that the browser sent, if any."""
        return self._cookies.read(request.scope["headers"],
                                  self._cookies.login_prefix + state[:_STATE_LENGTH])

    def _binding(self, state: str, value: str, max_age: int) -> str:
        return self._cookies.login_binding(state[:_STATE_LENGTH], value, path=BINDING_PATH,
                                           max_age=max_age)


def _status(refusal: Refusal) -> str:
    """``Responder/NoPassive``: the status codes' last parts, for a log line."""
    parts = [code.rpartition(":")[2] for code in (refusal.code, refusal.sub_code) if code]
    return "".join(ch for ch in "/".join(parts)[:200] if ch.isprintable())  # unvalidated
