"""Assembling the gateway: components, login protocols, flows, routes and lifespan.

Two ways in, chosen by the canonical path (``hot_path.HotPath``):

* the gateway's own endpoints (``/_gateway/*``, ``/auth/check``, health, and every login
  protocol's routes, e.g. ``/saml/*``) run on Starlette (``gateway.routes`` and
  ``LoginProtocol.routes``), with the error handlers below;
* every other path takes the lean raw-ASGI hot path: session cookie → store → policy →
  proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from gateway import i18n
from gateway.answers import exception_answer
from gateway.config import Settings
from gateway.config_state import ConfigState, fingerprint
from gateway.cookies import Cookies
from gateway.errors import N_, ConfigError, GatewayError, LoginFailed
from gateway.flows import Flows, RegistrationFlow, SignInFlow, SignOutFlow
from gateway.hot_path import HotPath
from gateway.identities import IdentityRules
from gateway.identity import UpstreamIdentity
from gateway.keys import load_identity_keys
from gateway.paths import with_next
from gateway.policy import Decision, Policy
from gateway.protocol import LoginProtocol
from gateway.proxy import Proxy
from gateway.routes import routes
from gateway.routes.services import GatewayServices
from gateway.saml import IdPRegistry, SamlProtocol
from gateway.sessions import CookieSigner, SessionManager, SessionRecord, open_store
from gateway.stash import STASH_TTL, PostStash
from gateway.telemetry import Telemetry
from gateway.web import STATIC_DIR, error_answer, new_reference, to_response

log = logging.getLogger("gateway")


class Gateway:
    """The ASGI application and the components its endpoints share.

    Routes use exactly these: ``settings``, ``clock``, ``cookies``, ``stores``,
    ``sessions``, ``policy``, ``proxy``, ``upstream_identity``, ``telemetry``, ``stash``,
    ``csrf``, ``protocols``, ``registry`` (the SAML IdPs, for the admin console), ``flows``,
    ``config_state`` (the served configuration's fingerprint and last reload, for
    ``/readyz``), ``languages`` (the pages' languages, ``i18n.Languages``),
    ``sign_in_url`` and ``authorize``.

    ``running()`` is its lifespan (store, upstream pool, login protocols, purge timer):
    ``gateway.reload`` starts a new gateway with it before it takes over from the old.
    """

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time,
                 protocols: Sequence[LoginProtocol] | None = None,
                 config_state: ConfigState | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.config_sha256 = fingerprint(settings)  # of the files this gateway is built from
        self.config_state = config_state or ConfigState(self.config_sha256, clock())
        if protocols is None:
            protocols = [SamlProtocol(settings, clock)]
        if not protocols:
            raise ConfigError(["at least one login protocol is needed"])
        self.protocols: list[LoginProtocol] = list(protocols)
        saml = next((p for p in self.protocols if isinstance(p, SamlProtocol)), None)
        self.registry = saml.registry if saml is not None else IdPRegistry()
        secret_list = settings.session_secrets()
        self.cookies = Cookies(secure=settings.cookie_secure,
                               session_name=settings.session.cookie_name,
                               session_lifetime=settings.session.lifetime,
                               stash_ttl=STASH_TTL)
        self.stores = open_store(settings.store.url, clock, **settings.store.options())
        self.sessions = SessionManager(
            self.stores.sessions, CookieSigner(secret_list, "session"),
            lifetime=settings.session.lifetime, idle_timeout=settings.session.idle_timeout,
            clock=clock, keys=self.stores.keys, memory=settings.session.memory)
        self.policy = Policy.from_settings(settings, clock)
        try:
            identity_keys = load_identity_keys(settings.identity.keys_dir)
        except (OSError, ValueError) as exc:
            raise ConfigError([f"{settings.source}: key identity.keys_dir: {exc}"]) from exc
        self.upstream_identity = UpstreamIdentity(settings, identity_keys, clock)
        public = settings.public_url.split("://", 1)
        self.proxy = Proxy(
            settings.upstreams,
            strip_headers=[*self.upstream_identity.strip_names, "X-Request-Id",
                           *settings.proxy.strip_headers],
            strip_prefixes=settings.proxy.strip_prefixes,
            strip_cookies=[self.cookies.session_name, self.cookies.idp_name,
                           self.cookies.stash_name, self.cookies.lang_name,
                           self.cookies.passive_name],
            strip_cookie_prefixes=[self.cookies.login_prefix],
            public_host=public[1], public_scheme=public[0],
            max_connections=settings.proxy.max_connections, client=settings.proxy.client,
            max_body_bytes=settings.max_body_bytes)
        self.csrf = CookieSigner(secret_list, "csrf")
        self.languages = i18n.Languages(settings.ui.languages, settings.ui.default,
                                        cookie_name=self.cookies.lang_name)
        self.stash = PostStash(self.stores.keys, secret_list[0])
        self.telemetry = Telemetry(settings, self.registry, self.stores, clock)
        self.sessions.report = self.telemetry.metrics.sessions_resolved
        self.flows = Flows(
            sign_in=SignInFlow(IdentityRules(settings), self.sessions),
            sign_out=SignOutFlow(self.sessions, self.protocols),
            registration=RegistrationFlow(settings, self.stores.records, self.stores.keys,
                                          self.sessions, clock))
        services = GatewayServices(self)
        protocol_routes: list[BaseRoute] = []
        for protocol in self.protocols:
            protocol_routes += protocol.routes(services)
        self._own = Starlette(  # the gateway's routes first: no protocol can shadow them
            routes=[*routes(self), *protocol_routes,
                    Mount("/_gateway/static", StaticFiles(directory=STATIC_DIR))],
            lifespan=self._lifespan,
            exception_handlers={GatewayError: self._on_error, 404: self._on_http_error,
                                405: self._on_http_error, Exception: self._on_crash})
        self._hot_path = HotPath(
            settings=settings, sessions=self.sessions, policy=self.policy, proxy=self.proxy,
            upstream_identity=self.upstream_identity, telemetry=self.telemetry,
            cookies=self.cookies, stash=self.stash, csrf=self.csrf, keys=self.stores.keys,
            sign_in_url=self.sign_in_url, own=self._own,
            own_prefixes=_prefixes(protocol_routes, self.protocols))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = i18n.bind(self.languages, scope)  # the language its pages are rendered in
        try:
            await self._hot_path(scope, receive, send)
        finally:
            i18n.unbind(token)

    def sign_in_url(self, next_url: str) -> str:
        """Where a visitor signs in to reach ``next_url``: the first protocol's page."""
        return with_next(self.protocols[0].sign_in_path, next_url)

    async def authorize(self, path: str, cookie: str | None, *, upstream: str | None = None,
                        fresh: bool = False) -> tuple[SessionRecord | None, Decision]:
        """The session for a cookie (if any) and the policy's decision for ``path`` going to
        ``upstream`` (the name of its route; None for the gateway's own pages). ``fresh``:
        the session as the store has it now, not from memory (an answer others cache)."""
        record = await self.sessions.resolve(cookie, fresh=fresh)
        return record, self.policy.decide(path, record.principal if record else None,
                                          upstream=upstream)

    # -- lifespan and the error handlers of the gateway's own endpoints ------------------

    def _lifespan(self, app: Starlette) -> contextlib.AbstractAsyncContextManager[None]:
        return self.running()

    @contextlib.asynccontextmanager
    async def running(self, trigger: str = "startup") -> AsyncIterator[None]:
        """Open the store and the upstream pool, start the login protocols and the purge
        timer; on exit stop them all. ``trigger`` is what the audit line says: "startup",
        or "reload" for a gateway built by a reload."""
        await self.stores.backend.open()
        started: list[LoginProtocol] = []
        purge: asyncio.Task[None] | None = None
        try:
            await self.proxy.start()
            for protocol in self.protocols:
                await protocol.start()
                started.append(protocol)
            purge = asyncio.get_running_loop().create_task(
                self._purge_every(self.settings.store.purge_interval))
            self.telemetry.started(trigger, self.config_sha256)
            yield
        finally:
            if purge is not None:
                purge.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await purge
            for protocol in reversed(started):
                await protocol.stop()
            await self.proxy.close()
            await self.stores.backend.close()
            self.telemetry.metrics.flush()  # the last second's proxied requests

    async def _purge_every(self, interval: float) -> None:
        """Delete what has expired in the store (pending sign-ins, the replay cache, rate
        counters, kept forms, failure records, sessions past their end, registrations
        past their retention with their sessions) every ``interval`` seconds while the
        gateway runs. Each process runs its own timer; several processes on one store
        purge the same rows, which costs only a repeat (a registration is deleted, its
        sessions ended and audited by one of them)."""
        while True:
            await asyncio.sleep(interval)
            try:
                gone = await self.stores.backend.purge_expired()
                gone += await self.flows.registration.purge_expired()  # past retention
            except GatewayError as exc:
                log.warning("store purge failed: %s", exc.reason)
                continue
            except Exception:  # never let the timer die: the next round may work
                log.exception("store purge failed")
                continue
            if gone:
                log.info("store purge removed %d expired entries", gone)

    async def _on_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        ref = new_reference()
        accept = request.headers.get("accept", "")
        if isinstance(exc, LoginFailed):
            log.warning("login failed ref=%s kind=%s reason=%s", ref, exc.kind, exc.reason)
            self.telemetry.login_failed(ref, exc)
            return to_response(exception_answer(
                exc, accept=accept, reference=ref,
                retry_url=self.protocols[0].sign_in_path))
        log.warning("%s ref=%s reason=%s", type(exc).__name__, ref, exc.reason)
        self.telemetry.failed(exc)
        return to_response(exception_answer(exc, accept=accept, reference=ref))

    async def _on_http_error(self, request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        title = N_("Not found") if status == 404 else N_("Method not allowed")
        return to_response(error_answer(status, title,
                                        N_("There is nothing here for that request."),
                                        accept=request.headers.get("accept", "")))

    async def _on_crash(self, request: Request, exc: Exception) -> Response:
        ref = new_reference()
        log.exception("internal error ref=%s", ref)
        return to_response(error_answer(500, N_("Something went wrong"),
                                        N_("The gateway hit an unexpected problem."),
                                        accept=request.headers.get("accept", ""),
                                        reference=ref))


def _prefixes(protocol_routes: Sequence[BaseRoute],
              protocols: Sequence[LoginProtocol]) -> tuple[str, ...]:
    """The first path segment of every protocol route and sign-out page (``/saml/``)."""
    paths = [getattr(route, "path", "") for route in protocol_routes]
    paths += [p.sign_out_path for p in protocols if p.sign_out_path]
    return tuple(dict.fromkeys("/" + path.split("/")[1] + "/" for path in paths
                               if path.count("/") >= 2))


def create_app(settings: Settings, *, clock: Callable[[], float] = time.time,
               protocols: Sequence[LoginProtocol] | None = None) -> Gateway:
    """The gateway for ``settings``; ``protocols`` defaults to SAML from the config."""
    return Gateway(settings, clock=clock, protocols=protocols)

