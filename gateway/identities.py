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

Scoped attributes (``[idp] scoped_attributes``: eduPersonPrincipalName,
eduPersonScopedAffiliation, subject-id, pairwise-id by default) are checked first, as
Shibboleth does: a value must be ``<something>@<scope>`` (one ``@``) with a scope the IdP
vouches for (``SignedIn.scopes``, from its metadata, or ``[[idps]] scopes``), otherwise
it is dropped and the drop logged (the IdP, the attribute and the scope, never the value).
Scopes are domains: a scope that is not ASCII is never in scope, and ASCII scopes compare
with only A-Z folded.

Who the principal is (``subject``) comes from where the IdP's ``subject`` says:

* ``member_id`` (the default): the member number, required. The number itself for an IdP
  whose numbers are the organisation's own (``member_ids = "organisation"``), otherwise
  namespaced by the IdP (``<entity ID>!<number>``), so no IdP can assert another's members;
* ``subject-id`` or ``pairwise-id`` (the OASIS subject identifier attributes): the value,
  checked against the profile's syntax and the IdP's scopes and lower-cased (the profile
  compares it case-insensitively); namespaced by the IdP unless ``member_ids =
  "organisation"``, where the validated scope makes it unique already;
* ``persistent``: the protocol's persistent identifier (SAML: a persistent NameID), always
  namespaced by the IdP, since it is unique only per IdP.

A member's e-mail address is marked verified (``Principal.email_verified``): the IdP
vouches for its own accounts, as an OpenID provider's ``email_verified``. It is not
scope-checked (an IdP may release any address), so an upstream must judge the address
together with the IdP (``X-Member-Idp``), never alone.

A value that would become a subject may not contain ``!``, so it can never pose as
another IdP's namespaced subject. When the subject comes from elsewhere the member number
is optional and only an attribute. An IdP's ``allowed_entitlements`` drops every other
entitlement it asserts.

Who may meet a rule: an entitlement, a status or an attribute is whatever an IdP
asserts, so a rule that asks for one is met by any IdP that asserts it, unless the rule
names its IdPs (``require.idp``) or the IdPs' entitlements are filtered
(``allowed_entitlements``, per issuer, as Shibboleth SP's attribute filter).
``open_to_any_idp`` says when a rule is not bound so (the admin console refuses such a
rule); ``warnings`` names other entitlement rules several IdPs may meet.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Mapping, Sequence

from gateway.config import IdPOptions, Requirement, Settings
from gateway.errors import LoginFailed
from gateway.principal import ENTITLEMENTS, MEMBER_ID, STATUS, Principal
from gateway.protocol import SignedIn

log = logging.getLogger("gateway.identities")

_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Zl", "Zp"})
MAX_VALUE_LENGTH = 1024
#: Separates the IdP from the member number in a scoped subject.
SCOPE_SEPARATOR = "!"
#: The released names of the subject identifier attributes (OASIS SAML V2.0 Subject
#: Identifier Attributes Profile), by ``subject`` choice.
SUBJECT_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "subject-id": ("urn:oasis:names:tc:SAML:attribute:subject-id", "subject-id"),
    "pairwise-id": ("urn:oasis:names:tc:SAML:attribute:pairwise-id", "pairwise-id"),
}
# The shape of both: <id>@<scope>, one '@', no space and no '!' (so never a namespaced
# subject), the scope a domain. The profile's <id> is stricter ([-=0-9A-Za-z]); real IdPs
# send '.' and '_' too, which are harmless.
_SUBJECT_ID = re.compile(r"[^\s@!]{1,255}@[0-9A-Za-z][-.0-9A-Za-z]{0,252}")
#: At most this many scopes are named in one log line.
_LOGGED_SCOPES = 5


