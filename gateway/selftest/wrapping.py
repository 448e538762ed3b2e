"""Attacks on the signature: XML Signature Wrapping (as SAML Raider names the shapes), an
Assertion hidden where a careless reader finds it, and signatures removed, replaced or
made with weak or unusual recipes. Each is ``(forge, valid_root) -> forged message``.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import xmlsec
from lxml import etree
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C

from gateway.keys import generate_self_signed
from gateway.selftest.forge import (
    DS,
    NS,
    SAML,
    SAMLP,
    Forge,
    assertion_of,
    evil_copy,
    make_evil,
    signature_of,
    unsign,
)


def xsw_response(inside_signature: bool) -> Callable[[Forge, Any], Any]:
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


@functools.cache
def _attacker() -> tuple[str, str]:
    """One attacker key pair per process (RSA key generation takes a moment)."""
    return generate_self_signed("attacker")


def rsa_sha1(forge: Forge, root: Any) -> Any:
    return forge.resign_assertion(root, sign_algorithm=C.RSA_SHA1, digest_algorithm=C.SHA256)


def sha1_digest(forge: Forge, root: Any) -> Any:
    return forge.resign_assertion(root, sign_algorithm=C.RSA_SHA256, digest_algorithm=C.SHA1)


def signed_with(**recipe: Any) -> Callable[[Forge, Any], Any]:
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


# -- The same attacker against a Response signed as a whole, its Assertion unsigned
#    (Keycloak's default shape, accepted with signed_response = "accept")


def tamper_signed_response(forge: Forge, root: Any) -> Any:
    """The attacker edits the Assertion under the Response signature."""
    make_evil(assertion_of(root))
    return root


def evil_beside_signed_response(forge: Forge, root: Any) -> Any:
    """An evil unsigned twin appended to the signed Response (after its signature)."""
    root.append(evil_copy(assertion_of(root)))
    return root


def signed_response_in_extensions(forge: Forge, root: Any) -> Any:
    """A fresh unsigned Response with no Assertion of its own carries the genuine signed
    Response in samlp:Extensions, hoping a reader takes the one Assertion it finds."""
    genuine = copy.deepcopy(root)
    unsign(root)
    root.remove(assertion_of(root))
    root.set("ID", "_evil-response")
    extensions = etree.Element(SAMLP + "Extensions")
    root.find("saml:Issuer", NS).addnext(extensions)
    extensions.append(genuine)
    return root


def response_signature_into_assertion(forge: Forge, root: Any) -> Any:
    """The Response signature moved into the evil Assertion: a shape that looks like
    "assertion signed", with a Reference that points at the Response."""
    signature = signature_of(root)
    root.remove(signature)
    assertion = make_evil(assertion_of(root))
    assertion.find("saml:Issuer", NS).addnext(signature)
    return root


def assertion_out_of_signed_response(forge: Forge, root: Any) -> Any:
    """The Assertion of a signed Response, made evil, in the same Response unsigned."""
    unsign(root)
    make_evil(assertion_of(root))
    return root


def response_signed_by_attacker(forge: Forge, root: Any) -> Any:
    """Evil Assertion, Response re-signed with the attacker's key (certificate in
    KeyInfo)."""
    key, cert = _attacker()
    make_evil(assertion_of(unsign(root)))
    return forge.sign(root, key_pem=key, cert_pem=cert)


def response_signature_on_assertion_id(forge: Forge, root: Any) -> Any:
    """The IdP's key signed, on the Response, a Reference to the Assertion's ID instead of
    the Response's: nothing of the Response around the Assertion is then covered."""
    unsign(root)
    x = xmlsec.constants
    template = xmlsec.template.create(root, x.TransformExclC14N, x.TransformRsaSha256)
    root.find("saml:Issuer", NS).addnext(template)
    reference = xmlsec.template.add_reference(template, x.TransformSha256,
                                              uri="#" + assertion_of(root).get("ID"))
    xmlsec.template.add_transform(reference, x.TransformExclC14N)
    xmlsec.template.add_x509_data(xmlsec.template.ensure_key_info(template))
    key = xmlsec.Key.from_memory(forge.key_pem, x.KeyDataFormatPem, None)
    key.load_cert_from_memory(forge.cert_pem, x.KeyDataFormatPem)
    context = xmlsec.SignatureContext()
    context.key = key
    xmlsec.tree.add_ids(root, ["ID"])
    context.sign(template)
    return root


def response_signed_with(**recipe: Any) -> Callable[[Forge, Any], Any]:
    """The Response re-signed by the IdP's key with an unusual recipe."""
    def apply(forge: Forge, root: Any) -> Any:
        return forge.sign_with(unsign(root), **recipe)
    return apply
