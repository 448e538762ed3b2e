"""Access rules: first match wins, default member, owner and require conditions."""

from __future__ import annotations

import pytest

from gateway.config import Rule
from gateway.policy import Policy
from gateway.principal import Principal

MEMBER = "urn:mace:example.org:entitlement:member"
ADMIN = "urn:mace:example.org:entitlement:admin"

RULES = [
    Rule(path="/public/**", access="public"),
    Rule(path="/issues/**", access="member",
         require={"entitlement": MEMBER, "status": "active"}, message="Renew to read."),
    Rule(path="/members/{member_id}/notes/**", access="owner"),
    Rule(path="/_gateway/admin/**", access="member", require={"entitlement": ADMIN}),
    Rule(path="/only/*/one", access="public"),
]


def person(member_id: str = "M1", status: str = "active", *ents: str,
           subject: str | None = None, **attributes: tuple[str, ...]) -> Principal:
    return Principal(subject=member_id if subject is None else subject, idp="https://idp",
                     attributes={"member_id": (member_id,), "status": (status,),
                                 "entitlements": ents or (MEMBER,), **attributes})


@pytest.fixture
def policy() -> Policy:
    return Policy(RULES)


@pytest.mark.parametrize(("path", "kind"), [
    ("/public", "allow"), ("/public/", "allow"), ("/public/a/b/c", "allow"),
    ("/publicity", "login"), ("/issues/1", "login"), ("/", "login"), ("/anything", "login"),
    ("/only/x/one", "allow"), ("/only/x/y/one", "login"), ("/only/one", "login"),
])
def test_anonymous(policy: Policy, path: str, kind: str) -> None:
    assert policy.decide(path, None).kind == kind


def test_member_rules(policy: Policy) -> None:
    alice = person()
    assert policy.decide("/issues/2023-03/pages/14", alice).kind == "allow"
    assert policy.decide("/elsewhere", alice).kind == "allow"  # default: any member
    lapsed = policy.decide("/issues/2023-03/pages/14", person(status="lapsed"))
    assert (lapsed.kind, lapsed.failed, lapsed.message) == ("deny", "status", "Renew to read.")
    assert lapsed.reason == "membership status is lapsed, needs active"
    no_ent = policy.decide("/issues/x", person("M1", "active", "urn:other"))
    assert (no_ent.kind, no_ent.failed) == ("deny", "entitlement")
    assert policy.decide("/_gateway/admin/x", alice).kind == "deny"
    assert policy.decide("/_gateway/admin/x", person("M3", "active", MEMBER, ADMIN)).kind \
        == "allow"


def test_owner_rule(policy: Policy) -> None:
    alice = person("M1001")
    assert policy.decide("/members/M1001/notes", alice).kind == "allow"
    assert policy.decide("/members/M1001/notes/4/edit", alice).kind == "allow"
    other = policy.decide("/members/M1004/notes", alice)
    assert (other.kind, other.failed) == ("deny", "owner")
    assert policy.decide("/members/M1004/notes", None).kind == "login"


def test_owner_rule_compares_the_subject_not_the_asserted_number(policy: Policy) -> None:
    """A member of a scoped IdP asserting M1001 is not the owner of M1001's notes."""
    scoped = person("M1001", subject="https://idp-b.example.org/idp!M1001")
    denied = policy.decide("/members/M1001/notes", scoped)
    assert (denied.kind, denied.failed) == ("deny", "owner")


def test_require_attributes() -> None:
    policy = Policy([
        Rule(path="/staff/**", access="member",
             require={"attributes": {"affiliation": ["staff", "faculty"]}}, message="Staff."),
        Rule(path="/both/**", access="member",
             require={"attributes": {"affiliation": "staff", "idp": ["https://idp"]}}),
    ])
    staff = person(affiliation=("member", "staff"))
    assert policy.decide("/staff/x", staff).kind == "allow"
    assert policy.decide("/both/x", staff).kind == "allow"
    member = person(affiliation=("member",))
    denied = policy.decide("/staff/x", member)
    assert (denied.kind, denied.failed, denied.message) == ("deny", "attributes", "Staff.")
    assert denied.reason == "attribute affiliation is not staff or faculty"
    assert policy.decide("/staff/x", person()).failed == "attributes"  # not released at all
    elsewhere = Principal(subject="M1", idp="https://other",
                          attributes={"affiliation": ("staff",)})
    assert policy.decide("/both/x", elsewhere).failed == "attributes"


def test_gated_flag(policy: Policy) -> None:
    assert not policy.decide("/public/x", None).gated
    assert policy.decide("/issues/x", person()).gated


def test_owner_rule_without_parameter_is_a_config_error() -> None:
    with pytest.raises(ValueError, match=r"owner rule needs a \{parameter\} segment"):
        Rule(path="/members/**", access="owner")


def test_registered_rule() -> None:
    policy = Policy([Rule(path="/issues/free-2024/**", access="registered"),
                     Rule(path="/issues/**", access="member")])
    visitor = Principal(subject="R-1", idp="", kind="registered",
                        attributes={"status": ("registered",)})
    assert policy.decide("/issues/free-2024/pages/1", None).kind == "register"
    assert policy.decide("/issues/free-2024/pages/1", visitor).kind == "allow"
    assert policy.decide("/issues/free-2024/pages/1", person()).kind == "allow"
    member_only = policy.decide("/issues/2023-03/pages/1", visitor)
    assert (member_only.kind, member_only.reason) == ("login", "a member sign-in is needed")
