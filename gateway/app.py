"""Assembling the ASGI app.

Two ways in, chosen by the canonical path:

* the gateway's own endpoints (``/saml/*``, ``/auth/check``, ``/_gateway/*``, health)
  run on Starlette; their handlers live in ``gateway.routes``;
* every other path takes the lean hot path — raw ASGI, no per-request framework
  objects: session cookie → store → policy → proxy.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import NamedTuple
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from gateway.config import Settings
from gateway.errors import AmbiguousPath, ConfigError, GatewayError, LoginFailed, StoreError
from gateway.identity import IdentityHeaderSet, TokenIssuer
from gateway.keys import load_identity_keys
from gateway.login import LoginFlow
from gateway.paths import canonical_path, check_query
from gateway.policy import Decision, Policy
from gateway.proxy import Proxy
from gateway.routes import routes
from gateway.saml import IdPRegistry, ServiceProvider
from gateway.saml.metadata_source import MetadataRefresher
from gateway.sessions import CookieSigner, SessionManager, SessionRecord, open_store
from gateway.stash import MAX_STASH_BYTES, STASH_TTL, PostStash
from gateway.telemetry import Telemetry
from gateway.web import (
    STATIC_DIR,
    error_answer,
    new_reference,
    send_answer,
    to_response,
    wants_json,
)

log = logging.getLogger("gateway")

OWN_PREFIXES = ("/saml/", "/_gateway/", "/.well-known/", "/auth/")
OWN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Called on internal addresses (probes, a proxy's forward-auth, services fetching the
# JWKS), so with whatever Host those use; none of them builds anything from Host.
ANY_HOST_PATHS = frozenset({b"/healthz", b"/readyz", b"/metrics", b"/auth/check",
                            b"/.well-known/jwks.json"})
TITLES = {400: "Bad request", 401: "Sign-in required", 403: "Access denied",
          413: "Request too large", 429: "Too many requests", 502: "Service unreachable",
          503: "Temporarily unavailable", 504: "Service timed out"}


class Gateway:
    """The ASGI application and the components its endpoints share."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.policy = Policy(settings.rules)
        self.registry = IdPRegistry.load_dir(settings.idp.metadata_dir)
        self.sp = ServiceProvider(settings, self.registry, clock)
        self.store = open_store(settings.store.url, clock, **settings.store.options())
        secret_list = settings.session_secrets()
        self.sessions = SessionManager(
            self.store, CookieSigner(secret_list, "session"),
            lifetime=settings.session.lifetime, idle_timeout=settings.session.idle_timeout,
            clock=clock,
        )
        self.login = LoginFlow(settings, self.sp, self.registry, self.sessions, self.store,
                               CookieSigner(secret_list, "login"))
        self.csrf = CookieSigner(secret_list, "csrf")
        self.stash = PostStash(self.store, secret_list[0])
        secure = settings.cookie_secure
        self.cookie_name = ("__Host-" if secure else "") + settings.session.cookie_name
        self._cookie_attrs = (f"; Path=/; Max-Age={settings.session.lifetime}; HttpOnly; "
                              f"SameSite=Lax{'; Secure' if secure else ''}")
        self._cookie_prefix = (self.cookie_name + "=").encode()
        self.identity = IdentityHeaderSet(settings.identity_headers)
        try:
            keys = load_identity_keys(settings.identity.keys_dir)
        except (OSError, ValueError) as exc:
            raise ConfigError([f"{settings.source}: key identity.keys_dir: {exc}"]) from exc
        self.tokens = TokenIssuer(keys, issuer=settings.public_url,
                                  lifetime=settings.identity.token_lifetime, clock=clock)
        self._token_header = settings.identity.token_header.lower().encode("ascii")
        # Per upstream, compiled once: which identity headers and token claims it receives.
        self.identity_for = {
            u.name: (self.identity.fields(u.claims), tuple(u.claims)) for u in settings.upstreams
        }
        public = settings.public_url.split("://", 1)
        self.proxy = Proxy(
            settings.upstreams,
            strip_headers=[*self.identity.names, settings.identity.token_header,
                           "X-Request-Id"],
            strip_cookies=[self.cookie_name],
            public_host=public[1], public_scheme=public[0],
            max_body_bytes=settings.max_body_bytes,
        )
        self._hosts = frozenset(h.encode("latin-1") for h in settings.hosts)
        self._origin = settings.public_url.encode("latin-1")
        self._hsts = [(b"strict-transport-security", b"max-age=31536000")] if secure else []
        self.metadata_xml = ""
        self.telemetry = Telemetry(settings, self.registry, self.store, clock)
        self.web = Starlette(
            routes=[*routes(self),
                    Mount("/_gateway/static", StaticFiles(directory=STATIC_DIR))],
            lifespan=self._lifespan,
            exception_handlers={GatewayError: self._on_error, 404: self._on_http_error,
                                405: self._on_http_error, Exception: self._on_crash},
        )

    # -- the hot path ---------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.web(scope, receive, send)
            return  # websockets are not proxied yet: closing the scope refuses them
        send = self.telemetry.begin(scope, send)  # request ID, access log line, metrics
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        if self._hsts:
            send = _with_headers(send, self._hsts)
        # One pass over the headers for everything the hot path looks at.
        host = accept = cookie = fetch_mode = fetch_site = origin = content_type = b""
        for name, value in scope["headers"]:
            if name == b"cookie":
                cookie = value if not cookie else cookie + b"; " + value
            elif name == b"host" and not host:  # the first one, if a client sends two
                host = value
            elif name == b"accept":
                accept = value
            elif name == b"sec-fetch-mode":
                fetch_mode = value
            elif name == b"sec-fetch-site":
                fetch_site = value
            elif name == b"origin":
                origin = value
            elif name == b"content-type":
                content_type = value
        if raw_path not in ANY_HOST_PATHS and host.lower() not in self._hosts:
            log.warning("refused Host %r", host)
            await send_answer(send, error_answer(
                400, "Unknown site", "This gateway does not serve that host name.",
                accept=accept.decode("latin-1")))
            return
        try:
            path, encoded = canonical_path(raw_path.partition(b"?")[0])
            check_query(scope.get("query_string", b""))
        except AmbiguousPath as exc:
            ref = new_reference()
            log.warning("refused path ref=%s reason=%s", ref, exc.reason)
            await send_answer(send, error_answer(
                400, "Address not accepted", exc.public_message,
                accept=accept.decode("latin-1"), reference=ref))
            return
        if path in OWN_PATHS or path.startswith(OWN_PREFIXES):
            await self.web(scope, receive, send)
            return
        await self._forward(scope, receive, send, path, encoded, _Headers(
            accept, cookie, fetch_mode, fetch_site, origin, content_type))

    async def _forward(self, scope: Scope, receive: Receive, send: Send, path: str,
                       encoded: str, headers: _Headers) -> None:
        accept, cookie, fetch_mode, fetch_site, origin, content_type = headers
        try:
            session_cookie = self._session_cookie(cookie)
            record, decision = await self.authorize(path, session_cookie)
        except StoreError as exc:
            await self._fail(send, exc, accept)
            return
        query = scope.get("query_string", b"").decode("latin-1")
        target = encoded + ("?" + query if query else "")
        if decision.kind in ("login", "register"):
            # Only a top-level navigation starts a login: an image, script or XHR that
            # followed a redirect would create a pending request and a cookie for nothing.
            navigable = (fetch_mode in (b"", b"navigate")
                         and not wants_json(accept.decode("latin-1")))
            # A form posted by a browser whose session ended (it still sends the cookie) is
            # kept across the sign-in; a visitor who never signed in has typed nothing
            # into a member page, and keeping anonymous bodies would invite filling the store.
            if (navigable and decision.kind == "login" and scope["method"] == "POST"
                    and session_cookie is not None
                    and content_type.startswith(b"application/x-www-form-urlencoded")):
                await self._stash_and_sign_in(receive, send, target)
                return
            navigation = navigable and scope["method"] in {"GET", "HEAD"}
            await self._sign_in_needed(send, decision, navigation, target,
                                       accept.decode("latin-1"))
            return
        if decision.kind == "deny":
            assert record is not None
            await send_answer(send, self.denied(record, decision, path,
                                                accept.decode("latin-1")))
            return
        if (scope["method"] in UNSAFE_METHODS and decision.gated
                and (fetch_site == b"cross-site" or (origin and origin != self._origin))):
            # A cross-site form or fetch riding on the member's cookie (CSRF): the session
            # cookie is SameSite=Lax, and this check covers older browsers and same-site
            # subdomains as well.
            log.warning("refused cross-site %s path=%s origin=%r", scope["method"], path, origin)
            await send_answer(send, error_answer(
                403, "Access denied", "This request came from another site.",
                accept=accept.decode("latin-1")))
            return
        route = self.proxy.route(path)
        if route is None:
            await send_answer(send, error_answer(404, "Not found",
                                                 "There is nothing at this address.",
                                                 accept=accept.decode("latin-1")))
            return
        extra = self.identity_headers(record, route.name) if record else []
        extra.append(self.telemetry.proxying(route.name, record, path))  # X-Request-Id
        try:
            await self.proxy.forward(scope, receive, send, route=route, target=target,
                                     add_headers=extra,
                                     gated=decision.gated or record is not None)
        except GatewayError as exc:
            await self._fail(send, exc, accept, f" upstream={route.name}")

    async def authorize(self, path: str,
                        cookie: str | None) -> tuple[SessionRecord | None, Decision]:
        """The session for a cookie (if any) and the policy's decision for ``path``."""
        record = await self.sessions.resolve(cookie)
        return record, self.policy.decide(path, record.principal if record else None)

    def identity_headers(self, record: SessionRecord,
                         upstream: str) -> list[tuple[bytes, bytes]]:
        fields, claims = self.identity_for[upstream]
        headers = self.identity.headers(record.principal, fields)
        headers.append((self._token_header,
                        self.tokens.token(record.principal, record.key, upstream, claims)))
        return headers

    def denied(self, record: SessionRecord, decision: Decision, path: str,
               accept: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        principal = record.principal
        log.info("denied member=%s path=%s rule=%s reason=%s", principal.member_id, path,
                 decision.rule, decision.reason)
        self.telemetry.denied(record, decision, path)
        lapsed = decision.failed == "status"
        return error_answer(
            403, "Your membership has lapsed" if lapsed else "Access denied",
            decision.message or decision.reason, accept=accept,
            template="lapsed.html" if lapsed else "error.html",
            display_name=principal.display_name, reason=decision.reason)

    def session_cookie_header(self, value: str) -> str:
        return f"{self.cookie_name}={value}{self._cookie_attrs}"

    def clear_session_cookie_header(self) -> str:
        return self.session_cookie_header("").replace(
            f"Max-Age={self.settings.session.lifetime}", "Max-Age=0")

    def _session_cookie(self, header: bytes) -> str | None:
        if not header:
            return None
        for part in header.split(b";"):
            part = part.strip()
            if part.startswith(self._cookie_prefix):
                return part[len(self._cookie_prefix):].decode("latin-1")
        return None

    async def _sign_in_needed(self, send: Send, decision: Decision, navigation: bool,
                              target: str, accept: str) -> None:
        page = "/_gateway/register" if decision.kind == "register" else "/saml/login"
        location = f"{page}?next={quote(target, safe='')}"
        if wants_json(accept) or not navigation:
            await send_answer(send, error_answer(
                401, "Sign-in required", "Sign in to reach this page.", accept=accept,
                retry_url=location))
            return
        await send_answer(send, (302, [(b"location", location.encode()),
                                       (b"cache-control", b"no-store")], b""))

    async def _stash_and_sign_in(self, receive: Receive, send: Send, target: str) -> None:
        """A form posted without a live session: keep it, sign in, replay it afterwards."""
        body = bytearray()
        more = True
        while more and len(body) <= MAX_STASH_BYTES:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if len(body) > MAX_STASH_BYTES:
            await send_answer(send, error_answer(
                401, "Sign-in required", "Your session has ended and this form was too large "
                "to keep; please sign in and send it again.", retry_url="/saml/login"))
            return
        stash_id = await self.stash.keep(target, bytes(body))
        location = "/saml/login?next=" + quote(f"/_gateway/replay/{stash_id}", safe="")
        cookie = (f"gw-stash={self.csrf.sign(stash_id)}; Path=/_gateway/replay; "
                  f"Max-Age={STASH_TTL}; HttpOnly; SameSite=Lax"
                  f"{'; Secure' if self.settings.cookie_secure else ''}")
        log.info("kept a form POST for %s across sign-in", target.partition("?")[0])
        await send_answer(send, (303, [(b"location", location.encode()),
                                       (b"set-cookie", cookie.encode()),
                                       (b"cache-control", b"no-store")], b""))

    async def _fail(self, send: Send, exc: GatewayError, accept: bytes, extra: str = "") -> None:
        ref = new_reference()
        log.error("%s ref=%s reason=%s%s", type(exc).__name__, ref, exc.reason, extra)
        self.telemetry.failed(exc)
        await send_answer(send, error_answer(
            exc.status, TITLES.get(exc.status, "Error"), exc.public_message,
            accept=accept.decode("latin-1"), reference=ref))

    # -- lifespan and the error handlers of the gateway's own endpoints ------------------

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.store.open()
        await self.proxy.start()
        # [[metadata]] URLs: cached copies, first downloads, then refreshed in background.
        self.idp_refresher = MetadataRefresher(self.settings.metadata, self.registry, self.sp,
                                               self.clock)
        await self.idp_refresher.start()
        self.telemetry.started()
        self.metadata_xml = self.sp.metadata()
        try:
            yield
        finally:
            await self.idp_refresher.stop()
            await self.proxy.close()
            await self.store.close()

    async def _on_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        ref = new_reference()
        accept = request.headers.get("accept", "")
        if isinstance(exc, LoginFailed):
            log.warning("login failed ref=%s kind=%s reason=%s", ref, exc.kind, exc.reason)
            self.telemetry.login_failed(ref, exc)
            return to_response(error_answer(
                400, "Sign-in failed", "We could not sign you in. Please try again; if it "
                "keeps failing, contact support.", accept=accept, reference=ref,
                retry_url="/saml/login"))
        log.warning("%s ref=%s reason=%s", type(exc).__name__, ref, exc.reason)
        self.telemetry.failed(exc)
        return to_response(error_answer(exc.status, TITLES.get(exc.status, "Error"),
                                        exc.public_message, accept=accept, reference=ref))

    async def _on_http_error(self, request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        title = "Not found" if status == 404 else "Method not allowed"
        return to_response(error_answer(status, title, "There is nothing here for that request.",
                                        accept=request.headers.get("accept", "")))

    async def _on_crash(self, request: Request, exc: Exception) -> Response:
        ref = new_reference()
        log.exception("internal error ref=%s", ref)
        return to_response(error_answer(500, "Something went wrong",
                                        "The gateway hit an unexpected problem.",
                                        accept=request.headers.get("accept", ""),
                                        reference=ref))


def create_app(settings: Settings, *, clock: Callable[[], float] = time.time) -> Gateway:
    return Gateway(settings, clock=clock)


def app_from_env() -> Gateway:
    """The uvicorn factory for ``serve``: config from ``$GATEWAY_CONFIG``."""
    from gateway.config import load_settings
    from gateway.logs import configure_logging

    settings = load_settings()
    configure_logging(settings.logging.format or "json")  # in every worker process
    return Gateway(settings)


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    async def sender(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return sender


class _Headers(NamedTuple):
    """The request headers the hot path decides on, read in one pass."""

    accept: bytes
    cookie: bytes
    fetch_mode: bytes
    fetch_site: bytes
    origin: bytes
    content_type: bytes
