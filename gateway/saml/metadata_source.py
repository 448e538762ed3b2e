"""IdP metadata from URLs (``[[metadata]]``): fetch, verify, cache, refresh.

The only module that does network I/O for metadata. Each source is downloaded with a
timeout and a size limit, its signature verified against the pinned certificate
(``metadata_signature``), its ``validUntil`` checked, filtered to the configured
entities or registration authority, and only then swapped into the registry. On any
failure the last good copy stays in use. Good copies are kept in ``cache_dir`` (the
exact bytes, verified again on load) with a small JSON state file, so a restart
without network still has its IdPs and ``sso-gateway idp list`` can show the state.

Refresh runs every ``refresh`` seconds, sooner when the document's ``cacheDuration``
is shorter, retried after ``RETRY_SECONDS`` when it fails; IdPs whose ``validUntil``
passes before a good refresh are removed (expired metadata is not used). Each outcome
is told to the registry under the URL with its credentials masked (``/metrics``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp

from gateway.audit import audit
from gateway.config import MetadataSource as SourceConfig
from gateway.config import mask_url
from gateway.errors import ConfigError
from gateway.saml import metadata_report as report
from gateway.saml.metadata_signature import MetadataRefused, verify_signed_metadata
from gateway.saml.registry import IdP, IdPRegistry, idps_from_tree, parse_instant

log = logging.getLogger("gateway.metadata")
RETRY_SECONDS = 300
#: After installing a document at least this large, freed memory is handed back to the OS.
TRIM_AFTER_BYTES = 1 << 20
MIN_INTERVAL = 60
EXPIRY_LOG_EVERY = 86400
_DURATION = re.compile(r"P(?:(\d+)Y)?(?:(\d+)M)?(?:(\d+)W)?(?:(\d+)D)?"
                       r"(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?")


class SettingsCache(Protocol):
    """What the refresher needs from the ``ServiceProvider``."""

    def settings_for(self, idp: IdP) -> Any: ...
    def forget(self, idp: IdP) -> None: ...


@dataclass
class SourceState:
    """What ``idp list`` shows about a URL: kept next to the cached copy."""

    url: str
    fetched_at: float | None = None  # last good download (verified and in use)
    checked_at: float | None = None  # last attempt
    error: str = ""  # why the last attempt failed; "" when it succeeded
    skipped: list[str] = field(default_factory=list)  # unusable entities of the copy in use


@dataclass
class Accepted:
    idps: list[IdP]
    interval: float  # seconds until the next refresh
    sha256: str
    root: Any = field(repr=False)  # the verified document
    skipped: list[str] = field(default_factory=list)  # entities left out, with the reason


@dataclass
class Source:
    """One ``[[metadata]]`` entry and its cache files."""

    config: SourceConfig
    cert_pem: str = field(repr=False)
    state: SourceState
    next_at: float = 0.0

    @classmethod
    def open(cls, config: SourceConfig) -> Source:
        state = SourceState(config.url)
        with contextlib.suppress(OSError, ValueError, TypeError):
            state = SourceState(**json.loads(cache_paths(config)[1].read_text()))
        return cls(config, config.signing_cert.read_text(), state)

    @property
    def url(self) -> str:
        return self.config.url

    @property
    def label(self) -> str:
        """The source's name in ``/metrics``: its URL, credentials masked."""
        return mask_url(self.url)

    @property
    def cache_file(self) -> Path:
        return cache_paths(self.config)[0]

    def accept(self, data: bytes, now: float) -> Accepted:
        """Verify and parse one document; raise ``MetadataRefused`` if it must not be used."""
        root = verify_signed_metadata(data, self.cert_pem, self.url)
        until = parse_instant(root.get("validUntil"))
        if until is not None and until <= now:
            raise MetadataRefused(f"{self.url}: expired (validUntil {report.when(until)})")
        problems: list[str] = []
        skipped: list[str] = []
        idps = idps_from_tree(root, self.cache_file, problems, url=self.url,
                              entities=self.config.entities,
                              registration_authority=self.config.registration_authority,
                              skipped=skipped)
        fresh = [i for i in idps if i.valid_until is None or i.valid_until > now]
        if problems or not fresh:
            why = f"{self.url}: every IdP has expired" if idps else \
                f"{self.url}: no IdP the gateway can use ({len(skipped)} skipped)"
            raise MetadataRefused("; ".join(problems) or why)
        interval = float(self.config.refresh)
        cache = duration(root.get("cacheDuration"))
        if cache is not None:
            interval = min(interval, max(cache, MIN_INTERVAL))
        return Accepted(fresh, interval, hashlib.sha256(data).hexdigest(), root, skipped)

    async def fetch(self) -> bytes:
        return await download(self.url, self.config.timeout, self.config.max_bytes)

    def save(self, data: bytes | None) -> None:
        """Write the good copy (when given) and the state, each atomically."""
        xml_path, state_path = cache_paths(self.config)
        xml_path.parent.mkdir(parents=True, exist_ok=True)
        if data is not None:
            _write_atomic(xml_path, data)
        _write_atomic(state_path, json.dumps(asdict(self.state), indent=1).encode())


