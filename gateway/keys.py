"""Keys: the SP's SAML key pair (RSA + self-signed certificate) and identity-token keys.

SAML peers pin certificates from metadata, so a self-signed certificate is the
norm; what matters is that the private key never leaves ``certs/``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
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


# Identity-token signing keys -------------------------------------------------------------
#
# One PEM file per key in a directory, named by creation time so that sorting the names
# sorts the keys: the newest signs, all are published in the JWKS until pruned.


@dataclass(frozen=True)
class IdentityKey:
    kid: str  # RFC 7638 JWK thumbprint: stable, derived from the public key alone
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    path: Path

    def public_jwk(self) -> dict[str, str]:
        jwk = _public_jwk(self.private_key)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": "ES256"}


def _b64(value: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes(32, "big")).rstrip(b"=").decode()


def _public_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    numbers = key.public_key().public_numbers()
    return {"crv": "P-256", "kty": "EC", "x": _b64(numbers.x), "y": _b64(numbers.y)}


def _thumbprint(key: ec.EllipticCurvePrivateKey) -> str:
    canonical = json.dumps(_public_jwk(key), separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def generate_identity_key(directory: Path) -> IdentityKey:
    """Add a new P-256 key to ``directory`` (mode 0600); it becomes the signing key."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    path = directory / f"identity-{stamp}.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return IdentityKey(_thumbprint(key), key, path)


def load_identity_keys(directory: Path) -> list[IdentityKey]:
    """Every identity key in ``directory``, oldest first (the last one signs)."""
    keys = []
    for path in sorted(directory.glob("identity-*.pem")):
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ValueError(f"{path}: not a P-256 private key")
        keys.append(IdentityKey(_thumbprint(key), key, path))
    return keys


def ensure_identity_key(directory: Path) -> IdentityKey | None:
    """Create the first identity key if ``directory`` has none; return it, else ``None``."""
    if directory.is_dir() and load_identity_keys(directory):
        return None
    return generate_identity_key(directory)


def prune_identity_keys(directory: Path, keep: int) -> list[IdentityKey]:
    """Delete all but the ``keep`` newest keys; return the deleted ones."""
    if keep < 1:
        raise ValueError("keep at least the signing key")
    keys = load_identity_keys(directory)
    dropped = keys[:-keep]
    for key in dropped:
        key.path.unlink()
    return dropped
