"""The values behind a refused login, for ``sso-gateway explain``.

Checks of our own raise ``LoginFailed`` with the values they compared. python3-saml
only says which check failed; for its refusals the values are read here from the
refused document (decrypted when it could be), so the explanation can show both sides:
the certificates in the message's KeyInfo and those in our metadata, the Audience,
Destination or InResponseTo seen and expected, the measured clock offset. For a refused
signature: which of the Response and the Assertion arrived signed (the shape), whether
the certificate in the message is one of the IdP's, and the ``signed_response`` setting
that applied, so the advice can tell a shape the gateway was told to refuse from a
signature that does not verify.

Everything read from the message is escaped and truncated (``clean``): it describes a
refused, possibly hostile message and is never trusted for anything else.
"""

from __future__ import annotations

from typing import Any

from lxml import etree
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C

from gateway.errors import LoginFailed
from gateway.saml.clock import explain_times
from gateway.saml.registry import IdP
from gateway.saml.response import clean
from gateway.saml.sp_keys import fingerprint
from gateway.saml.structure import Signed, parser

_NS = C.NSMAP
_KEYINFO_CERTS = ".//ds:Signature/ds:KeyInfo/ds:X509Data/ds:X509Certificate"


def add_details(exc: LoginFailed, *, xml: bytes, response: Any, idp: IdP, sp_entity_id: str,
                acs_url: str, request_id: str | None, now: float,
                signed: Signed | None = None, signed_response: str | None = None) -> None:
    """Fill in ``exc.details`` (keeping what the raising check already put there).
    ``signed``: the shape ``check_structure`` read (None: refused before that);
    ``signed_response``: the IdP's setting for a signed Response over an unsigned
    Assertion."""
    details = exc.details
    details.setdefault("idp", idp.entity_id)
    raw = _parse(xml)
    document = raw
    if response is not None:
        try:
            document = response.get_xml_document()
        except Exception:  # pragma: no cover - the library built it already
            document = raw
    if exc.kind == "signature":
        seen: list[str] = []
        for root in (raw, document):
            for node in root.iterfind(_KEYINFO_CERTS, _NS) if root is not None else ():
                value = fingerprint("".join(node.itertext()))
                if value not in seen:
                    seen.append(value)
        details.setdefault("certificates_seen", ", ".join(seen) or "(none in KeyInfo)")
        expected = [fingerprint(c) for c in idp.signing_certs]
        details.setdefault("certificates_expected", ", ".join(expected))
        details.setdefault("certificate_known",
                           "yes" if any(value in expected for value in seen) else "no")
        details.setdefault("signed", _shape(signed, document))
        if signed_response is not None:
            details.setdefault("signed_response", signed_response)
    if document is None:
        return
    if exc.kind in ("expired", "not_yet_valid") and "offset_seconds" not in details:
        # The library refused with its fixed 300 s drift: report that bound.
        details.update(explain_times(document, now, float(C.ALLOWED_CLOCK_DRIFT)))
    elif exc.kind == "audience" and "audience" not in details:
        audiences = document.iterfind(
            "saml:Assertion/saml:Conditions/saml:AudienceRestriction/saml:Audience", _NS)
        details["audience"] = ", ".join(clean("".join(a.itertext()), 120)
                                        for a in audiences) or "(none)"
        details["expected"] = sp_entity_id
    elif exc.kind == "destination" and "expected" not in details:
        details["destination"] = clean(document.get("Destination") or "(none)")
        details["expected"] = acs_url
    elif exc.kind == "in_response_to" and "expected" not in details:
        details["in_response_to"] = clean(document.get("InResponseTo") or "(none)", 80)
        details["expected"] = request_id or "(none: IdP-initiated)"
    elif exc.kind == "issuer" and "issuer" not in details:
        issuer = document.find("saml:Issuer", _NS)
        details["issuer"] = clean("".join(issuer.itertext()) if issuer is not None else "(none)")
        details["expected"] = idp.entity_id


def _shape(signed: Signed | None, document: Any) -> str:
    """The shape in words; an encrypted Assertion's own signature read after decryption."""
    if signed is None:
        return "(not read: refused before its signatures were looked at)"
    if signed.assertion is None and document is not None:
        assertion = document.find("saml:Assertion", _NS)
        if assertion is not None:
            signed = Signed(signed.response, assertion.find("ds:Signature", _NS) is not None)
    return signed.shape


def _parse(xml: bytes) -> Any:
    try:
        return etree.fromstring(xml, parser())
    except etree.XMLSyntaxError:
        return None
