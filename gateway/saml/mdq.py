"""IdPs fetched one at a time, on first use, from a Metadata Query (MDQ) service.

A ``[[metadata]]`` entry with ``mdq`` names the service's base URL. When a visitor picks
an IdP the gateway does not know (``idp=`` at the sign-in start, a discovery service's
answer, an unsolicited Response from an IdP that may send one), the entity is asked for
at ``<mdq>/entities/<URL-encoded entity ID>`` (or ``{sha1}<hex>`` with
``mdq_identifier = "sha1"``), ``Accept: application/samlmetadata+xml``. The answer must
be signed by the pinned certificate (``metadata_signature``), describe exactly the
entity asked for, and not be past its ``validUntil``; only then is the IdP added to the
registry (as source ``mdq:<base>``) and its bytes kept in ``cache_dir``.

An anonymous client chooses the entity ID, so what it can make the gateway fetch and
keep is bounded: only URL or URN entity IDs of at most 1024 characters (and, with
``entities``, only those); a not-found or refused answer is remembered for
``mdq_not_found_ttl`` seconds; fetches are limited per client and for the whole gateway
(``mdq_fetches_per_minute``); each answer within ``timeout`` and ``max_bytes``; at most
``mdq_max_entities`` entities are kept, least recently used evicted (memory and disk).

An entity is used for ``refresh`` seconds, or its ``cacheDuration`` when shorter, never
past its ``validUntil``; after that the next use refreshes it in the background. A failed
refresh keeps the last good copy (logged, and counted in the registry under
``mdq:<base URL>``, never under the entity ID a client chose) until its ``validUntil`` (an
answer "not found" removes it: the federation removed the entity); at
start-up the copies on disk are loaded again (signature and validity checked again), so
the service being down does not stop members whose IdP was seen before.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import aiohttp
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C
from yarl import URL

from gateway.audit import audit
from gateway.config import MetadataSource as SourceConfig
from gateway.config import mask_url
from gateway.errors import ConfigError, StoreError
from gateway.rate_limits import over_limit
from gateway.saml.metadata_signature import MetadataRefused, verify_signed_metadata
from gateway.saml.metadata_source import (
    MIN_INTERVAL,
    SettingsCache,
    bounded_body,
    duration,
    transport_errors,
)
from gateway.saml.registry import IdP, IdPRegistry, idps_from_tree
from gateway.sessions import KeyStore

log = logging.getLogger("gateway.metadata")
ACCEPT = "application/samlmetadata+xml"
#: The longest entity ID asked for (SAML caps entityID at 1024 characters).
MAX_ENTITY_ID = 1024
#: MDQ fetches one client may cause per minute (the gateway-wide cap is configured).
PER_CLIENT_PER_MINUTE = 10
#: After a failed refresh, the last good copy is used this long before the next try.
RETRY_SECONDS = 60.0
#: How many not-found entity IDs are remembered at most (oldest forgotten first).
MAX_NOT_FOUND = 10_000
_ENTITY_ID = re.compile(r"(?:https?://[^/?#\s]+|urn:[A-Za-z0-9][A-Za-z0-9-]{0,31}:)\S*",
                        re.IGNORECASE)
_BAD = re.compile(r"['\s\x00-\x1f\x7f]")
_ENTITY = f"{{{C.NS_MD}}}EntityDescriptor"


class NotFound(Exception):
    """The MDQ service does not know the entity (HTTP 404)."""


def source_name(config: SourceConfig) -> str:
    """The registry source of an MDQ service's IdPs."""
    return f"mdq:{config.mdq}"


