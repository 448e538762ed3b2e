"""The IdPs this gateway trusts, read from SAML metadata files in one directory.

Each ``*.xml`` file holds one ``md:EntityDescriptor`` or an ``md:EntitiesDescriptor``
aggregate. Every problem in every file is collected and raised at once as a
``ConfigError`` whose lines name the file; a half-loaded registry never exists.

Metadata files are placed by an administrator, so they are trusted for their content;
they are still parsed with the library's hardened parser (no DTD, no entities, no
network) and a DOCTYPE is refused outright.

Metadata fetched from URLs (``gateway.saml.metadata_source``) arrives as named
*sources*: ``replace_source`` swaps one source's IdPs in a single assignment, so
readers (the login flow, python3-saml threads) see either the old set or the new one.
The IdPs from files come first; an entity ID a later source repeats is skipped.

The refreshers also tell the registry how each source's refreshes go
(``refresh_outcome``: the last good fetch, the failures, under the source's label), so
``/metrics`` can show metadata that stopped refreshing.

An aggregate (``md:EntitiesDescriptor``) never fails because of one entity: an IdP the
gateway cannot use (no HTTP-Redirect SingleSignOnService, no usable signing
certificate, a bad entityID) is skipped, its reason logged, counted in ``skipped`` and
shown by ``sso-gateway idp list``. A single ``md:EntityDescriptor`` with such a problem
is still refused, since it can only be a mistake.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from lxml import etree
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C
from onelogin.saml2.settings import validate_url
from onelogin.saml2.xml_utils import OneLogin_Saml2_XML

from gateway.errors import ConfigError, UnknownIdP
from gateway.saml.scopes import Scope, read_scopes

log = logging.getLogger("gateway.metadata")
_MD = f"{{{C.NS_MD}}}"
_MDUI_NS = "urn:oasis:names:tc:SAML:metadata:ui"
_MDRPI_NS = "urn:oasis:names:tc:SAML:metadata:rpi"
_NS = {"md": C.NS_MD, "ds": C.NS_DS, "mdui": _MDUI_NS, "mdrpi": _MDRPI_NS}
_DOCTYPE = re.compile(rb"<!\s*DOCTYPE", re.IGNORECASE)
_BAD_ENTITY_ID = re.compile(r"['\s\x00-\x1f]")
_BAD_URL = re.compile(r"[\s\x00-\x1f\"'<>\\]")  # kept out of a logo's src
# Signing keys: KeyDescriptors for signing, or with no ``use`` (meaning both uses).
_SIGNING_CERTS = (
    "md:KeyDescriptor[not(@use) or @use='signing']/ds:KeyInfo/ds:X509Data/ds:X509Certificate"
)


#: A localized metadata value: (text, xml:lang), the language "" when none is given.
Localized = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Logo:
    """An ``mdui:Logo``: an https URL (no other is kept) and its size in pixels."""

    url: str
    width: int
    height: int
    lang: str = ""


@dataclass(frozen=True, slots=True)
class UIInfo:
    """What discovery shows and searches of an IdP: its ``mdui:UIInfo`` (display names,
    else the OrganizationDisplayNames) and its ``mdui:DiscoHints`` domain hints."""

    display_names: tuple[Localized, ...] = ()
    descriptions: tuple[Localized, ...] = ()
    keywords: tuple[Localized, ...] = ()  # as written: words split by spaces, "+" a space
    information_urls: tuple[Localized, ...] = ()
    privacy_urls: tuple[Localized, ...] = ()
    logos: tuple[Logo, ...] = ()
    domain_hints: tuple[str, ...] = ()  # lower-case


NO_UI = UIInfo()


@dataclass(frozen=True)
class IdP:
    """One trusted IdP. ``settings`` is the python3-saml ``idp`` settings block.

    ``settings`` is left out of equality and hashing (the other fields determine it),
    so an ``IdP`` can key a cache; treat it as read-only.
    """

    entity_id: str
    display_name: str
    sso_url: str  # HTTP-Redirect binding
    slo_url: str  # HTTP-Redirect binding, or "" when the IdP has none
    signing_certs: tuple[str, ...]  # PEM bodies (base64 DER, no armour)
    source: Path  # the metadata file (for a URL: its cached copy)
    settings: Mapping[str, Any] = field(compare=False, repr=False)
    # The earliest validUntil of the EntityDescriptor and its aggregates (POSIX seconds).
    valid_until: float | None = field(default=None, compare=False)
    url: str = field(default="", compare=False)  # the metadata URL, "" for a file
    ui: UIInfo = field(default=NO_UI, compare=False, repr=False)  # for discovery
    # The HTTP-POST SingleLogoutService, used only when there is no Redirect one ("" if none).
    slo_post_url: str = ""
    # The scopes its metadata lists (shibmd:Scope) for scoped attribute values.
    scopes: tuple[Scope, ...] = field(default=(), compare=False)

    @property
    def origin(self) -> str:
        """Where the metadata comes from, as an admin wrote it: the URL or the file."""
        return self.url or str(self.source)


@dataclass(frozen=True, slots=True)
class Refreshes:
    """How one metadata source's refreshes went in this process."""

    source: str  # its label: the URL with credentials masked, or "mdq:<base URL>"
    last_success: float | None = None  # when a document was last fetched and verified
    failures: int = 0  # refreshes that failed (the last good copy, if any, stayed in use)


