"""Build and sign SAML 2.0 Responses; read and verify HTTP-Redirect AuthnRequests.

Pure functions, no HTTP: the dev IdP's endpoints use them, and so do tests that need
to forge hostile responses (every part of the Response is a keyword argument).

Signing goes through ``OneLogin_Saml2_Utils.add_sign`` (RSA-SHA256, SHA-256 digest,
exclusive c14n). ``add_sign`` puts the signature after the *first* ``saml:Issuer`` of
the document it is given, so the Assertion is signed as a document of its own and only
then placed into the Response; the Response (if signed) is signed last, so that its
signature covers the already signed Assertion.

With ``encrypt_to`` (the SP's certificate, PEM) the signed Assertion is encrypted to
that certificate and sent as an ``EncryptedAssertion``: AES-256-GCM content (or
AES-128-CBC, ``encryption="aes128-cbc"``) under a fresh session key, the key wrapped
with RSA-OAEP, as python3-saml's ``generate_name_id`` does it for NameIDs.
"""

from __future__ import annotations

import secrets
import time
from typing import Final

import xmlsec
from lxml import etree
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C
from onelogin.saml2.utils import OneLogin_Saml2_Utils

from gateway.devidp.authn_request import (
    AuthnRequestError,
    AuthnRequestInfo,
    parse_authn_request,
    parse_redirect_query,
    verify_redirect_signature,
)
from gateway.devidp.users import ATTRNAME_FORMAT_BASIC

__all__ = [
    "AuthnRequestError",
    "AuthnRequestInfo",
    "build_response",
    "build_status_response",
    "new_id",
    "parse_authn_request",
    "parse_redirect_query",
    "saml_time",
    "verify_redirect_signature",
]

SAMLP: Final = C.NS_SAMLP
SAML: Final = C.NS_SAML
_NSMAP: Final = {"samlp": SAMLP, "saml": SAML}
PASSWORD_PROTECTED_TRANSPORT: Final[str] = C.AC_PASSWORD_PROTECTED
STATUS_SUCCESS: Final = C.STATUS_SUCCESS
STATUS_RESPONDER: Final = C.STATUS_RESPONDER
NO_PASSIVE: Final = C.STATUS_NO_PASSIVE
NO_AUTHN_CONTEXT: Final = "urn:oasis:names:tc:SAML:2.0:status:NoAuthnContext"
#: The REFEDS Multi-Factor Authentication profile's context class.
REFEDS_MFA: Final = "https://refeds.org/profile/mfa"
BEARER: Final = C.CM_BEARER
XENC: Final = "http://www.w3.org/2001/04/xmlenc#"
CONTENT_CIPHERS: Final = {"aes256-gcm": (xmlsec.constants.TransformAes256Gcm, 256),
                          "aes128-cbc": (xmlsec.constants.TransformAes128Cbc, 128)}


def new_id() -> str:
    """A fresh SAML ID: an NCName (it must not start with a digit) with 160 random bits."""
    return "_" + secrets.token_hex(20)