def cache_dir(config: SourceConfig) -> Path:
    """The directory of an MDQ service's kept entities (one ``<sha256>.xml`` each)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", urlsplit(config.mdq).hostname or "mdq")
    return config.cache_dir / f"mdq-{host}-{hashlib.sha256(config.mdq.encode()).hexdigest()[:16]}"


def entity_file(config: SourceConfig, entity_id: str) -> Path:
    return cache_dir(config) / f"{hashlib.sha256(entity_id.encode()).hexdigest()}.xml"


def askable(entity_id: str) -> bool:
    """Whether an entity ID may be asked for at all: a URL or URN, within the length."""
    return (len(entity_id) <= MAX_ENTITY_ID and _ENTITY_ID.fullmatch(entity_id) is not None
            and _BAD.search(entity_id) is None)


def request_url(config: SourceConfig, entity_id: str) -> str:
    """Where the MDQ service answers for ``entity_id``."""
    if config.mdq_identifier == "sha1":
        # The MDQ protocol's transformed identifier: a name, not a security function.
        digest = hashlib.sha1(entity_id.encode(), usedforsecurity=False).hexdigest()
        name = quote("{sha1}" + digest, safe="")
    else:
        name = quote(entity_id, safe="")
    return f"{config.mdq}/entities/{name}"


def accept(config: SourceConfig, cert_pem: str, data: bytes, entity_id: str,
           now: float) -> tuple[IdP, float]:
    """The IdP in one MDQ answer and until when it is fresh; raises ``MetadataRefused``
    unless the answer is signed by the pinned certificate, describes exactly
    ``entity_id``, is usable and within its ``validUntil``."""
    where = request_url(config, entity_id)
    root = verify_signed_metadata(data, cert_pem, where)
    named = {(node.get("entityID") or "").strip() for node in root.iter(_ENTITY)}
    if named != {entity_id}:
        shown = ", ".join(repr(n[:200]) for n in sorted(named)[:3]) or "no entity"
        raise MetadataRefused(f"{where}: the answer describes {shown}, not the entity asked "
                              "for")
    problems: list[str] = []
    idps = idps_from_tree(root, entity_file(config, entity_id), problems, url=where,
                          entities=config.entities,
                          registration_authority=config.registration_authority)
    if problems or len(idps) != 1:
        raise MetadataRefused("; ".join(problems) or f"{where}: no IdP the gateway can use")
    idp = idps[0]
    if idp.valid_until is not None and idp.valid_until <= now:
        raise MetadataRefused(f"{where}: expired (validUntil passed)")
    interval = float(config.refresh)
    cache = duration(root.get("cacheDuration"))
    if cache is not None:
        interval = min(interval, max(cache, MIN_INTERVAL))
    fresh_until = now + interval
    if idp.valid_until is not None:
        fresh_until = min(fresh_until, idp.valid_until)
    return idp, fresh_until


@dataclass
class Entry:
    idp: IdP
    fresh_until: float  # used as it is until then; afterwards refreshed on next use


class MdqService:
    """One MDQ service: its kept entities (LRU), what it did not know, its fetches."""

    def __init__(self, config: SourceConfig, registry: IdPRegistry,
                 sp: SettingsCache | None = None, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.name = source_name(config)
        self.label = f"mdq:{mask_url(config.mdq)}"  # in /metrics: credentials masked
        self._cert_pem = config.signing_cert.read_text()
        self._registry = registry
        registry.add_on_demand_source(self.name)
        registry.refresh_outcome(self.label)  # its failures counted from zero
        self._sp = sp
        self._clock = clock
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._not_found: OrderedDict[str, float] = OrderedDict()  # entity ID → until
        self._inflight: dict[str, asyncio.Task[IdP | None]] = {}
        self._http: aiohttp.ClientSession | None = None

    # Life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the kept entities (newest first, within ``mdq_max_entities``)."""
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.timeout), trust_env=False)
        loaded = await asyncio.to_thread(self._load_kept, self._clock())
        for idp in loaded:
            self._entries[idp.entity_id] = Entry(idp, 0.0)  # refreshed on first use
            self._registry.put(self.name, idp)
        if loaded:
            log.info("MDQ %s: %d kept IdP%s loaded", self.config.mdq, len(loaded),
                     "s" if len(loaded) != 1 else "")

    async def stop(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _load_kept(self, now: float) -> list[IdP]:
        def modified(path: Path) -> float:
            with contextlib.suppress(OSError):
                return path.stat().st_mtime
            return 0.0

        files = sorted(cache_dir(self.config).glob("*.xml"), key=modified, reverse=True)
        loaded: list[IdP] = []
        for path in files:
            if len(loaded) >= self.config.mdq_max_entities:
                path.unlink(missing_ok=True)
                continue
            try:
                data = path.read_bytes()
                root = verify_signed_metadata(data, self._cert_pem, str(path))
                entity_id = (root.get("entityID") or "").strip()
                if path != entity_file(self.config, entity_id):
                    raise MetadataRefused(f"{path}: holds another entity")
                loaded.append(accept(self.config, self._cert_pem, data, entity_id, now)[0])
            except (OSError, MetadataRefused) as exc:
                log.warning("kept MDQ entity not used (removed): %s", exc)
                path.unlink(missing_ok=True)
        return list(reversed(loaded))  # oldest first: the LRU order

    # Lookups --------------------------------------------------------------------------

    def would_fetch(self, entity_id: str) -> bool:
        """Whether ``lookup`` would ask the service (not kept, not known to be missing)."""
        return (askable(entity_id) and entity_id not in self._entries
                and self._not_found.get(entity_id, 0.0) <= self._clock()
                and (not self.config.entities or entity_id in self.config.entities))

    async def lookup(self, entity_id: str, keys: KeyStore) -> IdP | None:
        """The IdP ``entity_id`` from this service (kept, or fetched now), else None."""
        now = self._clock()
        entry = self._entries.get(entity_id)
        if entry is not None:
            self._entries.move_to_end(entity_id)
            if entry.fresh_until > now:
                return entry.idp
            if entry.idp.valid_until is None or entry.idp.valid_until > now:
                self._fetch_once(entity_id, keys)  # refresh in the background
                return entry.idp
        elif not self.would_fetch(entity_id):
            return None
        return await asyncio.shield(self._fetch_once(entity_id, keys))

    def _fetch_once(self, entity_id: str, keys: KeyStore) -> asyncio.Task[IdP | None]:
        """One fetch per entity at a time: concurrent lookups share it."""
        task = self._inflight.get(entity_id)
        if task is None:
            task = asyncio.create_task(self._fetch(entity_id, keys), name="mdq-fetch")
            self._inflight[entity_id] = task
            task.add_done_callback(lambda _: self._inflight.pop(entity_id, None))
        return task

    async def _fetch(self, entity_id: str, keys: KeyStore) -> IdP | None:
        now = self._clock()
        kept = self._entries.get(entity_id)
        try:
            over = await over_limit(keys, "mdq", self.config.mdq_fetches_per_minute, 60.0)
        except StoreError as exc:  # the limit cannot be counted: no fetch
            log.error("MDQ %s: not asked for %s: %s", self.config.mdq, entity_id[:200],
                      exc.reason)
            return self._keep_or_drop(kept, now, "the store is unavailable")
        if over:
            log.warning("MDQ %s: not asked for %s: over mdq_fetches_per_minute (%d)",
                        self.config.mdq, entity_id[:200], self.config.mdq_fetches_per_minute)
            return self._keep_or_drop(kept, now, "over the fetch limit")
        url = request_url(self.config, entity_id)
        try:
            data = await self._download(url)
            idp, fresh_until = await asyncio.to_thread(accept, self.config, self._cert_pem,
                                                       data, entity_id, now)
            if self._sp is not None and (kept is None or kept.idp != idp):
                self._sp.settings_for(idp)  # python3-saml must accept it before it is used
            path = entity_file(self.config, entity_id)
            await asyncio.to_thread(_write_atomic, path, data)
        except NotFound:
            log.info("MDQ %s does not know %s", self.config.mdq, entity_id[:200])
            self._remember_missing(entity_id, now)
            if kept is not None:  # the federation removed it: so does the gateway
                self._entries.pop(entity_id, None)
                self._forget(kept.idp, "removed (the MDQ service no longer knows it)")
            return None
        except (MetadataRefused, ConfigError, OSError) as exc:
            reason = "; ".join(exc.problems) if isinstance(exc, ConfigError) else str(exc)
            log.error("MDQ entity %s refused: %s", entity_id[:200], reason)
            if kept is None:
                self._remember_missing(entity_id, now)
            return self._keep_or_drop(kept, now, reason)
        self._install(kept, idp, fresh_until)
        self._registry.refresh_outcome(self.label, succeeded_at=self._clock())
        return idp

    async def _download(self, url: str) -> bytes:
        assert self._http is not None, "MdqService.start() was not called"
        limit, timeout = self.config.max_bytes, self.config.timeout
        with transport_errors(url, timeout):
            # Sent as encoded here: the percent-encoded entity ID is the MDQ identifier.
            async with self._http.get(URL(url, encoded=True), headers={"Accept": ACCEPT},
                                      max_redirects=3) as resp:
                if resp.status == 404:
                    raise NotFound(url)
                return await bounded_body(resp, url, limit)

    # Bookkeeping ----------------------------------------------------------------------

    def _install(self, kept: Entry | None, idp: IdP, fresh_until: float) -> None:
        self._entries[idp.entity_id] = Entry(idp, fresh_until)
        self._entries.move_to_end(idp.entity_id)
        self._not_found.pop(idp.entity_id, None)
        if kept is None or kept.idp != idp:
            if kept is not None and self._sp is not None:
                self._sp.forget(kept.idp)
            self._registry.put(self.name, idp)
            change = "added" if kept is None else "updated"
            log.info("MDQ %s: IdP %s %s", self.config.mdq, idp.entity_id, change)
            audit("metadata_change", change=change, entity_id=idp.entity_id,
                  source=self.config.mdq)
        while len(self._entries) > self.config.mdq_max_entities:
            old = self._entries.popitem(last=False)[1].idp
            self._forget(old, "evicted (least recently used)")

    def _keep_or_drop(self, kept: Entry | None, now: float, reason: str) -> IdP | None:
        """After a failed refresh: the last good copy until its validUntil, else nothing."""
        if kept is None:
            return None
        self._registry.refresh_outcome(self.label, failed=True)
        if kept.idp.valid_until is not None and kept.idp.valid_until <= now:
            self._entries.pop(kept.idp.entity_id, None)
            self._forget(kept.idp, "expired and no newer copy could be fetched")
            return None
        kept.fresh_until = now + RETRY_SECONDS
        log.error("MDQ refresh of %s failed (last good copy stays in use): %s",
                  kept.idp.entity_id, reason)
        return kept.idp

    def _forget(self, idp: IdP, why: str) -> None:
        self._registry.drop(self.name, idp.entity_id)
        if self._sp is not None:
            self._sp.forget(idp)
        with contextlib.suppress(OSError):
            entity_file(self.config, idp.entity_id).unlink(missing_ok=True)
        log.info("MDQ %s: IdP %s %s", self.config.mdq, idp.entity_id, why)
        audit("metadata_change", change="removed", entity_id=idp.entity_id,
              source=self.config.mdq)

    def _remember_missing(self, entity_id: str, now: float) -> None:
        if self.config.mdq_not_found_ttl <= 0:
            return
        self._not_found[entity_id] = now + self.config.mdq_not_found_ttl
        self._not_found.move_to_end(entity_id)
        while len(self._not_found) > MAX_NOT_FOUND:
            self._not_found.popitem(last=False)


class MdqResolver:
    """Every ``[[metadata]] mdq`` service, asked in order for an IdP not yet known."""

    def __init__(self, configs: Sequence[SourceConfig], registry: IdPRegistry,
                 sp: SettingsCache | None = None, clock: Callable[[], float] = time.time) -> None:
        self.services = [MdqService(c, registry, sp, clock) for c in configs if c.mdq]

    def __bool__(self) -> bool:
        return bool(self.services)

    async def start(self) -> None:
        for service in self.services:
            await service.start()

    async def stop(self) -> None:
        for service in self.services:
            await service.stop()

    def would_fetch(self, entity_id: str) -> bool:
        """Whether a lookup of ``entity_id`` would ask some MDQ service."""
        return any(s.would_fetch(entity_id) for s in self.services)

    async def lookup(self, entity_id: str, keys: KeyStore) -> IdP | None:
        """The IdP from the first service that knows it, else None (never raises for the
        service's failures: they are logged)."""
        for service in self.services:
            idp = await service.lookup(entity_id, keys)
            if idp is not None:
                return idp
        return None


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
