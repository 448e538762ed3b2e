"""The schema of ``gateway.toml``: one pydantic model per section, validated strictly.

Unknown keys are errors; values are checked where they are declared. ``gateway.config``
loads a file into these models and adds the checks that need the whole configuration.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from gateway.i18n import shipped
from gateway.principal import (
    DISPLAY_NAME,
    EMAIL,
    EMAIL_VERIFIED,
    ENTITLEMENTS,
    MEMBER_ID,
    STATUS,
)


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Whose member numbers an IdP asserts: "organisation" (the organisation's own: the member
# is the number) or "scoped" (the member is "<entity ID>!<number>").
MemberIds = Literal["organisation", "scoped"]
# Where an IdP's member (the subject) comes from: its member number, the SAML subject-id
# or pairwise-id attribute (scoped, checked against its metadata), or a persistent NameID.
SubjectSource = Literal["member_id", "subject-id", "pairwise-id", "persistent"]
_NAMEID = "urn:oasis:names:tc:SAML:{}:nameid-format:{}"
#: The NameID formats an AuthnRequest asks for, by the short names the config takes.
NAMEID_FORMATS = {"unspecified": _NAMEID.format("1.1", "unspecified"),
                  "emailAddress": _NAMEID.format("1.1", "emailAddress"),
                  "persistent": _NAMEID.format("2.0", "persistent"),
                  "transient": _NAMEID.format("2.0", "transient")}
_NAMEID_URN = re.compile(r"urn:oasis:names:tc:SAML:(1\.1|2\.0):nameid-format:[A-Za-z]{1,64}")
#: The released names of scoped attributes (eduPersonPrincipalName,
#: eduPersonScopedAffiliation, subject-id, pairwise-id): values must end in "@<scope>"
#: with a scope the IdP's metadata lists, or they are dropped.
DEFAULT_SCOPED_ATTRIBUTES = [
    "eduPersonPrincipalName", "urn:oid:1.3.6.1.4.1.5923.1.1.1.6",
    "eduPersonScopedAffiliation", "urn:oid:1.3.6.1.4.1.5923.1.1.1.9",
    "subject-id", "urn:oasis:names:tc:SAML:attribute:subject-id",
    "pairwise-id", "urn:oasis:names:tc:SAML:attribute:pairwise-id",
]
_SCOPE = re.compile(r"[0-9A-Za-z][-.0-9A-Za-z]{0,252}")


def _name_id_format(value: str | None) -> str | None:
    """A NameID format by short name or URN → its URN."""
    if value is None or _NAMEID_URN.fullmatch(value):
        return value
    if value in NAMEID_FORMATS:
        return NAMEID_FORMATS[value]
    raise ValueError(f"must be one of {', '.join(NAMEID_FORMATS)} or a "
                     "urn:oasis:names:tc:SAML:…:nameid-format:… URN")
# A Response whose signature covers an unsigned Assertion (Keycloak's default): "accept"
# it (the Response signature must verify and cover the one Assertion used) or "refuse"
# it (the Assertion itself must be signed).
SignedResponse = Literal["accept", "refuse"]


#: A language tag → text (or URL) map, as ``{ en = "…", de = "…" }``.
Localized = dict[str, str]


class SPLogo(_Model):
    url: str
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    lang: str = ""

    _url = field_validator("url")(_http_url)


class SPContact(_Model):
    # SAML's contact types, plus REFEDS SIRTFI's security contact.
    type: Literal["technical", "support", "administrative", "billing", "other", "security"]
    email: list[str] = Field(min_length=1)  # "mailto:" is added when missing
    given_name: str = ""
    surname: str = ""
    company: str = ""
    telephone: list[str] = []


class SPMetadataSettings(_Model):
    """``[sp.metadata]``: what federations ask of SP metadata (docs/idp-admin.md)."""

    display_name: Localized = {}  # mdui:DisplayName; also the AttributeConsumingService name
    description: Localized = {}  # mdui:Description
    information_url: Localized = {}  # mdui:InformationURL
    privacy_url: Localized = {}  # mdui:PrivacyStatementURL
    logos: list[SPLogo] = []  # mdui:Logo
    organization_name: Localized = {}  # md:Organization (all three or none)
    organization_display_name: Localized = {}
    organization_url: Localized = {}
    contacts: list[SPContact] = []
    entity_categories: list[str] = []  # e.g. http://refeds.org/category/research-and-scholarship
    # assurance-certification https://refeds.org/sirtfi (needs a security contact)
    sirtfi: bool = False
    # RequestedAttribute: every released name of [attributes]; these gateway attributes
    # are marked isRequired.
    required_attributes: list[str] = ["member_id"]
    request_attributes: bool = True  # False: no AttributeConsumingService

    @field_validator("information_url", "privacy_url", "organization_url")
    @classmethod
    def _urls(cls, value: Localized) -> Localized:
        for url in value.values():
            _http_url(url)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SPMetadataSettings:
        org = [self.organization_name, self.organization_display_name, self.organization_url]
        if any(org) and not all(org):
            raise ValueError("organization_name, organization_display_name and "
                             "organization_url go together (all or none)")
        if self.sirtfi and not any(c.type == "security" for c in self.contacts):
            raise ValueError("sirtfi = true needs a contact of type \"security\"")
        return self


class SPSettings(_Model):
    entity_id: str = ""  # defaults to public_url + /saml/metadata
    key_file: Path = Path("certs/sp.key")
    cert_file: Path = Path("certs/sp.crt")
    sign_authn_requests: bool = True
    # Key rollover: the next key pair is published in SP metadata and decrypts too;
    # completing the rollover = moving it to key_file/cert_file (docs/idp-admin.md).
    next_key_file: Path | None = None
    next_cert_file: Path | None = None
    # SP metadata lifetime, in seconds. None (default) = no validUntil / no cacheDuration:
    # an IdP that imports the metadata once keeps trusting it. With a value, validUntil is
    # "now + metadata_valid_for" each time the metadata is built (at least hourly).
    metadata_valid_for: int | None = Field(None, ge=3600)
    metadata_cache_duration: int | None = Field(None, ge=60)
    sign_metadata: bool = False  # sign /saml/metadata with the SP key
    metadata: SPMetadataSettings = SPMetadataSettings()

    @model_validator(mode="after")
    def _next_pair(self) -> SPSettings:
        if (self.next_key_file is None) != (self.next_cert_file is None):
            raise ValueError("next_key_file and next_cert_file go together (both or neither)")
        return self


class LimitSettings(_Model):
    """Per client address, per minute; counted in the store, so they hold across replicas."""

    logins: int = Field(30, ge=1)  # sign-in starts (known IdP or not) and ACS posts
    # Not per client: sign-ins in progress in the whole gateway (each is kept for
    # [idp] login_timeout); past it a sign-in start answers 503 and nothing is kept.
    pending_logins: int = Field(10000, ge=1)
    registrations: int = Field(10, ge=1)
    logouts: int = Field(30, ge=1)  # logout messages at the SLS (/saml/sls)
    kept_forms: int = Field(5, ge=0)  # forms kept across a sign-in (0: keep none)
    # Not per client: forms kept across a sign-in by everyone per 10 minutes (a kept form
    # lives 10 minutes, so at most twice this many are kept at once, each at most 64 KiB).
    kept_forms_total: int = Field(100, ge=0)
    # Not per client: refused sign-ins kept in the store for `sso-gateway explain`, per
    # hour; past it a refusal is only logged (its log line carries the same reference).
    failure_records: int = Field(100, ge=0)
    # Per e-mail address and hour: confirmation mails of the registration gate.
    verification_mails: int = Field(3, ge=1)
    # Not per client: new registrations per hour, by everyone (with verification: requests
    # for a link); past it the form answers 503 and nothing is kept.
    registrations_total: int = Field(100, ge=1)
    # Not per client: confirmation mails per hour, to everyone; past it no mail goes.
    verification_mails_total: int = Field(100, ge=1)


class IdPSettings(_Model):
    metadata_dir: Path = Path("idp_metadata")
    allow_unsolicited: bool = False
    login_timeout: int = Field(300, ge=30, le=3600)  # seconds an AuthnRequest stays valid
    auto_redirect: bool = False  # with one IdP, skip the sign-in page and go straight there
    max_issue_age: int = Field(300, ge=30, le=3600)  # seconds; plus clock_skew
    # Allowed difference between the IdP's clock and ours, in seconds (python3-saml's own
    # fixed 300 s stays the outer bound, so more than 300 cannot be allowed).
    clock_skew: int = Field(120, ge=0, le=300)
    # An external discovery service (SAML IdP Discovery protocol); "" = our own list.
    discovery_url: str = ""
    # The sign-in page lists every IdP up to this many; with more it shows a search box,
    # the remembered IdP and at most `search_results` matches, never the whole list.
    list_all_up_to: int = Field(20, ge=1, le=500)
    search_results: int = Field(20, ge=1, le=100)
    logos: bool = True  # show mdui:Logo images (https only, loaded by the browser)
    discofeed: bool = True  # publish /saml/discofeed (the IdP list as Shibboleth's JSON)
    # Defaults for every IdP without its own [[idps]] value (see IdPOptions).
    member_ids: MemberIds = "scoped"
    allowed_entitlements: list[str] | None = None  # None = keep every asserted entitlement
    signed_response: SignedResponse = "accept"
    subject: SubjectSource = "member_id"
    # The NameIDPolicy Format of AuthnRequests: unspecified (the IdP picks), persistent,
    # transient, emailAddress, or a full URN.
    name_id_format: str = NAMEID_FORMATS["unspecified"]
    # Released attribute names whose values must carry a scope the IdP's metadata lists.
    scoped_attributes: list[str] = DEFAULT_SCOPED_ATTRIBUTES

    @field_validator("name_id_format")
    @classmethod
    def _name_id_format(cls, value: str) -> str:
        return _name_id_format(value) or value

    @field_validator("discovery_url")
    @classmethod
    def _discovery_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if value and (parts.scheme not in {"http", "https"} or not parts.hostname
                      or parts.fragment):
            raise ValueError("must be an absolute http(s) URL without a fragment")
        if value and parts.scheme == "http" and not is_loopback(parts.hostname or ""):
            raise ValueError("must be https:// (plain http is allowed only on loopback)")
        return value


#: A gateway attribute name: what rules, identity headers and token claims call it.
ATTRIBUTE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
#: Names every principal answers without being configured (``Principal.values``).
BUILT_IN = frozenset({"subject", "idp", EMAIL_VERIFIED})
#: For the attributes the gateway itself reads (``principal.ROLES``): the released
#: attribute names that may carry each (the first one present wins).
DEFAULT_ATTRIBUTES: dict[str, list[str]] = {
    MEMBER_ID: ["memberId", "urn:oid:1.3.6.1.4.1.5923.1.1.1.6"],
    EMAIL: ["mail", "email", "urn:oid:0.9.2342.19200300.100.1.3"],
    DISPLAY_NAME: ["displayName", "urn:oid:2.16.840.1.113730.3.1.241"],
    ENTITLEMENTS: ["eduPersonEntitlement", "urn:oid:1.3.6.1.4.1.5923.1.1.1.7"],
    STATUS: ["memberStatus"],
}
#: The identity headers upstreams get by default (attribute name → header name).
DEFAULT_IDENTITY_HEADERS: dict[str, str] = {
    "subject": "X-Member-Id",
    EMAIL: "X-Member-Email",
    EMAIL_VERIFIED: "X-Member-Email-Verified",
    DISPLAY_NAME: "X-Member-Name",
    ENTITLEMENTS: "X-Member-Entitlements",
    STATUS: "X-Member-Status",
    "idp": "X-Member-Idp",
}
#: What an upstream learns besides the subject, unless its ``claims`` say otherwise.
DEFAULT_CLAIMS = [EMAIL, EMAIL_VERIFIED, DISPLAY_NAME, ENTITLEMENTS, STATUS, "idp"]
# An HTTP header name (RFC 9110 token).
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
#: A ``{name}`` segment of a rule's path.
PARAMETER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# A suffix an upstream strips from the last path segment (".json"), or ".*" for any.
_SUFFIX = re.compile(r"\.\*|(\.[A-Za-z0-9_+-]+)+")


def _attribute_names(value: dict[str, list[str]]) -> dict[str, list[str]]:
    for name in value:
        if name in BUILT_IN:
            raise ValueError(f"{name!r} is built in and cannot be mapped from attributes")
        if not ATTRIBUTE_NAME.fullmatch(name):
            raise ValueError(f"attribute name {name!r} must be lower-case letters, digits and "
                             "'_', starting with a letter (at most 64 characters)")
    return value


class IdPOptions(_Model):
    """``[[idps]]``: settings for one IdP, by entity ID."""

    entity_id: str = Field(min_length=1)
    # Attribute name → released names; the names given replace [attributes]'s for this IdP.
    attributes: dict[str, list[str]] | None = None
    allow_unsolicited: bool | None = None  # IdP-initiated SSO; None: [idp] allow_unsolicited
    require_encryption: bool = False  # refuse assertions that are not encrypted
    # "organisation": its member numbers are the organisation's own (subject = the number);
    # "scoped": namespaced by this IdP (subject = "<entity ID>!<number>"). None: [idp]'s.
    member_ids: MemberIds | None = None
    # Keep only these asserted entitlements (e.g. none of the admin ones). None: [idp]'s.
    allowed_entitlements: list[str] | None = None
    # A signed Response over an unsigned Assertion: "accept" or "refuse". None: [idp]'s.
    signed_response: SignedResponse | None = None
    # Where the subject comes from (member_id, subject-id, pairwise-id, persistent), and
    # the NameID format asked for. None: [idp]'s.
    subject: SubjectSource | None = None
    name_id_format: str | None = None
    # Scopes the admin vouches for besides those in the IdP's metadata (shibmd:Scope).
    scopes: list[str] = []

    @field_validator("name_id_format")
    @classmethod
    def _name_id_format(cls, value: str | None) -> str | None:
        return _name_id_format(value)

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: list[str]) -> list[str]:
        for scope in value:
            if not _SCOPE.fullmatch(scope):
                raise ValueError(f"{scope!r} is not a scope (a domain such as example.org, "
                                 "without '@')")
        return value

    @field_validator("attributes")
    @classmethod
    def _names(cls, value: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        return None if value is None else _attribute_names(value)


class SessionSettings(_Model):
    secrets: list[SecretStr] = []  # newest first: the first signs, all verify
    secrets_file: Path | None = None  # one secret per line, newest first
    cookie_name: str = "gw_session"
    lifetime: int = Field(8 * 3600, ge=60)  # absolute, seconds
    idle_timeout: int = Field(3600, ge=60)
    secure: bool | None = None  # default: true unless public_url is plain-http loopback
    # Keep resolved sessions in this process's memory; an end anywhere reaches every
    # process within one second through the store's change log (docs/architecture.md).
    memory: bool = True


#: Store URL schemes, in one place (validated here; ``sessions.store.open_store`` picks by it).
STORE_SCHEMES = ("sqlite", "redis", "rediss", "redis+sentinel")


class StoreSettings(_Model):
    # sqlite:///path · redis://[:password@]host:port/db · rediss://… (TLS) ·
    # redis+sentinel://[:password@]host:port[,host:port]/service_name[/db]
    url: str = Field("sqlite:///gateway.db", repr=False)  # may hold a password
    key_prefix: str = Field("gw:", min_length=1)  # Redis: namespace of every key
    pool_size: int = Field(32, ge=1, le=10_000)  # Redis: connections per process
    connect_timeout: float = Field(2.0, gt=0)  # Redis: seconds
    socket_timeout: float = Field(2.0, gt=0)  # Redis: seconds per command
    # Seconds between two purges of what has expired (pending sign-ins, replay cache,
    # counters, ended sessions), in each gateway process.
    purge_interval: int = Field(300, ge=1, le=86400)

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        if scheme not in STORE_SCHEMES:
            raise ValueError(f"unknown session store type {scheme!r} (expected sqlite:///path, "
                             "redis://host:port/db, rediss://… or redis+sentinel://…)")
        if not sep or (scheme != "sqlite" and not rest.split("/", 1)[0].rpartition("@")[2]):
            raise ValueError("must name a host (redis://host:port/db)")
        return value

    @property
    def display_url(self) -> str:
        """The URL with any password masked: the only form that is printed or logged."""
        return mask_url(self.url)

    def options(self) -> dict[str, Any]:
        """The backend options ``open_store`` takes besides the URL."""
        return self.model_dump(exclude={"url", "purge_interval"})


def mask_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    userinfo, at, tail = rest.rpartition("@")  # the last '@': over-masking is the safe side
    if not sep or not at:
        return url
    user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
    return f"{scheme}://{user}:*****@{tail}"


class Upstream(_Model):
    name: str  # also the audience of the identity tokens this upstream receives
    prefix: str = "/"
    url: str
    # Attribute names (and "idp") it learns besides the subject, as headers and token claims.
    claims: list[str] = DEFAULT_CLAIMS
    connect_timeout: float = Field(5.0, gt=0)
    timeout: float = Field(30.0, gt=0)  # whole response head; bodies stream after it
    health_url: str = ""  # checked by /readyz (any 2xx/3xx is healthy); "" = not checked
    # How the upstream itself reads paths, so the rules decide on what it will serve
    # (docs/access-rules.md): /Members/… as /members/… (IIS, case-insensitive Spring) …
    case_insensitive: bool = False
    # … and /notes.json as /notes (Rails formats, Spring suffix patterns); ".*" = any.
    strip_suffixes: list[str] = []

    @field_validator("prefix")
    @classmethod
    def _prefix_is_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value

    @field_validator("strip_suffixes")
    @classmethod
    def _suffixes(cls, value: list[str]) -> list[str]:
        for suffix in value:
            if not _SUFFIX.fullmatch(suffix):
                hint = f": write '.{suffix}'" if _SUFFIX.fullmatch("." + suffix) else ""
                raise ValueError(f"{suffix!r} is not a suffix{hint} (a '.' and letters, "
                                 "digits, '_', '-', '+', or '.*' for any)")
        return value

    @property
    def path_reading(self) -> str:
        """How the rules read paths to this upstream, as ``check`` prints it: ``exact``,
        or e.g. ``case-insensitive, suffixes .json .xml``."""
        suffixes = " ".join(dict.fromkeys(s.lower() for s in self.strip_suffixes))
        parts = (["case-insensitive"] if self.case_insensitive else []) + (
            [f"suffixes {suffixes}"] if suffixes else [])
        return ", ".join(parts) or "exact"

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(_http_url(value))
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        return value.rstrip("/")


#: An AuthnContextClassRef as a rule may name it: an absolute URI (``https:``, ``urn:``)
#: of printable ASCII without XML-special characters (it goes into the AuthnRequest).
AUTHN_CONTEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[!#$%'()*+,./0-9:;=?@A-Z\[\]_a-z~-]{1,500}")
#: The shortest ``max_auth_age`` a rule may set: a sign-in round trip must fit in it, or
#: every step-up would be stale on arrival.
MIN_AUTH_AGE = 60


class Requirement(_Model):
    entitlement: list[str] = []  # every one listed is required
    status: list[str] = []  # any one listed is enough
    idp: list[str] = []  # any one listed is enough
    # Attribute name → values: each named attribute must have one of its listed values.
    attributes: dict[str, list[str]] = {}
    # Authentication context classes (AuthnContextClassRef URIs, e.g. REFEDS MFA): any one
    # listed is enough; a session without one goes through a step-up sign-in.
    authn_context: list[str] = []

    @field_validator("entitlement", "status", "idp", "authn_context", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("authn_context")
    @classmethod
    def _context_uris(cls, value: list[str]) -> list[str]:
        for uri in value:
            if not AUTHN_CONTEXT.fullmatch(uri):
                raise ValueError(f"{uri!r} is not an authentication context class URI "
                                 "(e.g. https://refeds.org/profile/mfa)")
        return value

    @field_validator("attributes", mode="before")
    @classmethod
    def _listify_values(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: [v] if isinstance(v, str) else v for k, v in value.items()}
        return value

    @field_validator("attributes")
    @classmethod
    def _some_value(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, accepted in value.items():
            if not accepted:
                raise ValueError(f"{name} must list at least one accepted value")
        return value


def pattern_segments(pattern: str) -> list[str]:
    """A rule's path pattern, or a request path, as segments (a trailing ``/`` adds none)."""
    segments = pattern.split("/")[1:]
    if segments and segments[-1] == "":
        segments.pop()
    return segments


