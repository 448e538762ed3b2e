"""Prometheus metrics (``/metrics``, text format), per gateway instance.

Counters and the latency histogram are updated where things happen; gauges that
describe state (sessions, pending logins, metadata, certificates) are computed when
``/metrics`` is scraped, so nothing has to keep them in step.

Label values come from fixed sets — configured upstream and IdP names, metadata sources,
status classes, the login failure kinds and denial reasons below (anything else becomes
``other``) — so a client can never create new time series.

Several worker processes: when ``PROMETHEUS_MULTIPROC_DIR`` is set (``sso-gateway serve
--workers N`` sets it to a fresh directory), prometheus-client keeps each process's
values in files there and a scrape, answered by any worker, adds them all up. Those
values remember their count per metric object, so each process keeps one object per
metric (``_shared``), and one listener of best-effort failures, for every ``Metrics`` it
makes: a reload builds a second gateway while the first finishes its requests, and both
count into the same values, each event once.
"""

from __future__ import annotations

import asyncio
import bisect
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.errors import StoreError
from gateway.sessions import Namespace, Stores, on_best_effort_failure
from gateway.status import Certificate
from gateway.version import VERSION

CONTENT_TYPE = CONTENT_TYPE_LATEST
LOGIN_FAILURE_KINDS = frozenset({
    "malformed", "signature", "unsolicited", "login_state", "in_response_to", "replay",
    "attributes", "destination", "not_yet_valid", "expired", "issuer", "audience",
    "subject_confirmation", "too_large", "unknown_idp", "store", "step_up_refused",
    "step_up_context", "step_up_stale", "step_up_subject", "other"})
DENIAL_REASONS = frozenset({"owner", "entitlement", "status", "idp", "attributes", "other"})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
UNKNOWN_IDP = "unknown"
# Proxied requests are counted in memory and added to the counters at most this many
# seconds later (and at every scrape of this process, and when it stops): a counter
# update in prometheus' multiprocess files costs 1.5-2 µs, four of them a request.
FLUSH_INTERVAL = 1.0
#: Why a proxied WebSocket ended (``gateway.websocket``): who closed it, or which limit.
WEBSOCKET_CLOSE_REASONS = ("client", "upstream", "idle", "too_large", "session_ended",
                           "store", "shutdown")

_Made = TypeVar("_Made", Counter, Gauge, Histogram)
_Kept = TypeVar("_Kept")
# Multiprocess mode: what this process (and value class) keeps once, by name.
_SHARED: dict[str, Any] = {}
_SHARED_FOR: tuple[int, object] | None = None


def _shared(name: str, make: Callable[[], _Kept]) -> _Kept:
    """In multiprocess mode, this process's one ``name``: made on first use, the same
    object afterwards, whichever gateway asks (prometheus' file-backed values keep their
    count per object, so a second copy of a metric would write over the first's)."""
    global _SHARED_FOR
    owner = (os.getpid(), values.ValueClass)
    if owner != _SHARED_FOR:  # another process (a forked worker) or value class
        _SHARED.clear()
        _SHARED_FOR = owner
    if name not in _SHARED:
        _SHARED[name] = make()
    kept: _Kept = _SHARED[name]
    return kept


def _metric(kind: type[_Made], name: str, documentation: str, labels: Sequence[str] = (),
            *, registry: CollectorRegistry | None, **options: Any) -> _Made:
    """A metric in ``registry`` (one gateway's own), or, with none (multiprocess mode),
    this process's shared one."""
    if registry is not None:
        return kind(name, documentation, labels, registry=registry, **options)
    return _shared(name, lambda: kind(name, documentation, labels, registry=None, **options))


