"""The development IdP for docker-compose.yml: a local trial only, never production.

``init`` writes what the gateways and the IdP need into ``/data`` (SP key and
certificate, a session secret, an identity-token key, the IdP's keys and its
metadata) unless already there;
``serve`` runs the dev IdP on 127.0.0.1:8001, which it shares with nginx's network
namespace — the dev IdP's loopback-only rule is kept, not bypassed.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from gateway.devidp import DevIdPSettings, ensure_keys, run
from gateway.devidp.metadata import idp_metadata
from gateway.keys import ensure_identity_key, write_keypair

DATA = Path(os.environ.get("TRIAL_DATA", "/data"))
GATEWAY_URL = os.environ.get("TRIAL_GATEWAY_URL", "http://localhost:8080")
IDP_URL = os.environ.get("TRIAL_IDP_URL", "http://localhost:8081")


def settings() -> DevIdPSettings:
    key_pem, cert_pem = ensure_keys(DATA / "certs")
    return DevIdPSettings(base_url=IDP_URL, key_pem=key_pem, cert_pem=cert_pem,
                          sp_entity_id=f"{GATEWAY_URL}/saml/metadata",
                          sp_acs_url=f"{GATEWAY_URL}/saml/acs",
                          sp_cert_pem=(DATA / "certs" / "sp.crt").read_text())


def init() -> None:
    certs = DATA / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    if not (certs / "sp.key").exists():
        write_keypair(certs / "sp.key", certs / "sp.crt", "sso-gateway trial SP")
    secret_file = certs / "session-secrets"
    if not secret_file.exists():
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48) + "\n")
    ensure_identity_key(certs / "identity")
    (DATA / "idp_metadata").mkdir(exist_ok=True)
    (DATA / "idp_metadata" / "devidp.xml").write_text(idp_metadata(settings()))
    print(f"trial files ready in {DATA}")


if __name__ == "__main__":
    if sys.argv[1:] == ["init"]:
        init()
    elif sys.argv[1:] == ["serve"]:
        run(settings(), "127.0.0.1", 8001)
    else:
        sys.exit("usage: trial_idp.py init|serve")