class Rule(_Model):
    """One ``[[rules]]`` entry. ``path`` is matched whole segment by whole segment: ``*``
    is one segment, ``**`` any number (none too), ``{name}`` one segment, named."""

    path: str
    access: Literal["public", "registered", "member", "owner"]
    require: Requirement = Requirement()
    message: str = ""  # shown to members who fail `require`
    # Owner rules: the {parameter} that must equal the member's subject (optional when the
    # path has only one).
    owner: str = ""
    # Public rules only: the Cache-Control sent with an anonymous answer whose upstream set
    # none (e.g. "public, max-age=300"); "" = relay the upstream's headers as they are.
    # Gated answers, and any answer to a signed-in member, stay private.
    cache: str = ""
    # Seconds since the member last authenticated at the IdP (AuthnInstant) after which
    # this rule asks for a fresh sign-in (ForceAuthn); None = any age.
    max_auth_age: int | None = Field(None, ge=MIN_AUTH_AGE)
    # Public rules only: try a passive sign-in (IsPassive) once for an anonymous visitor,
    # so a member the IdP already knows is shown signed in, never prompted.
    passive: bool = False

    @field_validator("cache")
    @classmethod
    def _cache(cls, value: str) -> str:
        value = value.strip()
        if value and not all(" " <= ch <= "~" for ch in value):
            raise ValueError("must be a Cache-Control value of printable ASCII characters")
        return value

    @model_validator(mode="after")
    def _cache_only_public(self) -> Rule:
        if self.cache and self.access != "public":
            raise ValueError('cache is only for access = "public" rules: gated answers are '
                             "always private to the member")
        return self

    @model_validator(mode="after")
    def _sign_in_options(self) -> Rule:
        if self.passive and self.access != "public":
            raise ValueError('passive is only for access = "public" rules: a gated page '
                             "sends a visitor to the sign-in anyway")
        gated = self.access in ("member", "owner")
        if not gated and (self.max_auth_age is not None or self.require.authn_context):
            raise ValueError('max_auth_age and require.authn_context are for access = '
                             '"member" or "owner" rules')
        return self

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        names: list[str] = []
        for segment in pattern_segments(value):
            if segment == "":
                raise ValueError("has an empty segment ('//'), which no request path has")
            if segment in ("*", "**"):
                continue
            if "*" in segment:
                raise ValueError(f"'*' and '**' must be a whole segment, not part of "
                                 f"{segment!r}")
            if "{" in segment or "}" in segment:
                found = PARAMETER.fullmatch(segment)
                if found is None:
                    raise ValueError(f"a parameter must be a whole segment: {segment!r} "
                                     "(write /{name}/, a name of letters, digits and '_')")
                if found[1] in names:
                    raise ValueError(f"parameter {segment} appears twice")
                names.append(found[1])
        return value

    @property
    def parameters(self) -> list[str]:
        """The names of the path's ``{parameters}``, in order."""
        return [m[1] for s in pattern_segments(self.path) if (m := PARAMETER.fullmatch(s))]

    @property
    def owner_parameter(self) -> str:
        """The parameter an owner rule compares with the subject ("" for other rules)."""
        if self.access != "owner":
            return ""
        return self.owner or self.parameters[0]

    @model_validator(mode="after")
    def _owner_names_parameter(self) -> Rule:
        names = self.parameters
        if self.access != "owner":
            if self.owner:
                raise ValueError('owner is only for access = "owner" rules')
            return self
        if not names:
            raise ValueError("an owner rule needs a {parameter} segment in its path")
        if not self.owner and len(names) > 1:
            raise ValueError(f"this owner rule has several parameters ({', '.join(names)}): "
                             "name the one that must equal the member's subject with "
                             'owner = "..."')
        if self.owner and self.owner not in names:
            raise ValueError(f"owner = {self.owner!r} is not a parameter of the path "
                             f"(its parameters: {', '.join(names)})")
        parts = pattern_segments(self.path)
        at = parts.index("{" + self.owner_parameter + "}")
        if "**" in parts[:at] and "**" in parts[at + 1:]:
            raise ValueError(f"the owner parameter {{{self.owner_parameter}}} must have a "
                             "fixed place in the path: not between two '**'")
        return self


