"""The forging toolkit: one valid, freshly signed Response, then one attack at a time.

``Forge`` builds the honest Response the dev IdP would send (its own key, read from the
demo's work directory, RSA-SHA256 and SHA-256, signed now). Every attack in ``ATTACKS``
is a function on that Response's lxml tree, so the only difference between a forgery
and a valid login is the attack itself. Where an attack needs the IdP to have signed
something odd (an expired assertion, no audience, an unusual transform), the Assertion
is changed and re-signed with the IdP's real key: that is the strongest attacker, one
that got the IdP to sign it, and what is refused then is refused for the attack alone.

Each ``Attack`` says what the gateway must answer (``kind``: the ``LoginFailed`` label)
and whether python3-saml on its own would accept it (``library_accepts``: a gap the
gateway closes itself); tests check both, so a library upgrade that changes either
shows up.

Also used by ``test_login_hostile``'s helpers (``begin``, ``acs``) and the attack suite.
"""

from __future__ import annotations

import base64
import copy
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import xmlsec
from lxml import etree
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C
from onelogin.saml2.utils import OneLogin_Saml2_Utils

from gateway.demo.stack import DemoStack
from gateway.devidp.response import build_response, new_id, saml_time
from gateway.devidp.users import NAMEID_PERSISTENT
from gateway.keys import generate_self_signed

NS = {"samlp": C.NS_SAMLP, "saml": C.NS_SAML, "ds": C.NS_DS}
SAML = f"{{{C.NS_SAML}}}"
SAMLP = f"{{{C.NS_SAMLP}}}"
DS = f"{{{C.NS_DS}}}"
PAGE = "/issues/2023-03/pages/14"
ATTACKER = "M1001"  # Alice, a real member, is the attacker …
VICTIM = "M1004"  # … and wants to be this one
ALICE: dict[str, list[str]] = {
    "memberId": [ATTACKER], "mail": ["alice@members.example.org"],
    "displayName": ["Alice Archer"], "memberStatus": ["active"],
    "eduPersonEntitlement": ["urn:mace:example.org:entitlement:member"],
}
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

    @classmethod
    def for_demo(cls, demo: DemoStack, *, idp_entity_id: str | None = None) -> Forge:
        certs = demo.workdir / "certs"
        return cls(
            idp_entity_id=idp_entity_id or demo.idp.entity_id,
            key_pem=(certs / "devidp-key.pem").read_text(),
            cert_pem=(certs / "devidp-cert.pem").read_text(),
            acs_url=demo.settings.public_url + "/saml/acs",
            sp_entity_id=demo.settings.sp_entity_id,
        )

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

    def sign_with(self, element: Any, *, c14n: Any = xmlsec.Transform.EXCL_C14N,
                  transforms: Sequence[Any] = (xmlsec.Transform.ENVELOPED,
                                               xmlsec.Transform.EXCL_C14N),
                  method: Any = xmlsec.Transform.RSA_SHA256,
                  digest: Any = xmlsec.Transform.SHA256,
                  extra_reference: Any = None, xpath: str | None = None) -> Any:
        """Sign ``element`` with the IdP's key through xmlsec with a chosen recipe (what an
        odd or compromised IdP could produce: the attacker cannot, the library decides)."""
        template = xmlsec.template.create(element, c14n, method)
        issuer = element.find("saml:Issuer", NS)
        element.insert(element.index(issuer) + 1, template)
        reference = xmlsec.template.add_reference(template, digest, uri="#" + element.get("ID"))
        for transform in transforms:
            node = xmlsec.template.add_transform(reference, transform)
            if transform == xmlsec.Transform.XPATH and xpath is not None:
                etree.SubElement(node, DS + "XPath").text = xpath
        if extra_reference is not None:
            extra = xmlsec.template.add_reference(template, extra_reference,
                                                  uri="#" + element.get("ID"))
            xmlsec.template.add_transform(extra, xmlsec.Transform.ENVELOPED)
            xmlsec.template.add_transform(extra, xmlsec.Transform.EXCL_C14N)
        xmlsec.template.add_x509_data(xmlsec.template.ensure_key_info(template))
        context = xmlsec.SignatureContext()
        key = xmlsec.Key.from_memory(self.key_pem, xmlsec.KeyFormat.PEM, None)
        key.load_cert_from_memory(self.cert_pem, xmlsec.KeyFormat.PEM)
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
    """Turn an Assertion (or everything under a Response) into the victim's."""
    for value in element.iterfind(".//saml:Attribute[@Name='memberId']/saml:AttributeValue", NS):
        value.text = VICTIM
    for value in element.iterfind(".//saml:Attribute[@Name='mail']/saml:AttributeValue", NS):
        value.text = "victim@members.example.org"
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


