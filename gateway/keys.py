"""Key pairs for SAML signing: generate an RSA key and a self-signed certificate.

SAML peers pin certificates from metadata, so a self-signed certificate is the
norm; what matters is that the private key never leaves ``certs/``.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


def generate_self_signed(common_name: str, days: int = 3650) -> tuple[str, str]:
    """Return ``(private_key_pem, certificate_pem)`` for a new RSA-3072 key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return key_pem, cert.public_bytes(serialization.Encoding.PEM).decode()


def write_keypair(
    key_path: Path, cert_path: Path, common_name: str, *, force: bool = False
) -> None:
    """Write a new key (mode 0600) and certificate; refuse to overwrite unless ``force``."""
    if not force:
        existing = [str(p) for p in (key_path, cert_path) if p.exists()]
        if existing:
            raise FileExistsError(", ".join(existing))
    key_pem, cert_pem = generate_self_signed(common_name)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key_pem)
    os.chmod(key_path, 0o600)
    cert_path.write_text(cert_pem)


def pem_body(pem: str) -> str:
    """The base64 body of a PEM certificate, as SAML metadata carries it."""
    lines = [ln.strip() for ln in pem.strip().splitlines()]
    return "".join(ln for ln in lines if ln and not ln.startswith("-----"))
