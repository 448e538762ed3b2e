"""What an admin needs to read about IdP metadata: certificate fingerprints and expiry,
a readable diff between two versions of an IdP, and the warnings of ``idp check``.

Pure functions over ``IdP`` values and parsed documents; the refresher logs what they
return and the CLI prints it.
"""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from gateway.saml.metadata_signature import WEAK
from gateway.saml.registry import IdP

EXPIRY_WARNING_DAYS = 30
_DS = "http://www.w3.org/2000/09/xmldsig#"


@dataclass(frozen=True)
class CertInfo:
    sha256: str  # upper-case hex pairs joined by ':'
    subject: str
    not_after: float  # POSIX seconds
    sha1_signed: bool  # the certificate itself is signed with SHA-1

    def days_left(self, now: float) -> float:
        return (self.not_after - now) / 86400

    def describe(self, now: float) -> str:
        days = self.days_left(now)
        left = f"expired {-days:.0f} days ago" if days < 0 else f"{days:.0f} days left"
        return f"SHA-256 {self.sha256}  expires {when(self.not_after)} ({left})"


def cert_info(body: str) -> CertInfo:
    """Facts about one certificate given as a PEM body (base64 DER)."""
    der = base64.b64decode(body)
    cert = x509.load_der_x509_certificate(der)
    digest = cert.fingerprint(hashes.SHA256()).hex().upper()
    algorithm = cert.signature_hash_algorithm
    return CertInfo(
        sha256=":".join(digest[i:i + 2] for i in range(0, len(digest), 2)),
        subject=cert.subject.rfc4514_string(),
        not_after=cert.not_valid_after_utc.timestamp(),
        sha1_signed=isinstance(algorithm, hashes.SHA1),
    )


def when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def diff(old: IdP | None, new: IdP | None) -> list[str]:
    """Readable lines saying what changed between two versions of one IdP."""
    if old is None and new is None:
        return []
    if old is None:
        assert new is not None
        return [f"added: SSO {new.sso_url}", *(f"signing certificate added: {c.sha256}"
                                              for c in map(cert_info, new.signing_certs))]
    if new is None:
        return ["removed"]
    lines = []
    for label, before, after in (("display name", old.display_name, new.display_name),
                                 ("SSO endpoint", old.sso_url, new.sso_url),
                                 ("SLO endpoint", old.slo_url, new.slo_url),
                                 ("SLO endpoint (HTTP-POST)", old.slo_post_url,
                                  new.slo_post_url)):
        if before != after:
            lines.append(f"{label}: {before or '(none)'} -> {after or '(none)'}")
    old_certs, new_certs = set(old.signing_certs), set(new.signing_certs)
    for body in new.signing_certs:
        if body not in old_certs:
            info = cert_info(body)
            lines.append(f"signing certificate added: {info.sha256} "
                         f"(expires {when(info.not_after)})")
    for body in old.signing_certs:
        if body not in new_certs:
            lines.append(f"signing certificate removed: {cert_info(body).sha256}")
    if old.valid_until != new.valid_until:
        lines.append(f"validUntil: {_maybe(old.valid_until)} -> {_maybe(new.valid_until)}")
    return lines


def _maybe(ts: float | None) -> str:
    return "(none)" if ts is None else when(ts)


def expiring(idp: IdP, now: float, days: int = EXPIRY_WARNING_DAYS) -> list[CertInfo]:
    """The IdP's signing certificates that expire within ``days`` (or have expired)."""
    return [c for c in map(cert_info, idp.signing_certs) if c.days_left(now) < days]


def idp_warnings(idp: IdP, now: float) -> list[str]:
    """``idp check``'s findings about one IdP: expiring certificates, SHA-1-signed
    certificates, no SLO, plain-http endpoints, expired metadata."""
    warnings = []
    for cert in expiring(idp, now):
        days = cert.days_left(now)
        state = "has expired" if days < 0 else f"expires in {days:.0f} days"
        warnings.append(f"signing certificate {cert.sha256} {state} ({when(cert.not_after)})")
    for cert in map(cert_info, idp.signing_certs):
        if cert.sha1_signed:
            warnings.append(f"signing certificate {cert.sha256} is signed with SHA-1")
    if not idp.slo_url and not idp.slo_post_url:
        warnings.append("no SingleLogoutService (HTTP-Redirect or HTTP-POST): sign-out will "
                        "not reach the IdP")
    for label, url in (("SSO", idp.sso_url), ("SLO", idp.slo_url),
                       ("SLO (HTTP-POST)", idp.slo_post_url)):
        if url.startswith("http://"):
            warnings.append(f"{label} endpoint uses plain http: {url}")
    if idp.valid_until is not None and idp.valid_until <= now:
        warnings.append(f"metadata expired (validUntil {when(idp.valid_until)})")
    return warnings


def document_warnings(root: Any) -> list[str]:
    """SHA-1 in any XML signature of a metadata document."""
    found = set()
    for tag in ("SignatureMethod", "DigestMethod"):
        for node in root.iter(f"{{{_DS}}}{tag}"):
            if node.get("Algorithm") in WEAK:
                found.add(f"{tag} {node.get('Algorithm')}")
    return [f"XML signature uses SHA-1 ({', '.join(sorted(found))})"] if found else []
