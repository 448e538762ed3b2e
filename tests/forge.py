"""The forging toolkit for tests: the package's toolkit plus what only tests need.

The toolkit itself (``Forge``, the tree operations, the ``ATTACKS`` registry) lives in
``gateway.selftest`` so that ``sso-gateway selftest`` ships it; it is re-exported here.
What stays here: ``forge_for_demo`` (the dev IdP's own key, read from the demo's work
directory), the httpx helpers that start a login and post to the ACS (``begin``,
``acs``), and a look into the SQLite replay cache.
"""

from __future__ import annotations

import base64
import sqlite3
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx

from gateway.demo.stack import DemoStack
from gateway.devidp.response import new_id
from gateway.selftest.attacks import ATTACKS, Attack, forge_attack
from gateway.selftest.forge import (
    ALICE,
    ATTACKER,
    DS,
    NS,
    SAML,
    SAMLP,
    VICTIM,
    Forge,
    assertion_of,
    attribute_value,
    encode,
    evil_copy,
    make_evil,
    parse,
    shift_times,
    signature_of,
    unsign,
)

__all__ = [
    "ALICE", "ATTACKER", "ATTACKS", "DS", "NS", "PAGE", "SAML", "SAMLP", "VICTIM", "Attack",
    "Forge", "Pending", "acs", "assertion_of", "attribute_value", "begin",
    "consumed_assertion_ids", "encode", "evil_copy", "forge_attack", "forge_for_demo",
    "make_evil", "now_id", "parse", "shift_times", "signature_of", "unsign",
]

PAGE = "/issues/2023-03/pages/14"


def forge_for_demo(demo: DemoStack, *, idp_entity_id: str | None = None) -> Forge:
    """A ``Forge`` that signs as the demo's dev IdP and addresses its gateway."""
    certs = demo.workdir / "certs"
    return Forge(
        idp_entity_id=idp_entity_id or demo.idp.entity_id,
        key_pem=(certs / "devidp-key.pem").read_text(),
        cert_pem=(certs / "devidp-cert.pem").read_text(),
        acs_url=demo.settings.public_url + "/saml/acs",
        sp_entity_id=demo.settings.sp_entity_id,
    )


# -- Talking to a running stack -------------------------------------------------------------


@dataclass
class Pending:
    request_id: str
    relay_state: str


def begin(http: httpx.Client, gateway_url: str, idp_entity_id: str,
          next_path: str = PAGE) -> Pending:
    """Start a login in this browser; return the AuthnRequest ID and RelayState."""
    answer = http.get(gateway_url + "/saml/login", params={"next": next_path,
                                                           "idp": idp_entity_id})
    assert answer.status_code == 302, answer.text
    query = parse_qs(urlsplit(answer.headers["location"]).query)
    xml = zlib.decompress(base64.b64decode(query["SAMLRequest"][0]), -15)
    return Pending(parse(xml).get("ID"), query["RelayState"][0])


def acs(http: httpx.Client, gateway_url: str, saml_response: str,
        relay_state: str) -> httpx.Response:
    return http.post(gateway_url + "/saml/acs",
                     data={"SAMLResponse": saml_response, "RelayState": relay_state})


def consumed_assertion_ids(db: Path) -> set[str]:
    """Assertion IDs in the replay cache (the SQLite store's ``once`` table)."""
    with sqlite3.connect(db) as conn:
        keys = [row[0] for row in conn.execute("SELECT key FROM once WHERE key LIKE 'assertion:%'")]
    return {key.rsplit(":", 1)[1] for key in keys}


def now_id() -> str:
    """An Assertion ID for one test (unique, valid NCName)."""
    return f"_t{int(time.time() * 1000)}{new_id()[1:12]}"
