"""Assembling the ASGI app.

Two ways in, chosen by the canonical path:

* the gateway's own endpoints (``/saml/*``, health, static files) run on Starlette;
* every other path takes the lean hot path — raw ASGI, no per-request framework
  objects: session cookie → store → policy → proxy.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from urllib.parse import parse_qs, quote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from gateway.config import Settings
from gateway.errors import (
    AmbiguousPath,
    BadRequest,
    ConfigError,
    GatewayError,
    LoginFailed,
    StoreError,
)
from gateway.identity import IdentityHeaderSet, TokenIssuer
from gateway.keys import load_identity_keys
from gateway.login import LoginFlow
from gateway.paths import canonical_path, safe_next
from gateway.policy import Decision, Policy
from gateway.principal import Principal
from gateway.proxy import Proxy
from gateway.saml import IdPRegistry, ServiceProvider
from gateway.sessions import CookieSigner, SessionManager, SessionRecord, open_store
from gateway.web import STATIC_DIR, Answer, error_answer, render, wants_json

log = logging.getLogger("gateway")

OWN_PREFIXES = ("/saml/", "/_gateway/", "/.well-known/", "/auth/")
OWN_PATHS = frozenset({"/healthz", "/readyz"})
MAX_ACS_BODY = 512 * 1024


def new_reference() -> str:
    """A short code users can quote; the log line with the reason carries the same code."""
    return secrets.token_hex(4).upper()


class Gateway:
    """The ASGI application. Build it with ``create_app``."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
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
        secure = settings.cookie_secure
        self.cookie_name = ("__Host-" if secure else "") + settings.session.cookie_name
        self._cookie_attrs = f"; Path=/; Max-Age={settings.session.lifetime}; HttpOnly; " \
                             f"SameSite=Lax{'; Secure' if secure else ''}"
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
        self._identity_for = {
            u.name: (self.identity.fields(u.claims), tuple(u.claims)) for u in settings.upstreams
        }
        public = settings.public_url.split("://", 1)
        self.proxy = Proxy(
            settings.upstreams,
            strip_headers=[*self.identity.names, settings.identity.token_header],
            strip_cookies=[self.cookie_name],
            public_host=public[1], public_scheme=public[0],
            max_body_bytes=settings.max_body_bytes,
        )
        self.web = self._build_web()

    # -- the hot path ---------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.web(scope, receive, send)
            return  # websockets are not proxied yet: closing the scope refuses them
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        try:
            path, encoded = canonical_path(raw_path.partition(b"?")[0])
        except AmbiguousPath as exc:
            ref = new_reference()
            log.warning("refused path ref=%s reason=%s", ref, exc.reason)
            await _send(send, error_answer(400, "Address not accepted", exc.public_message,
                                           accept=_header(scope, b"accept"), reference=ref))
            return
        if path in OWN_PATHS or path.startswith(OWN_PREFIXES):
            await self.web(scope, receive, send)
            return
        await self._forward(scope, receive, send, path, encoded)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, path: str,
                       encoded: str) -> None:
        accept = cookie = fetch_mode = b""
        for name, value in scope["headers"]:
            if name == b"cookie":
                cookie = value if not cookie else cookie + b"; " + value
            elif name == b"accept":
                accept = value
            elif name == b"sec-fetch-mode":
                fetch_mode = value
        try:
            record, decision = await self._authorize(path, self._session_cookie(cookie))
        except StoreError as exc:
            await self._fail(send, exc, accept)
            return
        principal = record.principal if record else None
        query = scope.get("query_string", b"").decode("latin-1")
        target = encoded + ("?" + query if query else "")
        if decision.kind == "login":
            # Only a top-level navigation starts a login: an image, script or XHR that
            # followed a redirect would create a pending request and a cookie for nothing.
            navigation = fetch_mode in (b"", b"navigate") and scope["method"] in {"GET", "HEAD"}
            await self._login_needed(send, navigation, target, accept.decode("latin-1"))
            return
        if decision.kind == "deny":
            assert principal is not None
            log.info("denied member=%s path=%s rule=%s reason=%s", principal.member_id, path,
                     decision.rule, decision.reason)
            lapsed = decision.failed == "status"
            await _send(send, error_answer(
                403, "Your membership has lapsed" if lapsed else "Access denied",
                decision.message or decision.reason, accept=accept.decode("latin-1"),
                template="lapsed.html" if lapsed else "error.html",
                display_name=principal.display_name, reason=decision.reason))
            return
        route = self.proxy.route(path)
        if route is None:
            await _send(send, error_answer(404, "Not found", "There is nothing at this address.",
                                           accept=accept.decode("latin-1")))
            return
        extra = self._identity_headers(record, route.name) if record else []
        try:
            await self.proxy.forward(scope, receive, send, route=route, target=target,
                                     add_headers=extra,
                                     gated=decision.gated or principal is not None)
        except GatewayError as exc:
            await self._fail(send, exc, accept, f" upstream={route.name}")

    async def _authorize(self, path: str,
                         cookie: str | None) -> tuple[SessionRecord | None, Decision]:
        record = await self.sessions.resolve(cookie)
        return record, self.policy.decide(path, record.principal if record else None)

    def _identity_headers(self, record: SessionRecord,
                          upstream: str) -> list[tuple[bytes, bytes]]:
        fields, claims = self._identity_for[upstream]
        principal: Principal = record.principal
        headers = self.identity.headers(principal, fields)
        headers.append((self._token_header,
                        self.tokens.token(principal, record.key, upstream, claims)))
        return headers

    def _session_cookie(self, header: bytes) -> str | None:
        if not header:
            return None
        for part in header.split(b";"):
            part = part.strip()
            if part.startswith(self._cookie_prefix):
                return part[len(self._cookie_prefix):].decode("latin-1")
        return None

    async def _login_needed(self, send: Send, navigation: bool, target: str, accept: str) -> None:
        if wants_json(accept) or not navigation:
            await _send(send, error_answer(
                401, "Sign-in required", "Sign in to reach this page.", accept=accept,
                retry_url="/saml/login?next=" + quote(target, safe="")))
            return
        location = "/saml/login?next=" + quote(target, safe="")
        await _send(send, (302, [(b"location", location.encode()),
                                 (b"cache-control", b"no-store")], b""))

    async def _fail(self, send: Send, exc: GatewayError, accept: bytes, extra: str = "") -> None:
        ref = new_reference()
        log.error("%s ref=%s reason=%s%s", type(exc).__name__, ref, exc.reason, extra)
        await _send(send, error_answer(exc.status, _TITLES.get(exc.status, "Error"),
                                       exc.public_message, accept=accept.decode("latin-1"),
                                       reference=ref))

    # -- the gateway's own endpoints ----------------------------------------------------

    def _build_web(self) -> Starlette:
        routes = [
            Route("/saml/metadata", self.saml_metadata),
            Route("/saml/login", self.saml_login),
            Route("/saml/acs", self.saml_acs, methods=["POST"]),
            Route("/auth/check", self.auth_check),
            Route("/.well-known/jwks.json", self.jwks),
            Route("/healthz", self.healthz),
            Route("/readyz", self.readyz),
            Mount("/_gateway/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ]
        return Starlette(routes=routes, lifespan=self._lifespan,
                         exception_handlers={GatewayError: self._on_error,
                                             404: self._on_not_found,
                                             405: self._on_not_found,
                                             Exception: self._on_crash})

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.store.open()
        await self.proxy.start()
        self._metadata_xml = self.sp.metadata()
        try:
            yield
        finally:
            await self.proxy.close()
            await self.store.close()

    async def saml_metadata(self, request: Request) -> Response:
        return Response(self._metadata_xml, media_type="application/samlmetadata+xml",
                        headers={"cache-control": "public, max-age=3600"})

    async def saml_login(self, request: Request) -> Response:
        next_url = safe_next(request.query_params.get("next"))
        idp = self.login.choose_idp(request.query_params.get("idp"))
        if idp is None:
            return _answer(render("choose_idp.html", title="Sign in", next=next_url,
                                  idps=self.registry.all()))
        started = await self.login.start(idp, next_url)
        response = RedirectResponse(started.redirect_url, status_code=302)
        response.headers["cache-control"] = "no-store"
        response.headers.append("set-cookie", started.cookie.header().decode("latin-1"))
        return response

    async def saml_acs(self, request: Request) -> Response:
        body = await _read_limited(request, MAX_ACS_BODY)
        if not request.headers.get("content-type", "").startswith(
                "application/x-www-form-urlencoded"):
            raise LoginFailed("malformed", "the ACS POST is not a urlencoded form")
        form = parse_qs(body.decode("latin-1"), keep_blank_values=True)
        client = request.client.host if request.client else ""
        done = await self.login.finish(form, request.cookies,
                                       user_agent=request.headers.get("user-agent", ""),
                                       client_ip=client)
        response = RedirectResponse(done.next_url, status_code=302)
        response.headers["cache-control"] = "no-store"
        response.headers.append("set-cookie", f"{self.cookie_name}={done.session_cookie_value}"
                                              f"{self._cookie_attrs}")
        response.headers.append("set-cookie", done.clear_cookie.header().decode("latin-1"))
        return response

    async def jwks(self, request: Request) -> Response:
        return JSONResponse(self.tokens.jwks, headers={"cache-control": "public, max-age=300"})

    async def auth_check(self, request: Request) -> Response:
        """Forward-auth for nginx ``auth_request``, Traefik ``forwardAuth``, Caddy ``forward_auth``.

        The proxy passes the original request's cookie and URI; the answer is 200 with
        identity headers to copy upstream, 401 with the login URL in ``Location`` (or a
        302 there with ``?mode=redirect``, for proxies that relay the answer as is), or
        403 with the reason.
        """
        original = (request.headers.get("x-original-uri")
                    or request.headers.get("x-forwarded-uri") or "/")
        method = request.headers.get("x-forwarded-method", "GET").upper()
        raw_path, _, query = original.partition("?")
        try:
            path, encoded = canonical_path(raw_path.encode("latin-1"))
        except (AmbiguousPath, UnicodeEncodeError) as exc:
            return _forward_auth_denied(request, f"ambiguous path: {exc}")
        upstream = request.query_params.get("upstream")
        route = None if upstream else self.proxy.route(path)
        name = upstream or (route.name if route else "")
        if name not in self._identity_for:
            return _forward_auth_denied(request, f"no upstream named {name!r}")
        record, decision = await self._authorize(path, request.cookies.get(self.cookie_name))
        target = encoded + ("?" + query if query else "")
        headers = {"cache-control": "no-store"}
        if decision.kind == "login":
            login = f"{self.settings.public_url}/saml/login?next={quote(target, safe='')}"
            if request.query_params.get("mode") == "redirect" and method in {"GET", "HEAD"}:
                return RedirectResponse(login, 302, headers=headers)
            return JSONResponse({"error": "Sign-in required", "login": login}, 401,
                                headers={**headers, "location": login})
        if decision.kind == "deny":
            return _forward_auth_denied(request, decision.reason)
        response = Response(status_code=200, headers=headers)
        if record is not None:
            for key, value in self._identity_headers(record, name):
                response.headers.append(key.decode(), value.decode("ascii"))
        return response

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        try:
            await self.store.ping()
        except StoreError as exc:
            log.error("not ready: %s", exc.reason)
            return JSONResponse({"status": "unavailable", "failed": {"store": exc.reason}}, 503)
        return JSONResponse({"status": "ok"})

    async def _on_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        ref = new_reference()
        accept = request.headers.get("accept", "")
        if isinstance(exc, LoginFailed):
            log.warning("login failed ref=%s kind=%s reason=%s", ref, exc.kind, exc.reason)
            return _answer(error_answer(400, "Sign-in failed",
                                        "We could not sign you in. Please try again; if it "
                                        "keeps failing, contact support.", accept=accept,
                                        reference=ref, retry_url="/saml/login"))
        log.warning("%s ref=%s reason=%s", type(exc).__name__, ref, exc.reason)
        return _answer(error_answer(exc.status, _TITLES.get(exc.status, "Error"),
                                    exc.public_message, accept=accept, reference=ref))

    async def _on_not_found(self, request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        title = "Not found" if status == 404 else "Method not allowed"
        return _answer(error_answer(status, title, "There is nothing here for that request.",
                                    accept=request.headers.get("accept", "")))

    async def _on_crash(self, request: Request, exc: Exception) -> Response:
        ref = new_reference()
        log.exception("internal error ref=%s", ref)
        return _answer(error_answer(500, "Something went wrong",
                                    "The gateway hit an unexpected problem.",
                                    accept=request.headers.get("accept", ""), reference=ref))


_TITLES = {400: "Bad request", 413: "Request too large", 502: "Service unreachable",
           503: "Temporarily unavailable", 504: "Service timed out"}


def create_app(settings: Settings, *, clock: Callable[[], float] = time.time) -> Gateway:
    return Gateway(settings, clock=clock)


async def _read_limited(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise _TooLarge(f"body of {length} bytes exceeds {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge(f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class _TooLarge(BadRequest):
    status = 413
    public_message = "The request body is too large."


def _forward_auth_denied(request: Request, reason: str) -> Response:
    log.info("forward-auth denied uri=%s reason=%s",
             request.headers.get("x-original-uri") or request.headers.get("x-forwarded-uri"),
             reason)
    return JSONResponse({"error": "Access denied", "reason": reason}, 403,
                        headers={"cache-control": "no-store", "x-auth-reason": reason})


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return ""


def _answer(answer: Answer) -> Response:
    status, headers, body = answer
    response = Response(body, status_code=status)
    for key, value in headers:
        response.headers.append(key.decode(), value.decode("latin-1"))
    return response


async def _send(send: Send, answer: Answer) -> None:
    status, headers, body = answer
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def app_from_env() -> Gateway:
    """The uvicorn factory for ``serve``: config from ``$GATEWAY_CONFIG``."""
    from gateway.config import load_settings

    return Gateway(load_settings())
