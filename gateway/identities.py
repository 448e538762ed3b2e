"""The identity rules: what a login protocol established (``SignedIn``) → a ``Principal``.

For each configured attribute the IdP's attribute map is tried in order and the first
released name that carries a value wins. The member number is required and has no
fallback: an e-mail address is not a member number, and guessing one would let a reused
address inherit someone else's membership.

Values are canonicalised before anything else sees them (they end up in headers,
tokens and logs): surrounding whitespace stripped, internal whitespace collapsed to
single spaces; a value containing a control character (CR, LF, NUL, …) or a Unicode
line/paragraph separator refuses the login, and so does one over 1024 characters.
Entitlements are sorted and deduplicated, the status is lower-cased. What the protocol
keeps for itself (logout handle, protocol data, authentication context) is kept
byte-for-byte but checked the same way.

Who the principal is (``subject``) depends on the IdP's ``member_ids``: the member
number itself for an IdP whose numbers are the organisation's own, otherwise the number
namespaced by the IdP (``<entity ID>!<number>``), so no IdP can assert another's
members. An IdP's ``allowed_entitlements`` drops every other entitlement it asserts.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Mapping, Sequence

from gateway.config import Settings
from gateway.errors import LoginFailed
from gateway.principal import ENTITLEMENTS, MEMBER_ID, STATUS, Principal
from gateway.protocol import SignedIn

log = logging.getLogger("gateway.identities")

_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Zl", "Zp"})
MAX_VALUE_LENGTH = 1024
#: Separates the IdP from the member number in a scoped subject.
SCOPE_SEPARATOR = "!"


class IdentityRules:
    """The configured identity rules, applied to every sign-in of every protocol."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def principal(self, signed_in: SignedIn) -> Principal:
        """The principal for a sign-in; raises ``LoginFailed('attributes', …)`` when the
        identity is unusable, the reason naming the IdP."""
        try:
            return self._principal(signed_in)
        except LoginFailed as exc:
            raise LoginFailed(exc.kind, f"The assertion from IdP {signed_in.idp!r}: "
                                        f"{exc.reason}", exc.details) from None

    def warnings(self, entity_ids: Sequence[str]) -> list[str]:
        """What an admin should know about the identity rules for these IdPs (the
        configured ones, from the protocol's registry), for ``sso-gateway check``."""
        settings = self._settings
        own = sorted(e for e in set(entity_ids)
                     if settings.idp_options(e).member_ids == "organisation")
        found = []
        if len(own) > 1:
            found.append(
                f"shared identity: {len(own)} IdPs assert the organisation's own member "
                f"numbers (member_ids = \"organisation\"): {', '.join(own)}; a member number "
                "from any of them signs in as the same member")
        if not own and any(rule.access == "owner" for rule in settings.rules):
            found.append(
                "owner rules are configured but no IdP has member_ids = \"organisation\": "
                "every member is scoped by an IdP (<entity ID>!<number>), so no one can own "
                "a path")
        return found

    def _principal(self, signed_in: SignedIn) -> Principal:
        idp = signed_in.idp
        options = self._settings.idp_options(idp)
        mapping = self._settings.attribute_map(idp)
        member_id = _member_id(signed_in.released, mapping[MEMBER_ID])
        attributes: dict[str, tuple[str, ...]] = {}
        for name, released_names in mapping.items():
            if name == MEMBER_ID:
                attributes[name] = (member_id,)
                continue
            values = _first_present(signed_in.released, released_names)
            if name == ENTITLEMENTS:
                values = sorted(set(values))
            elif name == STATUS:
                values = [v.lower() for v in values]
            attributes[name] = tuple(values)
        allowed = options.allowed_entitlements
        if allowed is not None:
            kept = tuple(e for e in attributes[ENTITLEMENTS] if e in allowed)
            dropped = sorted(set(attributes[ENTITLEMENTS]) - set(kept))
            if dropped:
                log.info("dropped entitlements %s asserted by IdP %s for member %s "
                         "(not in its allowed_entitlements)", ", ".join(dropped), idp,
                         member_id)
            attributes[ENTITLEMENTS] = kept
        subject = (member_id if options.member_ids == "organisation"
                   else f"{idp}{SCOPE_SEPARATOR}{member_id}")
        return Principal(
            subject=subject,
            idp=idp,
            attributes=attributes,
            kind="member",
            protocol=signed_in.protocol,
            authn_context=_opaque("authentication context", signed_in.authn_context),
            authn_instant=signed_in.authn_instant,
            session_not_on_or_after=signed_in.session_not_on_or_after,
            logout_handle=_opaque("logout handle", signed_in.logout_handle),
            protocol_data={k: _opaque(k, v) for k, v in signed_in.protocol_data.items()},
        )


def _member_id(released: Mapping[str, Sequence[str]], names: Sequence[str]) -> str:
    member_ids = set(_first_present(released, names))
    if not member_ids:
        raise LoginFailed("attributes", f"no member ID (none of the attributes "
                                        f"{list(names)} has a value).",
                          # names only, never values: for ``sso-gateway explain``
                          details={"released": ", ".join(sorted(released))[:2000] or "(none)"})
    if len(member_ids) > 1:
        raise LoginFailed("attributes", f"{len(member_ids)} different member IDs; "
                                        "refusing to pick one.")
    member_id = member_ids.pop()
    if SCOPE_SEPARATOR in member_id:
        # A scoped subject is "<entity ID>!<number>": a number with a '!' could pose as
        # another IdP's member.
        raise LoginFailed("attributes", f"the member ID {member_id!r} contains "
                                        f"{SCOPE_SEPARATOR!r}; refusing the login.")
    return member_id


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


def _first_present(released: Mapping[str, Sequence[str]], names: Sequence[str]) -> list[str]:
    for name in names:
        given = released.get(name, ())
        given = [given] if isinstance(given, str) else given  # one value, not its letters
        values = [canonical(name, v) for v in given if isinstance(v, str)]
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
