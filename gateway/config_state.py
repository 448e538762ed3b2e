"""What configuration a gateway process serves: its fingerprint, when it was loaded, and
how the last reload went (for ``/readyz``, ``/metrics`` and the audit log).

The fingerprint (``config_sha256``) is a SHA-256 over ``gateway.toml`` and every file it
names that the gateway reads when it builds itself: the SP key pairs (current and
next), the session-secrets file, the identity-token keys, the IdP metadata files, the
pinned certificates of ``[[metadata]]`` sources and the TLS certificate, key and
password files. Each file goes in as its role (``sp.key_file``, ``idp_metadata/<file
name>``…), its length and its bytes, in a fixed order, so any change to any of them (a
rotated key, a new IdP's metadata file) gives a new fingerprint, and the same files give
the same one in every worker and replica, wherever they are kept.
Metadata fetched from URLs is not part of it (it refreshes on its own, and is audited
as ``metadata_change``); neither are ``GATEWAY_*`` environment overrides, which a
reload cannot change. The hash reveals nothing of the secrets it covers.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Settings
from gateway.tls import tls_files


def inputs(settings: Settings) -> list[tuple[str, Path]]:
    """The files a gateway built from ``settings`` reads, each with the role it has (its
    name in the fingerprint), in the fingerprint's order."""
    sp = settings.sp
    named = [("gateway.toml", Path(settings.source)), ("sp.key_file", sp.key_file),
             ("sp.cert_file", sp.cert_file), ("sp.next_key_file", sp.next_key_file),
             ("sp.next_cert_file", sp.next_cert_file),
             ("session.secrets_file", settings.session.secrets_file)]
    files = [(role, path) for role, path in named if path is not None]
    files += [(f"identity/{p.name}", p)
              for p in sorted(settings.identity.keys_dir.glob("identity-*.pem"))]
    files += [(f"idp_metadata/{p.name}", p)
              for p in sorted(settings.idp.metadata_dir.glob("*.xml"))]
    files += [(f"metadata[{i}].signing_cert", m.signing_cert)
              for i, m in enumerate(settings.metadata)]
    tls = tls_files(settings)
    if tls is not None:
        files += [("server.tls_cert_file", tls.cert), ("server.tls_key_file", tls.key)]
        if tls.password is not None:
            files.append(("server.tls_key_password_file", tls.password))
    return files


def fingerprint(settings: Settings) -> str:
    """SHA-256 (hex) over the configuration file and the files it names."""
    digest = hashlib.sha256()
    for role, path in inputs(settings):
        try:
            data = path.read_bytes()
        except OSError:
            data = b""
        name = role.encode("utf-8", "surrogateescape")
        digest.update(len(name).to_bytes(4, "big") + name + len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of one file's bytes ("" if it cannot be read): a refused configuration's
    fingerprint when it does not even load."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


@dataclass(frozen=True, slots=True)
class Reload:
    """One reload: when, ``ok`` or ``refused``, the fingerprint tried, and why not."""

    time: float
    result: str
    sha256: str
    problems: tuple[str, ...] = ()


class ConfigState:
    """The configuration this process serves, shared by every ``Gateway`` a live
    process builds in turn (``gateway.reload``)."""

    def __init__(self, sha256: str, loaded_at: float) -> None:
        self.sha256 = sha256
        self.loaded_at = loaded_at
        self.last_reload: Reload | None = None

    def reloaded(self, outcome: Reload) -> None:
        """Record a reload; an ``ok`` one is what is served from now on."""
        self.last_reload = outcome
        if outcome.result == "ok":
            self.sha256, self.loaded_at = outcome.sha256, outcome.time

    def as_json(self) -> dict[str, object]:
        """What ``/readyz`` shows: the fingerprint, since when, and the last reload."""
        shown: dict[str, object] = {"sha256": self.sha256, "loaded": _utc(self.loaded_at)}
        if self.last_reload is not None:
            last = self.last_reload
            shown["last_reload"] = {"time": _utc(last.time), "result": last.result,
                                    "sha256": last.sha256, "problems": list(last.problems)}
        return shown


def _utc(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="milliseconds")
