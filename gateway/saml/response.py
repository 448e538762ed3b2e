"""Validating a SAML Response: the library's verdict, then the checks it leaves to us.

python3-saml (strict) checks schema, signatures, times, a *present* audience, issuers
and SubjectConfirmation. What it leaves to the application, and what is done here on
the library's own parsed and validated document:

- InResponseTo must be present and equal the request ID we issued (the library skips
  the comparison when the attribute is absent); for an IdP-initiated login (no request
  ID, only for IdPs that opted in) it must be absent, in the SubjectConfirmationData too;
- the Response Issuer must be present (the library only checks it when there is one)
  and, like the Assertion Issuer, equal the IdP's entity ID;
- at least one AudienceRestriction, and every Audience equal to our entity ID exactly
  (the library accepts an assertion without any, and treats several restrictions as
  alternatives instead of requiring each one);
- Destination present and equal the ACS URL exactly (the library accepts a missing
  Destination and any URL that starts with ours), and every bearer
  SubjectConfirmationData's Recipient equal to it too (the library: substring);
- exactly one Assertion, with an ID, and it is the one the signature reference points at;
  an Assertion without a signature of its own only when the IdP's ``signed_response`` is
  "accept" and the library was told to require the Response signature (``by_response``),
  and then only as the child of a Response whose one signature references the Response
  itself (so that signature covers it);
- every bearer SubjectConfirmationData carries NotOnOrAfter (the library accepts one
  without, so an assertion could be confirmable forever) and InResponseTo equal to our
  request ID (the library compares it only when present, so a genuine assertion issued
  without it could be re-wrapped into a Response answering another request);
- the Response's and the Assertion's IssueInstant are no older than ``max_issue_age``
  plus the configured clock skew, and not in the future beyond it (the library never
  looks at IssueInstant); NotBefore/NotOnOrAfter hold within the configured skew
  (``gateway.saml.clock``; the library's fixed 300 s drift stays the outer bound).

An ``EncryptedAssertion`` is decrypted with the current SP key, else with the next one
(key rollover), and the decrypted Response goes through ``check_structure`` again: the
signature inside was invisible to the first pass. Every check here then runs on the
decrypted document, exactly as for a plain Assertion.

The library's error codes are turned into short ``kind`` labels; reasons never quote
the message (values taken from it are escaped and truncated).
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from copy import deepcopy
from typing import Any

from lxml import etree
from onelogin.saml2.auth import OneLogin_Saml2_Auth
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C
from onelogin.saml2.response import OneLogin_Saml2_Response
from onelogin.saml2.utils import OneLogin_Saml2_ValidationError
from onelogin.saml2.xml_utils import OneLogin_Saml2_XML

from gateway.errors import LoginFailed
from gateway.saml.clock import check_issue_instant, check_validity
from gateway.saml.clock import saml_time as saml_time  # re-exported (slo.py)
from gateway.saml.structure import check_structure

_NS = C.NSMAP
_E = OneLogin_Saml2_ValidationError
_ENTITY_FORMAT = "urn:oasis:names:tc:SAML:2.0:nameid-format:entity"
MAX_ISSUE_AGE = 300.0  # seconds; the clock skew comes on top

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
    _E.NO_ENCRYPTED_ASSERTION: "encryption",
    _E.KEYINFO_NOT_FOUND_IN_ENCRYPTED_DATA: "decryption",
    _E.CHILDREN_NODE_NOT_FOUND_IN_KEYINFO: "decryption",
    _E.UNSUPPORTED_RETRIEVAL_METHOD: "decryption",
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
    """Remembers the validation error *code*, which ``Auth`` would otherwise discard, and
    decrypts with any of the SP's keys."""

    _settings: Any  # set by the base class
    error_code: int | None = None
    decrypted_with: int = 0  # index of the SP key that decrypted the assertion

    def __init__(self, settings: Any, response: str, alternatives: Sequence[Any] = ()) -> None:
        # Set before the base class runs: it decrypts in its constructor.
        self._alternatives = tuple(alternatives)
        super().__init__(settings, response)

    def _decrypt_assertion(self, xml: Any) -> Any:
        """Try the current SP key, then the next (rollover). ``self._settings`` is this
        Response's own reference: the shared settings objects are never modified."""
        failures: list[str] = []
        choices: tuple[Any, ...] = (self._settings, *self._alternatives)
        for index, settings in enumerate(choices):
            self._settings = settings
            try:
                decrypted = super()._decrypt_assertion(deepcopy(xml))
            except OneLogin_Saml2_ValidationError:
                raise  # the EncryptedAssertion itself is malformed: no key would help
            except Exception as exc:  # xmlsec.Error: not encrypted to this key
                failures.append(f"{type(exc).__name__}: {clean(exc, 120)}")
                continue
            self.decrypted_with = index
            # The signature inside was encrypted: the shape checks run again on it.
            check_structure(etree.tostring(decrypted))
            return decrypted
        raise LoginFailed(
            "decryption",
            f"The EncryptedAssertion could not be decrypted with any of the SP's "
            f"{len(failures)} key(s) ({'; '.join(failures)}).",
            {"keys_tried": str(len(failures))},
        )

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
    """``OneLogin_Saml2_Auth`` that keeps the Response object it validated.

    ``decryption_alternatives``: settings with the SP's other keys (key rollover)."""

    response: _Response | None = None
    decryption_alternatives: Sequence[Any] = ()

    def response_class(self, settings: Any, saml_response: str) -> _Response:
        # The base class calls ``self.response_class(settings, SAMLResponse)``.
        self.response = _Response(settings, saml_response, self.decryption_alternatives)
        return self.response


