"""Build, sign and read SAML logout messages for the dev IdP (and for forging tests).

Pure functions, no HTTP, like ``response.py``: every field is a keyword argument so a
hostile test overrides only the one it attacks. Redirect-binding messages are DEFLATEd,
base64-encoded and signed over ``SAMLxxx=…&RelayState=…&SigAlg=…`` (SAML bindings
§3.4.4.1); POST-binding messages carry an enveloped XML signature instead.
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote_plus

import xmlsec
from lxml import etree
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C
from onelogin.saml2.utils import OneLogin_Saml2_Utils
from onelogin.saml2.xml_utils import OneLogin_Saml2_XML

from gateway.devidp.authn_request import AuthnRequestError, inflate
from gateway.devidp.response import SAML, SAMLP, new_id, saml_time

__all__ = [
    "LogoutMessage",
    "build_logout_request",
    "build_logout_response",
    "read_logout_message",
    "redirect_query",
    "sign_enveloped",
]

_NSMAP: Final = {"samlp": SAMLP, "saml": SAML}
_ALGORITHMS: Final = {
    C.RSA_SHA256: xmlsec.constants.TransformRsaSha256,
    C.RSA_SHA384: xmlsec.constants.TransformRsaSha384,
    C.RSA_SHA512: xmlsec.constants.TransformRsaSha512,
    C.RSA_SHA1: xmlsec.constants.TransformRsaSha1,  # only so that tests can forge SHA-1
}


@dataclass(frozen=True)
class LogoutMessage:
    """What the dev IdP reads from a LogoutRequest or LogoutResponse (form checks only)."""

    kind: str  # "LogoutRequest" or "LogoutResponse"
    id: str
    issuer: str
    destination: str | None
    name_id: str = ""
    session_indexes: tuple[str, ...] = ()
    in_response_to: str | None = None
    status: str | None = None


def build_logout_request(
    *,
    issuer: str,
    destination: str | None,
    name_id: str,
    name_id_format: str | None,
    session_indexes: tuple[str, ...] = (),
    now: float,
    lifetime: int | None = 300,
    request_id: str | None = None,
) -> str:
    """A LogoutRequest (XML text). ``lifetime`` None leaves NotOnOrAfter out."""
    attrs = {"ID": request_id or new_id(), "Version": "2.0", "IssueInstant": saml_time(now)}
    if destination is not None:
        attrs["Destination"] = destination
    if lifetime is not None:
        attrs["NotOnOrAfter"] = saml_time(now + lifetime)
    root = etree.Element(f"{{{SAMLP}}}LogoutRequest", nsmap=_NSMAP, attrib=attrs)
    etree.SubElement(root, f"{{{SAML}}}Issuer").text = issuer
    name = etree.SubElement(root, f"{{{SAML}}}NameID")
    if name_id_format:
        name.set("Format", name_id_format)
    name.text = name_id
    for index in session_indexes:
        etree.SubElement(root, f"{{{SAMLP}}}SessionIndex").text = index
    xml: str = etree.tostring(root, encoding="unicode")
    return xml


def build_logout_response(
    *,
    issuer: str,
    destination: str | None,
    in_response_to: str | None,
    now: float,
    status: str = C.STATUS_SUCCESS,
    response_id: str | None = None,
) -> str:
    """A LogoutResponse (XML text)."""
    attrs = {"ID": response_id or new_id(), "Version": "2.0", "IssueInstant": saml_time(now)}
    if destination is not None:
        attrs["Destination"] = destination
    if in_response_to is not None:
        attrs["InResponseTo"] = in_response_to
    root = etree.Element(f"{{{SAMLP}}}LogoutResponse", nsmap=_NSMAP, attrib=attrs)
    etree.SubElement(root, f"{{{SAML}}}Issuer").text = issuer
    code = etree.SubElement(etree.SubElement(root, f"{{{SAMLP}}}Status"), f"{{{SAMLP}}}StatusCode")
    code.set("Value", status)
    xml: str = etree.tostring(root, encoding="unicode")
    return xml


def sign_enveloped(xml: str, key_pem: str, cert_pem: str) -> str:
    """``xml`` with an enveloped signature of its root, after the Issuer (POST binding)."""
    signed = OneLogin_Saml2_Utils.add_sign(
        xml, key_pem, cert_pem, sign_algorithm=C.RSA_SHA256, digest_algorithm=C.SHA256
    )
    return signed.decode() if isinstance(signed, bytes) else str(signed)


def redirect_query(
    kind: str,
    xml: str,
    *,
    key_pem: str | None,
    relay_state: str | None = None,
    sig_alg: str = C.RSA_SHA256,
) -> str:
    """The HTTP-Redirect query for a message (``kind``: SAMLRequest or SAMLResponse).

    ``key_pem`` None gives an unsigned query.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = compressor.compress(xml.encode()) + compressor.flush()
    parts = [f"{kind}={quote_plus(base64.b64encode(deflated).decode())}"]
    if relay_state is not None:
        parts.append(f"RelayState={quote_plus(relay_state)}")
    if key_pem is None:
        return "&".join(parts)
    parts.append(f"SigAlg={quote_plus(sig_alg)}")
    signed = "&".join(parts)
    signature = OneLogin_Saml2_Utils.sign_binary(signed, key_pem, _ALGORITHMS[sig_alg])
    return f"{signed}&Signature={quote_plus(base64.b64encode(signature).decode())}"


def read_logout_message(value: str, *, deflated: bool) -> LogoutMessage:
    """Decode and read a LogoutRequest or LogoutResponse (the decoded parameter value)."""
    if deflated:
        xml = inflate(value)
    else:
        try:
            xml = base64.b64decode(value, validate=True)
        except ValueError as exc:
            raise AuthnRequestError("The message is not valid base64.") from exc
    try:
        root = OneLogin_Saml2_XML.to_etree(xml)
    except Exception as exc:  # lxml and the parser's DTD/entity refusals
        raise AuthnRequestError("The message is not well-formed XML.") from exc
    kind = etree.QName(root).localname
    if etree.QName(root).namespace != SAMLP or kind not in ("LogoutRequest", "LogoutResponse"):
        raise AuthnRequestError(f"Expected a logout message, got {kind}.")
    if not isinstance(
        OneLogin_Saml2_XML.validate_xml(root, "saml-schema-protocol-2.0.xsd"), etree._Element
    ):
        raise AuthnRequestError(f"The {kind} does not conform to the SAML 2.0 schema.")
    issuer = root.find(f"{{{SAML}}}Issuer")
    code = root.find(f"{{{SAMLP}}}Status/{{{SAMLP}}}StatusCode")
    return LogoutMessage(
        kind=kind,
        id=root.get("ID", ""),
        issuer=(issuer.text or "").strip() if issuer is not None else "",
        destination=root.get("Destination"),
        name_id=(root.findtext(f"{{{SAML}}}NameID") or "").strip(),
        session_indexes=tuple(
            (e.text or "").strip() for e in root.findall(f"{{{SAMLP}}}SessionIndex")
        ),
        in_response_to=root.get("InResponseTo"),
        status=code.get("Value") if code is not None else None,
    )
