"""The attack registry: every forgery the attack suite and ``sso-gateway selftest`` know.

Each ``Attack`` says what the gateway must answer (``kind``: the ``LoginFailed`` label)
and whether python3-saml on its own would accept it (``library_accepts``: a gap the
gateway closes itself); the tests check both, so a library upgrade that changes either
shows up. ``forge_attack`` applies one to a fresh valid Response.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import xmlsec
from lxml import etree

from gateway.devidp.response import new_id
from gateway.selftest.forge import (
    ALICE,
    NS,
    SAML,
    VICTIM,
    Forge,
    assertion_of,
    attribute_value,
    shift_times,
)
from gateway.selftest.wrapping import (
    assertion_out_of_signed_response,
    attacker_key_in_keyinfo,
    duplicate_signed_info,
    evil_beside_signed_response,
    evil_in_ds_object,
    evil_in_extensions,
    genuine_in_advice,
    response_signature_into_assertion,
    response_signature_on_assertion_id,
    response_signed_by_attacker,
    response_signed_with,
    rsa_sha1,
    sha1_digest,
    signed_response_in_extensions,
    signed_with,
    strip_all_signatures,
    strip_assertion_signature,
    tamper_signed_response,
    xsw3,
    xsw4,
    xsw5,
    xsw6,
    xsw7,
    xsw8,
    xsw_response,
)


@dataclass(frozen=True)
class Attack:
    """``apply(forge, valid_root)`` returns the forged message (tree or raw bytes)."""

    apply: Callable[[Forge, Any], Any]
    kind: str  # the LoginFailed kind the gateway answers with
    library_accepts: bool = False  # python3-saml alone would let it through: our check closes it
    base: Mapping[str, Any] = field(default_factory=dict)  # build_response options of the base
    from_valid: bool = True  # carries the valid Assertion's ID (replay-cache check applies)


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


def _element_in_member_id(assertion: Any) -> None:
    """The IdP signed ``M10<b/>01`` (an element splitting the text): a reader that takes
    the element's first text node reads ``M10``."""
    value = attribute_value(assertion, "memberId")
    value.text = "M10"
    etree.SubElement(value, "b").tail = "01"


def rewrap(forge: Forge, root: Any) -> Any:
    """A genuine signed Assertion issued for *another* request, in a fresh unsigned
    Response that answers the attacker's request."""
    irt = root.get("InResponseTo")
    genuine = forge.valid("_another-request", assertion_id=assertion_of(root).get("ID"))
    genuine.set("InResponseTo", irt)
    genuine.set("ID", new_id())
    return genuine


def rewrap_signed_response(forge: Forge, root: Any) -> Any:
    """A genuine Response signed as a whole, issued for another request of the same
    browser session, posted to answer this one."""
    return forge.valid("_another-request", assertion_id=assertion_of(root).get("ID"),
                       sign_assertion=False, sign_response=True)


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
    return str(etree.tostring(root, encoding="unicode"))


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


X = xmlsec.constants  # transform and algorithm identifiers
#: The base of the attacks on a Response signed as a whole over an unsigned Assertion.
RESPONSE_SIGNED: Mapping[str, Any] = {"sign_assertion": False, "sign_response": True}

ATTACKS: dict[str, Attack] = {
    # XML Signature Wrapping, as SAML Raider names the shapes
    "XSW1": Attack(xsw_response(inside_signature=True), "malformed",
                   base={"sign_response": True}),
    "XSW2": Attack(xsw_response(inside_signature=False), "malformed",
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
    "attacker-key-with-cert-in-KeyInfo": Attack(attacker_key_in_keyinfo, "signature"),
    "RSA-SHA1-signature": Attack(rsa_sha1, "signature"),
    "SHA1-digest": Attack(sha1_digest, "signature"),
    "c14n-with-comments-transform": Attack(
        signed_with(transforms=(X.TransformEnveloped,
                                 X.TransformExclC14NWithComments)),
        "signature", library_accepts=True),
    "inclusive-c14n-SignedInfo": Attack(signed_with(c14n=X.TransformInclC14NWithComments),
                                        "signature", library_accepts=True),
    "XPath-transform": Attack(
        signed_with(transforms=(X.TransformEnveloped, X.TransformXPath,
                                 X.TransformExclC14N), xpath="true()"),
        "signature", library_accepts=True),
    "second-Reference-with-SHA1": Attack(signed_with(extra_reference=X.TransformSha1),
                                         "signature", library_accepts=True),
    "duplicate-SignedInfo": Attack(duplicate_signed_info, "signature"),
    # the same attacker against a Response signed as a whole over an unsigned Assertion
    # (Keycloak's default shape, accepted with signed_response = "accept")
    "signed-Response: XSW1": Attack(xsw_response(inside_signature=True), "malformed",
                                    base=RESPONSE_SIGNED),
    "signed-Response: XSW2": Attack(xsw_response(inside_signature=False), "malformed",
                                    base=RESPONSE_SIGNED),
    "signed-Response: Assertion edited": Attack(tamper_signed_response, "signature",
                                                base=RESPONSE_SIGNED),
    "signed-Response: evil Assertion beside it": Attack(
        evil_beside_signed_response, "malformed", base=RESPONSE_SIGNED),
    "signed-Response: whole, in Extensions of an evil one": Attack(
        signed_response_in_extensions, "malformed", base=RESPONSE_SIGNED),
    "signed-Response: its signature moved into the Assertion": Attack(
        response_signature_into_assertion, "signature", base=RESPONSE_SIGNED),
    "signed-Response: signature removed": Attack(
        assertion_out_of_signed_response, "signature", base=RESPONSE_SIGNED),
    "signed-Response: attacker key, certificate in KeyInfo": Attack(
        response_signed_by_attacker, "signature", base=RESPONSE_SIGNED),
    "signed-Response: Reference to the Assertion, not the Response": Attack(
        response_signature_on_assertion_id, "signature", base=RESPONSE_SIGNED),
    "signed-Response: XPath transform": Attack(
        response_signed_with(transforms=(X.TransformEnveloped, X.TransformXPath,
                                         X.TransformExclC14N), xpath="true()"),
        "signature", library_accepts=True, base=RESPONSE_SIGNED),
    "signed-Response: c14n-with-comments transform": Attack(
        response_signed_with(transforms=(X.TransformEnveloped,
                                         X.TransformExclC14NWithComments)),
        "signature", library_accepts=True, base=RESPONSE_SIGNED),
    "signed-Response: comment in NameID": Attack(_comment_in("NameID"), "malformed",
                                                 library_accepts=True, base=RESPONSE_SIGNED),
    "signed-Response: genuine, for another request": Attack(
        rewrap_signed_response, "in_response_to", base=RESPONSE_SIGNED),
    # reading the signed text differently
    "comment-in-NameID": Attack(_comment_in("NameID"), "malformed", library_accepts=True),
    "comment-in-memberId": Attack(_comment_in("memberId"), "malformed", library_accepts=True,
                                  base={"attributes": {**ALICE, "memberId": ["M10011"]}}),
    "element-splitting-memberId": Attack(_mutated(_element_in_member_id), "malformed",
                                         library_accepts=True),
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
