"""The SP-initiated login flow, framework-free: start a login, finish it at the ACS.

What python3-saml leaves to the application lives here:

* every AuthnRequest ID is stored as *pending* (single use, short expiry) under
  a random ``state`` that travels as RelayState; the post-login destination is
  kept server-side with it, so RelayState never carries a URL;
* the browser that started the login holds a signed binding cookie for that
  ``state`` (one cookie per login, so two tabs never overwrite each other), and
  the ACS refuses a response that arrives in a browser without it — a Response
  captured elsewhere cannot be planted in a victim's browser;
* the Response is validated against exactly the pending request ID (a Response
  without InResponseTo is unsolicited and refused);
* each Assertion ID is accepted once, until its NotOnOrAfter (replay cache).

IdP-initiated SSO (off by default, ``[[idps]] allow_unsolicited`` per IdP): a Response
that arrives without a login state of this browser *and* without InResponseTo is
validated for the IdP named by its Issuer, if that IdP opted in, with InResponseTo
required to be absent everywhere; its RelayState is only ever a local path
(``safe_next``) and the replay cache applies as for any login. (An IdP-initiated
login cannot be bound to the browser: that is the risk an admin accepts by opting in.)

The binding cookie must survive the IdP's cross-site POST, so on https it is
``SameSite=None; Secure`` and scoped to ``/saml/``; it carries nothing but the
signed state and is deleted at the ACS.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from gateway.config import Settings
from gateway.errors import LoginFailed
from gateway.paths import safe_next
from gateway.saml import IdP, IdPRegistry, LoginResult, ServiceProvider
from gateway.sessions import CookieSigner, SessionManager, SessionRecord, Store
from gateway.telemetry import login_succeeded, note_idp

log = logging.getLogger("gateway.login")


@dataclass(frozen=True, slots=True)
class Cookie:
    name: str
    value: str
    max_age: int
    path: str
    secure: bool
    same_site: str

    def header(self) -> bytes:
        parts = [f"{self.name}={self.value}", f"Path={self.path}", f"Max-Age={self.max_age}",
                 "HttpOnly", f"SameSite={self.same_site}"]
        if self.secure:
            parts.append("Secure")
        return "; ".join(parts).encode("latin-1")


@dataclass(frozen=True, slots=True)
class LoginStarted:
    redirect_url: str
    cookie: Cookie


@dataclass(frozen=True, slots=True)
class LoginFinished:
    record: SessionRecord
    session_cookie_value: str
    next_url: str
    clear_cookie: Cookie | None  # the binding cookie to delete (None: IdP-initiated)


class LoginFlow:
    def __init__(self, settings: Settings, sp: ServiceProvider, registry: IdPRegistry,
                 sessions: SessionManager, store: Store, signer: CookieSigner) -> None:
        self._sp = sp
        self._registry = registry
        self._sessions = sessions
        self._store = store
        self._signer = signer
        self._ttl = settings.idp.login_timeout
        self._secure = settings.cookie_secure
        self._prefix = "__Secure-gw-login-" if self._secure else "gw-login-"

    def choose_idp(self, entity_id: str | None) -> IdP | None:
        """The IdP to use, or ``None`` when the user must choose. Raises ``UnknownIdP``."""
        if entity_id:
            return self._registry.get(entity_id)
        return self._registry.default()

    async def start(self, idp: IdP, next_url: str | None) -> LoginStarted:
        state = secrets.token_urlsafe(18)
        request = await run_in_threadpool(self._sp.start_login, idp, state)
        pending = json.dumps({"rid": request.request_id, "idp": idp.entity_id,
                              "next": safe_next(next_url)})
        if not await self._store.add_once(f"authn:{state}", pending, self._ttl):
            raise RuntimeError("login state collision")  # 144 random bits: never expected
        return LoginStarted(request.url, self._cookie(state, self._signer.sign(state), self._ttl))

    async def finish(self, form: Mapping[str, Sequence[str]], cookies: Mapping[str, str], *,
                     user_agent: str = "", client_ip: str = "") -> LoginFinished:
        responses = form.get("SAMLResponse", [])
        if len(responses) != 1 or not responses[0]:
            raise LoginFailed("malformed", "the POST must carry exactly one SAMLResponse")
        relay = form.get("RelayState", [])
        if len(relay) > 1:
            raise LoginFailed("malformed", "the POST carries more than one RelayState")
        state = relay[0] if relay else ""
        cookie = cookies.get(self._prefix + state[:24]) if state else None
        if not state or self._signer.unsign(cookie) != state:
            return await self._without_login_state(responses[0], state, cookie, user_agent,
                                                   client_ip)
        raw = await self._store.take(f"authn:{state}")
        if raw is None:
            raise LoginFailed(
                "in_response_to", "the login request is unknown, used or expired",
                {"relay_state": state[:24], "login_timeout_seconds": str(self._ttl)})
        pending = json.loads(raw)
        idp = self._registry.get(pending["idp"])
        note_idp(idp.entity_id)  # labels this login's outcome in metrics and the audit log
        result = await run_in_threadpool(
            self._sp.finish_login, responses[0], request_id=pending["rid"], idp=idp
        )
        return await self._complete(result, idp, pending["next"], self._cookie(state, "", 0),
                                    user_agent, client_ip)

    async def _without_login_state(self, saml_response: str, state: str, cookie: str | None,
                                   user_agent: str, client_ip: str) -> LoginFinished:
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
        note_idp(idp.entity_id)
        result = await run_in_threadpool(self._sp.finish_unsolicited, saml_response, idp=idp)
        log.info("IdP-initiated login from %s", idp.entity_id)
        return await self._complete(result, idp, safe_next(state), None, user_agent, client_ip)

    async def _complete(self, result: LoginResult, idp: IdP, next_url: str,
                        clear_cookie: Cookie | None, user_agent: str,
                        client_ip: str) -> LoginFinished:
        ttl = max(result.not_on_or_after - self._sessions.now(), 0) + 300
        if not await self._store.add_once(f"assertion:{idp.entity_id}:{result.assertion_id}",
                                          "1", ttl):
            raise LoginFailed("replay", f"assertion {result.assertion_id} was already used")
        record, value = await self._sessions.create(result.principal, user_agent=user_agent,
                                                    client_ip=client_ip)
        log.info("login ok member=%s idp=%s", result.principal.member_id, idp.entity_id)
        login_succeeded(idp.entity_id, result.principal.member_id, record.key)  # audit, metrics
        return LoginFinished(record, value, next_url, clear_cookie)

    def _cookie(self, state: str, value: str, max_age: int) -> Cookie:
        # state[:24] is the whole token; the slice bounds what a client can make us look up.
        return Cookie(self._prefix + state[:24], value, max_age, "/saml/", self._secure,
                      "None" if self._secure else "Lax")