class IdPRegistry:
    """An immutable set of IdPs keyed by entity ID."""

    def __init__(self, idps: Iterable[IdP] = ()) -> None:
        base: dict[str, IdP] = {}
        for idp in idps:
            if idp.entity_id in base:
                raise ValueError(f"IdP {idp.entity_id!r} given twice")
            base[idp.entity_id] = idp
        self._sources: dict[str, tuple[IdP, ...]] = {"": tuple(base.values())}
        self._idps: dict[str, IdP] = base
        self.generation = 0  # bumped by every replace_source
        # Per source ("" for the files): the aggregate entities skipped, with the reason.
        self.skipped: dict[str, tuple[str, ...]] = {}
        # Sources filled on demand (MDQ): what a visitor asked for, so never the default.
        self._on_demand: set[str] = set()
        self._refreshes: dict[str, Refreshes] = {}
        self._refresh_listeners: list[Callable[[str, int], None]] = []

    def refresh_outcome(self, source: str, *, succeeded_at: float | None = None,
                        failed: bool = False) -> None:
        """Note how a refresh of the source labelled ``source`` went: fetched and verified
        at ``succeeded_at``, or ``failed``; with neither, the source is only named (its
        failures counted from zero). Listeners hear ``(source, new failures)``."""
        kept = self._refreshes.get(source) or Refreshes(source)
        last = kept.last_success if succeeded_at is None else succeeded_at
        self._refreshes[source] = replace(kept, last_success=last,
                                          failures=kept.failures + failed)
        for listener in self._refresh_listeners:
            listener(source, int(failed))

    def on_refresh(self, listener: Callable[[str, int], None]) -> None:
        """Call ``listener(source, new failures)`` after every ``refresh_outcome`` (at once
        with 0 for each source already named)."""
        self._refresh_listeners.append(listener)
        for source in self._refreshes:
            listener(source, 0)

    def refreshes(self) -> list[Refreshes]:
        """How each named metadata source's refreshes went, in this process."""
        return list(self._refreshes.values())

    def add_on_demand_source(self, name: str) -> None:
        """Name a source whose IdPs are fetched on first use (MDQ): see ``on_demand``."""
        self._on_demand.add(name)

    @property
    def on_demand(self) -> bool:
        """Whether IdPs may arrive on first use: an empty registry can still sign in."""
        return bool(self._on_demand)

    def put(self, name: str, idp: IdP) -> None:
        """Add (or replace) one IdP of an on-demand source (MDQ), keeping the others."""
        self._on_demand.add(name)
        others = [i for i in self._sources.get(name, ()) if i.entity_id != idp.entity_id]
        self.replace_source(name, [*others, idp])

    def drop(self, name: str, entity_id: str) -> None:
        """Remove one IdP of an on-demand source (evicted from its cache, or expired)."""
        current = self._sources.get(name, ())
        if any(i.entity_id == entity_id for i in current):
            self.replace_source(name, [i for i in current if i.entity_id != entity_id])

    def replace_source(self, name: str, idps: Iterable[IdP],
                       skipped: Iterable[str] | None = None) -> None:
        """Set the IdPs of one named source (a metadata URL); an empty list removes it.
        ``skipped`` (when given) replaces the source's list of skipped entities."""
        if skipped is not None:
            reasons = dict(self.skipped)
            reasons[name] = tuple(skipped)
            if not reasons[name]:
                del reasons[name]
            self.skipped = reasons
        sources = dict(self._sources)
        sources[name] = tuple(idps)
        if not sources[name]:
            del sources[name]
        merged: dict[str, IdP] = {}
        for key, members in sources.items():
            for idp in members:
                other = merged.get(idp.entity_id)
                if other is None:
                    merged[idp.entity_id] = idp
                elif key == name:
                    log.warning("IdP %s from %s ignored: already defined by %s",
                                idp.entity_id, idp.origin, other.origin)
        self._sources = sources
        self._idps = merged  # one assignment: readers see the old or the new set
        self.generation += 1

    def source(self, name: str) -> tuple[IdP, ...]:
        """The IdPs a named source currently provides (shadowed ones included)."""
        return self._sources.get(name, ())

    @classmethod
    def load_dir(cls, directory: Path) -> IdPRegistry:
        """Load every ``*.xml`` in ``directory``; raise ``ConfigError`` listing every problem."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ConfigError([f"{directory}: IdP metadata directory does not exist"])
        problems: list[str] = []
        skipped: list[str] = []
        idps: dict[str, IdP] = {}
        for path in sorted(directory.glob("*.xml")):
            for idp in _load_file(path, problems, skipped):
                other = idps.get(idp.entity_id)
                if other is not None:
                    problems.append(
                        f"{path}: entityID {idp.entity_id!r} is already defined in {other.source}"
                    )
                    continue
                idps[idp.entity_id] = idp
        if problems:
            raise ConfigError(problems)
        registry = cls(idps.values())
        if skipped:
            registry.skipped = {"": tuple(skipped)}
        return registry

    def get(self, entity_id: str) -> IdP:
        try:
            return self._idps[entity_id]
        except KeyError:
            raise UnknownIdP(f"IdP {entity_id[:200]!r} is not configured") from None

    def all(self) -> list[IdP]:
        """All IdPs, sorted by display name (the order a discovery page shows them)."""
        return sorted(self._idps.values(), key=lambda i: (i.display_name.casefold(), i.entity_id))

    def default(self) -> IdP | None:
        """The only IdP when exactly one is configured (no discovery needed), else None.
        IdPs fetched on demand (MDQ) never make one the default: a visitor chose them."""
        if self._on_demand:
            return None
        if len(self._idps) == 1:
            return next(iter(self._idps.values()))
        return None

    def skipped_count(self) -> int:
        """How many aggregate entities are skipped as unusable, over all sources."""
        return sum(len(reasons) for reasons in self.skipped.values())

    def __len__(self) -> int:
        return len(self._idps)

    def __contains__(self, entity_id: object) -> bool:
        return entity_id in self._idps


def _load_file(path: Path, problems: list[str], skipped: list[str] | None = None) -> list[IdP]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        problems.append(f"{path}: cannot read ({exc.strerror or exc})")
        return []
    root = parse_xml(data, str(path), problems)
    return [] if root is None else idps_from_tree(root, path, problems, skipped=skipped)


def parse_xml(data: bytes, where: str, problems: list[str]) -> Any | None:
    """The root element of metadata bytes (hardened parser; DOCTYPE refused), or None."""
    if _DOCTYPE.search(data):
        problems.append(f"{where}: a DOCTYPE is not allowed in metadata")
        return None
    try:
        return OneLogin_Saml2_XML.to_etree(data)
    except Exception as exc:  # lxml syntax errors and the parser's DTD/entity refusals
        problems.append(f"{where}: not well-formed XML ({_short(exc)})")
        return None


def idps_from_tree(root: Any, path: Path, problems: list[str], *, url: str = "",
                   entities: Iterable[str] = (), registration_authority: str = "",
                   skipped: list[str] | None = None) -> list[IdP]:
    """The IdPs of a parsed metadata document, optionally only the listed ``entities``
    and/or those registered by ``registration_authority`` (mdrpi:RegistrationInfo).

    With ``skipped`` given, an entity of an aggregate the gateway cannot use is left
    out, its reason appended to ``skipped`` and logged, instead of to ``problems``."""
    where = url or str(path)
    if root.tag == f"{_MD}EntityDescriptor":
        nodes = [root]
    elif root.tag == f"{_MD}EntitiesDescriptor":
        nodes = list(root.iter(f"{_MD}EntityDescriptor"))
    else:
        problems.append(
            f"{where}: root element is {etree.QName(root).localname!r}, "
            "expected md:EntityDescriptor or md:EntitiesDescriptor"
        )
        return []
    wanted = set(entities)
    if wanted or registration_authority:
        nodes = [n for n in nodes if (not wanted or (n.get("entityID") or "").strip() in wanted)
                 and (not registration_authority
                      or _registration_authority(n) == registration_authority)]
        missing = wanted - {(n.get("entityID") or "").strip() for n in nodes}
        if missing:
            log.warning("%s: entities not found (or filtered out): %s", where,
                        ", ".join(sorted(missing)))

    idps: list[IdP] = []
    seen_idp_descriptor = False
    tolerant = skipped is not None and root.tag == f"{_MD}EntitiesDescriptor"
    for entity in nodes:
        if entity.find("md:IDPSSODescriptor", _NS) is None:
            continue  # aggregates also carry SPs; a lone SP is reported below
        seen_idp_descriptor = True
        if not tolerant:
            idp = _load_entity(path, entity, problems, url)
            if idp is not None:
                idps.append(idp)
            continue
        found: list[str] = []
        try:
            idp = _load_entity(path, entity, found, url)
        except Exception as exc:  # one odd entity must not fail the aggregate
            idp = None
            found.append(f"{where}: IdP {(entity.get('entityID') or '').strip()[:200]!r}: "
                         f"cannot be read ({_short(exc)})")
        if idp is not None:
            idps.append(idp)
        elif found and skipped is not None:
            prefix = found[0].split(": ", 2)
            lead = ": ".join(prefix[:2]) + ": " if len(prefix) == 3 else ""
            reason = "; ".join([found[0]] + [r.removeprefix(lead) for r in found[1:]])
            log.warning("IdP skipped (the gateway cannot use it): %s", reason)
            skipped.append(reason)
    if not seen_idp_descriptor:
        hint = " or the filter keeps none" if wanted or registration_authority else ""
        problems.append(f"{where}: no md:IDPSSODescriptor (this is not IdP metadata{hint})")
    return idps


def _registration_authority(entity: Any) -> str:
    """The entity's registrationAuthority, else the nearest aggregate's."""
    for node in (entity, *entity.iterancestors()):
        info = node.find("md:Extensions/mdrpi:RegistrationInfo", _NS)
        if info is not None:
            return str(info.get("registrationAuthority") or "").strip()
    return ""


def valid_until(entity: Any) -> float | None:
    """The earliest validUntil of an EntityDescriptor and its enclosing aggregates."""
    times = [parse_instant(node.get("validUntil")) for node in (entity, *entity.iterancestors())]
    known = [t for t in times if t is not None]
    return min(known) if known else None


def parse_instant(value: str | None) -> float | None:
    if not value:
        return None
    try:
        when = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


def _load_entity(path: Path, entity: Any, problems: list[str], url: str = "") -> IdP | None:
    entity_id = (entity.get("entityID") or "").strip()
    if not entity_id:
        problems.append(f"{url or path}: an md:EntityDescriptor has no entityID")
        return None
    where = f"{url or path}: IdP {entity_id!r}"
    if _BAD_ENTITY_ID.search(entity_id):
        # Kept from when the library's parser interpolated the entityID into an XPath.
        problems.append(f"{where}: entityID contains a quote, whitespace or control character")
        return None
    before = len(problems)

    # What python3-saml's metadata parser takes (the first Redirect endpoint of the first
    # IDPSSODescriptor), read directly: at federation scale, re-serialising and
    # re-parsing every entity for the library's parser was most of the load time.
    descriptor = entity.find("md:IDPSSODescriptor", _NS)
    sso_url = _location(descriptor, "SingleSignOnService")
    slo_url = _location(descriptor, "SingleLogoutService")
    # Single Logout by POST only when the IdP offers no Redirect endpoint.
    slo_post_url = "" if slo_url else _location(descriptor, "SingleLogoutService",
                                                 C.BINDING_HTTP_POST)
    if not sso_url:
        problems.append(f"{where}: no SingleSignOnService with the HTTP-Redirect binding")
    elif not validate_url(sso_url):
        problems.append(f"{where}: the SingleSignOnService Location is not a URL")
    if slo_url and not validate_url(slo_url):
        problems.append(f"{where}: the SingleLogoutService Location is not a URL")
    if slo_post_url and not validate_url(slo_post_url):
        problems.append(f"{where}: the SingleLogoutService (HTTP-POST) Location is not a URL")

    certs: list[str] = []
    bad_cert = False
    for node in descriptor.xpath(_SIGNING_CERTS, namespaces=_NS):
        body = "".join((OneLogin_Saml2_XML.element_text(node) or "").split())
        try:
            x509.load_der_x509_certificate(base64.b64decode(body, validate=True))
        except (binascii.Error, ValueError):
            problems.append(f"{where}: a signing X509Certificate is not a valid certificate")
            bad_cert = True
            continue
        if body not in certs:
            certs.append(body)
    if not certs and not bad_cert:
        problems.append(f"{where}: no signing certificate (KeyDescriptor use=\"signing\")")
    if len(problems) != before:
        return None

    settings: dict[str, Any] = {
        "entityId": entity_id,
        "singleSignOnService": {"url": sso_url, "binding": C.BINDING_HTTP_REDIRECT},
        "x509certMulti": {"signing": list(certs)},
    }
    if slo_url:
        settings["singleLogoutService"] = {"url": slo_url, "binding": C.BINDING_HTTP_REDIRECT}
    elif slo_post_url:
        settings["singleLogoutService"] = {"url": slo_post_url, "binding": C.BINDING_HTTP_POST}
    ui = _ui_info(entity, descriptor)
    return IdP(
        entity_id=entity_id,
        display_name=_display_name(ui.display_names) or entity_id,
        sso_url=sso_url,
        slo_url=slo_url,
        signing_certs=tuple(certs),
        source=path,
        settings=settings,
        valid_until=valid_until(entity),
        url=url,
        ui=ui,
        slo_post_url=slo_post_url,
        scopes=read_scopes(entity, where, _NS),
    )


def _location(descriptor: Any, service: str, binding: str = C.BINDING_HTTP_REDIRECT) -> str:
    """The Location of the first ``service`` endpoint with ``binding`` (HTTP-Redirect)."""
    for node in descriptor.iterfind(f"md:{service}", _NS):
        if node.get("Binding") == binding:
            return str(node.get("Location") or "").strip()
    return ""


_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
_MDUI = f"{{{_MDUI_NS}}}"
# mdui:UIInfo children kept as localized texts → their slot in ``_ui_info``.
_UI_TEXTS = {f"{_MDUI}{name}": n for n, name in enumerate(
    ("DisplayName", "Description", "Keywords", "InformationURL", "PrivacyStatementURL"))}


def _text(node: Any) -> str:
    return " ".join((node.text or "").split())


def _logo(node: Any) -> Logo | None:
    """An mdui:Logo the sign-in page may show: an https URL and a sane size, else None."""
    url = (node.text or "").strip()
    try:
        width, height = int(node.get("width") or ""), int(node.get("height") or "")
    except ValueError:
        return None
    if (not url.startswith("https://") or not validate_url(url) or _BAD_URL.search(url)
            or not (0 < width <= 1000 and 0 < height <= 1000)):
        return None
    return Logo(url, width, height, str(node.get(_LANG) or "").strip())


def _ui_info(entity: Any, descriptor: Any) -> UIInfo:
    """The IdP's mdui:UIInfo and mdui:DiscoHints (or the shared empty one), in one pass
    over the IDPSSODescriptor's Extensions; without an mdui:DisplayName, the
    OrganizationDisplayNames stand in as display names."""
    texts: list[list[Localized]] = [[] for _ in _UI_TEXTS]
    logos: list[Logo] = []
    hints: dict[str, None] = {}
    for block in descriptor.iterfind("md:Extensions/*", _NS):
        if block.tag == f"{_MDUI}UIInfo":
            for node in block:
                slot = _UI_TEXTS.get(node.tag)
                if slot is not None and (text := _text(node)):
                    texts[slot].append((text, str(node.get(_LANG) or "").strip()))
                elif node.tag == f"{_MDUI}Logo" and (logo := _logo(node)) is not None:
                    logos.append(logo)
        elif block.tag == f"{_MDUI}DiscoHints":
            hints.update((_text(n).lower(), None) for n in block
                         if n.tag == f"{_MDUI}DomainHint" and _text(n))
    names = texts[0] or [(_text(n), str(n.get(_LANG) or "").strip()) for n in entity.iterfind(
        "md:Organization/md:OrganizationDisplayName", _NS) if _text(n)]
    ui = UIInfo(tuple(names), tuple(texts[1]), tuple(texts[2]), tuple(texts[3]),
                tuple(texts[4]), tuple(logos), tuple(hints))
    return NO_UI if ui == NO_UI else ui


def _display_name(names: tuple[Localized, ...]) -> str:
    """The English display name (mdui, else OrganizationDisplayName), else the first."""
    return next((text for text, lang in names if lang == "en"), names[0][0] if names else "")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]
