"""The forging toolkit for tests: the package's toolkit plus what only tests need.

The toolkit itself (``Forge``, the tree operations, the ``ATTACKS`` registry) lives in
``gateway.selftest`` so that ``sso-gateway selftest`` ships it; it is re-exported here.
What stays here: ``forge_for_demo`` (the dev IdP's own key, read from the demo's work
directory), the httpx helpers that start a login and post to the ACS (``begin``,
``acs``), and a look into the SQLite replay cache.
"""

from __future__ import annotations

import base64
import re
import sqlite3
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from lxml import etree

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
    "Forge", "Pending", "VendorShape", "acs", "assertion_of", "attribute_value", "begin",
    "consumed_assertion_ids", "encode", "evil_copy", "forge_attack", "forge_for_demo",
    "make_evil", "now_id", "parse", "shaped_response", "shift_times", "signature_of", "unsign",
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


# -- Responses shaped as IdP products send them ----------------------------------------------

XS = "http://www.w3.org/2001/XMLSchema"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
ENTITY_FORMAT = "urn:oasis:names:tc:SAML:2.0:nameid-format:entity"


@dataclass(frozen=True)
class VendorShape:
    """How one IdP product shapes a Response by default: the attribute names it releases
    (Alice's values under them), their NameFormat, typed values, the NameID, which parts
    it signs, the namespace prefixes it writes and a few attributes of its own."""

    attributes: Mapping[str, Sequence[str]]
    name_id: str
    name_id_format: str
    sign_assertion: bool
    sign_response: bool
    name_format: str | None = None  # on every Attribute; None: left out
    typed_values: bool = False  # xsi:type="xs:string" on every AttributeValue
    protocol_prefix: str = "samlp"
    assertion_prefix: str = "saml"  # "": the assertion namespace as the default namespace
    issuer_format: bool = False  # Format="…:entity" on both Issuers
    response_attributes: Mapping[str, str] = field(default_factory=dict)


def _typed(assertion: Any) -> None:
    for value in list(assertion.iterfind(".//saml:Attribute/saml:AttributeValue", NS)):
        typed = etree.Element(value.tag, nsmap={"xs": XS, "xsi": XSI})
        typed.set(f"{{{XSI}}}type", "xs:string")
        typed.text = value.text
        value.addprevious(typed)
        value.getparent().remove(value)


def _prefixed(xml: str, shape: VendorShape) -> str:
    """The same document with the vendor's namespace prefixes (before anything is signed)."""
    def rename(match: re.Match[str]) -> str:
        lead, protocol = match.group(1), match.group(2)
        prefix = shape.protocol_prefix if protocol else shape.assertion_prefix
        if lead == "xmlns:":
            return f"xmlns:{prefix}=" if prefix else "xmlns="
        return f"{lead}{prefix}:" if prefix else lead
    return re.sub(r"(</?|xmlns:)saml(p?)(?:[:=])", rename, xml)


def shaped_response(forge: Forge, shape: VendorShape, request_id: str | None,
                    **changes: Any) -> str:
    """A Response for ``request_id`` as ``shape`` describes it, signed by ``forge``'s key;
    ``changes`` go to ``build_response``."""
    root = forge.valid(request_id, attributes={k: list(v) for k, v in shape.attributes.items()},
                       name_id=shape.name_id, name_id_format=shape.name_id_format,
                       sign_assertion=False, sign_response=False, **changes)
    for name, value in shape.response_attributes.items():
        root.set(name, value)
    assertion = assertion_of(root)
    for attribute in assertion.iterfind(".//saml:Attribute", NS):
        attribute.attrib.pop("NameFormat", None)
        if shape.name_format is not None:
            attribute.set("NameFormat", shape.name_format)
    if shape.typed_values:
        _typed(assertion)
    if shape.issuer_format:
        for issuer in root.iterfind(".//saml:Issuer", NS):
            issuer.set("Format", ENTITY_FORMAT)
    root = parse(_prefixed(etree.tostring(root, encoding="unicode"), shape))
    if shape.sign_assertion:
        assertion = assertion_of(root)
        root.replace(assertion, forge.sign(assertion))
    if shape.sign_response:
        root = forge.sign(root)
    return str(etree.tostring(root, encoding="unicode"))