# -- The attacks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    """``apply(forge, valid_root)`` returns the forged message (tree or raw bytes)."""

    apply: Callable[[Forge, Any], Any]
    kind: str  # the LoginFailed kind the gateway answers with
    library_accepts: bool = False  # python3-saml alone would let it through: our check closes it
    base: Mapping[str, Any] = field(default_factory=dict)  # build_response options of the base
    from_valid: bool = True  # carries the valid Assertion's ID (replay-cache check applies)


def _xsw_response(inside_signature: bool) -> Callable[[Forge, Any], Any]:
    """XSW1/XSW2: evil Response; the signed original (its signature removed) is moved into
    (1) or before (2) the Response signature, which still references the original ID."""
    def apply(forge: Forge, root: Any) -> Any:
        original = unsign(copy.deepcopy(root))
        make_evil(root)
        root.set("ID", "_evil-response")
        signature = signature_of(root)
        if inside_signature:
            signature.append(original)
        else:
            signature.addprevious(original)
        return root
    return apply


def xsw3(forge: Forge, root: Any) -> Any:
    assertion = assertion_of(root)
    assertion.addprevious(evil_copy(assertion))
    return root


def xsw4(forge: Forge, root: Any) -> Any:
    assertion = assertion_of(root)
    evil = evil_copy(assertion)
    root.append(evil)
    evil.append(assertion)
    return root


def xsw5(forge: Forge, root: Any) -> Any:
    assertion = assertion_of(root)
    clean = unsign(copy.deepcopy(assertion))
    make_evil(assertion).set("ID", "_evil-assertion")
    root.append(clean)
    return root


def xsw6(forge: Forge, root: Any) -> Any:
    assertion = assertion_of(root)
    clean = unsign(copy.deepcopy(assertion))
    make_evil(assertion).set("ID", "_evil-assertion")
    signature_of(assertion).append(clean)
    return root


def xsw7(forge: Forge, root: Any) -> Any:
    assertion = assertion_of(root)
    extensions = etree.Element("Extensions")  # no namespace, as SAML Raider makes it
    assertion.addprevious(extensions)
    extensions.append(evil_copy(assertion, new_id=None))
    return root


def xsw8(forge: Forge, root: Any) -> Any:
    assertion = assertion_of(root)
    clean = unsign(copy.deepcopy(assertion))
    make_evil(assertion)
    holder = etree.SubElement(signature_of(assertion), "Object")  # no namespace
    holder.append(clean)
    return root


def evil_in_extensions(forge: Forge, root: Any) -> Any:
    """Schema-valid: samlp:Extensions (any foreign namespace allowed) carries a twin."""
    assertion = assertion_of(root)
    extensions = etree.Element(SAMLP + "Extensions")
    root.find("saml:Issuer", NS).addnext(extensions)
    extensions.append(evil_copy(assertion))
    return root


def genuine_in_advice(forge: Forge, root: Any) -> Any:
    """Schema-valid: an evil Assertion whose saml:Advice holds the genuine signed one."""
    assertion = assertion_of(root)
    evil = evil_copy(assertion)
    advice = etree.Element(SAML + "Advice")
    evil.find("saml:Conditions", NS).addnext(advice)
    assertion.addprevious(evil)
    advice.append(assertion)
    return root


def evil_in_ds_object(forge: Forge, root: Any) -> Any:
    """Schema-valid: a ds:Object in the genuine Assertion's signature carries a twin
    (outside the enveloped signature's digest, so the signature still verifies)."""
    assertion = assertion_of(root)
    holder = etree.SubElement(signature_of(assertion), DS + "Object")
    holder.append(evil_copy(assertion))
    return root


def strip_assertion_signature(forge: Forge, root: Any) -> Any:
    unsign(assertion_of(root))
    return root


