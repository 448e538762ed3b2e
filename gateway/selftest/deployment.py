"""What the self-test knows of the deployment: the gateway's defaults, or its config file.

``sso-gateway selftest --config gateway.toml`` reads the file as data (TOML, or JSON
for a ``.json`` file) and takes from it only names: which released attributes feed the
gateway's attributes (the first name of each, per IdP when ``[[idps]]`` overrides
it), the identity header names and the token header, the session cookie's name, the
upstreams, the public paths, the front proxy's forward-auth headers and the sign-in
rate limit. Nothing is validated here (``sso-gateway check`` does that), and nothing of
the gateway's server side is imported: the self-test stays a client. Environment
overrides (``GATEWAY_*``) are not applied.

Without a file the gateway's defaults apply (``gateway.config_schema``'s
``DEFAULT_ATTRIBUTES``, ``DEFAULT_IDENTITY_HEADERS``, ``FRONT_PROXY_HEADERS``; a test
keeps these copies equal to them).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The attributes the gateway itself reads, and the released name each has by default
#: (the first of ``DEFAULT_ATTRIBUTES``).
DEFAULT_RELEASED: dict[str, str] = {
    "member_id": "memberId",
    "email": "mail",
    "display_name": "displayName",
    "entitlements": "eduPersonEntitlement",
    "status": "memberStatus",
}
#: ``DEFAULT_IDENTITY_HEADERS``: attribute name (or "subject", "idp", "email_verified") →
#: header name.
DEFAULT_HEADERS: dict[str, str] = {
    "subject": "X-Member-Id",
    "email": "X-Member-Email",
    "email_verified": "X-Member-Email-Verified",
    "display_name": "X-Member-Name",
    "entitlements": "X-Member-Entitlements",
    "status": "X-Member-Status",
    "idp": "X-Member-Idp",
}
DEFAULT_TOKEN_HEADER = "X-Gateway-Identity"
DEFAULT_COOKIE = "gw_session"
DEFAULT_LOGINS = 30  # [limits] logins: sign-in starts and ACS posts per client and minute
#: ``FRONT_PROXY_HEADERS``: the headers a front proxy names the original method, URI and
#: host in, on its forward-auth subrequest.
FRONT_PROXY_HEADERS: dict[str, tuple[str, str, str]] = {
    "nginx": ("X-Original-Method", "X-Original-URI", "X-Original-Host"),
    "traefik": ("X-Forwarded-Method", "X-Forwarded-Uri", "X-Forwarded-Host"),
    "caddy": ("X-Forwarded-Method", "X-Forwarded-Uri", "X-Forwarded-Host"),
}


class ConfigUnreadable(Exception):
    """The config file cannot be read or parsed."""


@dataclass(frozen=True)
class Deployment:
    """The names the self-test uses; ``source`` is the config file read, if any."""

    attributes: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: {k: (v,) for k, v in DEFAULT_RELEASED.items()})
    idp_attributes: Mapping[str, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_HEADERS))
    token_header: str = DEFAULT_TOKEN_HEADER
    cookie_name: str = DEFAULT_COOKIE
    cookie_secure: bool | None = None  # None: as the URL's scheme says
    logins_per_minute: int = DEFAULT_LOGINS
    upstreams: tuple[tuple[str, str], ...] = ()  # (name, prefix), in config order
    public_paths: tuple[str, ...] = ()  # literal paths of public rules
    forward_auth: tuple[str, str, str] | None = None  # None: not known (no config)
    source: str | None = None

    def released(self, idp_entity_id: str) -> dict[str, str]:
        """For the IdP under test: each of the gateway's own attributes → the released
        name to forge it under (the first the configuration lists)."""
        names = {**self.attributes, **self.idp_attributes.get(idp_entity_id, {})}
        return {role: names[role][0] for role in DEFAULT_RELEASED if names.get(role)}

    def session_cookie(self, https: bool) -> str:
        """The session cookie's name as a browser holds it (``__Host-`` when secure)."""
        secure = https if self.cookie_secure is None else self.cookie_secure
        return ("__Host-" if secure else "") + self.cookie_name

    @property
    def identity_headers(self) -> list[str]:
        """Every header that carries the identity upstream (the token's included)."""
        return [h for h in (*self.headers.values(), self.token_header) if h]

    def upstream_of(self, path: str) -> str | None:
        """The upstream whose prefix is the longest one ``path`` starts with."""
        best: tuple[int, str] | None = None
        for name, prefix in self.upstreams:
            bare = prefix.rstrip("/")
            if (path == bare or path.startswith(bare + "/")) and (
                    best is None or len(prefix) > best[0]):
                best = (len(prefix), name)
        return best[1] if best else None


def read_deployment(path: Path) -> Deployment:
    """The names in the config file at ``path`` (``ConfigUnreadable`` if it cannot be
    read or parsed)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigUnreadable(f"{path}: cannot read ({exc})") from None
    try:
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigUnreadable(f"{path}: not valid {path.suffix[1:] or 'TOML'} ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigUnreadable(f"{path}: not a table of settings")
    return deployment(raw, source=str(path))


def deployment(raw: Mapping[str, Any], source: str | None = None) -> Deployment:
    """The names in parsed config data, over the gateway's defaults."""
    attributes: dict[str, tuple[str, ...]] = {k: (v,) for k, v in DEFAULT_RELEASED.items()}
    attributes.update(_names(_table(raw, "attributes")))
    per_idp = {str(entry.get("entity_id")): _names(entry.get("attributes"))
               for entry in _list(raw, "idps") if entry.get("attributes")}
    headers = {**DEFAULT_HEADERS, **{str(k): str(v) for k, v in
                                     _table(raw, "identity_headers").items()}}
    session = _table(raw, "session")
    secure = session.get("secure")
    limits = _table(raw, "limits")
    logins = limits.get("logins", DEFAULT_LOGINS)
    upstreams = tuple((str(u.get("name", "")), str(u.get("prefix", "/")))
                      for u in _list(raw, "upstreams"))
    public = tuple(str(r["path"]) for r in _list(raw, "rules")
                   if r.get("access") == "public" and isinstance(r.get("path"), str)
                   and not any(c in r["path"] for c in "{*"))
    return Deployment(
        attributes=attributes, idp_attributes=per_idp, headers=headers,
        token_header=str(_table(raw, "identity").get("token_header", DEFAULT_TOKEN_HEADER)),
        cookie_name=str(session.get("cookie_name", DEFAULT_COOKIE)),
        cookie_secure=secure if isinstance(secure, bool) else None,
        logins_per_minute=logins if isinstance(logins, int) else DEFAULT_LOGINS,
        upstreams=upstreams, public_paths=public,
        forward_auth=_forward_auth(_table(raw, "forward_auth")), source=source)


def _forward_auth(table: Mapping[str, Any]) -> tuple[str, str, str]:
    proxy = str(table.get("front_proxy", "nginx"))
    if proxy in FRONT_PROXY_HEADERS:
        return FRONT_PROXY_HEADERS[proxy]
    return (str(table.get("method_header", "")), str(table.get("uri_header", "")),
            str(table.get("host_header", "")))


def _names(value: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, dict):
        return {}
    return {str(k): tuple(str(n) for n in v) for k, v in value.items() if isinstance(v, list)}


def _table(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key)
    return value if isinstance(value, dict) else {}


def _list(raw: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    value = raw.get(key)
    return [e for e in value if isinstance(e, dict)] if isinstance(value, list) else []
