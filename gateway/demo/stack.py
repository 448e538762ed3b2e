"""The demo stack: gateway + development IdP + sample reader, on loopback.

``prepare`` writes everything the gateway needs into a work directory (keys,
a session secret, IdP metadata, ``gateway.toml``), exactly as an admin would;
``serve`` runs the three servers in one event loop. The tests use the same two
functions, on free ports, so the demo is what the tests exercise.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import uvicorn

from gateway.app import create_app
from gateway.config import Settings, is_loopback, load_settings
from gateway.demo.reader import create_reader
from gateway.devidp import DevIdPSettings, ensure_keys
from gateway.devidp import create_app as create_idp_app
from gateway.devidp.metadata import idp_metadata
from gateway.keys import ensure_identity_key, write_keypair
from gateway.server import uvicorn_options

MEMBER = "urn:mace:example.org:entitlement:member"
ADMIN = "urn:mace:example.org:entitlement:admin"

_CONFIG = """\
# Written by `sso-gateway demo`. See gateway.example.toml for every option.
public_url = "{gateway_url}"
listen = "{listen}"

[session]
secrets_file = "session-secrets"

[identity]
keys_dir = "certs/identity"

[store]
url = "sqlite:///gateway.db"

[[idps]]
entity_id = "{idp_entity_id}"
member_ids = "organisation"   # the dev IdP's member numbers are the organisation's own

[[upstreams]]
name = "reader"
prefix = "/"
url = "{reader_url}"

[[rules]]
path = "/"
access = "public"
[[rules]]
path = "/public/**"
access = "public"
[[rules]]
path = "/favicon.ico"
access = "public"
[[rules]]
path = "/issues"
access = "public"
[[rules]]
path = "/static/**"
access = "public"
[[rules]]
path = "/search"
access = "public"
[[rules]]
path = "/search.json"
access = "public"
[[rules]]
path = "/issues/free-2024/**"
access = "registered"
[[rules]]
path = "/orders/**"
access = "member"
require = {{ entitlement = "{member}", status = "active" }}
[[rules]]
path = "/issues/**"
access = "member"
require = {{ entitlement = "{member}", status = "active" }}
[[rules]]
path = "/members/{{member_id}}/notes/**"
access = "owner"
[[rules]]
path = "/_gateway/admin/**"
access = "member"
require = {{ entitlement = "{admin}", idp = "{idp_entity_id}" }}   # only our IdP makes admins
"""


@dataclass(frozen=True)
class DemoStack:
    workdir: Path
    settings: Settings
    idp: DevIdPSettings
    reader_url: str

    @property
    def gateway_url(self) -> str:
        return self.settings.public_url


def prepare(workdir: Path, *, gateway_url: str = "http://127.0.0.1:8000",
            idp_url: str = "http://127.0.0.1:8001", reader_url: str = "http://127.0.0.1:8002",
            extra_config: str = "") -> DemoStack:
    """Write the demo's files into ``workdir`` (keeping existing keys) and load its config."""
    for url in (gateway_url, idp_url, reader_url):
        host = urlsplit(url).hostname or ""
        if not is_loopback(host):
            raise ValueError(f"the demo runs on loopback only, not {url}")
    certs = workdir / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    if not (certs / "sp.key").exists():
        write_keypair(certs / "sp.key", certs / "sp.crt", "sso-gateway demo SP", force=True)
    ensure_identity_key(certs / "identity")
    secret_file = workdir / "session-secrets"
    if not secret_file.exists():
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48) + "\n")
    idp_key, idp_cert = ensure_keys(certs)
    listen = f"{urlsplit(gateway_url).hostname}:{urlsplit(gateway_url).port or 80}"
    idp = DevIdPSettings(
        base_url=idp_url, key_pem=idp_key, cert_pem=idp_cert,
        sp_entity_id=f"{gateway_url}/saml/metadata", sp_acs_url=f"{gateway_url}/saml/acs",
        sp_cert_pem=(certs / "sp.crt").read_text(),
    )
    (workdir / "gateway.toml").write_text(
        _CONFIG.format(gateway_url=gateway_url, listen=listen, reader_url=reader_url,
                       member=MEMBER, admin=ADMIN, idp_entity_id=idp.entity_id)
        + extra_config)
    metadata_dir = workdir / "idp_metadata"
    metadata_dir.mkdir(exist_ok=True)
    (metadata_dir / "devidp.xml").write_text(idp_metadata(idp))
    return DemoStack(workdir, load_settings(workdir / "gateway.toml", environ={}), idp,
                     reader_url)


def servers(stack: DemoStack, *,
            jwks_verify: ssl.SSLContext | bool = True) -> list[uvicorn.Server]:
    """Three uvicorn servers (gateway, IdP, reader), not yet started."""
    def server(app: Any, url: str, **options: Any) -> uvicorn.Server:
        parts = urlsplit(url)
        config = uvicorn.Config(app, host=parts.hostname or "127.0.0.1", port=parts.port or 80,
                                log_level="warning", lifespan="auto", **options)
        return uvicorn.Server(config)

    return [
        # X-Forwarded-For only from the configured trusted_proxies (none in the demo), as
        # in `serve`: uvicorn's default would believe any client on loopback.
        server(create_app(stack.settings), stack.gateway_url,
               **stack.settings.proxy_header_options,
               **uvicorn_options(stack.settings.server, stack.settings.websocket)),
        server(create_idp_app(stack.idp), stack.idp.base_url),
        server(create_reader(gateway_url=stack.gateway_url, jwks_verify=jwks_verify,
                             data_dir=stack.workdir / "reader"), stack.reader_url),
    ]


async def serve(stack: DemoStack) -> None:
    await asyncio.gather(*(s.serve() for s in servers(stack)))
