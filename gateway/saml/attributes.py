"""SAML attributes of a validated assertion → ``Principal``.

For each identity field the configured attribute names are tried in order and the
first one that carries a value wins. ``member_id`` is required and has no fallback:
an e-mail address is not a member number, and guessing one would let a reused
address inherit someone else's membership.

Values are canonicalised before anything else sees them (they end up in headers,
tokens and logs): surrounding whitespace stripped, internal whitespace collapsed to
single spaces; a value containing a control character (CR, LF, NUL, …) or a
Unicode line/paragraph separator refuses the login.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence

from gateway.config import AttributeMap
from gateway.errors import LoginFailed
from gateway.principal import Principal

_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Zl", "Zp"})
MAX_VALUE_LENGTH = 1024


def map_principal(
    attributes: Mapping[str, Sequence[str]],
    *,
    name_id: str,
    name_id_format: str,
    session_index: str,
    idp: str,
    mapping: AttributeMap,
    authn_instant: float,
    session_not_on_or_after: float | None,
) -> Principal:
    """Build the ``Principal``; raises ``LoginFailed('attributes', …)`` on unusable values,
    the reason naming the IdP."""
    try:
        return _principal(attributes, name_id=name_id, name_id_format=name_id_format,
                          session_index=session_index, idp=idp, mapping=mapping,
                          authn_instant=authn_instant,
                          session_not_on_or_after=session_not_on_or_after)
    except LoginFailed as exc:
        raise LoginFailed(exc.kind, f"The assertion from IdP {idp!r}: {exc.reason}") from None


def _principal(attributes: Mapping[str, Sequence[str]], *, name_id: str, name_id_format: str,
               session_index: str, idp: str, mapping: AttributeMap, authn_instant: float,
               session_not_on_or_after: float | None) -> Principal:
    member_ids = _first_present(attributes, mapping.member_id)
    if not member_ids:
        raise LoginFailed("attributes", f"no member ID (none of the attributes "
                                        f"{mapping.member_id} has a value).")
    if len(set(member_ids)) > 1:
        raise LoginFailed("attributes", f"{len(set(member_ids))} different member IDs; "
                                        "refusing to pick one.")
    emails = _first_present(attributes, mapping.email)
    names = _first_present(attributes, mapping.display_name)
    statuses = _first_present(attributes, mapping.status)
    entitlements = _first_present(attributes, mapping.entitlements)
    return Principal(
        member_id=member_ids[0],
        idp=idp,
        name_id=_opaque("NameID", name_id),
        email=emails[0] if emails else "",
        display_name=names[0] if names else "",
        entitlements=tuple(sorted(set(entitlements))),
        status=statuses[0].lower() if statuses else "",
        name_id_format=_opaque("NameID Format", name_id_format),
        session_index=_opaque("SessionIndex", session_index),
        authn_instant=authn_instant,
        session_not_on_or_after=session_not_on_or_after,
    )


def canonical(name: str, value: str) -> str:
    """Strip and collapse whitespace; refuse control characters and oversized values."""
    _check_characters(name, value)
    text = " ".join(value.split())
    if len(text) > MAX_VALUE_LENGTH:
        raise LoginFailed(
            "attributes",
            f"Attribute {name!r} has a value of {len(text)} characters "
            f"(more than {MAX_VALUE_LENGTH}).",
        )
    return text


def _first_present(attributes: Mapping[str, Sequence[str]], names: Sequence[str]) -> list[str]:
    for name in names:
        values = [canonical(name, v) for v in attributes.get(name, ())]
        values = [v for v in values if v]
        if values:
            return values
    return []


def _opaque(name: str, value: str) -> str:
    """Identifiers are kept byte-for-byte (no whitespace collapsing), but still checked."""
    _check_characters(name, value)
    if len(value) > MAX_VALUE_LENGTH:
        raise LoginFailed("attributes", f"The {name} is longer than {MAX_VALUE_LENGTH} characters.")
    return value


def _check_characters(name: str, value: str) -> None:
    for ch in value:
        if unicodedata.category(ch) in _FORBIDDEN_CATEGORIES:
            raise LoginFailed(
                "attributes",
                f"Attribute {name!r} contains the control character U+{ord(ch):04X}; "
                "refusing the login.",
            )