async def download(url: str, timeout: float, limit: int) -> bytes:
    """The document at ``url``; raise ``MetadataRefused`` on any transport problem."""
    with transport_errors(url, timeout):
        async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout),
                                          trust_env=False) as http,
                    http.get(url, max_redirects=5) as resp):
            return await bounded_body(resp, url, limit)


async def bounded_body(resp: aiohttp.ClientResponse, url: str, limit: int) -> bytes:
    """A 200 answer's body, refused (``MetadataRefused``) past ``limit`` bytes."""
    if resp.status != 200:
        raise MetadataRefused(f"{url}: answered HTTP {resp.status}")
    if (resp.content_length or 0) > limit:
        raise MetadataRefused(f"{url}: larger than max_bytes ({limit})")
    body = bytearray()
    async for chunk in resp.content.iter_chunked(65536):
        body += chunk
        if len(body) > limit:
            raise MetadataRefused(f"{url}: larger than max_bytes ({limit})")
    return bytes(body)


@contextlib.contextmanager
def transport_errors(url: str, timeout: float) -> Iterator[None]:
    """A download's timeout and connection errors as ``MetadataRefused``."""
    try:
        yield
    except TimeoutError:
        raise MetadataRefused(f"{url}: no complete answer within {timeout:g} s") from None
    except aiohttp.ClientError as exc:
        raise MetadataRefused(f"{url}: unreachable ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:200]})") from None


#: IdP changes of one refresh logged one by one; the rest are counted.
LOGGED_CHANGES = 20