class PolicySettings(_Model):
    """``[policy]``: what the access rules do beyond the ``[[rules]]`` list."""

    # The access of a path no rule matches (the last rule, "/**", printed by `check`).
    default: Literal["public", "registered", "member"] = "member"


#: The consent a registering visitor gives, unless ``[registration] consent_text`` says
#: otherwise.
DEFAULT_CONSENT = ("I agree that the publisher stores my e-mail address to give me access to "
                   "the free issue and may write to me about the magazine. I can withdraw "
                   "this at any time.")


class RegistrationSettings(_Model):
    """``[registration]``: the e-mail registration for ``registered`` pages (open only
    when a rule, or the policy default, asks for ``registered``)."""

    verify: bool = False  # confirm the address by a one-time link mailed through [smtp]
    consent_text: str = Field(DEFAULT_CONSENT, min_length=10, max_length=2000)
    retention_days: float = Field(365, gt=0, le=36500)  # then the registration is deleted
    privacy_url: str = ""  # the privacy notice, linked from the form and the mail
    link_lifetime: int = Field(1800, ge=300, le=86400)  # seconds a confirmation link works

    @field_validator("privacy_url")
    @classmethod
    def _privacy_url(cls, value: str) -> str:
        return _http_url(value) if value else value


class SmtpSettings(_Model):
    """``[smtp]``: the relay that sends the registration gate's confirmation mails."""

    host: str = ""  # "" = no relay
    port: int = Field(587, ge=1, le=65535)
    # "starttls" (submission, port 587), "tls" (implicit TLS, port 465), or "none" (a
    # relay on this host or network; no credentials then, unless it is on loopback)
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str = ""
    password_file: Path | None = None  # the password, alone in a file (not in the config)
    from_address: str = ""  # the From of the mails, e.g. "Magazine <no-reply@example.org>"
    timeout: float = Field(10.0, gt=0, le=120)  # seconds each step of the conversation

    @model_validator(mode="after")
    def _credentials_need_tls(self) -> SmtpSettings:
        if self.security == "none" and self.username and not is_loopback(self.host):
            raise ValueError('username/password need security = "starttls" or "tls" '
                             "(plain SMTP would send them in clear text)")
        if (self.password_file is None) != (not self.username):
            raise ValueError("username and password_file go together (both or neither)")
        return self


