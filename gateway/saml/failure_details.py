"""The values behind a refused login, for ``sso-gateway explain``.

Checks of our own raise ``LoginFailed`` with the values they compared. python3-saml
only says which check failed; for its refusals the values are read here from the
refused document (decrypted when it could be), so the explanation can show both sides:
the certificates in the message's KeyInfo and those in our metadata, the Audience,
Destination or InResponseTo seen and expected, the measured clock offset.

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
from gateway.saml.structure import parser

_NS = C.NSMAP
_KEYINFO_CERTS = ".//ds:Signature/ds:KeyInfo/ds:X509Data/ds:X509Certificate"


def add_details(exc: LoginFailed, *, xml: bytes, response: Any, idp: IdP, sp_entity_id: str,
                acs_url: str, request_id: str | None, now: float) -> None:
    """Fill in ``exc.details`` (keeping what the raising check already put there)."""
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
        details.setdefault("certificates_expected",
                           ", ".join(fingerprint(c) for c in idp.signing_certs))
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


def _parse(xml: bytes) -> Any:
    try:
        return etree.fromstring(xml, parser())
    except etree.XMLSyntaxError:
        return None
