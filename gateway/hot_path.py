"""The lean hot path: raw ASGI from the request to the upstream, no framework objects.

Every request enters here. One pass over its headers (``HeadReader.read``) gives all this
path and the proxy need; the path is split from its query and canonicalised once. Then:

* Host must be one of this gateway's names (except for probes and forward-auth);
* an ambiguous path or a query with raw bytes is refused (400);
* the gateway's own endpoints (``/_gateway/``, ``/auth/``, health, each login protocol's
  prefix) go to the Starlette app (``own``);
* every other path: session cookie → session (``SessionManager.resolve``, which checks
  expiry) → policy → the cross-site check for unsafe methods on gated paths →
  ``decision_answer`` (sign-in, 401, 403) or, when allowed, the route, identity headers
  and ``Proxy.forward``.

A form posted from this site by a browser whose session just ended by idling is kept
across the sign-in (``PostStash``), for the subject of that session, and replayed
afterwards to a session of the same subject only. Nothing else an anonymous
client sends is written to the store: the cookie must be one of a real session that
ended (``SessionManager.recently_ended``; a junk or forged cookie is refused before the
store is asked), and kept forms are limited per client and minute and in total per
10 minutes (``[limits] kept_forms``, ``kept_forms_total``); past a limit the POST gets
the plain sign-in answer. A WebSocket upgrade goes to ``gateway.websocket`` (the same
checks, then the upstream), or gets a 501 with ``[websocket] enabled = false``; a
request naming its Host twice, a 400.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.answers import (
    decision_answer,
    exception_answer,
    navigable,
    passive_candidate,
    passive_sign_in,
    sign_in_location,
)
from gateway.config import Settings
from gateway.cookies import STASH_PATH, Cookies, header
from gateway.errors import N_, AmbiguousPath, CrossSite, GatewayError, StoreError
from gateway.identity import UpstreamIdentity
from gateway.paths import request_target
from gateway.policy import Decision, Policy
from gateway.proxy import Proxy
from gateway.proxy_headers import RequestHead
from gateway.rate_limits import over_limit
from gateway.sessions import CookieSigner, KeyStore, SessionManager, SessionRecord
from gateway.stash import MAX_STASH_BYTES, STASH_TTL, PostStash
from gateway.telemetry import Telemetry
from gateway.web import Answer, error_answer, new_reference, send_answer
from gateway.websocket import WebSocketGate, refuse_websocket

log = logging.getLogger("gateway")

#: Path prefixes of the gateway's own endpoints (a login protocol adds its own).
OWN_PREFIXES = ("/_gateway/", "/.well-known/", "/auth/")
OWN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Called on internal addresses (probes, a proxy's forward-auth, services fetching the
# JWKS), so with whatever Host those use; none of them builds anything from Host.
ANY_HOST_PATHS = frozenset({b"/healthz", b"/readyz", b"/metrics", b"/auth/check",
                            b"/.well-known/jwks.json"})
_FORM = b"application/x-www-form-urlencoded"
KEPT_FORMS_WINDOW = 60  # seconds: [limits] kept_forms is per client and minute
HSTS = (b"strict-transport-security", b"max-age=31536000")


class HotPath:
    """The gateway's ASGI entry point: the proxied path here, everything else to ``own``.

    ``own_prefixes`` are the login protocols' route prefixes (``"/<first segment>/"`` of
    each ``sign_in_path``);
    ``csrf`` signs the kept-form cookie (``routes/replay`` checks it with the same signer);
    ``keys`` counts kept forms against their limits.
    """

    def __init__(self, *, settings: Settings, sessions: SessionManager, policy: Policy,
                 proxy: Proxy, upstream_identity: UpstreamIdentity, telemetry: Telemetry,
                 cookies: Cookies, stash: PostStash, csrf: CookieSigner, keys: KeyStore,
                 sign_in_url: Callable[[str], str], own: ASGIApp,
                 own_prefixes: tuple[str, ...] = ()) -> None:
        self._sessions = sessions
        self._keys = keys
        self._kept_forms = settings.limits.kept_forms
        self._kept_forms_total = settings.limits.kept_forms_total
        self._policy = policy
        self._proxy = proxy
        self._identity = upstream_identity
        self._telemetry = telemetry
        self._cookies = cookies
        self._stash = stash
        self._csrf = csrf
        self._sign_in_url = sign_in_url
        self._own = own
        self._own_prefixes = (*OWN_PREFIXES, *own_prefixes)
        self._reader = proxy.head_reader(cookies.session_value)
        self._websocket: ASGIApp = refuse_websocket
        if settings.websocket.enabled:
            self._websocket = WebSocketGate(
                settings=settings, sessions=sessions, policy=policy, proxy=proxy,
                upstream_identity=upstream_identity, telemetry=telemetry,
                session_value=cookies.session_value, sign_in_url=sign_in_url,
                own=lambda path: path in OWN_PATHS or path.startswith(self._own_prefixes))
        self._hosts = frozenset(h.encode("latin-1") for h in settings.hosts)
        self._origin = settings.public_url.encode("latin-1")
        self._hsts = [HSTS] if cookies.secure else []
        # Public rules' Cache-Control ([[rules]] cache), by the rule a decision names.
        self._cache: dict[str, bytes] = {}
        for rule in settings.rules:
            if rule.cache:
                self._cache.setdefault(rule.path, rule.cache.encode("ascii"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._own(scope, receive, send)
            elif scope["type"] == "websocket":
                await self._websocket(scope, receive, send)
            return
        send = self._telemetry.begin(scope, send)  # request ID, access log line, metrics
        if self._hsts:
            send = _with_headers(send, self._hsts)
        raw_path = (scope.get("raw_path") or scope["path"].encode()).partition(b"?")[0]
        head = self._reader.read(scope["headers"])
        if _host_count(scope["headers"]) > 1:
            # Two Host headers: the gateway and whatever sits behind it might each read
            # another one. Nothing is ambiguous on purpose: refused on every path.
            log.warning("refused request with %d Host headers", _host_count(scope["headers"]))
            await send_answer(send, error_answer(
                400, N_("Bad request"), N_("The request names its host more than once."),
                accept=head.accept))
            return
        if raw_path not in ANY_HOST_PATHS and head.host.lower() not in self._hosts:
            log.warning("refused Host %r", head.host)
            await send_answer(send, error_answer(
                400, N_("Unknown site"), N_("This gateway does not serve that host name."),
                accept=head.accept))
            return
        try:
            path, target = request_target(raw_path, scope.get("query_string", b""))
        except AmbiguousPath as exc:
            ref = new_reference()
            log.warning("refused path ref=%s reason=%s", ref, exc.reason)
            await send_answer(send, exception_answer(exc, accept=head.accept, reference=ref))
            return
        if path in OWN_PATHS or path.startswith(self._own_prefixes):
            await self._own(scope, receive, send)
            return
        await self._serve(scope, receive, send, head, path, target)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, head: RequestHead,
                     path: str, target: str) -> None:
        try:
            record = await self._sessions.resolve(head.session)
        except StoreError as exc:
            await self._fail(send, exc, head.accept)
            return
        # The rules read the path as the upstream it goes to reads it (case, suffixes).
        route = self._proxy.route(path)
        decision = self._policy.decide(path, record.principal if record else None,
                                       upstream=route.name if route is not None else None)
        method: str = scope["method"]
        if (method in UNSAFE_METHODS and decision.gated
                and (head.fetch_site == b"cross-site"
                     or (head.origin and head.origin != self._origin))):
            # A cross-site form or fetch riding on the member's cookie (CSRF): the session
            # cookie is SameSite=Lax, and this check covers older browsers and same-site
            # subdomains as well. It comes before the keep-the-form branch, so a cross-site
            # POST is never kept to be sent later from the member's own browser.
            log.warning("refused cross-site %s path=%s origin=%r", method, path, head.origin)
            await send_answer(send, error_answer(
                CrossSite.status, CrossSite.title, N_("This request came from another site."),
                accept=head.accept))
            return
        navigation = False
        if decision.kind in ("login", "register", "step_up"):
            top_level = navigable(head.fetch_mode.decode("latin-1"), head.accept)
            # A form posted by a browser whose session just ended (it still sends the
            # cookie), or by a member whose session needs a step-up, is kept across the
            # sign-in; a visitor who never signed in has typed nothing into a member page,
            # and keeping anonymous bodies would fill the store.
            if (top_level and decision.kind in ("login", "step_up") and method == "POST"
                    and head.session is not None and head.content_type.startswith(_FORM)):
                try:
                    subject = await self._may_keep(
                        scope, head, record if decision.kind == "step_up" else None)
                    if subject:
                        await self._keep_form_and_sign_in(receive, send, target, head.accept,
                                                          subject, decision)
                        return
                except StoreError as exc:
                    await self._fail(send, exc, head.accept)
                    return
            navigation = top_level and method in ("GET", "HEAD")
            if decision.kind == "step_up":
                log.info("step-up sign-in needed path=%s reason=%s", path, decision.reason)
        elif decision.kind == "deny":
            assert record is not None
            self._telemetry.denied(record, decision, path)
        answer = decision_answer(decision, record, target=target, accept=head.accept,
                                 navigation=navigation, sign_in_url=self._sign_in_url)
        if answer is None and decision.passive and record is None:
            answer = self._passive_sign_in(scope, head, method, target)
        if answer is not None:
            await send_answer(send, answer)
            return
        if route is None:
            await send_answer(send, error_answer(404, N_("Not found"),
                                                 N_("There is nothing at this address."),
                                                 accept=head.accept))
            return
        request_id = self._telemetry.proxying(route.name, record, path)  # X-Request-Id
        extra = ([*self._identity.headers(record.key, record.principal, route.name),
                  request_id] if record is not None else [request_id])
        gated = decision.gated or record is not None
        try:
            await self._proxy.forward(scope, head, receive, send, route=route, target=target,
                                      add_headers=extra, gated=gated,
                                      cache=b"" if gated else self._cache.get(decision.rule, b""))
        except GatewayError as exc:
            await self._fail(send, exc, head.accept, f" upstream={route.name}")

    def _passive_sign_in(self, scope: Scope, head: RequestHead, method: str,
                         target: str) -> Answer | None:
        """An anonymous visitor of a ``passive`` public page, once per browser and
        ``PASSIVE_RETRY_AFTER``: off to a passive sign-in, with the marker cookie that
        stops the next try. ``None`` (serve the page) for anything but a browser's own
        page load, and for a browser that tried lately."""
        headers = scope["headers"]
        if not passive_candidate(method, head.fetch_mode.decode("latin-1"), head.accept,
                                 _header(headers, b"user-agent"),
                                 _header(headers, b"sec-purpose") + _header(headers, b"purpose"),
                                 _header(headers, b"sec-fetch-dest")):
            return None
        if self._cookies.read(headers, self._cookies.passive_name) is not None:
            return None
        location = passive_sign_in(target, self._sign_in_url)
        return 302, [(b"location", location.encode()), header(self._cookies.passive_tried()),
                     (b"cache-control", b"no-store")], b""

    async def _may_keep(self, scope: Scope, head: RequestHead,
                        live: SessionRecord | None) -> str:
        """The subject to keep the form for if it may be kept, else ``""``: this site
        vouched for it (``Origin``, or ``Sec-Fetch-Site: same-origin``), its cookie is one
        of a real session that just ended and whose subject is known (or ``live``, the
        member's session that needs a step-up), and the limits allow one more. Cheapest
        first: a junk cookie costs no store access, and only a real ended session's
        cookie reaches the counters."""
        if not (head.origin == self._origin
                or (not head.origin and head.fetch_site == b"same-origin")):
            return ""  # nothing says the form came from this site: not kept
        if not self._kept_forms or not self._kept_forms_total:
            return ""
        if live is not None:
            subject = live.principal.subject
        else:
            subject = await self._sessions.recently_ended(head.session) or ""
        if not subject:
            return ""
        client = scope.get("client")
        address = client[0] if client else "unknown"
        if await over_limit(self._keys, "kept_forms", self._kept_forms, KEPT_FORMS_WINDOW,
                            client=address):
            log.warning("form not kept: client %s is over %d kept forms a minute", address,
                        self._kept_forms)
            return ""
        if await over_limit(self._keys, "kept_forms", self._kept_forms_total, STASH_TTL):
            log.warning("form not kept: over %d kept forms in %d s (kept_forms_total)",
                        self._kept_forms_total, STASH_TTL)
            return ""
        return subject

    async def _keep_form_and_sign_in(self, receive: Receive, send: Send, target: str,
                                     accept: str, subject: str, decision: Decision) -> None:
        """A form posted by ``subject``'s session that ended or needs a step-up: keep it,
        sign in, replay it afterwards (to ``subject`` only)."""
        body = bytearray()
        more = True
        while more and len(body) <= MAX_STASH_BYTES:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if len(body) > MAX_STASH_BYTES:
            await send_answer(send, error_answer(
                401, N_("Sign-in required"), N_("Your session has ended and this form was too "
                                                "large to keep; please sign in and send it "
                                                "again."), accept=accept,
                retry_url=sign_in_location(decision, target, self._sign_in_url)))
            return
        try:
            stash_id = await self._stash.keep(target, bytes(body),
                                              origin=self._origin.decode("latin-1"),
                                              subject=subject)
        except StoreError as exc:
            await self._fail(send, exc, accept)
            return
        location = sign_in_location(decision, f"{STASH_PATH}/{stash_id}", self._sign_in_url)
        log.info("kept a form POST for %s across sign-in", target.partition("?")[0])
        await send_answer(send, (303, [(b"location", location.encode()),
                                       header(self._cookies.stash(self._csrf.sign(stash_id))),
                                       (b"cache-control", b"no-store")], b""))

    async def _fail(self, send: Send, exc: GatewayError, accept: str, extra: str = "") -> None:
        ref = new_reference()
        log.error("%s ref=%s reason=%s%s", type(exc).__name__, ref, exc.reason, extra)
        self._telemetry.failed(exc)
        await send_answer(send, exception_answer(exc, accept=accept, reference=ref))


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str:
    """The first value of a header (``""`` if absent), for the rare branch that needs one
    the one-pass reader does not keep."""
    return next((v.decode("latin-1") for n, v in headers if n == name), "")


def _host_count(headers: list[tuple[bytes, bytes]]) -> int:
    return sum(1 for name, _ in headers if name == b"host")


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    async def sender(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return sender