class UISettings(_Model):
    """``[ui]``: the languages of the gateway's own pages (``gateway.i18n``)."""

    # Offered to browsers (by Accept-Language and the pages' switch); each must be shipped.
    languages: list[str] = Field(["en", "de"], min_length=1)
    default_language: str = ""  # when the browser asks for none offered; "" = the first

    @field_validator("languages")
    @classmethod
    def _shipped(cls, value: list[str]) -> list[str]:
        available = shipped()
        for lang in value:
            if lang not in available:
                raise ValueError(f"{lang!r} has no catalogue; shipped: {', '.join(available)}")
        if len(set(value)) != len(value):
            raise ValueError("lists a language twice")
        return value

    @model_validator(mode="after")
    def _default_offered(self) -> UISettings:
        if self.default_language and self.default_language not in self.languages:
            raise ValueError("default_language must be one of languages")
        return self

    @property
    def default(self) -> str:
        """The language for a browser that asks for none of the offered ones."""
        return self.default_language or self.languages[0]


class IdentitySettings(_Model):
    keys_dir: Path = Path("certs/identity")  # written by `sso-gateway certs generate`
    token_header: str = "X-Gateway-Identity"
    token_lifetime: int = Field(60, ge=10, le=3600)

    @field_validator("token_header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not _HEADER_NAME.fullmatch(value):
            raise ValueError("must be a header name (letters, digits, '-')")
        return value


class LoggingSettings(_Model):
    format: Literal["json", "text"] | None = None  # default: json in `serve`, text in `demo`
    audit: str = "stdout"  # the audit log: "stdout" or a file path (appended to)
    log_member_id: bool = False  # put member_id into request log lines


class MetricsSettings(_Model):
    # Who may read /metrics: "network" = clients in allow_from; "admin" = the rules that
    # guard /_gateway/admin (a member with the admin entitlement).
    access: Literal["network", "admin"] = "network"
    allow_from: list[str] = ["127.0.0.1", "::1"]  # addresses or networks (CIDR)


class ProxySettings(_Model):
    """``[proxy]``: client headers never forwarded, besides the built-in family of
    authentication headers (``gateway.proxy_headers.AUTH_HEADERS`` / ``AUTH_PREFIXES``).
    Names are compared in any case, with ``_`` (or ``.``) read as ``-``."""

    strip_headers: list[str] = []  # exact header names
    strip_prefixes: list[str] = []  # name prefixes, e.g. "X-Corp-"
    # Upstream connections per worker process, all upstreams together; a request that
    # finds them all in use waits up to its upstream's connect_timeout, then gets 504.
    max_connections: int = Field(1024, ge=1, le=100_000)
    # The HTTP client for the upstream hop: "lean" (gateway.upstream_client, httptools)
    # or "aiohttp" (the client used before it, kept as a fallback). WebSockets: aiohttp.
    client: Literal["lean", "aiohttp"] = "lean"

    @field_validator("strip_headers", "strip_prefixes")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        for name in value:
            if len(name) < 2 or not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a header name (or a prefix of one)")
        return value


class WebSocketSettings(_Model):
    """``[websocket]``: proxying WebSocket connections to upstreams (``gateway.websocket``,
    docs/architecture.md). Limits apply per connection, in both directions."""

    enabled: bool = True  # false: every upgrade is answered 501
    # Largest message either side may send (bytes); a larger one closes with 1009.
    max_message_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    # Seconds with no message either way; then the connection closes with 1001.
    idle_timeout: float = Field(300.0, ge=1, le=86400)
    max_connections: int = Field(500, ge=1, le=100_000)  # open per worker; past it: 503
    # Seconds between checks that each connection's session is still live (batched over
    # all connections of a worker); an ended session closes its connections with 4401.
    session_check_interval: float = Field(2.0, ge=0.2, le=60)
    ping_interval: float = Field(20.0, ge=0, le=3600)  # the server's pings to clients (0: none)
    # An upgrade to a gated path must carry Origin (browsers always send it); false lets
    # non-browser clients with a session cookie connect without one.
    require_origin: bool = True


class ServerSettings(_Model):
    """``[server]``: what the HTTP server in front of the gateway bounds (``serve`` and
    ``demo``; see ``gateway.server``)."""

    header_limit: int = Field(64 * 1024, ge=8 * 1024, le=16 * 1024 * 1024)  # bytes; else 431
    header_timeout: float = Field(30.0, gt=0, le=600)  # seconds to send a request head
    keepalive_timeout: int = Field(5, ge=1, le=600)  # idle seconds between requests
    limit_concurrency: int = Field(1000, ge=2)  # open connections per worker process
    # Seconds requests in progress may take to finish after SIGTERM; then they are cut.
    shutdown_timeout: float = Field(30.0, ge=0, le=3600)
    # TLS of its own (gateway.tls): a PEM certificate chain and its key (relative paths:
    # to gateway.toml's directory); TLS 1.2 and 1.3 only. Re-read on reload.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_key_password_file: Path | None = None  # when the key is encrypted: its password
    # HOST:PORT of a plain-HTTP listener that only redirects to public_url ("" = none).
    http_redirect_listen: str = ""
    # `serve` writes its process ID here (relative: to gateway.toml); `reload` reads it.
    pid_file: Path | None = None

    @field_validator("http_redirect_listen")
    @classmethod
    def _redirect_listen(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if value and (not host or not port.isdigit() or not 0 < int(port) < 65536):
            raise ValueError("must be HOST:PORT")
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together (both or neither)")
        if self.tls_key_password_file is not None and self.tls_key_file is None:
            raise ValueError("tls_key_password_file needs tls_key_file")
        if self.http_redirect_listen and self.tls_cert_file is None:
            raise ValueError("http_redirect_listen needs tls_cert_file and tls_key_file (it "
                             "redirects to the gateway's own https listener)")
        return self


class MetadataSource(_Model):
    """One ``[[metadata]]`` entry: IdP metadata fetched from a URL (``url``: one document,
    e.g. a federation aggregate) or, one entity at a time on first use, from a Metadata
    Query service (``mdq``); signature required."""

    url: str = ""
    mdq: str = ""  # MDQ base URL: an entity is fetched from <mdq>/entities/<identifier>
    # How the entity is named in the MDQ request path: the URL-encoded entity ID (every
    # MDQ server answers it), or "sha1" ({sha1} + hex SHA-1 of the entity ID).
    mdq_identifier: Literal["entity_id", "sha1"] = "entity_id"
    mdq_max_entities: int = Field(1000, ge=1, le=100_000)  # MDQ entities kept (LRU)
    mdq_not_found_ttl: int = Field(60, ge=0, le=3600)  # seconds an unknown one is not asked for
    mdq_fetches_per_minute: int = Field(60, ge=1)  # MDQ requests of the gateway, all clients
    signing_cert: Path  # PEM certificate the metadata signature must verify against
    refresh: int = Field(3600, ge=60, le=7 * 86400)  # seconds (a shorter cacheDuration wins)
    entities: list[str] = []  # keep only these entity IDs from an aggregate
    registration_authority: str = ""  # keep only entities registered by this authority
    timeout: float = Field(30.0, gt=0, le=600)  # seconds for the whole download
    max_bytes: int = Field(50 * 1024 * 1024, ge=1024)
    cache_dir: Path = Path("metadata_cache")  # last good copies, for restarts without network

    @model_validator(mode="before")
    @classmethod
    def _mdq_defaults(cls, data: Any) -> Any:
        """One entity per MDQ answer, fetched while a member waits: tighter defaults."""
        if isinstance(data, dict) and data.get("mdq"):
            data = {"timeout": 10.0, "max_bytes": 1024 * 1024, **data}
        return data

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return _http_url(value) if value else value

    @field_validator("mdq")
    @classmethod
    def _mdq_url(cls, value: str) -> str:
        if not value:
            return value
        parts = urlsplit(_http_url(value))
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_kind(self) -> MetadataSource:
        if bool(self.url) == bool(self.mdq):
            raise ValueError("give exactly one of url (a metadata document) and mdq (a "
                             "Metadata Query service)")
        return self


#: The headers each front proxy sets on its forward-auth subrequest: (method, URI, host).
#: Traefik's forwardAuth and Caddy's forward_auth set X-Forwarded-*; for nginx's
#: auth_request the gateway's documented proxy_set_header lines set X-Original-*.
FRONT_PROXY_HEADERS: dict[str, tuple[str, str, str]] = {
    "nginx": ("X-Original-Method", "X-Original-URI", "X-Original-Host"),
    "traefik": ("X-Forwarded-Method", "X-Forwarded-Uri", "X-Forwarded-Host"),
    "caddy": ("X-Forwarded-Method", "X-Forwarded-Uri", "X-Forwarded-Host"),
}
#: Every name some front proxy uses for the method, the URI and the host: besides the
#: configured one, each is a conflicting alternative when it carries another value.
ALTERNATIVE_HEADERS: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]] = (
    ("X-Original-Method", "X-Forwarded-Method"),
    ("X-Original-URI", "X-Original-URL", "X-Forwarded-Uri"),
    ("X-Original-Host", "X-Forwarded-Host"),
)
MIN_PROXY_SECRET_LENGTH = 32