class _BestEffort:
    """Counts the best-effort writes that failed (``sessions.best_effort_failed`` tells
    every listener of the process): one listener per counter, so a failure seen while
    two gateways share a process (a reload) is counted once."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        counter.labels("touch")
        on_best_effort_failure(self.failed)

    def failed(self, what: str) -> None:
        self.counter.labels(what).inc()


class Metrics:
    def __init__(self, upstreams: Sequence[str], idps: Sequence[str],
                 clock: Callable[[], float],
                 known_idp: Callable[[str], bool] | None = None) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # In multiprocess mode values live in files; a scrape builds its own registry.
        own = None if self.multiprocess else CollectorRegistry()
        self._registry = own
        self.logins = _metric(Counter, "gateway_logins",
                              "Finished SAML logins by IdP and result",
                              ["idp", "result", "kind"], registry=own)
        self.requests = _metric(Counter, "gateway_proxied_requests",
                                "Requests proxied upstream by upstream and status class",
                                ["upstream", "status_class"], registry=own)
        self.latency = _metric(Histogram, "gateway_upstream_response_seconds",
                               "Time from sending a request upstream to its response head",
                               ["upstream"], buckets=LATENCY_BUCKETS, registry=own)
        self.upstream_errors = _metric(Counter, "gateway_upstream_errors",
                                       "Upstreams not reachable or too slow (502/504 pages)",
                                       ["upstream", "kind"], registry=own)
        self.denials = _metric(Counter, "gateway_policy_denials",
                               "Requests denied by policy (403)", ["reason"], registry=own)
        self.store_errors = _metric(Counter, "gateway_store_errors",
                                    "Session store failures seen while serving requests",
                                    registry=own)
        best_effort = _metric(Counter, "gateway_best_effort_failures",
                              "Best-effort store writes that failed without failing the "
                              "request (touch)", ["what"], registry=own)
        self._best_effort = (_BestEffort(best_effort) if own is not None else
                             _shared("best-effort listener", lambda: _BestEffort(best_effort)))
        self.reloads = _metric(Counter, "gateway_config_reloads",
                               "Configuration reloads (SIGHUP, sso-gateway reload) by result",
                               ["result"], registry=own)
        for result in ("ok", "refused"):
            self.reloads.labels(result)
        self.websockets_open = _metric(Gauge, "gateway_websocket_connections",
                                       "Proxied WebSocket connections open now",
                                       multiprocess_mode="livesum", registry=own)
        self.websockets_closed = _metric(Counter, "gateway_websocket_closed",
                                         "Proxied WebSocket connections by why they ended",
                                         ["reason"], registry=own)
        for reason in WEBSOCKET_CLOSE_REASONS:
            self.websockets_closed.labels(reason)
        # Per metadata source, labelled by configuration (a URL with credentials masked,
        # or mdq:<base URL>), never by an entity ID a client chose.
        self.metadata_failures = _metric(
            Counter, "gateway_metadata_refresh_failures",
            "Failed refreshes of IdP metadata by source (a metadata URL, or mdq:<service> "
            "for refreshes of its kept entities); the last good copy stays in use. With "
            "several workers the sum over all of them: each refreshes its own copy",
            ["source"], registry=own)
        self.session_lookups = _metric(Counter, "gateway_session_lookups",
                                       "Session cookies resolved from this process's memory "
                                       "or from the store", ["source"], registry=own)
        # Known IdPs by a membership test, so IdPs that arrive later from metadata URLs
        # get their own label; entity IDs come from admin-controlled metadata only.
        self._known_idp = known_idp or frozenset(idps).__contains__
        # Children per label set, made once: the hot path only looks them up.
        self._requests = {(u, c): self.requests.labels(u, f"{c}xx")
                          for u in upstreams for c in range(1, 6)}
        self._latency = {u: self.latency.labels(u) for u in upstreams}
        # Not yet added: requests per (upstream, status class); per upstream the latency
        # sum and the count per bucket (the last one past every bound).
        self._counted: dict[tuple[str, int], int] = {}
        self._observed: dict[str, list[float]] = {}
        self._flush: asyncio.TimerHandle | None = None
        for reason in DENIAL_REASONS:
            self.denials.labels(reason)
        for idp in idps:
            self.logins.labels(idp, "success", "none")
        self.state = StateCollector(clock)
        if own is not None:
            own.register(self.state)

    def proxied(self, upstream: str, status: int, latency: float | None) -> None:
        """A proxied request's answer: counted, its latency observed, within
        ``FLUSH_INTERVAL`` seconds."""
        key = (upstream, status // 100)
        if key in self._requests:
            self._counted[key] = self._counted.get(key, 0) + 1
        if latency is not None and upstream in self._latency:
            observed = self._observed.get(upstream)
            if observed is None:
                observed = self._observed[upstream] = [0.0] * (len(LATENCY_BUCKETS) + 2)
            observed[0] += latency
            observed[1 + bisect.bisect_left(LATENCY_BUCKETS, latency)] += 1
        if self._flush is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a direct call): add them now
                self.flush()
            else:
                self._flush = loop.call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        """Add what ``proxied`` counted to the exported counters and histogram."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        counted, self._counted = self._counted, {}
        observed, self._observed = self._observed, {}
        for key, count in counted.items():
            self._requests[key].inc(count)
        for upstream, (total, *buckets) in observed.items():
            _observe_many(self._latency[upstream], total, buckets)

    def login(self, idp: str, kind: str | None) -> None:
        """A finished login: ``kind`` is ``None`` on success, else the failure kind."""
        label = idp if self._known_idp(idp) else UNKNOWN_IDP
        if kind is None:
            self.logins.labels(label, "success", "none").inc()
        else:
            kind = kind if kind in LOGIN_FAILURE_KINDS else "other"
            self.logins.labels(label, "failure", kind).inc()

    def sessions_resolved(self, from_memory: int, from_store: int) -> None:
        """Counts the session manager reports after each read of its change log."""
        if from_memory:
            self.session_lookups.labels("memory").inc(from_memory)
        if from_store:
            self.session_lookups.labels("store").inc(from_store)

    def metadata_refreshed(self, source: str, failures: int) -> None:
        """A refresh of a metadata source: ``failures`` new failed ones (0: it worked, or
        the source is new and counted from zero)."""
        self.metadata_failures.labels(source).inc(failures)

    def websocket_closed(self, reason: str) -> None:
        """A proxied WebSocket ended (``reason`` from ``WEBSOCKET_CLOSE_REASONS``)."""
        self.websockets_open.dec()
        self.websockets_closed.labels(
            reason if reason in WEBSOCKET_CLOSE_REASONS else "client").inc()

    def denied(self, failed: str) -> None:
        self.denials.labels(failed if failed in DENIAL_REASONS else "other").inc()

    async def exposition(self, stores: Stores) -> bytes:
        """The text exposition, with the store gauges read now."""
        self.flush()
        await self.state.refresh(stores)
        if self._registry is not None:
            return generate_latest(self._registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(self.state)
        return generate_latest(registry)


def _observe_many(child: Histogram, total: float, buckets: list[float]) -> None:
    """Observations in bulk: ``total`` their sum, ``buckets[i]`` how many fell in bucket i
    (as ``Histogram.observe`` sorts them, a bound inclusive). prometheus_client has no bulk
    call, so its bucket values are added to directly; the test suite checks the result
    against ``observe``."""
    child._sum.inc(total)
    for value, count in zip(child._buckets, buckets, strict=True):
        if count:
            value.inc(count)


def use_multiprocess_dir(path: str | None) -> None:
    """Count in files under ``path`` from now on (every worker, and the one process of a
    single-worker ``serve``, whose imports already chose in-memory counters); ``None``:
    in memory again."""
    if path is None:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


class StateCollector(Collector):
    """Gauges read at scrape time (the store counts, metadata, certificates)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.idps: list[tuple[str, float, float | None]] = []  # entity, loaded, validUntil
        self.metadata_sources: list[tuple[str, float]] = []  # source, last good fetch
        self.certificates: list[Certificate] = []
        self._sessions: int | None = None
        self._pending: int | None = None
        # The configuration the answering process serves: fingerprint, when loaded.
        self.config: tuple[str, float] | None = None

    async def refresh(self, stores: Stores) -> None:
        """Read the store gauges (live sessions, pending sign-ins)."""
        try:
            self._sessions = await stores.sessions.count_sessions()
            self._pending = await stores.keys.count_keys(Namespace.LOGIN_STATE)
        except StoreError:  # a scrape during an outage still reports everything else
            self._sessions = self._pending = None

    def collect(self) -> Iterable[Metric]:
        now = self._clock()
        build = GaugeMetricFamily("gateway_build_info", "The running sso-gateway's version "
                                  "(always 1)", labels=["version"])
        build.add_metric([VERSION], 1)
        yield build
        if self.config is not None:
            info = GaugeMetricFamily("gateway_config_info", "The configuration this process "
                                     "serves, by its fingerprint (always 1)", labels=["sha256"])
            info.add_metric([self.config[0]], 1)
            yield info
            yield GaugeMetricFamily("gateway_config_loaded_timestamp_seconds",
                                    "When this process loaded the configuration it serves",
                                    value=self.config[1])
        if self._sessions is not None:
            yield GaugeMetricFamily("gateway_sessions_active", "Live sessions in the store",
                                    value=self._sessions)
        if self._pending is not None:
            yield GaugeMetricFamily("gateway_login_requests_outstanding",
                                    "AuthnRequests sent and not yet answered or expired",
                                    value=self._pending)
        loaded = GaugeMetricFamily("gateway_idp_metadata_loaded_timestamp_seconds",
                                   "When each IdP's metadata was loaded", labels=["idp"])
        valid = GaugeMetricFamily("gateway_idp_metadata_valid_until_timestamp_seconds",
                                  "validUntil of each IdP's metadata (where it has one)",
                                  labels=["idp"])
        for entity_id, at, until in self.idps:
            loaded.add_metric([entity_id], at)
            if until is not None:
                valid.add_metric([entity_id], until)
        fetched = GaugeMetricFamily(
            "gateway_metadata_last_success_timestamp_seconds",
            "When the metadata in use was last fetched and verified, by source (a metadata "
            "URL, or mdq:<service> for its last good answer); the view of the process that "
            "answers the scrape: each worker refreshes its own copy", labels=["source"])
        for source, at in self.metadata_sources:
            fetched.add_metric([source], at)
        yield fetched
        certs = GaugeMetricFamily("gateway_certificate_expiry_days",
                                  "Days until a certificate expires (negative: expired)",
                                  labels=["role", "entity_id", "subject"])
        for cert in self.certificates:
            certs.add_metric([cert.role, cert.entity_id, cert.subject],
                             round(cert.days_left(now), 3))
        yield from (loaded, valid, certs)