def strip_all_signatures(forge: Forge, root: Any) -> Any:
    unsign(assertion_of(root))
    unsign(root)
    return make_evil(root)


def attacker_key_in_keyinfo(forge: Forge, root: Any) -> Any:
    """Evil Assertion and Response re-signed with the attacker's key; add_sign puts the
    attacker's certificate in KeyInfo, hoping the SP trusts what the message brings."""
    key, cert = _attacker()
    forge.resign_assertion(root, make_evil, key_pem=key, cert_pem=cert)
    return forge.sign(root, key_pem=key, cert_pem=cert)


def _attacker() -> tuple[str, str]:
    global _ATTACKER_KEYS
    if _ATTACKER_KEYS is None:
        _ATTACKER_KEYS = generate_self_signed("attacker")
    return _ATTACKER_KEYS


_ATTACKER_KEYS: tuple[str, str] | None = None


def rsa_sha1(forge: Forge, root: Any) -> Any:
    return forge.resign_assertion(root, sign_algorithm=C.RSA_SHA1, digest_algorithm=C.SHA256)


def sha1_digest(forge: Forge, root: Any) -> Any:
    return forge.resign_assertion(root, sign_algorithm=C.RSA_SHA256, digest_algorithm=C.SHA1)


def _signed_with(**recipe: Any) -> Callable[[Forge, Any], Any]:
    def apply(forge: Forge, root: Any) -> Any:
        assertion = unsign(assertion_of(root))
        forge.sign_with(assertion, **recipe)
        return root
    return apply


def duplicate_signed_info(forge: Forge, root: Any) -> Any:
    signature = signature_of(assertion_of(root))
    evil_info = copy.deepcopy(signature.find("ds:SignedInfo", NS))
    signature.find("ds:SignedInfo", NS).addnext(evil_info)
    return root


def _comment_in(name: str) -> Callable[[Forge, Any], Any]:
    """The IdP signed ``M10011``/``alice-persistent-id``; the attacker splits the signed
    text with a comment (c14n drops comments, so the signature still verifies) hoping a
    reader takes only the first text node: ``M1001`` / ``alice-persistent``."""
    def apply(forge: Forge, root: Any) -> Any:
        assertion = assertion_of(root)
        if name == "NameID":
            node = assertion.find("saml:Subject/saml:NameID", NS)
        else:
            node = attribute_value(assertion, name)
        text = node.text
        node.text = text[:-1] if name == "memberId" else text[:-3]
        comment = etree.Comment("")
        comment.tail = text[-1:] if name == "memberId" else text[-3:]
        node.append(comment)
        return root
    return apply


def rewrap(forge: Forge, root: Any) -> Any:
    """A genuine signed Assertion issued for *another* request, in a fresh unsigned
    Response that answers the attacker's request."""
    irt = root.get("InResponseTo")
    genuine = forge.valid("_another-request", assertion_id=assertion_of(root).get("ID"))
    genuine.set("InResponseTo", irt)
    genuine.set("ID", new_id())
    return genuine


def rewrap_without_scd_irt(forge: Forge, root: Any) -> Any:
    """The same, with a genuine Assertion whose SubjectConfirmationData has no InResponseTo
    (as IdPs issue for unsolicited logins): the library never compares it."""
    irt = root.get("InResponseTo")
    genuine = forge.valid(None, assertion_id=assertion_of(root).get("ID"))
    genuine.set("InResponseTo", irt)
    return genuine


def _mutated(mutate: Callable[[Any], None]) -> Callable[[Forge, Any], Any]:
    """The IdP (its real key) signed an Assertion changed by ``mutate``."""
    def apply(forge: Forge, root: Any) -> Any:
        return forge.resign_assertion(root, mutate)
    return apply


def _drop_audience(assertion: Any) -> None:
    conditions = assertion.find("saml:Conditions", NS)
    conditions.remove(conditions.find("saml:AudienceRestriction", NS))


def _scd(assertion: Any) -> Any:
    return assertion.find("saml:Subject/saml:SubjectConfirmation/saml:SubjectConfirmationData",
                          NS)


def _drop_scd_not_on_or_after(assertion: Any) -> None:
    del _scd(assertion).attrib["NotOnOrAfter"]