class IdentityRules:
    """The configured identity rules, applied to every sign-in of every protocol."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._scoped = frozenset(settings.idp.scoped_attributes)

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
        for entity_id in sorted(set(entity_ids)):
            options = settings.idp_options(entity_id)
            if options.subject == "persistent" and not (options.name_id_format or "").endswith(
                    ":persistent"):
                found.append(
                    f"IdP {entity_id}: subject = \"persistent\" but the NameID format asked "
                    f"for is {options.name_id_format}; set [[idps]] name_id_format = "
                    "\"persistent\", or members of an IdP that picks another format cannot "
                    "sign in")
        for rule in settings.rules:
            wanted = rule.require.entitlement
            if rule.access not in ("member", "owner") or not wanted or rule.require.idp:
                continue
            granting = sorted(e for e in set(entity_ids)
                              if _may_assert(settings.idp_options(e), wanted))
            if len(granting) > 1:
                shown = ", ".join(granting[:3]) + (", …" if len(granting) > 3 else "")
                found.append(
                    f"rule {rule.path}: {len(granting)} IdPs may assert {' and '.join(wanted)} "
                    f"and so decide who gets in ({shown}); if only some are trusted for it, "
                    "name them (require.idp) or filter the others' entitlements "
                    "(allowed_entitlements)")
        return found

    def _principal(self, signed_in: SignedIn) -> Principal:
        idp = signed_in.idp
        options = self._settings.idp_options(idp)
        mapping = self._settings.attribute_map(idp)
        released, out_of_scope = self._in_scope(signed_in, options)
        # The member number is required only when it is the subject; otherwise it is an
        # attribute like any other.
        member_id = (_member_id(released, mapping[MEMBER_ID])
                     if options.subject == "member_id" else "")
        if not member_id:
            subject = _subject(signed_in, options, released, out_of_scope)
        elif options.member_ids == "organisation":
            subject = member_id
        else:
            subject = f"{idp}{SCOPE_SEPARATOR}{member_id}"
        attributes: dict[str, tuple[str, ...]] = {}
        for name, released_names in mapping.items():
            values = _first_present(released, released_names)
            if name == MEMBER_ID and member_id:
                values = [member_id]
            elif name == ENTITLEMENTS:
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
                         (attributes.get(MEMBER_ID) or (subject,))[0])
            attributes[ENTITLEMENTS] = kept
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
            email_verified=True,  # the IdP vouches for its own accounts' addresses
        )

    def _in_scope(self, signed_in: SignedIn, options: IdPOptions,
                  ) -> tuple[dict[str, Sequence[str]], dict[str, list[str]]]:
        """The released attributes without the scoped values out of the IdP's scopes, and
        what was dropped (released name → the dropped values' scopes, "" for none)."""
        extra = {scope.lower() for scope in options.scopes}  # ASCII (the schema checks)
        released: dict[str, Sequence[str]] = {}
        dropped: dict[str, list[str]] = {}
        for name, given in signed_in.released.items():
            if name not in self._scoped:
                released[name] = given
                continue
            kept = []
            for value in [given] if isinstance(given, str) else given:
                scope = _scope_of(value) if isinstance(value, str) else ""
                # A domain is ASCII: only A-Z fold, so the long s (U+017F) is never "s".
                if scope and scope.isascii() and (scope.lower() in extra
                              or any(s.matches(scope) for s in signed_in.scopes)):
                    kept.append(value)
                else:
                    dropped.setdefault(name, []).append(scope)
            released[name] = kept
        if dropped and not signed_in.scopes and not extra:
            log.warning("IdP %s has no scope (no shibmd:Scope in its metadata, no [[idps]] "
                        "scopes): dropped every value of its scoped attributes %s",
                        signed_in.idp, ", ".join(sorted(dropped)))
        else:
            for name, scopes in sorted(dropped.items()):
                named = sorted({s[:100] or "(no scope)" for s in scopes})
                log.warning("dropped %d value(s) of %s asserted by IdP %s: scope %s is not "
                            "one of its scopes", len(scopes), name, signed_in.idp,
                            ", ".join(named[:_LOGGED_SCOPES]))
        return released, dropped


def open_to_any_idp(settings: Settings, require: Requirement) -> str:
    """Whom ``require`` lets in when any IdP the gateway trusts (every IdP of a federation
    aggregate or MDQ too) may meet it, or "" when only IdPs the configuration names can:
    ``require.idp`` names them, a required scoped attribute (``[idp] scoped_attributes``,
    every accepted value ``…@<scope>``) can only come from an IdP that vouches for its
    scope, or ``[idp] allowed_entitlements`` keeps a required entitlement from every IdP
    without its own ``[[idps]] allowed_entitlements``."""
    if require.idp or _scoped(settings, require.attributes):
        return ""
    if not require.entitlement:
        return ("any member of any IdP (it requires no entitlement, no idp and no scoped "
                "attribute)")
    named = " and ".join(require.entitlement)
    default = settings.idp.allowed_entitlements
    if default is None:
        return (f"any IdP that asserts the entitlement {named} (every IdP keeps every "
                "entitlement it asserts: [idp] allowed_entitlements is not set)")
    if set(require.entitlement) <= set(default):
        return (f"any IdP that asserts the entitlement {named} ([idp] allowed_entitlements "
                "lets every IdP assert it)")
    return ""


def _scoped(settings: Settings, attributes: Mapping[str, Sequence[str]]) -> bool:
    """Whether one of these required attributes is carried only by scoped attributes (for
    every IdP: ``[attributes]`` and each ``[[idps]]`` override) and every value it accepts
    has a scope: only an IdP that vouches for that scope can assert such a value."""
    scoped = set(settings.idp.scoped_attributes)

    def carried_scoped(name: str) -> bool:
        maps = [settings.attributes.get(name, [])]
        maps += [o.attributes[name] for o in settings.idps
                 if o.attributes and name in o.attributes]
        return all(released and set(released) <= scoped for released in maps)

    return any(carried_scoped(name) and all(_scope_of(v) for v in accepted)
               for name, accepted in attributes.items())


def _may_assert(options: IdPOptions, entitlements: Sequence[str]) -> bool:
    """Whether an IdP's entitlements, as its ``allowed_entitlements`` filter them, may
    hold all of these."""
    allowed = options.allowed_entitlements
    return allowed is None or set(entitlements) <= set(allowed)


def _scope_of(value: str) -> str:
    """The scope of a scoped value (after its one ``@``), or "" when it has none."""
    local, at, scope = value.strip().partition("@")
    return scope if at and local and scope and "@" not in scope else ""


def _subject(signed_in: SignedIn, options: IdPOptions, released: Mapping[str, Sequence[str]],
             out_of_scope: Mapping[str, Sequence[str]]) -> str:
    """The subject from a subject identifier attribute or the persistent identifier."""
    idp, source = signed_in.idp, str(options.subject)
    if source == "persistent":
        value = _opaque("persistent NameID", signed_in.persistent_id)
        if not value:
            raise LoginFailed(
                "attributes", "no persistent NameID, and this IdP's subject is \"persistent\" "
                "(ask it for one: [[idps]] name_id_format = \"persistent\").",
                {"subject": source})
        if SCOPE_SEPARATOR in value:
            raise LoginFailed("attributes", f"the persistent NameID contains "
                                            f"{SCOPE_SEPARATOR!r}; refusing the login.",
                              {"subject": source})
        return f"{idp}{SCOPE_SEPARATOR}{value}"
    names = SUBJECT_ATTRIBUTES[source]
    values = set(_first_present(released, names))
    if not values:
        scopes = sorted({s[:100] or "(no scope)" for n in names for s in out_of_scope.get(n, ())})
        if scopes:
            raise LoginFailed(
                "attributes", f"its {source} is out of its scope ({', '.join(scopes[:5])} is "
                "not a scope its metadata lists, nor one of its [[idps]] scopes); refusing "
                "the login.", {"subject": source, "scope": ", ".join(scopes[:5])})
        raise LoginFailed("attributes", f"no {source} (none of the attributes {list(names)} "
                                        "has a value), and this IdP's subject is "
                                        f"\"{source}\".",
                          {"subject": source,
                           "released": ", ".join(sorted(released))[:2000] or "(none)"})
    if len(values) > 1:
        raise LoginFailed("attributes", f"{len(values)} different {source} values; "
                                        "refusing to pick one.", {"subject": source})
    value = values.pop()
    if not _SUBJECT_ID.fullmatch(value):
        raise LoginFailed("attributes", f"the {source} is not <id>@<scope> (one '@', no "
                                        "space or '!', a domain as scope); refusing the login.",
                          {"subject": source})
    value = value.lower()  # the profile compares values case-insensitively
    return value if options.member_ids == "organisation" else f"{idp}{SCOPE_SEPARATOR}{value}"


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