def saml_time(timestamp: float) -> str:
    """``xs:dateTime`` in UTC, whole seconds, as SAML peers expect."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _el(
    parent: etree._Element, ns: str, tag: str, text: str | None = None, **attrs: str
) -> etree._Element:
    child = etree.SubElement(parent, f"{{{ns}}}{tag}", attrib=attrs)
    if text is not None:
        child.text = text
    return child


def _sign(element: etree._Element, key_pem: str, cert_pem: str) -> etree._Element:
    signed = OneLogin_Saml2_Utils.add_sign(
        etree.tostring(element),
        key_pem,
        cert_pem,
        sign_algorithm=C.RSA_SHA256,
        digest_algorithm=C.SHA256,
    )
    # add_sign's own output, re-read without DTDs, entities or network access.
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    return etree.fromstring(signed, parser)


def encrypt_assertion(assertion: etree._Element, cert_pem: str,
                      encryption: str = "aes256-gcm") -> etree._Element:
    """``saml:EncryptedAssertion`` holding ``assertion`` encrypted to ``cert_pem``."""
    transform, bits = CONTENT_CIPHERS[encryption]
    manager = xmlsec.KeysManager()
    manager.add_key(xmlsec.Key.from_memory(cert_pem, xmlsec.constants.KeyDataFormatCertPem, None))
    template = xmlsec.template.encrypted_data_create(
        assertion, transform, type=xmlsec.constants.TypeEncElement, ns="xenc")
    xmlsec.template.encrypted_data_ensure_cipher_value(template)
    key_info = xmlsec.template.encrypted_data_ensure_key_info(template, ns="ds")
    encrypted_key = xmlsec.template.add_encrypted_key(key_info, xmlsec.constants.TransformRsaOaep)
    xmlsec.template.encrypted_data_ensure_cipher_value(encrypted_key)
    context = xmlsec.EncryptionContext(manager)
    context.key = xmlsec.Key.generate(xmlsec.constants.KeyDataAes, bits,
                                      xmlsec.constants.KeyDataTypeSession)
    encrypted = context.encrypt_xml(template, assertion)
    wrapper = etree.Element(f"{{{SAML}}}EncryptedAssertion", nsmap={"saml": SAML})
    wrapper.append(encrypted)
    return wrapper


def _assertion(
    *,
    assertion_id: str,
    issuer: str,
    now: float,
    lifetime: int,
    name_id: str,
    name_id_format: str,
    recipient: str,
    in_response_to: str | None,
    audience: str,
    session_index: str,
    session_not_on_or_after: float | None,
    authn_instant: float,
    attributes: dict[str, list[str]],
    authn_context: str = PASSWORD_PROTECTED_TRANSPORT,
) -> etree._Element:
    root = etree.Element(
        f"{{{SAML}}}Assertion",
        nsmap={"saml": SAML},
        attrib={"ID": assertion_id, "Version": "2.0", "IssueInstant": saml_time(now)},
    )
    _el(root, SAML, "Issuer", issuer)
    subject = _el(root, SAML, "Subject")
    _el(subject, SAML, "NameID", name_id, Format=name_id_format)
    confirmation = _el(subject, SAML, "SubjectConfirmation", Method=BEARER)
    data = {"NotOnOrAfter": saml_time(now + lifetime), "Recipient": recipient}
    if in_response_to is not None:
        data["InResponseTo"] = in_response_to
    _el(confirmation, SAML, "SubjectConfirmationData", **data)
    conditions = _el(
        root, SAML, "Conditions", NotBefore=saml_time(now), NotOnOrAfter=saml_time(now + lifetime)
    )
    _el(_el(conditions, SAML, "AudienceRestriction"), SAML, "Audience", audience)
    authn = {"AuthnInstant": saml_time(authn_instant), "SessionIndex": session_index}
    if session_not_on_or_after is not None:
        authn["SessionNotOnOrAfter"] = saml_time(session_not_on_or_after)
    statement = _el(root, SAML, "AuthnStatement", **authn)
    context = _el(statement, SAML, "AuthnContext")
    _el(context, SAML, "AuthnContextClassRef", authn_context)
    if attributes:
        attribute_statement = _el(root, SAML, "AttributeStatement")
        for name, values in attributes.items():
            attribute = _el(
                attribute_statement, SAML, "Attribute", Name=name, NameFormat=ATTRNAME_FORMAT_BASIC
            )
            for value in values:
                _el(attribute, SAML, "AttributeValue", value)
    return root


def build_response(
    *,
    idp_entity_id: str,
    key_pem: str,
    cert_pem: str,
    acs_url: str,
    sp_entity_id: str,
    in_response_to: str | None,
    name_id: str,
    name_id_format: str,
    attributes: dict[str, list[str]],
    session_index: str,
    now: float | None = None,
    lifetime: int = 300,
    assertion_id: str | None = None,
    response_id: str | None = None,
    sign_assertion: bool = True,
    sign_response: bool = False,
    audience: str | None = None,
    destination: str | None = None,
    recipient: str | None = None,
    session_not_on_or_after: float | None = None,
    authn_instant: float | None = None,
    encrypt_to: str | None = None,
    encryption: str = "aes256-gcm",
    authn_context: str = PASSWORD_PROTECTED_TRANSPORT,
) -> str:
    """Return a SAML Response (XML text) carrying one Assertion, signed as asked.

    ``now`` defaults to the current time; the Assertion is valid from ``now`` (NotBefore)
    until ``now + lifetime`` (Conditions and SubjectConfirmationData NotOnOrAfter).
    ``audience``, ``destination`` and ``recipient`` default to the honest values so that a
    forging test overrides only the one it attacks. ``authn_instant`` (when the user
    actually typed a password; default ``now``) differs from ``now`` for single sign-on
    through an existing IdP session. ``encrypt_to`` (a PEM certificate) sends the signed
    Assertion encrypted to it. ``authn_context`` is the AuthnContextClassRef.
    """
    now = time.time() if now is None else now
    assertion = _assertion(
        assertion_id=assertion_id or new_id(),
        issuer=idp_entity_id,
        now=now,
        lifetime=lifetime,
        name_id=name_id,
        name_id_format=name_id_format,
        recipient=acs_url if recipient is None else recipient,
        in_response_to=in_response_to,
        audience=sp_entity_id if audience is None else audience,
        session_index=session_index,
        session_not_on_or_after=session_not_on_or_after,
        authn_instant=now if authn_instant is None else authn_instant,
        attributes=attributes,
        authn_context=authn_context,
    )
    if sign_assertion:
        assertion = _sign(assertion, key_pem, cert_pem)

    attrs = {
        "ID": response_id or new_id(),
        "Version": "2.0",
        "IssueInstant": saml_time(now),
        "Destination": acs_url if destination is None else destination,
    }
    if in_response_to is not None:
        attrs["InResponseTo"] = in_response_to
    response = etree.Element(f"{{{SAMLP}}}Response", nsmap=_NSMAP, attrib=attrs)
    _el(response, SAML, "Issuer", idp_entity_id)
    status = _el(response, SAMLP, "Status")
    _el(status, SAMLP, "StatusCode", Value=STATUS_SUCCESS)
    if encrypt_to is not None:
        # encrypt_xml replaces the element in its tree: give it a document of its own.
        assertion = encrypt_assertion(etree.fromstring(etree.tostring(assertion)), encrypt_to,
                                      encryption)
    response.append(assertion)
    if sign_response:
        response = _sign(response, key_pem, cert_pem)
    xml: str = etree.tostring(response, encoding="unicode")
    return xml


def build_status_response(*, idp_entity_id: str, acs_url: str, in_response_to: str,
                          sub_status: str, message: str = "", now: float | None = None,
                          response_id: str | None = None) -> str:
    """A Response without an Assertion that refuses the request: top-level status
    ``Responder`` with ``sub_status`` (e.g. ``NO_PASSIVE``, ``NO_AUTHN_CONTEXT``). Unsigned,
    as most IdPs send their refusals: it grants nothing."""
    now = time.time() if now is None else now
    response = etree.Element(f"{{{SAMLP}}}Response", nsmap=_NSMAP, attrib={
        "ID": response_id or new_id(), "Version": "2.0", "IssueInstant": saml_time(now),
        "Destination": acs_url, "InResponseTo": in_response_to})
    _el(response, SAML, "Issuer", idp_entity_id)
    status = _el(response, SAMLP, "Status")
    top = _el(status, SAMLP, "StatusCode", Value=STATUS_RESPONDER)
    _el(top, SAMLP, "StatusCode", Value=sub_status)
    if message:
        _el(status, SAMLP, "StatusMessage", message)
    xml: str = etree.tostring(response, encoding="unicode")
    return xml
