"""Telemetry of one gateway: request IDs, the request log line, metrics and audit events.

``Gateway`` holds one ``Telemetry`` and tells it what happens (few calls, each one line
on the hot path and in the routes): ``begin`` at the start of every HTTP request wraps
``send`` so the answer carries ``X-Request-Id`` and, when its last byte is sent, one
``gateway.access`` log line is written and the request counted; ``proxying``,
``denied``, ``failed`` and ``login_failed`` fill in what the line and the metrics need.
Per request that is one monotonic clock read at each end, a few counter increments and
one log call.

The sign-in flow reports a finished sign-in with ``login_succeeded`` (and the IdP it
answers with ``note_idp``); the request's context finds the right ``Telemetry``, so the
flow needs no reference to it. Who someone is in audit lines is their ``subject`` (with
the ``member_id`` they were asserted, when there is one).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import time
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.types import Message, Scope, Send

from gateway.audit import audit, configure_audit
from gateway.config import Settings
from gateway.errors import LoginFailed, StoreError, UpstreamError, UpstreamTimeout
from gateway.explain import Failure, keep_failure
from gateway.logs import (
    CURRENT,
    AccessLog,
    RequestContext,
    clean_request_id,
    current,
    new_request_id,
    session_hash,
)
from gateway.metrics import Metrics
from gateway.principal import Principal
from gateway.rate_limits import over_limit
from gateway.sessions import SessionRecord, Stores
from gateway.status import Certificate, IdPDirectory, Readiness, certificates
from gateway.version import VERSION

if TYPE_CHECKING:
    from gateway.policy import Decision

access_log = AccessLog()
log = logging.getLogger("gateway")
RECENT_FAILURES = 200
_monotonic = time.monotonic


# A refused login: the last RECENT_FAILURES in memory (this process, for the console's
# list), and in the store for FAILURE_TTL (any process, `sso-gateway explain`) up to
# [limits] failure_records an hour across all clients; past that only its log line.
LoginFailure = Failure
FAILURE_RECORDS_WINDOW = 3600  # seconds: [limits] failure_records is per hour
MAX_REASON = 1000  # characters of a failure's reason that are kept
# Store writes of this request's failures: awaited before its answer starts, so a
# reference the member sees can already be explained.
_PENDING: ContextVar[list[asyncio.Task[None]] | None] = ContextVar("failures", default=None)


class Telemetry:
    """Request IDs, access-log lines, metrics, audit events and kept login failures of
    one gateway; ``registry`` is the login protocol's IdPs (metrics labels, readiness,
    certificates)."""

    def __init__(self, settings: Settings, registry: IdPDirectory, stores: Stores,
                 clock: Callable[[], float]) -> None:
        wall = clock
        self._wall = wall
        self.settings = settings
        self.registry = registry
        self.metrics = Metrics([u.name for u in settings.upstreams],
                               [i.entity_id for i in registry.all()], wall,
                               known_idp=registry.__contains__)
        self.readiness = Readiness(stores.backend, registry, settings.upstreams, wall)
        registry.on_refresh(self.metrics.metadata_refreshed)  # failures counted as they come
        self._generation = -1  # of the registry the certificate list was built from
        self._certificates: list[Certificate] = []
        self._loaded: dict[str, float] = {}  # entity ID -> when this process first had it
        self.refresh_state()
        self.failures: deque[LoginFailure] = deque(maxlen=RECENT_FAILURES)
        self._stores = stores
        self._trusted = address_matcher(settings.trusted_proxies)
        self._log_member = settings.logging.log_member_id
        configure_audit(settings.logging.audit, Path(settings.source).parent)

    @property
    def certificates(self) -> list[Certificate]:
        """SP and IdP certificates, rebuilt whenever the registry changed (metadata URLs
        add, refresh and drop IdPs while the gateway runs)."""
        if self.registry.generation != self._generation:
            self._certificates = certificates(self.settings, self.registry)
            now = self._wall()
            for idp in self.registry.all():
                self._loaded.setdefault(idp.entity_id, now)
            self._generation = self.registry.generation
        return self._certificates

    def refresh_state(self) -> None:
        """Bring the scrape-time gauges up to date with the registry."""
        state = self.metrics.state
        state.certificates = self.certificates
        state.idps = [(entity, self._loaded.get(entity, 0.0), until)
                      for entity, until in self.readiness.valid_until.items()]
        state.metadata_sources = [(r.source, r.last_success) for r in self.registry.refreshes()
                                  if r.last_success is not None]

    def started(self, trigger: str = "startup", config_sha256: str | None = None) -> None:
        """Log the version this process runs; audit what it serves with: its config (and the
        version; ``trigger`` "reload" when a running process loaded it anew, with the
        fingerprint of ``gateway.config_state``) and each IdP's metadata."""
        source = Path(self.settings.source)
        log.info("sso-gateway %s %s with %s", VERSION,
                 "reloaded" if trigger == "reload" else "started", source)
        audit("config_reload", trigger=trigger, config=str(source),
              config_sha256=config_sha256 or _sha256(source), version=VERSION,
              result="ok" if trigger == "reload" else None)
        # One line per metadata source, each hashed once: an aggregate of thousands of IdPs
        # is one document, not thousands of lines (and reads).
        by_source: dict[str, list[str]] = {}
        for idp in self.registry.all():
            by_source.setdefault(str(idp.source), []).append(idp.entity_id)
        for name, entities in by_source.items():
            audit("metadata_change", change="loaded", source=name, sha256=_sha256(Path(name)),
                  entity_id=entities[0] if len(entities) == 1 else f"{len(entities)} IdPs",
                  idps=len(entities))

    # -- per request ----------------------------------------------------------------------

    def begin(self, scope: Scope, send: Send) -> Send:
        """Start a request's context; the returned ``send`` finishes it. The request's
        ``X-Request-Id`` is taken over when its TCP peer (``PEER``) is in
        ``trusted_proxies``."""
        client = scope.get("client")
        host = client[0] if client else ""
        request_id = None
        # Believed from the proxy that sent it: the TCP peer, not the client that uvicorn
        # read from its X-Forwarded-For. No peer known (another server): from no one.
        peer = scope.get(PEER)
        if self._trusted is not None and peer and self._trusted(peer[0]):
            for name, value in scope["headers"]:
                if name == b"x-request-id":
                    request_id = clean_request_id(value)
                    break
        ctx = RequestContext(request_id or new_request_id(), _monotonic(), host, self)
        CURRENT.set(ctx)
        pending: list[asyncio.Task[None]] = []
        _PENDING.set(pending)
        header = (b"x-request-id", ctx.request_id.encode("ascii"))

        async def sender(message: Message) -> None:
            if message["type"] == "http.response.start":
                while pending:
                    await pending.pop()
                ctx.status = message["status"]
                if ctx.upstream_started:
                    ctx.upstream_started = _monotonic() - ctx.upstream_started  # the latency
                message = {**message, "headers": [*message.get("headers", []), header]}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                await send(message)
                self._finished(ctx, scope)
                return
            await send(message)

        return sender

    def proxying(self, upstream: str, record: SessionRecord | None,
                 path: str) -> tuple[bytes, bytes]:
        """The request goes to ``upstream``; returns the ``X-Request-Id`` header for it."""
        ctx = CURRENT.get()
        if ctx is None:
            return (b"x-request-id", new_request_id().encode())
        ctx.upstream, ctx.path, ctx.upstream_started = upstream, path, _monotonic()
        if record is not None:
            ctx.session = session_hash(record.key)
            ctx.member_id = record.principal.member_id
        return (b"x-request-id", ctx.request_id.encode("ascii"))

    def denied(self, record: SessionRecord, decision: Decision, path: str) -> None:
        """The rules refused ``record``'s principal ``path`` (a 403 follows)."""
        session = session_hash(record.key)
        principal = record.principal
        ctx = CURRENT.get()
        if ctx is not None:
            ctx.path, ctx.session, ctx.member_id = path, session, principal.member_id
        log.info("denied subject=%s path=%s rule=%s reason=%s", principal.subject, path,
                 decision.rule, decision.reason)
        self.metrics.denied(decision.failed)
        audit("access_denied", subject=principal.subject,
              member_id=principal.member_id or None, session=session, path=path,
              rule=decision.rule, reason=decision.reason, failed=decision.failed or None)

    def failed(self, exc: Exception) -> None:
        """A store or upstream failure is about to be answered with an error page."""
        if isinstance(exc, StoreError):
            self.metrics.store_errors.inc()
        ctx = CURRENT.get()
        if isinstance(exc, UpstreamError) and ctx is not None and ctx.upstream:
            ctx.upstream_started = 0.0  # no latency to record: there was no answer
            kind = "timeout" if isinstance(exc, UpstreamTimeout) else "unreachable"
            self.metrics.upstream_errors.labels(ctx.upstream, kind).inc()

    def login_failed(self, reference: str, exc: LoginFailed) -> None:
        """A sign-in was refused with ``reference``: metrics, audit, and the failure kept
        for the admin console and ``sso-gateway explain``."""
        ctx = current()
        idp = (ctx.idp if ctx is not None else "") or exc.details.get("idp", "")
        self.metrics.login(idp, exc.kind)
        failure = Failure(self._wall(), reference, exc.kind, exc.reason[:MAX_REASON], idp,
                          ctx.request_id if ctx else "", ctx.client if ctx else "",
                          dict(exc.details))
        self.failures.appendleft(failure)
        audit("login_failure", reference=reference, kind=exc.kind, reason=exc.reason, idp=idp)
        task = asyncio.get_running_loop().create_task(self._keep(failure))
        pending = _PENDING.get()
        if pending is not None:
            pending.append(task)

    async def _keep(self, failure: Failure) -> None:
        """Keep ``failure`` in the store, unless this hour's records are used up (a flood
        of refusals must not fill the store: its log line has the same reference)."""
        cap = self.settings.limits.failure_records
        try:
            if not cap or await over_limit(self._stores.keys, "failure_records", cap,
                                           FAILURE_RECORDS_WINDOW):
                log.warning("login failure ref=%s not kept: over %d failure records an hour "
                            "([limits] failure_records); its log line is the record",
                            failure.reference, cap)
                return
            await keep_failure(self._stores.records, failure)
        except StoreError as exc:  # the member's error page must not fail with it
            log.warning("could not store login failure ref=%s: %s", failure.reference,
                        exc.reason)
        except Exception:
            log.exception("could not store login failure ref=%s", failure.reference)

    def _finished(self, ctx: RequestContext, scope: Scope, cut: bool = False) -> None:
        latency = ctx.upstream_started if ctx.upstream else 0.0
        if ctx.upstream:
            self.metrics.proxied(ctx.upstream, ctx.status, latency or None)
        fields: dict[str, object] = {
            "method": scope["method"], "path": ctx.path or scope["path"][:512],
            "status": ctx.status,
            "duration_ms": round((_monotonic() - ctx.started) * 1000, 2)}
        if ctx.upstream:
            fields["upstream"] = ctx.upstream
        if ctx.session:
            fields["session"] = ctx.session
        if self._log_member and ctx.member_id:
            fields["member_id"] = ctx.member_id
        if cut:
            fields["cut"] = True
        access_log.write("request", fields, ctx.request_id)


