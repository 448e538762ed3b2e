"""``Principal``: who the user is, and where that identity came from.

A principal is built once per sign-in by ``gateway.identities`` from what a login
protocol hands over (``gateway.protocol.SignedIn``) and lives in the session store
unchanged. It carries:

* ``subject``: the key that is unique across IdPs. Owner rules, the identity token's
  ``sub``, "your sessions", revocation, the admin console and the CLI use it. For an IdP
  whose member numbers are the organisation's own it is the member number; otherwise it
  is namespaced by the IdP (``<entity ID>!<member number>``), so no IdP can assert
  another IdP's members. An IdP may instead be set to give it by its subject-id or
  pairwise-id attribute or its persistent NameID (``gateway.identities``), still
  namespaced by the IdP unless the value's checked scope makes it unique;
* ``idp`` and ``protocol``: where and how the sign-in happened, with the authentication
  context and instant;
* ``attributes``: every released attribute under the name the configuration gives it,
  multi-valued. The gateway's own needs are attributes with fixed names
  (``ROLES``): the configuration decides which released attributes feed them;
* ``email_verified``: whether someone vouches for the e-mail address, as OpenID
  Connect's claim of that name: the member's IdP (for its own accounts) or the mailed
  link a registered reader followed. A typed address nobody confirmed is not verified.
  Principals stored before the marker existed have ``None``: verified only for an IdP
  member. Upstreams get it as the built-in value ``email_verified`` (``values``);
* ``logout_handle`` and ``protocol_data``: opaque to everyone but the login protocol
  (SAML keeps its NameID and SessionIndex there); sessions are indexed by the handle so
  a protocol's logout finds them without the store knowing the protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

MEMBER_ID = "member_id"
EMAIL = "email"
DISPLAY_NAME = "display_name"
ENTITLEMENTS = "entitlements"
STATUS = "status"
#: The built-in value saying whether the e-mail address is vouched for ("true"/"false").
EMAIL_VERIFIED = "email_verified"
#: The attributes the gateway itself reads, in one place: member number, e-mail, name,
#: entitlements (multi-valued) and membership status.
ROLES = (MEMBER_ID, EMAIL, DISPLAY_NAME, ENTITLEMENTS, STATUS)

Kind = Literal["member", "registered"]


@dataclass(frozen=True, slots=True)
class Principal:
    """A signed-in identity (a member) or a registered visitor.

    ``attributes`` maps a configured name to its values (a tuple, possibly empty); treat
    it as read-only. Times are POSIX seconds; ``session_not_on_or_after`` caps the
    gateway session when the IdP asked for it. ``email_verified``: see the module
    docstring (``None``: not recorded, as in sessions kept by older versions).
    """

    subject: str
    idp: str
    attributes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    kind: Kind = "member"
    protocol: str = ""
    authn_context: str = ""
    authn_instant: float = 0.0
    session_not_on_or_after: float | None = None
    logout_handle: str = ""
    protocol_data: Mapping[str, str] = field(default_factory=dict)
    email_verified: bool | None = None

    @property
    def is_member(self) -> bool:
        return self.kind == "member"

    @property
    def has_verified_email(self) -> bool:
        """Whether there is an e-mail address and someone vouches for it (an older
        principal without the marker: only an IdP member's)."""
        vouched = self.is_member if self.email_verified is None else self.email_verified
        return vouched and bool(self.email)

    def values(self, name: str) -> tuple[str, ...]:
        """The values of an attribute (``subject``, ``idp`` and ``email_verified``, as
        "true" or "false", answer too); () if absent."""
        if name == "subject":
            return (self.subject,)
        if name == "idp":
            return (self.idp,) if self.idp else ()
        if name == EMAIL_VERIFIED:
            return ("true",) if self.has_verified_email else ("false",)
        return self.attributes.get(name, ())

    def first(self, name: str) -> str:
        """The first value of an attribute, or ""."""
        found = self.values(name)
        return found[0] if found else ""

    @property
    def member_id(self) -> str:
        """The member number as the IdP asserted it (for display; ``subject`` decides)."""
        return self.first(MEMBER_ID)

    @property
    def email(self) -> str:
        return self.first(EMAIL)

    @property
    def display_name(self) -> str:
        return self.first(DISPLAY_NAME)

    @property
    def entitlements(self) -> tuple[str, ...]:
        return self.attributes.get(ENTITLEMENTS, ())

    @property
    def status(self) -> str:
        return self.first(STATUS)

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "idp": self.idp, "kind": self.kind,
                "attributes": {k: list(v) for k, v in self.attributes.items()},
                "protocol": self.protocol, "authn_context": self.authn_context,
                "authn_instant": self.authn_instant,
                "session_not_on_or_after": self.session_not_on_or_after,
                "logout_handle": self.logout_handle,
                "protocol_data": dict(self.protocol_data),
                "email_verified": self.email_verified}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Principal:
        return cls(
            subject=str(data["subject"]), idp=str(data.get("idp") or ""),
            attributes={str(k): tuple(str(x) for x in v)
                        for k, v in (data.get("attributes") or {}).items()},
            kind="registered" if data.get("kind") == "registered" else "member",
            protocol=str(data.get("protocol") or ""),
            authn_context=str(data.get("authn_context") or ""),
            authn_instant=float(data.get("authn_instant") or 0.0),
            session_not_on_or_after=(None if data.get("session_not_on_or_after") is None
                                     else float(data["session_not_on_or_after"])),
            logout_handle=str(data.get("logout_handle") or ""),
            protocol_data={str(k): str(v) for k, v in (data.get("protocol_data") or {}).items()},
            email_verified=(None if data.get("email_verified") is None
                            else data["email_verified"] is True),
        )
