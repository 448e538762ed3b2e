"""TLS of the gateway's own: the server's ``SSLContext`` from ``[server] tls_*``, and
reloading its certificate while it serves.

TLS 1.2 and 1.3 only. For 1.2 the ciphers are ECDHE key exchange with AES-GCM or
ChaCha20-Poly1305 (forward secrecy, AEAD; Mozilla's "intermediate" profile); 1.3 keeps
OpenSSL's suites, which are all of that kind. No compression, no renegotiation.

A reload loads the new certificate and key into a scratch context first: a file that is
missing, not PEM, a key that does not match, or a wrong password is refused there, and
the live context keeps its pair. Only then is ``load_cert_chain`` run on the live
context, so handshakes from then on get the new certificate and connections already
open keep theirs. Each worker process has one live context (``install`` is called by
the server's context factory in that process).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from gateway.config import Settings
from gateway.errors import ConfigError

log = logging.getLogger("gateway.tls")

#: TLS 1.2 ciphers: ECDHE with AEAD only (TLS 1.3 suites are OpenSSL's defaults).
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL"
#: A certificate expiring sooner than this (days) draws a warning from ``check``.
EXPIRY_WARNING_DAYS = 21


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """The certificate chain, key and (optional) key-password files, as absolute paths."""

    cert: Path
    key: Path
    password: Path | None = None

    def read_password(self) -> bytes | None:
        if self.password is None:
            return None
        return self.password.read_bytes().rstrip(b"\r\n")


def tls_files(settings: Settings) -> TLSFiles | None:
    """``[server] tls_*`` with relative paths taken from gateway.toml's directory, or
    ``None`` when the gateway does not serve TLS itself."""
    server = settings.server
    if server.tls_cert_file is None or server.tls_key_file is None:
        return None
    base = Path(settings.source).parent

    def resolve(path: Path) -> Path:
        return base / path.expanduser()

    return TLSFiles(resolve(server.tls_cert_file), resolve(server.tls_key_file),
                    resolve(server.tls_key_password_file)
                    if server.tls_key_password_file is not None else None)


def new_context() -> ssl.SSLContext:
    """A server context with the gateway's protocol and cipher settings, no certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(["http/1.1"])
    return context


def load_pair(context: ssl.SSLContext, files: TLSFiles) -> None:
    """Load ``files`` into ``context``; ``ConfigError`` naming the files if they are
    missing, not PEM, do not belong together, or the password is wrong."""
    try:
        password = files.read_password()
        context.load_cert_chain(files.cert, files.key, password)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if isinstance(exc, ssl.SSLError):
            reason = _ssl_reason(exc)
        raise ConfigError([f"[server] tls_cert_file {str(files.cert)!r} / tls_key_file "
                           f"{str(files.key)!r}: {reason}"]) from None


def _ssl_reason(exc: ssl.SSLError) -> str:
    text = f"{exc.reason or ''} {exc}".lower()
    if "key values mismatch" in text:
        return "the key does not belong to the certificate"
    if "bad decrypt" in text or "bad password" in text:
        return "cannot decrypt the key (tls_key_password_file)"
    if "no start line" in text or "pem" in text:
        return "not a PEM certificate and key"
    return f"not usable ({exc.reason or exc})"


def check(files: TLSFiles, now: float) -> list[str]:
    """Load the pair into a scratch context (``ConfigError`` if it cannot serve); the
    warnings ``check`` prints: the certificate has expired or expires soon."""
    load_pair(new_context(), files)
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError([f"[server] tls_cert_file {str(files.cert)!r}: {exc}"]) from None
    days = (cert.not_valid_after_utc.timestamp() - now) / 86400
    until = cert.not_valid_after_utc.date().isoformat()
    if days < 0:
        return [f"[server] tls_cert_file: the certificate expired on {until}"]
    if days < EXPIRY_WARNING_DAYS:
        return [f"[server] tls_cert_file: the certificate expires in {days:.0f} days "
                f"({until})"]
    return []


def server_context(files: TLSFiles) -> ssl.SSLContext:
    """The context the server listens with, loaded with ``files``."""
    context = new_context()
    load_pair(context, files)
    return context


class LiveTLS:
    """The listening server's context in this process, and the files it was loaded from."""

    def __init__(self, context: ssl.SSLContext, files: TLSFiles) -> None:
        self.context = context
        self.files = files

    def reload(self, files: TLSFiles) -> None:
        """New handshakes get ``files``' pair; ``ConfigError`` (and the old pair kept)
        if it cannot serve."""
        load_pair(new_context(), files)  # refused here, before the live context is touched
        load_pair(self.context, files)
        self.files = files
        log.info("TLS certificate loaded from %s", files.cert)


_live: LiveTLS | None = None


def install(context: ssl.SSLContext, files: TLSFiles) -> None:
    """Remember the context this process's server listens with (for ``live``)."""
    global _live
    _live = LiveTLS(context, files)


def live() -> LiveTLS | None:
    """The server context of this process, if it serves TLS itself."""
    return _live