def response_cut(scope: Scope) -> None:
    """The answer to the current request started but its body was cut (the upstream
    failed or the client left): its access-log line is written now, with ``"cut": true``,
    since no last body message will write it."""
    ctx = CURRENT.get()
    if ctx is not None and isinstance(ctx.owner, Telemetry) and ctx.status:
        ctx.owner._finished(ctx, scope, cut=True)


# Under this key in each request's ASGI scope: the address of the TCP peer, (host, port),
# as ``gateway.server``'s protocols saw it; ``scope["client"]`` is the client that a
# trusted proxy named in X-Forwarded-For, once uvicorn's proxy-header handling has run.
PEER = "gateway.peer"


# Under this key in a server's ASGI state (``scope["state"]``, a shallow copy per
# request): a ``Drain`` that ``gateway.server`` marks when that server begins a graceful
# shutdown, so ``/readyz`` answers 503 from then on, requests in progress included. Per
# server, not per process: tests run several servers in one process.
DRAINING = "gateway.draining"


class Drain:
    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = False


def drain_of(state: dict[str, object]) -> Drain:
    """The ``Drain`` of the server whose ASGI state is ``state``."""
    drain = state.get(DRAINING)
    if not isinstance(drain, Drain):
        drain = state[DRAINING] = Drain()
    return drain