def check_response(
    auth: Auth, *, request_id: str | None, idp_entity_id: str, sp_entity_id: str,
    acs_url: str, now: float, max_issue_age: float = MAX_ISSUE_AGE,
    skew: float = C.ALLOWED_CLOCK_DRIFT, by_response: bool = False,
) -> Any:
    """The application's checks on a Response the library accepted; returns the Assertion.

    ``request_id`` None means an IdP-initiated login (the caller checked the IdP opted in):
    then no InResponseTo may appear anywhere. ``by_response``: the library was told to
    require the Response signature, which may then be the only one covering the
    Assertion."""
    response = auth.response
    if response is None:  # pragma: no cover - process_response always builds one
        raise LoginFailed("malformed", "python3-saml accepted a response it did not parse.")
    document = response.document
    where = f"The SAML response from IdP {clean(idp_entity_id)}"
    _check_in_response_to(auth.get_last_response_in_response_to(), request_id, where)

    destination = document.get("Destination")
    if destination != acs_url:
        shown = "no Destination" if destination is None else f"Destination {clean(destination)}"
        raise LoginFailed("destination", f"{where} has {shown}; expected exactly {acs_url}.",
                          {"destination": clean(destination or "(none)"), "expected": acs_url})

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
    if assertion.find("ds:Signature", _NS) is None:
        _check_covered_by_response(document, where, by_response)
    _check_issuer(assertion.findall("saml:Issuer", _NS), "Assertion", where, idp_entity_id)
    _check_audience(assertion, where, sp_entity_id)
    _check_subject_confirmations(assertion, where, request_id, acs_url)
    check_issue_instant(document, "Response", where, now, max_issue_age, skew)
    check_issue_instant(assertion, "Assertion", where, now, max_issue_age, skew)
    check_validity(assertion, where, now, skew)
    return assertion


def _check_covered_by_response(document: Any, where: str, by_response: bool) -> None:
    """An unsigned Assertion is accepted only under the one signature of its Response,
    referencing the Response itself, which the library was told to require."""
    signatures = OneLogin_Saml2_XML.query(document, "/samlp:Response/ds:Signature")
    references = OneLogin_Saml2_XML.query(
        document, "/samlp:Response/ds:Signature/ds:SignedInfo/ds:Reference")
    response_id = document.get("ID")
    if not by_response or len(signatures) != 1 or len(references) != 1 or not response_id \
            or references[0].get("URI") != "#" + response_id:
        raise LoginFailed("signature", f"{where} has an unsigned Assertion that no signature "
                          "of its Response covers.")


def _check_in_response_to(value: str | None, request_id: str | None, where: str) -> None:
    if request_id is None:
        if value:
            raise LoginFailed(
                "in_response_to",
                f"{where} answers request {clean(value, 80)}, but no login of ours is pending "
                "in this browser (IdP-initiated logins carry no InResponseTo).",
                {"in_response_to": clean(value, 80), "expected": "(none: IdP-initiated)"})
        return
    if not value:
        raise LoginFailed(
            "in_response_to",
            f"{where} has no InResponseTo: it is unsolicited and this login expected an answer "
            "to a request of ours.", {"in_response_to": "(none)", "expected": request_id})
    if not hmac.compare_digest(value.encode(), request_id.encode()):
        raise LoginFailed(
            "in_response_to",
            f"{where} answers request {clean(value, 80)}, not the outstanding "
            f"request {clean(request_id, 80)}.",
            {"in_response_to": clean(value, 80), "expected": request_id})


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
                "audience", f"{where} is for audience {shown}, not exactly {sp_entity_id}.",
                {"audience": shown, "expected": sp_entity_id},
            )


def _check_subject_confirmations(assertion: Any, where: str, request_id: str | None,
                                 acs: str) -> None:
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
                    {"recipient": clean(recipient or "(none)"), "expected": acs},
                )
            irt = data.get("InResponseTo")
            if request_id is None:
                if irt is not None:
                    raise LoginFailed(
                        "in_response_to",
                        f"{where} is IdP-initiated but its SubjectConfirmationData has an "
                        "InResponseTo.", {"in_response_to": clean(irt, 80),
                                          "expected": "(none: IdP-initiated)"})
                continue
            if irt is None or not hmac.compare_digest(irt.encode(), request_id.encode()):
                shown = "no InResponseTo" if irt is None else "an InResponseTo that differs"
                raise LoginFailed(
                    "in_response_to",
                    f"{where} has a SubjectConfirmationData with {shown} from the request.",
                )
