"""What an operator needs to know about the deployment's state, gathered for ``/readyz``,
``/metrics`` and the admin console: the store answers, each upstream's health URL answers,
IdP metadata is loaded and not past its ``validUntil``, certificates are not expiring.

Upstream health results are kept for ``HEALTH_CACHE_SECONDS`` (by the gateway's clock),
so load balancers probing every second do not turn into a request storm upstream.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp
from cryptography import x509

from gateway.config import Settings, Upstream
from gateway.errors import StoreError
from gateway.sessions import Backend

HEALTH_CACHE_SECONDS = 5.0
HEALTH_TIMEOUT = 2.0


class IdPInfo(Protocol):
    """What status needs to know of one IdP (``saml.IdP`` has it)."""

    @property
    def entity_id(self) -> str: ...

    @property
    def signing_certs(self) -> tuple[str, ...]: ...  # base64 DER bodies

    @property
    def valid_until(self) -> float | None: ...  # metadata validUntil, POSIX seconds

    @property
    def source(self) -> Path: ...  # the metadata file (or cached copy)


class SourceRefreshes(Protocol):
    """How one metadata source's refreshes went in this process
    (``saml.registry.Refreshes`` is one)."""

    @property
    def source(self) -> str: ...  # a label: the URL, credentials masked, or mdq:<base URL>

    @property
    def last_success(self) -> float | None: ...  # POSIX seconds of the last good fetch

    @property
    def failures(self) -> int: ...


class IdPDirectory(Protocol):
    """The IdPs a login protocol currently trusts (``saml.IdPRegistry`` is one);
    ``generation`` changes whenever the set does."""

    @property
    def generation(self) -> int: ...

    def all(self) -> Sequence[IdPInfo]: ...

    def __len__(self) -> int: ...

    def __contains__(self, entity_id: object) -> bool: ...

    @property
    def on_demand(self) -> bool:
        """Whether IdPs may arrive on first use (MDQ): an empty directory can sign in."""

    def refreshes(self) -> Sequence[SourceRefreshes]:
        """Per metadata source (URL or MDQ service): its last good fetch and failures."""

    def on_refresh(self, listener: Callable[[str, int], None]) -> None:
        """Have ``listener(source, new failures)`` called after each refresh of a source
        (and at once with 0 for each source already known)."""


@dataclass(frozen=True, slots=True)
class Certificate:
    role: str  # "sp" or "idp"
    entity_id: str
    subject: str
    not_after: float  # POSIX seconds

    def days_left(self, now: float) -> float:
        return (self.not_after - now) / 86400


def certificates(settings: Settings, registry: IdPDirectory) -> list[Certificate]:
    """The SP certificate and every IdP signing certificate, with their expiry."""
    found = []
    try:
        sp = x509.load_pem_x509_certificate(settings.sp.cert_file.read_bytes())
        found.append(_certificate("sp", settings.sp_entity_id, sp))
    except (OSError, ValueError):
        pass  # `check` and startup report a missing or bad SP certificate
    for idp in registry.all():
        for body in idp.signing_certs:
            der = x509.load_der_x509_certificate(base64.b64decode(body))
            found.append(_certificate("idp", idp.entity_id, der))
    return found


def _certificate(role: str, entity_id: str, cert: x509.Certificate) -> Certificate:
    return Certificate(role, entity_id, cert.subject.rfc4514_string(),
                       cert.not_valid_after_utc.timestamp())


def metadata_valid_until(idp: IdPInfo) -> float | None:
    """The earliest ``validUntil`` over the IdP's EntityDescriptor and its enclosing
    aggregates (from the registry), or ``None`` when none is set."""
    return idp.valid_until


class Readiness:
    """The checks behind ``/readyz``: ``failures()`` names each failed one and why."""

    def __init__(self, store: Backend, registry: IdPDirectory, upstreams: Sequence[Upstream],
                 clock: Callable[[], float]) -> None:
        self._store = store
        self._registry = registry
        self._clock = clock
        self._health = [(u.name, u.health_url) for u in upstreams if u.health_url]
        self._cache: dict[str, tuple[float, str | None]] = {}

    @property
    def valid_until(self) -> dict[str, float | None]:
        """Per IdP now in the registry (metadata URLs are refreshed while running)."""
        return {idp.entity_id: metadata_valid_until(idp) for idp in self._registry.all()}

    async def failures(self) -> dict[str, str]:
        failed: dict[str, str] = {}
        try:
            await self._store.ping()
        except StoreError as exc:
            failed["store"] = exc.reason
        failed.update(self.metadata_problems())
        for name, problem in zip([n for n, _ in self._health],
                                 await asyncio.gather(*(self._upstream(n, url)
                                                        for n, url in self._health)),
                                 strict=True):
            if problem:
                failed[f"upstream:{name}"] = problem
        return failed

    def metadata_problems(self) -> dict[str, str]:
        if len(self._registry) == 0 and not self._registry.on_demand:  # MDQ: on first use
            return {"idp_metadata": "no IdP metadata is loaded"}
        now = self._clock()
        problems = {}
        for entity_id, until in self.valid_until.items():
            if until is not None and until <= now:
                when = dt.datetime.fromtimestamp(until, dt.UTC).isoformat(timespec="seconds")
                problems[f"idp_metadata:{entity_id}"] = f"metadata expired (validUntil {when})"
        return problems

    async def _upstream(self, name: str, url: str) -> str | None:
        now = self._clock()
        cached = self._cache.get(name)
        if cached is not None and now - cached[0] < HEALTH_CACHE_SECONDS:
            return cached[1]
        problem = await _probe(url)
        self._cache[name] = (now, problem)
        return problem


async def _probe(url: str) -> str | None:
    timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT)
    try:
        async with (aiohttp.ClientSession(timeout=timeout, trust_env=False) as session,
                    session.get(url, allow_redirects=False) as resp):
            if resp.status >= 400:
                return f"health URL answered {resp.status}"
            return None
    except TimeoutError:
        return f"health URL did not answer within {HEALTH_TIMEOUT:g} s"
    except aiohttp.ClientError as exc:
        return f"health URL unreachable ({type(exc).__name__})"
