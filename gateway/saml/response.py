"""Validating a SAML Response: the library's verdict, then the checks it leaves to us.

python3-saml (strict) checks schema, signatures, times, a *present* audience, issuers
and SubjectConfirmation. What it leaves to the application, and what is done here on
the library's own parsed and validated document:

- InResponseTo must be present and equal the request ID we issued (the library skips
  the comparison when the attribute is absent);
- the Response Issuer must be present (the library only checks it when there is one)
  and, like the Assertion Issuer, equal the IdP's entity ID;
- at least one AudienceRestriction, and every Audience equal to our entity ID exactly
  (the library accepts an assertion without any, and treats several restrictions as
  alternatives instead of requiring each one);
- Destination present and equal the ACS URL exactly (the library accepts a missing
  Destination and any URL that starts with ours), and every bearer
  SubjectConfirmationData's Recipient equal to it too (the library: substring);
- exactly one Assertion, with an ID, and it is the one the signature reference points at;
- every bearer SubjectConfirmationData carries NotOnOrAfter (the library accepts one
  without, so an assertion could be confirmable forever) and InResponseTo equal to our
  request ID (the library compares it only when present, so a genuine assertion issued
  without it could be re-wrapped into a Response answering another request);
- the Response's and the Assertion's IssueInstant are no older than ``max_issue_age``
  plus the library's clock drift, and not in the future beyond that drift (the library
  never looks at IssueInstant).

The library's error codes are turned into short ``kind`` labels; reasons never quote
the message (values taken from it are escaped and truncated).
"""

from __future__ import annotations

import hmac
from typing import Any

from onelogin.saml2.auth import OneLogin_Saml2_Auth
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C
from onelogin.saml2.response import OneLogin_Saml2_Response
from onelogin.saml2.utils import OneLogin_Saml2_Utils, OneLogin_Saml2_ValidationError
from onelogin.saml2.xml_utils import OneLogin_Saml2_XML

from gateway.errors import LoginFailed

_NS = C.NSMAP
_E = OneLogin_Saml2_ValidationError
_ENTITY_FORMAT = "urn:oasis:names:tc:SAML:2.0:nameid-format:entity"
MAX_ISSUE_AGE = 300.0  # seconds; the library's ALLOWED_CLOCK_DRIFT comes on top

_KINDS: dict[int, str] = {
    _E.STATUS_CODE_IS_NOT_SUCCESS: "status",
    _E.WRONG_INRESPONSETO: "in_response_to",
    _E.ASSERTION_EXPIRED: "expired",
    _E.SESSION_EXPIRED: "expired",
    _E.RESPONSE_EXPIRED: "expired",
    _E.ASSERTION_TOO_EARLY: "not_yet_valid",
    _E.WRONG_SUBJECTCONFIRMATION: "subject_confirmation",
    _E.WRONG_DESTINATION: "destination",
    _E.EMPTY_DESTINATION: "destination",
    _E.WRONG_AUDIENCE: "audience",
    _E.SP_NAME_QUALIFIER_NAME_MISMATCH: "audience",
    _E.ISSUER_MULTIPLE_IN_RESPONSE: "issuer",
    _E.ISSUER_NOT_FOUND_IN_ASSERTION: "issuer",
    _E.WRONG_ISSUER: "issuer",
    _E.DUPLICATED_ATTRIBUTE_NAME_FOUND: "attributes",
    _E.ENCRYPTED_ATTRIBUTES: "attributes",
    _E.AUTHN_CONTEXT_MISMATCH: "authn_context",
    **dict.fromkeys(
        (
            _E.WRONG_SIGNED_ELEMENT,
            _E.ID_NOT_FOUND_IN_SIGNED_ELEMENT,
            _E.DUPLICATED_ID_IN_SIGNED_ELEMENTS,
            _E.INVALID_SIGNED_ELEMENT,
            _E.DUPLICATED_REFERENCE_IN_SIGNED_ELEMENTS,
            _E.UNEXPECTED_SIGNED_ELEMENTS,
            _E.WRONG_NUMBER_OF_SIGNATURES_IN_RESPONSE,
            _E.WRONG_NUMBER_OF_SIGNATURES_IN_ASSERTION,
            _E.WRONG_NUMBER_OF_SIGNATURES,
            _E.NO_SIGNED_MESSAGE,
            _E.NO_SIGNED_ASSERTION,
            _E.NO_SIGNATURE_FOUND,
            _E.INVALID_SIGNATURE,
            _E.DEPRECATED_SIGNATURE_METHOD,
            _E.DEPRECATED_DIGEST_METHOD,
        ),
        "signature",
    ),
}


