"""The schema of ``gateway.toml``: one pydantic model per section, validated strictly.

Unknown keys are errors; values are checked where they are declared. ``gateway.config``
loads a file into these models and adds the checks that need the whole configuration.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SPSettings(_Model):
    entity_id: str = ""  # defaults to public_url + /saml/metadata
    key_file: Path = Path("certs/sp.key")
    cert_file: Path = Path("certs/sp.crt")
    sign_authn_requests: bool = True
    # Key rollover: the next key pair is published in SP metadata and decrypts too;
    # completing the rollover = moving it to key_file/cert_file (docs/idp-admin.md).
    next_key_file: Path | None = None
    next_cert_file: Path | None = None

    @model_validator(mode="after")
    def _next_pair(self) -> SPSettings:
        if (self.next_key_file is None) != (self.next_cert_file is None):
            raise ValueError("next_key_file and next_cert_file go together (both or neither)")
        return self


class LimitSettings(_Model):
    """Per client address, per minute; counted in the store, so they hold across replicas."""

    logins: int = Field(30, ge=1)  # sign-in starts and ACS posts
    registrations: int = Field(10, ge=1)


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


class AttributeMap(_Model):
    """For each identity field, the SAML attribute names that may carry it (first present wins)."""

    member_id: list[str] = ["memberId", "urn:oid:1.3.6.1.4.1.5923.1.1.1.6"]
    email: list[str] = ["mail", "email", "urn:oid:0.9.2342.19200300.100.1.3"]
    display_name: list[str] = ["displayName", "urn:oid:2.16.840.1.113730.3.1.241"]
    entitlements: list[str] = ["eduPersonEntitlement", "urn:oid:1.3.6.1.4.1.5923.1.1.1.7"]
    status: list[str] = ["memberStatus"]


class IdPOptions(_Model):
    """``[[idps]]``: settings for one IdP, by entity ID."""

    entity_id: str = Field(min_length=1)
    attributes: AttributeMap | None = None  # the fields given replace [attributes]'s
    allow_unsolicited: bool | None = None  # IdP-initiated SSO; None: [idp] allow_unsolicited
    require_encryption: bool = False  # refuse assertions that are not encrypted


class SessionSettings(_Model):
    secrets: list[SecretStr] = []  # newest first: the first signs, all verify
    secrets_file: Path | None = None  # one secret per line, newest first
    cookie_name: str = "gw_session"
    lifetime: int = Field(8 * 3600, ge=60)  # absolute, seconds
    idle_timeout: int = Field(3600, ge=60)
    secure: bool | None = None  # default: true unless public_url is plain-http loopback


STORE_SCHEMES = ("sqlite", "redis", "rediss", "redis+sentinel")


class StoreSettings(_Model):
    # sqlite:///path · redis://[:password@]host:port/db · rediss://… (TLS) ·
    # redis+sentinel://[:password@]host:port[,host:port]/service_name[/db]
    url: str = Field("sqlite:///gateway.db", repr=False)  # may hold a password
    key_prefix: str = Field("gw:", min_length=1)  # Redis: namespace of every key
    pool_size: int = Field(32, ge=1, le=10_000)  # Redis: connections per process
    connect_timeout: float = Field(2.0, gt=0)  # Redis: seconds
    socket_timeout: float = Field(2.0, gt=0)  # Redis: seconds per command

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
        return self.model_dump(exclude={"url"})


def mask_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    userinfo, at, tail = rest.rpartition("@")  # the last '@': over-masking is the safe side
    if not sep or not at:
        return url
    user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
    return f"{scheme}://{user}:*****@{tail}"


Claim = Literal["email", "display_name", "entitlements", "status", "idp"]
ALL_CLAIMS: list[Claim] = ["email", "display_name", "entitlements", "status", "idp"]


class Upstream(_Model):
    name: str  # also the audience of the identity tokens this upstream receives
    prefix: str = "/"
    url: str
    claims: list[Claim] = ALL_CLAIMS  # what it learns besides member_id (headers and token)
    connect_timeout: float = Field(5.0, gt=0)
    timeout: float = Field(30.0, gt=0)  # whole response head; bodies stream after it
    health_url: str = ""  # checked by /readyz (any 2xx/3xx is healthy); "" = not checked

    @field_validator("prefix")
    @classmethod
    def _prefix_is_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(_http_url(value))
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        return value.rstrip("/")


class Requirement(_Model):
    entitlement: list[str] = []  # every one listed is required
    status: list[str] = []  # any one listed is enough
    idp: list[str] = []  # any one listed is enough

    @field_validator("entitlement", "status", "idp", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class Rule(_Model):
    path: str
    access: Literal["public", "registered", "member", "owner"]
    require: Requirement = Requirement()
    message: str = ""  # shown to members who fail `require`

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value

    @model_validator(mode="after")
    def _owner_names_parameter(self) -> Rule:
        if self.access == "owner" and "{" not in self.path:
            raise ValueError("an owner rule needs a {parameter} segment in its path")
        return self


class IdentityHeaders(_Model):
    member_id: str = "X-Member-Id"
    email: str = "X-Member-Email"
    display_name: str = "X-Member-Name"
    entitlements: str = "X-Member-Entitlements"
    status: str = "X-Member-Status"
    idp: str = "X-Member-Idp"


class IdentitySettings(_Model):
    keys_dir: Path = Path("certs/identity")  # written by `sso-gateway certs generate`
    token_header: str = "X-Gateway-Identity"
    token_lifetime: int = Field(60, ge=10, le=3600)


class LoggingSettings(_Model):
    format: Literal["json", "text"] | None = None  # default: json in `serve`, text in `demo`
    audit: str = "stdout"  # the audit log: "stdout" or a file path (appended to)
    log_member_id: bool = False  # put member_id into request log lines


class MetricsSettings(_Model):
    # Who may read /metrics: "network" = clients in allow_from; "admin" = the rules that
    # guard /_gateway/admin (a member with the admin entitlement).
    access: Literal["network", "admin"] = "network"
    allow_from: list[str] = ["127.0.0.1", "::1"]  # addresses or networks (CIDR)


class MetadataSource(_Model):
    """One ``[[metadata]]`` entry: IdP metadata fetched from a URL, signature required."""

    url: str
    signing_cert: Path  # PEM certificate the metadata signature must verify against
    refresh: int = Field(3600, ge=60, le=7 * 86400)  # seconds (a shorter cacheDuration wins)
    entities: list[str] = []  # keep only these entity IDs from an aggregate
    registration_authority: str = ""  # keep only entities registered by this authority
    timeout: float = Field(30.0, gt=0, le=600)  # seconds for the whole download
    max_bytes: int = Field(50 * 1024 * 1024, ge=1024)
    cache_dir: Path = Path("metadata_cache")  # last good copies, for restarts without network

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return _http_url(value)


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
    attributes: AttributeMap = AttributeMap()
    idps: list[IdPOptions] = []
    session: SessionSettings = SessionSettings()
    store: StoreSettings = StoreSettings()
    upstreams: list[Upstream] = []
    metadata: list[MetadataSource] = []
    rules: list[Rule] = []
    identity_headers: IdentityHeaders = IdentityHeaders()
    identity: IdentitySettings = IdentitySettings()
    logging: LoggingSettings = LoggingSettings()
    metrics: MetricsSettings = MetricsSettings()
    limits: LimitSettings = LimitSettings()
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

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be HOST:PORT")
        return value

    # Derived values ------------------------------------------------------------------

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

    def idp_options(self, entity_id: str) -> IdPOptions:
        """The ``[[idps]]`` entry of one IdP (defaults when it has none)."""
        found = next((o for o in self.idps if o.entity_id == entity_id), None)
        options = found or IdPOptions(entity_id=entity_id)
        if options.allow_unsolicited is None:
            options = options.model_copy(update={"allow_unsolicited": self.idp.allow_unsolicited})
        return options

    def attribute_map(self, entity_id: str) -> AttributeMap:
        """``[attributes]`` with the fields one IdP's ``[[idps]]`` entry overrides."""
        own = self.idp_options(entity_id).attributes
        if own is None:
            return self.attributes
        return self.attributes.model_copy(update=own.model_dump(include=own.model_fields_set))

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


