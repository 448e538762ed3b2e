"""``gateway.toml`` plus ``GATEWAY_*`` environment overrides → validated, typed settings.

Every problem is reported at once, one line each, naming the key and the file.
Relative paths are resolved against the directory of the config file. Validation
reads files (the config, key files' existence) and nothing else. The models of each
section live in ``gateway.config_schema`` and are re-exported here.

Environment overrides use ``__`` for nesting: ``GATEWAY_PUBLIC_URL``,
``GATEWAY_STORE__URL``, ``GATEWAY_SESSION__SECRETS='["…"]'``. A value that parses
as JSON is taken as JSON, anything else as a string.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections import Counter
from collections.abc import Mapping
from itertools import pairwise
from pathlib import Path
from typing import Any

from cryptography import x509
from pydantic import ValidationError

from gateway.config_schema import (
    BUILT_IN,
    DEFAULT_ATTRIBUTES,
    DEFAULT_CLAIMS,
    DEFAULT_IDENTITY_HEADERS,
    PARAMETER,
    IdentitySettings,
    IdPOptions,
    IdPSettings,
    LimitSettings,
    LoggingSettings,
    MemberIds,
    MetadataSource,
    MetricsSettings,
    PolicySettings,
    ProxySettings,
    Requirement,
    Rule,
    ServerSettings,
    SessionSettings,
    Settings,
    SPSettings,
    StoreSettings,
    Upstream,
    is_loopback,
    mask_url,
    pattern_segments,
)
from gateway.errors import ConfigError

__all__ = [
    "BUILT_IN",
    "DEFAULT_ATTRIBUTES",
    "DEFAULT_CLAIMS",
    "DEFAULT_IDENTITY_HEADERS",
    "PARAMETER",
    "IdPOptions",
    "IdPSettings",
    "IdentitySettings",
    "LimitSettings",
    "LoggingSettings",
    "MemberIds",
    "MetadataSource",
    "MetricsSettings",
    "PolicySettings",
    "ProxySettings",
    "Requirement",
    "Rule",
    "SPSettings",
    "ServerSettings",
    "SessionSettings",
    "Settings",
    "StoreSettings",
    "Upstream",
    "is_loopback",
    "load_settings",
    "mask_url",
    "pattern_segments",
]

ENV_PREFIX = "GATEWAY_"
# 32 random bytes as base64 (what `certs generate` writes is 48 bytes, 64 characters).
MIN_SECRET_LENGTH = 43
# Entropy a session secret must show, estimated from its characters (see secret_weakness).
MIN_SECRET_BITS = 128
MIN_BITS_PER_CHARACTER = 3.0  # random hex shows about 3.8, random base64 about 5
_GENERATE = ("generate one with: python3 -c 'import secrets; "
             "print(secrets.token_urlsafe(48))'")


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
    if settings is not None:
        problems += _check_names(settings, path)
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
    for i, secret in enumerate(secrets):  # those of secrets_file follow the inline ones
        key = f"session.secrets[{i}]"
        weakness = secret_weakness(secret)
        if len(secret) < MIN_SECRET_LENGTH:
            problems.append(
                f"{source}: key {key} ('**********'): must be at least 32 "
                f"random bytes, i.e. {MIN_SECRET_LENGTH} characters of base64 ({_GENERATE})")
        elif weakness is not None:
            problems.append(f"{source}: key {key} ('**********'): not random enough: "
                            f"{weakness} ({_GENERATE})")
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
    urls = [m.url or m.mdq for m in settings.metadata]
    for url in sorted({u for u in urls if urls.count(u) > 1}):
        problems.append(f"{source}: key metadata: {url!r} is listed twice")
    if settings.session.idle_timeout > settings.session.lifetime:
        problems.append(f"{source}: key session.idle_timeout: must not exceed session.lifetime")
    return problems


def secret_weakness(secret: str) -> str | None:
    """Why ``secret`` looks made by hand rather than drawn at random, or ``None``.

    Estimates from the characters alone, tuned so that random secrets in base64 or hex
    (``secrets.token_urlsafe``, ``certs generate``, ``openssl rand -hex 32``) always
    pass: a repeated block (``aaaa…``, ``abab…``, a word over and over), a walk through
    neighbouring characters (``abcdef…``, ``0123…``), too few different characters, or
    fewer than ``MIN_SECRET_BITS`` bits by the Shannon estimate over the secret.
    """
    n = len(secret)
    if n == 0:
        return "it is empty"
    sample = secret[:4096]  # the checks are quadratic; no real secret is this long
    period = next((p for p in range(1, len(sample) // 2 + 1) if sample[p:] == sample[:-p]),
                  None)
    if period is not None:
        return f"it repeats a block of {period} character{'s' if period > 1 else ''}"
    if n > 1:
        steps = sum(abs(ord(a) - ord(b)) <= 1 for a, b in pairwise(secret))
        if steps / (n - 1) > 0.6:
            return "it is mostly runs of the same or neighbouring characters"
    counts = Counter(secret)
    per_character = -sum(c / n * math.log2(c / n) for c in counts.values())
    if per_character < MIN_BITS_PER_CHARACTER:
        return (f"its {len(counts)} different characters give about {per_character:.1f} bits "
                f"each (random base64 gives about 5, hex about 4)")
    if per_character * n < MIN_SECRET_BITS:
        return (f"it holds about {per_character * n:.0f} bits of entropy "
                f"(at least {MIN_SECRET_BITS} are needed)")
    return None


def _check_names(settings: Settings, source: Path) -> list[str]:
    """Every attribute a header, claim, rule or IdP entry names must be configured."""
    known = settings.attribute_names
    listed = ", ".join(sorted(known))
    problems = []

    def unknown(key: str, name: str, extra: frozenset[str] = frozenset()) -> None:
        if name not in known | extra:
            also = "".join(f", {n}" for n in sorted(extra))
            problems.append(f"{source}: key {key} ({name!r}): unknown attribute (configured in "
                            f"[attributes]: {listed}{also})")

    for name in settings.identity_headers:
        unknown(f"identity_headers.{name}", name, BUILT_IN)
    for i, upstream in enumerate(settings.upstreams):
        for j, name in enumerate(upstream.claims):
            unknown(f"upstreams[{i}].claims[{j}]", name, BUILT_IN - {"subject"})
    for i, rule in enumerate(settings.rules):
        for name in rule.require.attributes:
            unknown(f"rules[{i}].require.attributes.{name}", name, BUILT_IN)
    for i, idp in enumerate(settings.idps):
        for name in idp.attributes or {}:
            unknown(f"idps[{i}].attributes.{name}", name)
    owners: dict[str, str] = {}
    token_header = _header_key(settings.identity.token_header)
    for name, header in settings.identity_headers.items():
        if not header:
            continue
        key = f"{source}: key identity_headers.{name} ({header!r})"
        if _header_key(header) == token_header:
            problems.append(f"{key}: is also identity.token_header")
        elif _header_key(header) in owners:
            problems.append(f"{key}: is also the header of {owners[_header_key(header)]} (give "
                            "one of them another name, or \"\" for no header)")
        owners.setdefault(_header_key(header), name)
    return problems


def _header_key(name: str) -> str:
    """Header names as the proxy compares them (``_`` read as ``-``)."""
    return name.strip().lower().replace("_", "-")


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
