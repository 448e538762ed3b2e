"""The SP's key pairs and the SP metadata that publishes them.

Normally there is one key pair (``[sp] key_file``/``cert_file``). During a key rollover
``[sp] next_key_file``/``next_cert_file`` name a second one: the metadata then lists both
certificates, for signing and for encryption, so an IdP may encrypt to either while it
picks up the new metadata; the gateway decrypts with either key and keeps signing with
the current one. Completing the rollover means moving the next pair into
``key_file``/``cert_file`` and removing the ``next_*`` keys (``docs/idp-admin.md``).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from onelogin.saml2.metadata import OneLogin_Saml2_Metadata
from onelogin.saml2.settings import OneLogin_Saml2_Settings

from gateway.config import Settings, SPSettings
from gateway.errors import ConfigError

#: A metadata validity shorter than this (seconds) draws a warning from ``check``.
SHORT_VALIDITY = 30 * 86400


@dataclass(frozen=True)
class KeyPair:
    key_pem: str = field(repr=False)
    cert_pem: str
    label: str  # "current" or "next"


def read_keypairs(settings: Settings) -> list[KeyPair]:
    """The current key pair, then the next one when a rollover is configured."""
    sp = settings.sp
    files = [("current", sp.key_file, sp.cert_file)]
    if sp.next_key_file is not None and sp.next_cert_file is not None:
        files.append(("next", sp.next_key_file, sp.next_cert_file))
    problems: list[str] = []
    pairs = [_read(label, key, cert, problems) for label, key, cert in files]
    if problems:
        raise ConfigError(problems)
    if len(pairs) == 2 and pairs[0].cert_pem.strip() == pairs[1].cert_pem.strip():
        raise ConfigError([f"{sp.next_cert_file}: the next SP certificate is the current one"])
    return pairs


def _read(label: str, key_file: Path, cert_file: Path, problems: list[str]) -> KeyPair:
    try:
        key_pem = key_file.read_text()
        cert_pem = cert_file.read_text()
    except OSError as exc:
        raise ConfigError(
            [f"{exc.filename}: cannot read SP key or certificate ({exc.strerror})"]
        ) from exc
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except (ValueError, TypeError):
        problems.append(f"{key_file}: not an unencrypted PEM private key")
        key = None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
    except ValueError:
        problems.append(f"{cert_file}: not a PEM certificate")
        cert = None
    if key is not None and cert is not None:
        der = serialization.PublicFormat.SubjectPublicKeyInfo
        enc = serialization.Encoding.DER
        if key.public_key().public_bytes(enc, der) != cert.public_key().public_bytes(enc, der):
            problems.append(f"{cert_file}: certificate does not match the key in {key_file}")
    return KeyPair(key_pem, cert_pem, label)


def sp_metadata(settings: OneLogin_Saml2_Settings, certs: list[str], *,
                valid_until: float | None = None, cache_duration: int | None = None) -> str:
    """SP metadata XML with a signing and an encryption KeyDescriptor per certificate
    (current first), checked against the metadata schema.

    ``validUntil`` (POSIX seconds) and ``cacheDuration`` (seconds) are written only when
    given: python3-saml's own defaults (two days, one week) would make every IdP that
    imported the metadata once refuse the gateway two days later."""
    security = settings.get_security_data()
    xml = OneLogin_Saml2_Metadata.builder(
        settings.get_sp_data(),
        authnsign=security["authnRequestsSigned"],
        wsign=security["wantAssertionsSigned"],
        # "" tells the builder to leave the attribute out (None means its default).
        valid_until=int(valid_until) if valid_until is not None else "",
        cache_duration=cache_duration if cache_duration is not None else "",
    )
    # Each call inserts its two KeyDescriptors first: add the current certificate last.
    for cert in reversed(certs):
        xml = OneLogin_Saml2_Metadata.add_x509_key_descriptors(xml, cert, add_encryption=True)
    text = xml.decode() if isinstance(xml, bytes) else str(xml)
    errors = settings.validate_metadata(text)
    if errors:
        raise ConfigError([f"the generated SP metadata is invalid: {', '.join(errors)}"])
    return text


def metadata_warnings(sp: SPSettings) -> list[str]:
    """What ``check`` says about the SP metadata lifetime settings (``[sp]``)."""
    warnings = []
    valid_for, cache = sp.metadata_valid_for, sp.metadata_cache_duration
    if valid_for is not None and valid_for < SHORT_VALIDITY:
        warnings.append(
            f"sp.metadata_valid_for = {valid_for} s ({valid_for / 86400:.1f} days): an IdP that "
            "imports the SP metadata once refuses this gateway when that time has passed; "
            f"use {SHORT_VALIDITY // 86400} days or more, or leave it unset (no validUntil), "
            "unless every IdP refreshes the metadata from /saml/metadata")
    if valid_for is not None and cache is not None and cache > valid_for:
        warnings.append(f"sp.metadata_cache_duration ({cache} s) is longer than "
                        f"sp.metadata_valid_for ({valid_for} s): the metadata expires "
                        "before an IdP is told to fetch it again")
    return warnings


def fingerprint(cert: str) -> str:
    """SHA-256 fingerprint (colon-separated hex) of a PEM certificate or its base64 body."""
    body = "".join(line for line in cert.splitlines() if "-----" not in line)
    try:
        der = base64.b64decode("".join(body.split()), validate=True)
    except ValueError:
        return "unreadable"
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))