def _unbounded(assertion: Any) -> None:
    _drop_scd_not_on_or_after(assertion)
    del assertion.find("saml:Conditions", NS).attrib["NotOnOrAfter"]


def _recipient_contains_acs(forge: Forge) -> Callable[[Any], None]:
    def mutate(assertion: Any) -> None:
        _scd(assertion).set("Recipient", "https://evil.example/collect?" + forge.acs_url)
    return mutate


def _duplicate_attribute(assertion: Any) -> None:
    statement = assertion.find("saml:AttributeStatement", NS)
    twin = copy.deepcopy(statement.find("saml:Attribute[@Name='memberId']", NS))
    twin.find("saml:AttributeValue", NS).text = VICTIM
    statement.append(twin)


def _duplicate_attribute_statement(assertion: Any) -> None:
    statement = assertion.find("saml:AttributeStatement", NS)
    second = etree.SubElement(assertion, SAML + "AttributeStatement")
    twin = copy.deepcopy(statement.find("saml:Attribute[@Name='memberId']", NS))
    twin.find("saml:AttributeValue", NS).text = VICTIM
    second.append(twin)


def _times(seconds: float) -> Callable[[Forge, Any], Any]:
    def apply(forge: Forge, root: Any) -> Any:
        shift_times(root, seconds, ("IssueInstant",))
        return forge.resign_assertion(root, lambda a: shift_times(a, seconds))
    return apply


def stale_issue_instant(forge: Forge, root: Any) -> Any:
    """Issued 20 minutes ago, still inside a (long) validity window: the library never
    looks at IssueInstant."""
    shift_times(root, -1200, ("IssueInstant",))
    return forge.resign_assertion(
        root, lambda a: shift_times(a, -1200, ("IssueInstant", "NotBefore", "AuthnInstant")))


def destination_prefix(forge: Forge, root: Any) -> Any:
    root.set("Destination", forge.acs_url + ".evil.example/acs")
    return root




def _xml_text(root: Any) -> str:
    return etree.tostring(root, encoding="unicode")


def xxe(forge: Forge, root: Any) -> bytes:
    text = _xml_text(root).replace("alice-persistent-id", "&xxe;", 1)
    return ('<?xml version="1.0"?><!DOCTYPE samlp:Response '
            '[<!ENTITY xxe SYSTEM "file:///etc/passwd">]>' + text).encode()


def billion_laughs(forge: Forge, root: Any) -> bytes:
    entities = '<!ENTITY lol "lol">' + "".join(
        f'<!ENTITY lol{i} "{("&lol%s;" % (i - 1 if i > 1 else "")) * 10}">' for i in range(1, 10))
    text = _xml_text(root).replace("alice-persistent-id", "&lol9;", 1)
    return f"<?xml version=\"1.0\"?><!DOCTYPE samlp:Response [{entities}]>{text}".encode()


def bare_doctype(forge: Forge, root: Any) -> bytes:
    return ("<!DOCTYPE samlp:Response>" + _xml_text(root)).encode()


def doctype_in_utf16(forge: Forge, root: Any) -> bytes:
    """A DOCTYPE that a byte-level search for ``<!DOCTYPE`` does not see."""
    text = '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE samlp:Response>' + _xml_text(root)
    return text.encode("utf-16")