def kind_for(code: int | None) -> str:
    """The ``LoginFailed.kind`` for a python3-saml validation error code."""
    return _KINDS.get(code, "malformed") if code is not None else "malformed"


def clean(text: object, limit: int = 300) -> str:
    """A value from a message, made safe for one log line: escaped and truncated."""
    escaped = str(text).encode("unicode_escape", "backslashreplace").decode("ascii")
    return escaped if len(escaped) <= limit else escaped[:limit] + "…"


class _Response(OneLogin_Saml2_Response):  # type: ignore[misc]
    """Remembers the validation error *code*, which ``Auth`` would otherwise discard."""

    error_code: int | None = None

    def is_valid(
        self, request_data: dict[str, Any], request_id: str | None = None,
        raise_exceptions: bool = False,
    ) -> bool:
        try:
            return bool(super().is_valid(request_data, request_id, raise_exceptions=True))
        except OneLogin_Saml2_ValidationError as exc:
            self.error_code = exc.code
            if raise_exceptions:
                raise
            return False
        except Exception:
            if raise_exceptions:
                raise
            return False


class Auth(OneLogin_Saml2_Auth):  # type: ignore[misc]
    """``OneLogin_Saml2_Auth`` that keeps the Response object it validated."""

    response: _Response | None = None

    def response_class(self, settings: Any, saml_response: str) -> _Response:
        # The base class calls ``self.response_class(settings, SAMLResponse)``.
        self.response = _Response(settings, saml_response)
        return self.response


def check_response(
    auth: Auth, *, request_id: str, idp_entity_id: str, sp_entity_id: str, acs_url: str,
    now: float, max_issue_age: float = MAX_ISSUE_AGE,
) -> Any:
    """The application's checks on a Response the library accepted; returns the Assertion."""
    response = auth.response
    if response is None:  # pragma: no cover - process_response always builds one
        raise LoginFailed("malformed", "python3-saml accepted a response it did not parse.")
    document = response.document
    where = f"The SAML response from IdP {clean(idp_entity_id)}"

    in_response_to = auth.get_last_response_in_response_to()
    if not in_response_to:
        raise LoginFailed(
            "in_response_to",
            f"{where} has no InResponseTo: it is unsolicited and this login expected an answer "
            "to a request of ours.",
        )
    if not hmac.compare_digest(in_response_to.encode(), request_id.encode()):
        raise LoginFailed(
            "in_response_to",
            f"{where} answers request {clean(in_response_to, 80)}, not the outstanding "
            f"request {clean(request_id, 80)}.",
        )

    destination = document.get("Destination")
    if destination != acs_url:
        shown = "no Destination" if destination is None else f"Destination {clean(destination)}"
        raise LoginFailed("destination", f"{where} has {shown}; expected exactly {acs_url}.")

    issuers = OneLogin_Saml2_XML.query(document, "/samlp:Response/saml:Issuer")
    _check_issuer(issuers, "Response", where, idp_entity_id)

    decrypted = response.get_xml_document()
    if len(OneLogin_Saml2_XML.query(decrypted, "//saml:Assertion")) != 1:
        raise LoginFailed("malformed", f"{where} does not contain exactly one Assertion.")
    assertions = OneLogin_Saml2_XML.query(decrypted, "/samlp:Response/saml:Assertion")
    assertion_id = auth.get_last_assertion_id()
    if len(assertions) != 1 or not assertion_id or assertions[0].get("ID") != assertion_id:
        raise LoginFailed(
            "malformed", f"{where} has no Assertion ID or its Assertion is not the signed one."
        )
    assertion = assertions[0]
    _check_issuer(assertion.findall("saml:Issuer", _NS), "Assertion", where, idp_entity_id)
    _check_audience(assertion, where, sp_entity_id)
    _check_subject_confirmations(assertion, where, request_id, acs_url)
    _check_issue_instant(document, "Response", where, now, max_issue_age)
    _check_issue_instant(assertion, "Assertion", where, now, max_issue_age)
    return assertion


