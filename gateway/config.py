"""``gateway.toml`` plus ``GATEWAY_*`` environment overrides → validated, typed settings.

Every problem is reported at once, one line each, naming the key and the file.
Relative paths are resolved against the directory of the config file. Validation
reads files (the config, key files' existence) and nothing else.

Environment overrides use ``__`` for nesting: ``GATEWAY_PUBLIC_URL``,
``GATEWAY_STORE__URL``, ``GATEWAY_SESSION__SECRETS='["…"]'``. A value that parses
as JSON is taken as JSON, anything else as a string.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from cryptography import x509
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.errors import ConfigError

ENV_PREFIX = "GATEWAY_"
# 32 random bytes as base64 (what `certs generate` writes is 48 bytes, 64 characters).
MIN_SECRET_LENGTH = 43


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


def load_settings(
    path: Path | str | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read, merge and validate the config. Raises ``ConfigError`` listing every problem."""
    environ = os.environ if environ is None else environ
    path = Path(path or environ.get("GATEWAY_CONFIG") or "gateway.toml")
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read ({exc})"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML ({exc})"]) from None
    problems: list[str] = []
    _apply_env(raw, environ, problems)
    _resolve_paths(raw, path.parent)
    raw["source"] = path
    settings: Settings | None = None
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        problems += [_describe(err, path) for err in exc.errors()]
    problems += _check_files(raw, path)
    if settings is not None and not problems:
        problems += _check_semantics(settings, path)
    if problems or settings is None:
        raise ConfigError(problems)
    return settings


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str], problems: list[str]) -> None:
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == "GATEWAY_CONFIG":
            continue
        keys = name[len(ENV_PREFIX) :].lower().split("__")
        target = raw
        for key in keys[:-1]:
            node = target.setdefault(key, {})
            if not isinstance(node, dict):
                problems.append(f"environment {name}: {key!r} is not a table")
                break
            target = node
        else:
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = value
            target[keys[-1]] = parsed if isinstance(parsed, list | bool | int | float) else value


_PATH_KEYS = (("sp", "key_file"), ("sp", "cert_file"), ("sp", "next_key_file"),
              ("sp", "next_cert_file"), ("idp", "metadata_dir"),
              ("session", "secrets_file"), ("identity", "keys_dir"))


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    defaults = {("sp", "key_file"): "certs/sp.key", ("sp", "cert_file"): "certs/sp.crt",
                ("idp", "metadata_dir"): "idp_metadata", ("identity", "keys_dir"): "certs/identity"}
    for section, key in _PATH_KEYS:
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            continue
        value = table.get(key, defaults.get((section, key)))
        if isinstance(value, str):
            table[key] = str(base / Path(value).expanduser())
    for entry in raw.get("metadata") or []:
        if isinstance(entry, dict):
            entry.setdefault("cache_dir", "metadata_cache")
            for key in ("signing_cert", "cache_dir"):
                if isinstance(entry.get(key), str):
                    entry[key] = str(base / Path(entry[key]).expanduser())
    store = raw.get("store")
    if isinstance(store, dict) and isinstance(store.get("url"), str):
        url = store["url"]
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            store["url"] = "sqlite:///" + str((base / url[len("sqlite:///") :]).resolve())
    elif not isinstance(store, dict) or "url" not in store:
        raw.setdefault("store", {})["url"] = "sqlite:///" + str((base / "gateway.db").resolve())


def _check_files(raw: dict[str, Any], source: Path) -> list[str]:
    problems = []
    for section, key in _PATH_KEYS:
        table = raw.get(section)
        value = table.get(key) if isinstance(table, dict) else None
        if not isinstance(value, str):
            continue
        p = Path(value)
        want_dir = key.endswith("_dir")
        if want_dir and not p.is_dir():
            hint = " (run `sso-gateway certs generate`)" if section == "identity" else ""
            problems.append(
                f"{source}: key {section}.{key}: directory {str(p)!r} does not exist{hint}")
        elif not want_dir and not p.is_file():
            hint = " (run `sso-gateway certs generate`)" if section == "sp" else ""
            problems.append(f"{source}: key {section}.{key}: file {str(p)!r} does not exist{hint}")
    for i, entry in enumerate(raw.get("metadata") or []):
        cert = entry.get("signing_cert") if isinstance(entry, dict) else None
        if isinstance(cert, str) and not Path(cert).is_file():
            problems.append(
                f"{source}: key metadata[{i}].signing_cert: file {cert!r} does not exist")
    return problems


def _check_semantics(settings: Settings, source: Path) -> list[str]:
    problems = []
    secrets = settings.session_secrets()
    if not secrets:
        problems.append(f"{source}: key session.secrets: at least one secret is required")
    for i, secret in enumerate(secrets):
        if len(secret) < MIN_SECRET_LENGTH:
            problems.append(
                f"{source}: key session.secrets[{i}] ('**********'): must be at least 32 "
                f"random bytes, i.e. {MIN_SECRET_LENGTH} characters of base64 (generate one "
                f"with: python3 -c 'import secrets; print(secrets.token_urlsafe(48))')"
            )
    if not any(settings.identity.keys_dir.glob("identity-*.pem")):
        problems.append(f"{source}: key identity.keys_dir: no identity-*.pem key in "
                        f"{str(settings.identity.keys_dir)!r} (run `sso-gateway certs generate`)")
    if not settings.upstreams:
        problems.append(f"{source}: key upstreams: at least one [[upstreams]] entry is required")
    names = [u.name for u in settings.upstreams]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{source}: key upstreams: name {name!r} is used twice")
    entities = [o.entity_id for o in settings.idps]
    for entity in sorted({e for e in entities if entities.count(e) > 1}):
        problems.append(f"{source}: key idps: entity_id {entity!r} is listed twice")
    for i, entry in enumerate(settings.metadata):
        try:
            x509.load_pem_x509_certificate(entry.signing_cert.read_bytes())
        except (OSError, ValueError):
            problems.append(f"{source}: key metadata[{i}].signing_cert: "
                            f"{str(entry.signing_cert)!r} is not a PEM certificate")
    urls = [m.url for m in settings.metadata]
    for url in sorted({u for u in urls if urls.count(u) > 1}):
        problems.append(f"{source}: key metadata: url {url!r} is listed twice")
    if settings.session.idle_timeout > settings.session.lifetime:
        problems.append(f"{source}: key session.idle_timeout: must not exceed session.lifetime")
    return problems


def _describe(err: Any, source: Path) -> str:
    loc = ".".join(
        f"[{part}]" if isinstance(part, int) else str(part) for part in err["loc"]
    ).replace(".[", "[")
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        msg = f"must be one of {expected}"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    value = err.get("input")
    shown = "" if isinstance(value, dict | list) or value is None else f" ({value!r})"
    if "secret" in loc:
        shown = " ('**********')"
    elif loc == "store.url" and isinstance(value, str):
        shown = f" ({mask_url(value)!r})"
    return f"{source}: key {loc}{shown}: {msg}"
