"""The forging toolkit: one valid, freshly signed Response, then one attack at a time.

``Forge`` builds the honest Response an IdP would send (signed with the key it is given,
RSA-SHA256 and SHA-256, signed now). Every attack in ``gateway.selftest.attacks.ATTACKS``
is a function on that Response's lxml tree, so the only difference between a forgery
and a valid login is the attack itself. Where an attack needs the IdP to have signed
something odd (an expired assertion, no audience, an unusual transform), the Assertion
is changed and re-signed with the IdP's real key: that is the strongest attacker, one
that got the IdP to sign it, and what is refused then is refused for the attack alone.

Part of the package (not only of the tests) so that ``sso-gateway selftest`` can forge
against a live gateway; it needs only lxml, xmlsec, python3-saml and the dev IdP's
Response builder.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import xmlsec
from lxml import etree
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C
from onelogin.saml2.utils import OneLogin_Saml2_Utils

from gateway.devidp.response import build_response, saml_time

NS = {"samlp": C.NS_SAMLP, "saml": C.NS_SAML, "ds": C.NS_DS}
SAML = f"{{{C.NS_SAML}}}"
SAMLP = f"{{{C.NS_SAMLP}}}"
DS = f"{{{C.NS_DS}}}"
NAMEID_PERSISTENT = C.NAMEID_PERSISTENT
ATTACKER = "M1001"  # Alice, a real member, is the attacker …
VICTIM = "M1004"  # … and wants to be this one
ATTACKER_EMAIL = "alice@members.example.org"
VICTIM_EMAIL = "victim@members.example.org"
#: Alice's values for each of the gateway's own attributes.
ALICE_VALUES: dict[str, list[str]] = {
    "member_id": [ATTACKER], "email": [ATTACKER_EMAIL], "display_name": ["Alice Archer"],
    "status": ["active"], "entitlements": ["urn:mace:example.org:entitlement:member"],
}
#: The released names the demo's IdP (and the gateway's defaults) give them.
ALICE: dict[str, list[str]] = {
    "memberId": [ATTACKER], "mail": [ATTACKER_EMAIL],
    "displayName": ["Alice Archer"], "memberStatus": ["active"],
    "eduPersonEntitlement": ["urn:mace:example.org:entitlement:member"],
}


def alice_as(released: Mapping[str, str]) -> dict[str, list[str]]:
    """Alice's attributes under a deployment's released names (gateway attribute →
    released name, e.g. ``member_id`` → ``urn:oid:1.3.6.1.4.1.5923.1.1.1.6``)."""
    return {released[role]: list(values) for role, values in ALICE_VALUES.items()
            if role in released}
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)


def parse(xml: str | bytes) -> Any:
    return etree.fromstring(xml.encode() if isinstance(xml, str) else xml, _PARSER)


def encode(message: Any) -> str:
    """base64 of an lxml tree or of raw bytes/text, as the HTTP-POST binding carries it."""
    if isinstance(message, str):
        message = message.encode()
    elif not isinstance(message, bytes):
        message = etree.tostring(message)
    return base64.b64encode(message).decode()


@dataclass(frozen=True)
class Forge:
    """Everything needed to sign as the IdP and address the gateway."""

    idp_entity_id: str
    key_pem: str
    cert_pem: str
    acs_url: str
    sp_entity_id: str
    attributes: Mapping[str, Sequence[str]] = field(default_factory=lambda: dict(ALICE))

    def xml(self, request_id: str | None, **changes: Any) -> str:
        """The honest Response (assertion signed) with ``build_response`` options changed."""
        options: dict[str, Any] = {
            "idp_entity_id": self.idp_entity_id, "key_pem": self.key_pem,
            "cert_pem": self.cert_pem, "acs_url": self.acs_url,
            "sp_entity_id": self.sp_entity_id, "in_response_to": request_id,
            "name_id": "alice-persistent-id", "name_id_format": NAMEID_PERSISTENT,
            "attributes": {k: list(v) for k, v in self.attributes.items()},
            "session_index": "_s1",
        }
        options.update(changes)
        return build_response(**options)

    def valid(self, request_id: str | None, **changes: Any) -> Any:
        return parse(self.xml(request_id, **changes))

    def sign(self, element: Any, *, key_pem: str | None = None, cert_pem: str | None = None,
             sign_algorithm: str = C.RSA_SHA256, digest_algorithm: str = C.SHA256) -> Any:
        """``element`` signed on its own (enveloped, after its Issuer), as the dev IdP does."""
        signed = OneLogin_Saml2_Utils.add_sign(
            etree.tostring(element), key_pem or self.key_pem, cert_pem or self.cert_pem,
            sign_algorithm=sign_algorithm, digest_algorithm=digest_algorithm)
        return parse(signed)

    def resign_assertion(self, root: Any, mutate: Callable[[Any], None] | None = None,
                         **sign_options: Any) -> Any:
        """Drop the Assertion's signature, apply ``mutate``, sign it again (IdP key unless
        ``key_pem``/``cert_pem`` say otherwise)."""
        assertion = assertion_of(root)
        unsign(assertion)
        if mutate is not None:
            mutate(assertion)
        root.replace(assertion, self.sign(assertion, **sign_options))
        return root

    def sign_with(self, element: Any, *, c14n: Any = xmlsec.constants.TransformExclC14N,
                  transforms: Sequence[Any] = (xmlsec.constants.TransformEnveloped,
                                               xmlsec.constants.TransformExclC14N),
                  method: Any = xmlsec.constants.TransformRsaSha256,
                  digest: Any = xmlsec.constants.TransformSha256,
                  extra_reference: Any = None, xpath: str | None = None) -> Any:
        """Sign ``element`` with the IdP's key through xmlsec with a chosen recipe (what an
        odd or compromised IdP could produce: the attacker cannot, the library decides)."""
        template = xmlsec.template.create(element, c14n, method)
        issuer = element.find("saml:Issuer", NS)
        element.insert(element.index(issuer) + 1, template)
        reference = xmlsec.template.add_reference(template, digest, uri="#" + element.get("ID"))
        for transform in transforms:
            node = xmlsec.template.add_transform(reference, transform)
            if transform == xmlsec.constants.TransformXPath and xpath is not None:
                etree.SubElement(node, DS + "XPath").text = xpath
        if extra_reference is not None:
            extra = xmlsec.template.add_reference(template, extra_reference,
                                                  uri="#" + element.get("ID"))
            xmlsec.template.add_transform(extra, xmlsec.constants.TransformEnveloped)
            xmlsec.template.add_transform(extra, xmlsec.constants.TransformExclC14N)
        xmlsec.template.add_x509_data(xmlsec.template.ensure_key_info(template))
        context = xmlsec.SignatureContext()
        key = xmlsec.Key.from_memory(self.key_pem, xmlsec.constants.KeyDataFormatPem, None)
        key.load_cert_from_memory(self.cert_pem, xmlsec.constants.KeyDataFormatPem)
        context.key = key
        xmlsec.tree.add_ids(element, ["ID"])
        context.sign(template)
        return element


# -- Small tree operations ------------------------------------------------------------------


def assertion_of(root: Any) -> Any:
    found = root.find("saml:Assertion", NS)
    assert found is not None
    return found


def signature_of(element: Any) -> Any:
    found = element.find("ds:Signature", NS)
    assert found is not None
    return found


def unsign(element: Any) -> Any:
    signature = element.find("ds:Signature", NS)
    if signature is not None:
        element.remove(signature)
    return element


def make_evil(element: Any) -> Any:
    """Turn an Assertion (or everything under a Response) into the victim's: Alice's
    member number and address become the victim's, whatever the attributes are called."""
    for value in element.iterfind(".//saml:Attribute/saml:AttributeValue", NS):
        if value.text == ATTACKER:
            value.text = VICTIM
        elif value.text == ATTACKER_EMAIL:
            value.text = VICTIM_EMAIL
    for name_id in element.iterfind(".//saml:Subject/saml:NameID", NS):
        name_id.text = "victim-persistent-id"
    return element


def evil_copy(assertion: Any, new_id: str | None = "_evil-assertion") -> Any:
    evil = make_evil(unsign(copy.deepcopy(assertion)))
    if new_id is not None:
        evil.set("ID", new_id)
    return evil


def shift_times(element: Any, seconds: float,
                names: Sequence[str] = ("IssueInstant", "NotBefore", "NotOnOrAfter",
                                        "AuthnInstant")) -> None:
    for node in element.iter():
        for name in names:
            value = node.get(name) if isinstance(node.tag, str) else None
            if value:
                parsed = OneLogin_Saml2_Utils.parse_SAML_to_time(value)
                node.set(name, saml_time(parsed + seconds))


def attribute_value(assertion: Any, name: str) -> Any:
    return assertion.find(f".//saml:Attribute[@Name='{name}']/saml:AttributeValue", NS)