def _check_issue_instant(element: Any, name: str, where: str, now: float, max_age: float) -> None:
    value = element.get("IssueInstant")
    try:
        issued = saml_time(value)
    except Exception:
        issued = None
    if issued is None:
        raise LoginFailed("malformed", f"{where} has no readable {name} IssueInstant.")
    drift = C.ALLOWED_CLOCK_DRIFT
    if issued < now - max_age - drift:
        raise LoginFailed(
            "expired", f"{where} has a {name} issued {int(now - issued)} s ago "
            f"(at most {int(max_age)} s, plus {drift} s clock drift)."
        )
    if issued > now + drift:
        raise LoginFailed("not_yet_valid", f"{where} has a {name} issued in the future.")


def _check_issuer(nodes: list[Any], element: str, where: str, idp_entity_id: str) -> None:
    if len(nodes) != 1:
        raise LoginFailed("issuer", f"{where} has {len(nodes)} {element} Issuer elements, not 1.")
    value = OneLogin_Saml2_XML.element_text(nodes[0])
    if value != idp_entity_id:
        raise LoginFailed(
            "issuer", f"{where} has {element} Issuer {clean(value)}, not the IdP's entity ID."
        )
    fmt = nodes[0].get("Format")
    if fmt is not None and fmt != _ENTITY_FORMAT:
        raise LoginFailed("issuer", f"{where} has an {element} Issuer of format {clean(fmt)}.")


def _check_audience(assertion: Any, where: str, sp_entity_id: str) -> None:
    restrictions = assertion.findall("saml:Conditions/saml:AudienceRestriction", _NS)
    if not restrictions:
        raise LoginFailed("audience", f"{where} has no AudienceRestriction.")
    for restriction in restrictions:
        audiences = [
            OneLogin_Saml2_XML.element_text(a) for a in restriction.findall("saml:Audience", _NS)
        ]
        if not audiences or any(a != sp_entity_id for a in audiences):
            shown = ", ".join(clean(a, 120) for a in audiences) or "none"
            raise LoginFailed(
                "audience", f"{where} is for audience {shown}, not exactly {sp_entity_id}."
            )


def _check_subject_confirmations(assertion: Any, where: str, request_id: str, acs: str) -> None:
    for confirmation in assertion.findall("saml:Subject/saml:SubjectConfirmation", _NS):
        if confirmation.get("Method", C.CM_BEARER) != C.CM_BEARER:
            continue  # the library ignores these too; only bearer confirms a browser login
        for data in confirmation.findall("saml:SubjectConfirmationData", _NS):
            if not data.get("NotOnOrAfter"):
                raise LoginFailed(
                    "subject_confirmation",
                    f"{where} has a bearer SubjectConfirmationData without NotOnOrAfter.",
                )
            recipient = data.get("Recipient")
            if recipient != acs:
                raise LoginFailed(
                    "destination",
                    f"{where} has SubjectConfirmationData Recipient "
                    f"{clean(recipient)}; expected exactly {acs}.",
                )
            irt = data.get("InResponseTo")
            if irt is None or not hmac.compare_digest(irt.encode(), request_id.encode()):
                shown = "no InResponseTo" if irt is None else "an InResponseTo that differs"
                raise LoginFailed(
                    "in_response_to",
                    f"{where} has a SubjectConfirmationData with {shown} from the request.",
                )


def saml_time(value: str | None) -> float | None:
    """Parse an ``xs:dateTime`` the way the library does; None when absent."""
    if not value:
        return None
    return float(OneLogin_Saml2_Utils.parse_SAML_to_time(value))