ATTACKS: dict[str, Attack] = {
    # XML Signature Wrapping, as SAML Raider names the shapes
    "XSW1": Attack(_xsw_response(inside_signature=True), "malformed",
                   base={"sign_response": True}),
    "XSW2": Attack(_xsw_response(inside_signature=False), "malformed",
                   base={"sign_response": True}),
    "XSW3": Attack(xsw3, "malformed"),
    "XSW4": Attack(xsw4, "malformed"),
    "XSW5": Attack(xsw5, "malformed"),
    "XSW6": Attack(xsw6, "malformed"),
    "XSW7": Attack(xsw7, "malformed"),
    "XSW8": Attack(xsw8, "malformed"),
    "evil-assertion-in-Extensions": Attack(evil_in_extensions, "malformed"),
    "genuine-assertion-in-Advice-of-evil": Attack(genuine_in_advice, "malformed"),
    "evil-assertion-in-ds-Object": Attack(evil_in_ds_object, "malformed"),
    # signatures
    "assertion-signature-removed": Attack(strip_assertion_signature, "signature"),
    "all-signatures-removed": Attack(strip_all_signatures, "signature",
                                     base={"sign_response": True}),
    "only-response-signed": Attack(lambda f, r: r, "signature",
                                   base={"sign_assertion": False, "sign_response": True}),
    "attacker-key-with-cert-in-KeyInfo": Attack(attacker_key_in_keyinfo, "signature"),
    "RSA-SHA1-signature": Attack(rsa_sha1, "signature"),
    "SHA1-digest": Attack(sha1_digest, "signature"),
    "c14n-with-comments-transform": Attack(
        _signed_with(transforms=(xmlsec.Transform.ENVELOPED,
                                 xmlsec.Transform.EXCL_C14N_COMMENTS)),
        "signature", library_accepts=True),
    "inclusive-c14n-SignedInfo": Attack(_signed_with(c14n=xmlsec.Transform.C14N_COMMENTS),
                                        "signature", library_accepts=True),
    "XPath-transform": Attack(
        _signed_with(transforms=(xmlsec.Transform.ENVELOPED, xmlsec.Transform.XPATH,
                                 xmlsec.Transform.EXCL_C14N), xpath="true()"),
        "signature", library_accepts=True),
    "second-Reference-with-SHA1": Attack(_signed_with(extra_reference=xmlsec.Transform.SHA1),
                                         "signature", library_accepts=True),
    "duplicate-SignedInfo": Attack(duplicate_signed_info, "signature"),
    # reading the signed text differently
    "comment-in-NameID": Attack(_comment_in("NameID"), "malformed", library_accepts=True),
    "comment-in-memberId": Attack(_comment_in("memberId"), "malformed", library_accepts=True,
                                  base={"attributes": {**ALICE, "memberId": ["M10011"]}}),
    # the Response around a genuine Assertion
    "rewrapped-assertion-of-another-request": Attack(rewrap, "subject_confirmation"),
    "rewrapped-assertion-without-SCD-InResponseTo": Attack(
        rewrap_without_scd_irt, "in_response_to", library_accepts=True),
    "missing-Audience": Attack(_mutated(_drop_audience), "audience", library_accepts=True),
    "Destination-starting-with-ACS-URL": Attack(destination_prefix, "destination",
                                                library_accepts=True),
    "Recipient-containing-ACS-URL": Attack(
        lambda f, r: f.resign_assertion(r, _recipient_contains_acs(f)), "destination",
        library_accepts=True),
    # time
    "expired": Attack(_times(-3600), "expired"),
    "not-yet-valid": Attack(_times(3600), "not_yet_valid"),
    "SCD-without-NotOnOrAfter": Attack(_mutated(_drop_scd_not_on_or_after),
                                       "subject_confirmation", library_accepts=True),
    "unbounded-no-NotOnOrAfter": Attack(_mutated(_unbounded), "subject_confirmation",
                                        library_accepts=True),
    "stale-IssueInstant": Attack(stale_issue_instant, "expired", library_accepts=True,
                                 base={"lifetime": 3600}),
    # attributes
    "duplicate-attribute": Attack(_mutated(_duplicate_attribute), "attributes"),
    "duplicate-attribute-in-second-statement": Attack(
        _mutated(_duplicate_attribute_statement), "attributes"),
    # XML parsing
    "XXE": Attack(xxe, "malformed"),
    "billion-laughs": Attack(billion_laughs, "malformed"),
    "bare-DOCTYPE": Attack(bare_doctype, "malformed"),
    "DOCTYPE-in-UTF-16": Attack(doctype_in_utf16, "malformed"),
}


def forge_attack(forge: Forge, name: str, request_id: str, assertion_id: str) -> Any:
    """The named attack applied to a fresh valid Response for ``request_id``."""
    attack = ATTACKS[name]
    root = forge.valid(request_id, assertion_id=assertion_id, **attack.base)
    return attack.apply(forge, root)


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
    import sqlite3

    with sqlite3.connect(db) as conn:
        keys = [row[0] for row in conn.execute("SELECT key FROM once WHERE key LIKE 'assertion:%'")]
    return {key.rsplit(":", 1)[1] for key in keys}


def now_id() -> str:
    """An Assertion ID for one test (unique, valid NCName)."""
    return f"_t{int(time.time() * 1000)}{new_id()[1:12]}"