class ForwardAuthSettings(_Model):
    """``[forward_auth]``: how the front proxy that asks ``/auth/check`` names the original
    request (docs/behind-the-gateway.md)."""

    # nginx (X-Original-*) · traefik · caddy (X-Forwarded-*) · headers (the names below)
    front_proxy: Literal["nginx", "traefik", "caddy", "headers"] = "nginx"
    method_header: str = ""  # front_proxy = "headers" only
    uri_header: str = ""  # front_proxy = "headers" only
    host_header: str = ""  # front_proxy = "headers" only; "" = the proxy sends no host
    # A secret the front proxy adds to every auth subrequest; without it /auth/check
    # refuses. Keep it out of the file: GATEWAY_FORWARD_AUTH__SHARED_SECRET.
    shared_secret: SecretStr | None = None
    shared_secret_header: str = "X-Gateway-Auth-Secret"

    @field_validator("method_header", "uri_header", "host_header", "shared_secret_header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if value and not _HEADER_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid header name")
        return value

    @field_validator("shared_secret")
    @classmethod
    def _secret_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_PROXY_SECRET_LENGTH:
            raise ValueError(f"must be at least {MIN_PROXY_SECRET_LENGTH} random characters")
        return value

    @model_validator(mode="after")
    def _names(self) -> ForwardAuthSettings:
        own = (self.method_header, self.uri_header, self.host_header)
        if self.front_proxy != "headers":
            if any(own):
                raise ValueError("method_header, uri_header and host_header are set only "
                                 'with front_proxy = "headers"')
        elif not (self.method_header and self.uri_header):
            raise ValueError('front_proxy "headers" needs method_header and uri_header')
        names = [n.lower().replace("_", "-") for n in (*self.headers, self.shared_secret_header)
                 if n]
        if len(set(names)) != len(names):
            raise ValueError("the method, URI, host and shared-secret headers must differ")
        return self

    @property
    def headers(self) -> tuple[str, str, str]:
        """The header names of the original method, URI and host ("" for no host)."""
        if self.front_proxy == "headers":
            return self.method_header, self.uri_header, self.host_header
        return FRONT_PROXY_HEADERS[self.front_proxy]

    @property
    def alternatives(self) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        """For the method, URI and host: the names other front proxies give them."""
        method, uri, host = (n.lower().replace("_", "-") for n in self.headers)
        known_method, known_uri, known_host = ALTERNATIVE_HEADERS
        return (tuple(n for n in known_method if n.lower() != method),
                tuple(n for n in known_uri if n.lower() != uri),
                tuple(n for n in known_host if n.lower() != host))