def cache_paths(config: SourceConfig) -> tuple[Path, Path]:
    """The cached copy and the state file of one metadata URL."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", urlsplit(config.url).hostname or "metadata")
    name = f"{host}-{hashlib.sha256(config.url.encode()).hexdigest()[:16]}"
    return config.cache_dir / f"{name}.xml", config.cache_dir / f"{name}.json"


def duration(value: str | None) -> float | None:
    """An xs:duration (``PT6H``, ``P1D``) in seconds; years and months count 365 and 30 days."""
    match = _DURATION.fullmatch((value or "").strip())
    if not value or match is None or not any(match.groups()):
        return None
    y, mo, w, d, h, mi, s = (float(g) if g else 0.0 for g in match.groups())
    return (((y * 365 + mo * 30 + w * 7 + d) * 24 + h) * 60 + mi) * 60 + s


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, else None. A federation aggregate is parsed in a worker
    thread; the tens of MB its tree took stay in that thread's malloc arena (counted in
    RSS) after they are freed, unless the arena is trimmed."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        trim: Callable[[int], int] = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
        return trim
    return None


_TRIM = _malloc_trim()


def release_memory(size: int) -> None:
    """Hand freed memory back to the OS after a large metadata document was processed."""
    if _TRIM is not None and size >= TRIM_AFTER_BYTES:
        _TRIM(0)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class MetadataRefresher:
    """Keeps the registry's URL sources current; started and stopped by the app lifespan."""

    def __init__(self, configs: Sequence[SourceConfig], registry: IdPRegistry,
                 sp: SettingsCache | None = None, clock: Callable[[], float] = time.time) -> None:
        self.sources = [Source.open(c) for c in configs]
        self._registry = registry
        self._sp = sp
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._warned: dict[str, float] = {}  # entity ID → when its expiring cert was logged

    async def start(self) -> None:
        """Install the cached copies, download what has none, then refresh in background."""
        now = self._clock()
        missing = []
        loaded = 0
        for source in self.sources:
            try:
                data = source.cache_file.read_bytes()
                accepted = await asyncio.to_thread(source.accept, data, now)
                self._install(source, accepted, None, initial=True)
                accepted.root = None  # the parsed document is not needed any more
                # The copy in use was fetched when its state file says (by any process).
                self._registry.refresh_outcome(source.label,
                                               succeeded_at=source.state.fetched_at)
                loaded += len(data)
                source.next_at = now  # refresh soon, in the background
            except FileNotFoundError:
                missing.append(source)
            except (OSError, MetadataRefused, ConfigError) as exc:
                log.warning("cached metadata of %s not used: %s", source.url, exc)
                missing.append(source)
        # Startup loads are audited as "loaded" by the app (telemetry), not as changes.
        await asyncio.gather(*(self.refresh(s, initial=True) for s in missing))
        release_memory(loaded)
        self.flag_expiring()
        if self.sources:
            self._task = asyncio.create_task(self._run(), name="metadata-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def refresh(self, source: Source, initial: bool = False) -> bool:
        """Download, verify and install one source; on failure keep the last good copy."""
        now = self._clock()
        source.state.checked_at = now
        try:
            data = await source.fetch()
            accepted = await asyncio.to_thread(source.accept, data, now)
            self._install(source, accepted, data, initial)
            accepted.root = None  # the parsed document is not needed any more
            release_memory(len(data))
        except (MetadataRefused, ConfigError, OSError) as exc:
            reason = "; ".join(exc.problems) if isinstance(exc, ConfigError) else str(exc)
            if isinstance(exc, OSError):
                reason = f"{source.url}: cannot write the cache ({exc})"
            kept = "last good copy stays in use" if self._registry.source(source.url) else \
                "no copy in use"
            log.error("metadata refresh failed for %s (%s): %s", source.url, kept, reason)
            source.state.error = reason
            self._registry.refresh_outcome(source.label, failed=True)
            source.next_at = now + min(RETRY_SECONDS, source.config.refresh)
            with contextlib.suppress(OSError):
                source.save(None)
            return False
        source.state.fetched_at, source.state.error = now, ""
        self._registry.refresh_outcome(source.label, succeeded_at=now)
        source.next_at = now + accepted.interval
        ends = [i.valid_until for i in accepted.idps if i.valid_until is not None]
        if ends:  # try for a newer copy before this one expires
            source.next_at = min(source.next_at, max(now + MIN_INTERVAL, min(ends) - 300))
        with contextlib.suppress(OSError):
            source.save(None)  # the copy itself was written by _install
        self.flag_expiring()
        return True

    def _install(self, source: Source, accepted: Accepted, data: bytes | None,
                 initial: bool = False) -> None:
        before = {i.entity_id: i for i in self._registry.source(source.url)}
        if self._sp is not None and not initial:
            # python3-saml must accept a changed IdP's settings before it is used; one it
            # refuses is skipped like any other unusable entity. At start-up the settings
            # are built on first use instead: the registry already checks what python3-saml
            # checks, and building thousands up front costs seconds and tens of MB.
            usable = []
            for idp in accepted.idps:
                try:
                    if before.get(idp.entity_id) != idp:
                        self._sp.settings_for(idp)
                except ConfigError as exc:
                    reason = "; ".join(exc.problems)
                    log.warning("IdP skipped (the gateway cannot use it): %s", reason)
                    accepted.skipped.append(reason)
                    continue
                usable.append(idp)
            if not usable:
                raise MetadataRefused(f"{source.url}: python3-saml refuses every IdP")
            accepted.idps = usable
        after = {i.entity_id: i for i in accepted.idps}
        if data is not None:  # the cache file is the IdP's source: write it before use
            source.cache_file.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(source.cache_file, data)
        self._registry.replace_source(source.url, accepted.idps, accepted.skipped)
        source.state.skipped = list(accepted.skipped)
        if accepted.skipped:
            log.warning("metadata of %s: %d IdP%s in use, %d skipped as unusable "
                        "(sso-gateway idp list shows why)", source.url, len(accepted.idps),
                        "s" if len(accepted.idps) != 1 else "", len(accepted.skipped))
        changed: dict[str, list[str]] = {"added": [], "removed": [], "updated": []}
        for entity_id in sorted(before.keys() | after.keys()):
            old, new = before.get(entity_id), after.get(entity_id)
            if self._sp is not None and old is not None and old != new:
                self._sp.forget(old)
            lines = report.diff(old, new)
            if initial or not lines:
                continue
            change = "added" if old is None else "removed" if new is None else "updated"
            changed[change].append(entity_id)
            if sum(map(len, changed.values())) <= LOGGED_CHANGES:
                log.warning("metadata of IdP %s %s (from %s): %s", entity_id, change,
                            source.url, "; ".join(lines))
        total = sum(map(len, changed.values()))
        if total == 1:  # one IdP: named in the audit line
            [(change, [entity_id])] = [(k, v) for k, v in changed.items() if v]
            audit("metadata_change", change=change, entity_id=entity_id, source=source.url,
                  sha256=accepted.sha256)
        elif total > 1:  # one line per refresh, however many IdPs an aggregate changed
            counts = ", ".join(f"{len(v)} {k}" for k, v in changed.items() if v)
            if total > LOGGED_CHANGES:
                log.warning("metadata of %s refreshed: %s (the first %d are logged above)",
                            source.url, counts, LOGGED_CHANGES)
            audit("metadata_change", change="refreshed", entity_id=f"{total} IdPs",
                  source=source.url, sha256=accepted.sha256, idps=len(after),
                  added=len(changed["added"]), removed=len(changed["removed"]),
                  updated=len(changed["updated"]))

    def drop_expired(self) -> None:
        """Remove URL IdPs whose validUntil has passed (no good refresh came in time)."""
        now = self._clock()
        for source in self.sources:
            current = self._registry.source(source.url)
            keep = [i for i in current if i.valid_until is None or i.valid_until > now]
            if len(keep) == len(current):
                continue
            self._registry.replace_source(source.url, keep)
            for idp in current:
                if idp not in keep:
                    log.error("metadata of IdP %s from %s expired (validUntil %s) and no "
                              "newer copy could be fetched: IdP removed", idp.entity_id,
                              source.url, report.when(idp.valid_until or now))
                    audit("metadata_change", change="expired", entity_id=idp.entity_id,
                          source=source.url)
                    if self._sp is not None:
                        self._sp.forget(idp)

    def flag_expiring(self) -> None:
        """Log IdPs whose signing certificate expires within 30 days (once a day each)."""
        now = self._clock()
        for idp in self._registry.all():
            soon = report.expiring(idp, now)
            if not soon or now - self._warned.get(idp.entity_id, -EXPIRY_LOG_EVERY) \
                    < EXPIRY_LOG_EVERY:
                continue
            self._warned[idp.entity_id] = now
            for cert in soon:
                log.warning("IdP %s (%s): signing certificate %s", idp.entity_id, idp.origin,
                            cert.describe(now))

    async def _run(self) -> None:
        while True:
            now = self._clock()
            due = [s for s in self.sources if s.next_at <= now]
            try:
                if due:
                    await asyncio.gather(*(self.refresh(s) for s in due))
                self.drop_expired()
                self.flag_expiring()
            except Exception:  # a bug must not end refreshing for the process's lifetime
                log.exception("metadata refresh pass failed")
                for s in due:
                    s.next_at = max(s.next_at, now + RETRY_SECONDS)
            wake = [s.next_at for s in self.sources]
            wake += [i.valid_until for s in self.sources for i in self._registry.source(s.url)
                     if i.valid_until is not None]
            await asyncio.sleep(min(max(min(wake) - self._clock(), 1.0), 3600.0))
