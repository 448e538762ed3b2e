"""Time checks with the configured clock skew, and the offsets they measured.

python3-saml compares NotBefore/NotOnOrAfter with a fixed module constant,
``ALLOWED_CLOCK_DRIFT`` (300 s), and never looks at IssueInstant. Changing the constant
would change it for every caller in the process, so it is left alone as the outer
bound: the library refuses beyond 300 s, and these checks, run on the library's
validated (and decrypted) document, refuse beyond ``[idp] clock_skew`` (default 120 s,
at most 300). Every refusal carries the measured offset for ``sso-gateway explain``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from onelogin.saml2.constants import OneLogin_Saml2_Constants as C
from onelogin.saml2.utils import OneLogin_Saml2_Utils

from gateway.errors import LoginFailed

_NS = C.NSMAP


def saml_time(value: str | None) -> float | None:
    """Parse an ``xs:dateTime`` the way the library does; None when absent."""
    if not value:
        return None
    return float(OneLogin_Saml2_Utils.parse_SAML_to_time(value))


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def details(check: str, value: float, now: float, offset: float, skew: float) -> dict[str, str]:
    """What a clock refusal reports: the time checked, ours, and the offset in seconds
    (the time checked minus ours: positive means ahead of our clock)."""
    return {"check": check, "value": iso(value), "now": iso(now),
            "offset_seconds": f"{offset:+.0f}", "allowed_skew_seconds": f"{skew:.0f}"}


def _read(element: Any, name: str, where: str) -> float | None:
    try:
        return saml_time(element.get(name))
    except Exception:
        raise LoginFailed("malformed", f"{where} has an unreadable {name}.") from None


def check_issue_instant(element: Any, name: str, where: str, now: float, max_age: float,
                        skew: float) -> None:
    """IssueInstant: not older than ``max_age`` + skew, not ahead by more than skew."""
    issued = _read(element, "IssueInstant", where)
    if issued is None:
        raise LoginFailed("malformed", f"{where} has no readable {name} IssueInstant.")
    if issued < now - max_age - skew:
        raise LoginFailed(
            "expired", f"{where} has a {name} issued {int(now - issued)} s ago "
            f"(at most {int(max_age)} s, plus {int(skew)} s clock skew).",
            details(f"{name} IssueInstant", issued, now, issued - now, skew))
    if issued > now + skew:
        raise LoginFailed(
            "not_yet_valid", f"{where} has a {name} issued {int(issued - now)} s in the future "
            f"(clock skew allowed: {int(skew)} s).",
            details(f"{name} IssueInstant", issued, now, issued - now, skew))


def check_validity(assertion: Any, where: str, now: float, skew: float) -> None:
    """Conditions and bearer SubjectConfirmationData NotBefore/NotOnOrAfter, with skew."""
    elements = [("Conditions", e) for e in assertion.findall("saml:Conditions", _NS)]
    elements += [("SubjectConfirmationData", e) for e in assertion.findall(
        "saml:Subject/saml:SubjectConfirmation/saml:SubjectConfirmationData", _NS)]
    for label, element in elements:
        not_before = _read(element, "NotBefore", where)
        if not_before is not None and not_before > now + skew:
            raise LoginFailed(
                "not_yet_valid", f"{where} is valid only from {iso(not_before)} ({label} "
                f"NotBefore), {int(not_before - now)} s ahead of our clock (skew allowed: "
                f"{int(skew)} s).", details(f"{label} NotBefore", not_before, now,
                                            not_before - now, skew))
        not_after = _read(element, "NotOnOrAfter", where)
        if not_after is not None and not_after <= now - skew:
            raise LoginFailed(
                "expired", f"{where} expired at {iso(not_after)} ({label} NotOnOrAfter), "
                f"{int(now - not_after)} s ago (skew allowed: {int(skew)} s).",
                details(f"{label} NotOnOrAfter", not_after, now, not_after - now, skew))


def explain_times(response_doc: Any, now: float, skew: float) -> dict[str, str]:
    """The first time check that fails for a refused document (the library refused it
    with its own, detail-free message); {} when none does."""
    try:
        for assertion in response_doc.findall("saml:Assertion", _NS):
            check_validity(assertion, "", now, skew)
    except LoginFailed as exc:
        return exc.details
    return {}