class Settings(_Model):
    public_url: str
    listen: str = "127.0.0.1:8000"
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    # Host headers answered besides public_url's own; anything else is a 400.
    allowed_hosts: list[str] = []
    # Addresses of reverse proxies whose X-Forwarded-For/-Proto are believed ("*" = any).
    trusted_proxies: list[str] = []
    sp: SPSettings = SPSettings()
    idp: IdPSettings = IdPSettings()
    # Attribute name → released attribute names (first present wins), over DEFAULT_ATTRIBUTES.
    attributes: dict[str, list[str]] = DEFAULT_ATTRIBUTES
    idps: list[IdPOptions] = []
    session: SessionSettings = SessionSettings()
    store: StoreSettings = StoreSettings()
    upstreams: list[Upstream] = []
    metadata: list[MetadataSource] = []
    rules: list[Rule] = []
    policy: PolicySettings = PolicySettings()
    # Attribute name (or "subject", "idp") → header name ("" = none), over the defaults.
    identity_headers: dict[str, str] = DEFAULT_IDENTITY_HEADERS
    identity: IdentitySettings = IdentitySettings()
    logging: LoggingSettings = LoggingSettings()
    metrics: MetricsSettings = MetricsSettings()
    limits: LimitSettings = LimitSettings()
    proxy: ProxySettings = ProxySettings()
    server: ServerSettings = ServerSettings()
    websocket: WebSocketSettings = WebSocketSettings()
    forward_auth: ForwardAuthSettings = ForwardAuthSettings()
    registration: RegistrationSettings = RegistrationSettings()
    smtp: SmtpSettings = SmtpSettings()
    ui: UISettings = UISettings()
    source: Path = Field(Path("gateway.toml"), exclude=True)

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError("must be an absolute http(s) URL")
        if parts.path not in {"", "/"} or parts.query or parts.fragment:
            raise ValueError("must be an origin only, with no path, query or fragment")
        if parts.scheme == "http" and not is_loopback(parts.hostname):
            raise ValueError("must be https:// (plain http is allowed only on loopback)")
        return value.rstrip("/")

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                if entry != "*":
                    ipaddress.ip_network(entry)  # strict: "10.0.0.1/24" is not a network
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address, a network (CIDR) or \"*\" "
                                 "(host names are not resolved)") from None
        return value

    @field_validator("attributes")
    @classmethod
    def _attributes(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        merged = {**DEFAULT_ATTRIBUTES, **_attribute_names(value)}
        if not merged[MEMBER_ID]:
            raise ValueError("member_id must name at least one released attribute")
        return merged

    @field_validator("identity_headers")
    @classmethod
    def _identity_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, header in value.items():
            if header and not _HEADER_NAME.fullmatch(header):
                raise ValueError(f"{header!r} (for {name}) is not a valid header name")
        return {**DEFAULT_IDENTITY_HEADERS, **value}

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be HOST:PORT")
        return value

    @model_validator(mode="after")
    def _verification_needs_smtp(self) -> Settings:
        if self.registration.verify and not (self.smtp.host and self.smtp.from_address):
            raise ValueError("[registration] verify = true needs [smtp] host and from_address")
        return self

    # Derived values ------------------------------------------------------------------

    @property
    def registration_open(self) -> bool:
        """Whether the registration gate is on: a rule (or the policy default) lets
        registered readers in. Without one, nothing registers anyone."""
        return (self.policy.default == "registered"
                or any(rule.access == "registered" for rule in self.rules))

    @property
    def sp_entity_id(self) -> str:
        return self.sp.entity_id or f"{self.public_url}/saml/metadata"

    @property
    def hosts(self) -> frozenset[str]:
        """Every Host header value the gateway answers (lower-case, with port as sent)."""
        public = urlsplit(self.public_url)
        default_port = 443 if public.scheme == "https" else 80
        own = {public.netloc.lower()}
        if public.port in (None, default_port):
            own |= {public.hostname or "", f"{public.hostname}:{default_port}"}
        return frozenset(own | {h.lower() for h in self.allowed_hosts})

    @property
    def cookie_secure(self) -> bool:
        if self.session.secure is not None:
            return self.session.secure
        return self.public_url.startswith("https://")

    @property
    def listen_host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def listen_port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def proxy_header_options(self) -> dict[str, Any]:
        """uvicorn's options for X-Forwarded-For/-Proto: believed only from an address in
        ``trusted_proxies``, and from no one when it is empty (uvicorn on its own would
        believe loopback). Every server that runs the gateway starts with these."""
        return {"proxy_headers": bool(self.trusted_proxies),
                "forwarded_allow_ips": ",".join(self.trusted_proxies) or None}

    @property
    def attribute_names(self) -> frozenset[str]:
        """Every configured attribute name (the roles' and the admin's own)."""
        return frozenset(self.attributes)

    def idp_options(self, entity_id: str) -> IdPOptions:
        """The ``[[idps]]`` entry of one IdP (defaults when it has none), with the values it
        leaves unset taken from ``[idp]``: ``allow_unsolicited``, ``member_ids``,
        ``signed_response``, ``subject`` and ``name_id_format`` are never None;
        ``allowed_entitlements`` is None when every entitlement is kept."""
        found = next((o for o in self.idps if o.entity_id == entity_id), None)
        options = found or IdPOptions(entity_id=entity_id)
        defaults = {"allow_unsolicited": self.idp.allow_unsolicited,
                    "member_ids": self.idp.member_ids,
                    "allowed_entitlements": self.idp.allowed_entitlements,
                    "signed_response": self.idp.signed_response,
                    "subject": self.idp.subject, "name_id_format": self.idp.name_id_format}
        unset = {k: v for k, v in defaults.items() if getattr(options, k) is None}
        return options.model_copy(update=unset) if unset else options

    def attribute_map(self, entity_id: str) -> dict[str, tuple[str, ...]]:
        """For one IdP: every configured attribute name → the released attribute names that
        may carry it, in order (``[attributes]`` with the names its ``[[idps]]`` entry
        overrides)."""
        own = self.idp_options(entity_id).attributes or {}
        return {name: tuple(own.get(name, released))
                for name, released in self.attributes.items()}

    def session_secrets(self) -> list[str]:
        """All cookie secrets, newest first (from ``secrets`` then ``secrets_file``)."""
        values = [s.get_secret_value() for s in self.session.secrets]
        if self.session.secrets_file is not None:
            lines = self.session.secrets_file.read_text().splitlines()
            values += [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
        return values


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


