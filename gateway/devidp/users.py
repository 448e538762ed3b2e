"""The development IdP's demo users.

Every user signs in with the password ``demo``. Users with a second factor (``alice``
and ``carol``) can also give the one-time code ``DEMO_CODE`` when a service asks for
multi-factor authentication (REFEDS MFA); the others cannot. The attributes use the names the
membership IdP releases (``memberId``, ``mail``, ``displayName``,
``eduPersonEntitlement``, ``memberStatus``, ``eduPersonAffiliation``), so the gateway's
attribute mapping sees exactly what production sends.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

DEMO_PASSWORD = "demo"
#: The one-time code of every demo user with a second factor (fixed: it is a demo).
DEMO_CODE = "123456"
ENTITLEMENT_MEMBER = "urn:mace:example.org:entitlement:member"
ENTITLEMENT_ADMIN = "urn:mace:example.org:entitlement:admin"
ATTRNAME_FORMAT_BASIC = "urn:oasis:names:tc:SAML:2.0:attrname-format:basic"
NAMEID_PERSISTENT = "urn:oasis:names:tc:SAML:2.0:nameid-format:persistent"


@dataclass(frozen=True)
class DemoUser:
    username: str
    password: str
    display_name: str
    attributes: dict[str, list[str]]
    second_factor: bool = False  # can answer a one-time code (multi-factor sign-in)

    @property
    def role(self) -> str:
        """A short label for the login page's list of demo users."""
        entitlements = self.attributes.get("eduPersonEntitlement", [])
        status = self.attributes.get("memberStatus", ["?"])[0]
        if ENTITLEMENT_ADMIN in entitlements:
            return f"admin, {status} member"
        if ENTITLEMENT_MEMBER in entitlements:
            return f"{status} member"
        return "no membership"


def _member(
    username: str, member_id: str, display_name: str, status: str, *, admin: bool = False,
    affiliation: tuple[str, ...] = ("member",), second_factor: bool = False,
) -> DemoUser:
    entitlements = [ENTITLEMENT_MEMBER] + ([ENTITLEMENT_ADMIN] if admin else [])
    return DemoUser(
        username=username,
        password=DEMO_PASSWORD,
        display_name=display_name,
        attributes={
            "memberId": [member_id],
            "mail": [f"{username}@members.example.org"],
            "displayName": [display_name],
            "eduPersonEntitlement": entitlements,
            "memberStatus": [status],
            "eduPersonAffiliation": list(affiliation),
        },
        second_factor=second_factor,
    )


DEMO_USERS: tuple[DemoUser, ...] = (
    _member("alice", "M1001", "Alice Archer", "active", affiliation=("member", "staff"),
            second_factor=True),
    _member("bob", "M1002", "Bob Baker", "lapsed"),
    _member("carol", "M1003", "Carol Clarke", "active", admin=True, affiliation=("staff",),
            second_factor=True),
    _member("dave", "M1004", "Dave Dalton", "active"),
)


def find_user(users: Iterable[DemoUser], username: str) -> DemoUser | None:
    """The user called ``username``, or ``None``."""
    return next((u for u in users if u.username == username), None)


def authenticate(users: Iterable[DemoUser], username: str, password: str) -> DemoUser | None:
    """The user whose username and password both match, or ``None``."""
    user = find_user(users, username)
    if user is None:
        return None
    if not hmac.compare_digest(user.password.encode(), password.encode()):
        return None
    return user


def persistent_name_id(idp_entity_id: str, username: str) -> str:
    """An opaque, stable persistent NameID: it reveals neither the username nor the e-mail.

    A NUL separates the parts so that no (entity ID, username) pair collides with another.
    """
    digest = hashlib.sha256(f"{idp_entity_id}\x00{username}".encode()).hexdigest()
    return digest[:40]
