"""Read AuthnRequests that arrive over the HTTP-Redirect binding, and check their signatures.

The redirect binding signs the query string, not the XML: the signed octets are
``SAMLRequest=…&RelayState=…&SigAlg=…`` with each value exactly as it was URL-encoded
by the sender (SAML bindings §3.4.4.1). Decoding and re-encoding would break signatures
from senders that encode differently (lower-case hex, ``%20`` for space), so the values
are taken from the raw query string and never re-encoded.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote_plus

import xmlsec
from lxml import etree
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C
from onelogin.saml2.utils import OneLogin_Saml2_Utils
from onelogin.saml2.xml_utils import OneLogin_Saml2_XML

ALLOWED_SIG_ALGS: Final = frozenset({C.RSA_SHA256, C.RSA_SHA384, C.RSA_SHA512})
MAX_ENCODED_REQUEST: Final = 64 * 1024
MAX_INFLATED_REQUEST: Final = 256 * 1024


class AuthnRequestError(ValueError):
    """The AuthnRequest cannot be read; the message says why, in words fit for a 400 page."""


@dataclass(frozen=True)
class AuthnRequestInfo:
    id: str
    issuer: str
    acs_url: str | None
    issue_instant: str
    destination: str | None = None
    protocol_binding: str | None = None
    force_authn: bool = False
    is_passive: bool = False
    #: RequestedAuthnContext's AuthnContextClassRefs (empty: the SP asked for none).
    requested_contexts: tuple[str, ...] = ()
    comparison: str = "exact"


def parse_redirect_query(query_string_raw: str) -> dict[str, str]:
    """Split a raw query string into ``{name: raw value}`` without decoding the values.

    A repeated parameter raises :class:`AuthnRequestError`: which copy was signed and which
    one would be used is exactly the ambiguity a signature-wrapping attack needs.
    """
    params: dict[str, str] = {}
    for part in query_string_raw.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        name = unquote_plus(name)
        if name in params:
            raise AuthnRequestError(f"The parameter {name} appears more than once.")
        params[name] = value
    return params


def verify_redirect_signature(
    query_string_raw: str, sp_cert_pem: str, kind: str = "SAMLRequest"
) -> bool:
    """True if the raw query carries a valid RSA-SHA256/384/512 signature by ``sp_cert_pem``.

    ``kind`` names the message parameter: ``SAMLRequest`` or ``SAMLResponse``.

    SHA-1 and unknown algorithms, a missing or malformed signature, and repeated
    parameters all give False.
    """
    try:
        params = parse_redirect_query(query_string_raw)
    except AuthnRequestError:
        return False
    if kind not in params or "SigAlg" not in params or "Signature" not in params:
        return False
    algorithm = unquote_plus(params["SigAlg"])
    if algorithm not in ALLOWED_SIG_ALGS:
        return False
    try:
        signature = base64.b64decode(unquote_plus(params["Signature"]), validate=True)
    except (binascii.Error, ValueError):
        return False
    signed = "&".join(
        f"{name}={params[name]}" for name in (kind, "RelayState", "SigAlg") if name in params
    )
    try:
        return bool(
            OneLogin_Saml2_Utils.validate_binary_sign(
                signed, signature, sp_cert_pem, algorithm=algorithm
            )
        )
    except (xmlsec.Error, ValueError, TypeError):
        return False


def inflate(saml_request_b64_deflated: str) -> bytes:
    """base64, then raw DEFLATE, within the size limits (Redirect binding)."""
    if len(saml_request_b64_deflated) > MAX_ENCODED_REQUEST:
        raise AuthnRequestError("The SAMLRequest is too large.")
    try:
        deflated = base64.b64decode(saml_request_b64_deflated, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AuthnRequestError("The SAMLRequest is not valid base64.") from exc
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        xml = inflater.decompress(deflated, MAX_INFLATED_REQUEST)
    except zlib.error as exc:
        raise AuthnRequestError("The SAMLRequest is not DEFLATE-compressed.") from exc
    if inflater.unconsumed_tail:
        raise AuthnRequestError("The SAMLRequest inflates to more than we accept.")
    return xml


def parse_authn_request(saml_request_b64_deflated: str) -> AuthnRequestInfo:
    """Decode (base64, then raw DEFLATE), schema-validate and read an AuthnRequest.

    The argument is the *decoded* value of the ``SAMLRequest`` parameter. This checks
    form only; whether the request is signed and whom it comes from is the caller's job.
    """
    xml = inflate(saml_request_b64_deflated)
    try:
        # onelogin's parser refuses DTDs and entities (no XXE, no billion laughs).
        root = OneLogin_Saml2_XML.to_etree(xml)
    except Exception as exc:  # lxml and defusedxml-style errors have no common base
        raise AuthnRequestError("The SAMLRequest is not well-formed XML.") from exc
    if root.tag != f"{{{C.NS_SAMLP}}}AuthnRequest":
        raise AuthnRequestError(f"Expected an AuthnRequest, got {etree.QName(root).localname}.")
    if not isinstance(
        OneLogin_Saml2_XML.validate_xml(root, "saml-schema-protocol-2.0.xsd"), etree._Element
    ):
        raise AuthnRequestError("The AuthnRequest does not conform to the SAML 2.0 schema.")
    if root.get("Version") != "2.0":
        raise AuthnRequestError("The AuthnRequest is not SAML version 2.0.")
    issuer = root.find(f"{{{C.NS_SAML}}}Issuer")
    if issuer is None or not (issuer.text or "").strip():
        raise AuthnRequestError("The AuthnRequest has no Issuer.")
    requested = root.find(f"{{{C.NS_SAMLP}}}RequestedAuthnContext")
    refs = [] if requested is None else requested.findall(f"{{{C.NS_SAML}}}AuthnContextClassRef")
    contexts = tuple((ref.text or "").strip() for ref in refs)
    return AuthnRequestInfo(
        id=root.get("ID", ""),
        issuer=(issuer.text or "").strip(),
        acs_url=root.get("AssertionConsumerServiceURL"),
        issue_instant=root.get("IssueInstant", ""),
        destination=root.get("Destination"),
        protocol_binding=root.get("ProtocolBinding"),
        force_authn=root.get("ForceAuthn") in ("true", "1"),
        is_passive=root.get("IsPassive") in ("true", "1"),
        requested_contexts=contexts,
        comparison="exact" if requested is None else requested.get("Comparison", "exact"),
    )