def draining(scope: Scope) -> bool:
    """The server that received this request is shutting down: it finishes what it has
    and takes nothing new."""
    state = scope.get("state")
    drain = state.get(DRAINING) if state else None
    return isinstance(drain, Drain) and drain.active


def note_idp(entity_id: str) -> None:
    """The sign-in being finished answers this IdP (labels its outcome)."""
    ctx = CURRENT.get()
    if ctx is not None:
        ctx.idp = entity_id


def login_succeeded(principal: Principal, session_key: str) -> None:
    """A sign-in started the session ``session_key``: audit, metrics, the access log."""
    ctx = CURRENT.get()
    session = session_hash(session_key)
    if ctx is not None:
        ctx.idp, ctx.session, ctx.member_id = principal.idp, session, principal.member_id
        if isinstance(ctx.owner, Telemetry):
            ctx.owner.metrics.login(principal.idp, None)
    audit("login_success", idp=principal.idp, subject=principal.subject,
          member_id=principal.member_id or None, protocol=principal.protocol or None,
          session=session)


def address_matcher(entries: list[str]) -> Callable[[str], bool] | None:
    """A test for client addresses in ``entries`` (IPs, CIDR networks, ``*``), or ``None``
    when the list is empty."""
    if not entries:
        return None
    if "*" in entries:
        return lambda host: True
    networks = [ipaddress.ip_network(e, strict=False) for e in entries if _is_ip(e)]
    literals = frozenset(e for e in entries if not _is_ip(e))

    def match(host: str) -> bool:
        if host in literals:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in net for net in networks)

    return match


def _is_ip(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return True


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""
