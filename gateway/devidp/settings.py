"""The development IdP's settings, and its key pair on disk."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gateway.devidp.users import DEMO_USERS, DemoUser
from gateway.keys import write_keypair

KEY_FILE = "devidp-key.pem"
CERT_FILE = "devidp-cert.pem"


@dataclass(frozen=True)
class DevIdPSettings:
    """Everything the dev IdP needs to know about itself and its one SP.

    ``sp_sls_url`` is where LogoutRequests and LogoutResponses go (default: the ACS URL
    with ``/acs`` replaced by ``/sls``). ``session_lifetime`` (seconds) bounds the IdP's
    own sign-in cookie and is sent to the SP as ``SessionNotOnOrAfter``.
    ``assertion_lifetime`` is how long an Assertion may be presented. ``clock`` returns
    Unix time; tests move it instead of sleeping.
    """

    base_url: str
    key_pem: str = field(repr=False)
    cert_pem: str
    sp_entity_id: str
    sp_acs_url: str
    sp_cert_pem: str | None = None
    sp_sls_url: str = ""
    entity_id: str = ""
    display_name: str = "Development IdP (demo members)"
    users: tuple[DemoUser, ...] = DEMO_USERS
    session_lifetime: int = 8 * 3600
    require_signed_requests: bool = True
    assertion_lifetime: int = 300
    clock: Callable[[], float] = field(default=time.time, repr=False, compare=False)

    def __post_init__(self) -> None:
        base_url = self.base_url.rstrip("/")
        object.__setattr__(self, "base_url", base_url)
        if not self.entity_id:
            object.__setattr__(self, "entity_id", base_url + "/metadata")
        if not self.sp_sls_url:
            head, sep, _ = self.sp_acs_url.rpartition("/acs")
            object.__setattr__(self, "sp_sls_url", head + "/sls" if sep else "")
        if self.require_signed_requests and not self.sp_cert_pem:
            raise ValueError("sp_cert_pem is required when require_signed_requests is on")

    @property
    def sso_url(self) -> str:
        return self.base_url + "/sso"

    @property
    def slo_url(self) -> str:
        return self.base_url + "/slo"


def ensure_keys(directory: Path) -> tuple[str, str]:
    """Load the IdP's ``(key_pem, cert_pem)`` from ``directory``, creating them on first use.

    If only one of the two files exists, ``FileExistsError`` is raised rather than
    silently replacing a key that something may already trust.
    """
    key_path, cert_path = directory / KEY_FILE, directory / CERT_FILE
    if not (key_path.exists() and cert_path.exists()):
        write_keypair(key_path, cert_path, "sso-gateway development IdP")
    return key_path.read_text(), cert_path.read_text()
