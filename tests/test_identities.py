"""The identity rules: released attributes → principal, subject per IdP, entitlement
filtering, canonical values, and the warnings ``sso-gateway check`` prints."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from gateway.config import Rule, Settings
from gateway.errors import LoginFailed
from gateway.identities import IdentityRules
from gateway.protocol import SignedIn

IDP = "https://idp.example.org/idp"
OTHER = "https://other.example.org/idp"
MEMBER = "urn:mace:example.org:entitlement:member"
ADMIN = "urn:mace:example.org:entitlement:admin"
ALICE = {"memberId": ["M1001"], "mail": ["alice@example.org"], "displayName": ["Alice"],
         "eduPersonEntitlement": [MEMBER, ADMIN], "memberStatus": ["Active"],
         "eduPersonAffiliation": ["member", "staff"]}


def rules(**config: Any) -> IdentityRules:
    return IdentityRules(Settings.model_validate({"public_url": "https://gw.example.org",
                                                  **config}))


def signed_in(released: dict[str, list[str]], idp: str = IDP, **extra: Any) -> SignedIn:
    return SignedIn(idp=idp, protocol="saml", released=released, **extra)


def test_every_configured_attribute_is_mapped_first_present_wins() -> None:
    identities = rules(attributes={"member_id": ["a", "b"], "email": ["m1", "m2"],
                                  "affiliation": ["eduPersonAffiliation", "urn:oid:affil"],
                                  "orcid": ["eduPersonOrcid"]})
    p = identities.principal(signed_in({"b": ["B"], "a": [" A "], "m2": ["two@x", "2@x"],
                                        "urn:oid:affil": ["x"], **ALICE}))
    assert (p.member_id, p.email, p.first("email")) == ("A", "two@x", "two@x")
    assert p.values("email") == ("two@x", "2@x")  # multi-valued, in order
    assert p.values("affiliation") == ("member", "staff")  # the first name present wins
    assert p.attributes["orcid"] == ()  # configured, not released: present and empty
    assert set(p.attributes) == {"member_id", "email", "display_name", "entitlements",
                                 "status", "affiliation", "orcid"}
    assert "mail" not in p.attributes  # released names are not kept as such


def test_an_idp_entry_overrides_only_the_names_it_gives() -> None:
    identities = rules(idps=[{"entity_id": OTHER, "attributes": {"member_id": ["employeeNo"]}}])
    p = identities.principal(signed_in({"employeeNo": ["E7"], "memberId": ["M1"],
                                        "mail": ["x@y"]}, idp=OTHER))
    assert (p.member_id, p.email) == ("E7", "x@y")
    assert identities.principal(signed_in({"memberId": ["M1"]})).member_id == "M1"


def test_the_principal_carries_how_the_sign_in_happened() -> None:
    p = rules().principal(signed_in(
        ALICE, authn_context="urn:oasis:names:tc:SAML:2.0:ac:classes:Password",
        authn_instant=1234.5, session_not_on_or_after=9999.0, logout_handle="h1",
        protocol_data={"name_id": " n ", "session_index": "s"}))
    assert (p.kind, p.is_member, p.idp, p.protocol) == ("member", True, IDP, "saml")
    assert p.authn_context == "urn:oasis:names:tc:SAML:2.0:ac:classes:Password"
    assert (p.authn_instant, p.session_not_on_or_after) == (1234.5, 9999.0)
    assert p.logout_handle == "h1"
    assert p.protocol_data == {"name_id": " n ", "session_index": "s"}  # byte-for-byte


def test_values_are_canonicalised() -> None:
    p = rules().principal(signed_in({
        "memberId": ["1", " 1 "],  # one distinct member number
        "eduPersonEntitlement": ["urn:z", " urn:a ", "urn:z", "   "],
        "memberStatus": ["LAPSED"],
        "displayName": ["A \u00a0  B"],
    }))
    assert p.attributes["member_id"] == ("1",)
    assert p.entitlements == ("urn:a", "urn:z")  # sorted, deduplicated, blanks dropped
    assert p.status == "lapsed"
    assert p.display_name == "A B"


def test_the_member_number_never_falls_back_to_email() -> None:
    with pytest.raises(LoginFailed) as info:
        rules().principal(signed_in({"mail": ["alice@example.org"], "memberId": ["   "]}))
    assert info.value.kind == "attributes"
    assert info.value.reason == (
        f"The assertion from IdP {IDP!r}: no member ID (none of the attributes "
        "['memberId', 'urn:oid:1.3.6.1.4.1.5923.1.1.1.6'] has a value).")


def test_two_member_numbers_are_refused() -> None:
    with pytest.raises(LoginFailed, match="2 different member IDs; refusing to pick one"):
        rules().principal(signed_in({"memberId": ["1", "2"]}))


def test_a_member_number_with_the_scope_separator_is_refused() -> None:
    """"<entity ID>!<number>" is a scoped subject: no number may pose as one."""
    for member_ids in ("organisation", "scoped"):
        with pytest.raises(LoginFailed, match="contains '!'"):
            rules(idp={"member_ids": member_ids}).principal(
                signed_in({"memberId": [f"{OTHER}!M1001"]}))


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\x00b", "a\tb", "a\u2028b", "a\x7fb"])
def test_control_characters_refuse_the_login(bad: str) -> None:
    with pytest.raises(LoginFailed, match="contains the control character"):
        rules().principal(signed_in({"memberId": ["1"], "eduPersonEntitlement": [bad]}))
    extra = rules(attributes={"affiliation": ["eduPersonAffiliation"]})
    with pytest.raises(LoginFailed):
        extra.principal(signed_in({"memberId": ["1"], "eduPersonAffiliation": [bad]}))
    with pytest.raises(LoginFailed):
        rules().principal(signed_in({"memberId": ["1"]}, protocol_data={"name_id": bad}))
    with pytest.raises(LoginFailed):
        rules().principal(signed_in({"memberId": ["1"]}, logout_handle=bad))


def test_oversized_values_refuse_the_login() -> None:
    with pytest.raises(LoginFailed, match=r"'displayName' has a value of 1025 characters"):
        rules().principal(signed_in({"memberId": ["1"], "displayName": ["x" * 1025]}))
    assert rules().principal(signed_in({"memberId": ["1"], "displayName": ["x" * 1024]}))
    with pytest.raises(LoginFailed, match="longer than 1024"):
        rules().principal(signed_in({"memberId": ["1"]},
                                    protocol_data={"session_index": "s" * 1025}))


def test_subject_is_scoped_by_default() -> None:
    p = rules().principal(signed_in(ALICE))
    assert (p.subject, p.member_id) == (f"{IDP}!M1001", "M1001")


def test_subject_per_member_ids() -> None:
    own = rules(idp={"member_ids": "organisation"})
    assert own.principal(signed_in(ALICE)).subject == "M1001"
    assert own.principal(signed_in(ALICE, idp=OTHER)).subject == "M1001"
    mixed = rules(idps=[{"entity_id": IDP, "member_ids": "organisation"}])
    assert mixed.principal(signed_in(ALICE)).subject == "M1001"
    assert mixed.principal(signed_in(ALICE, idp=OTHER)).subject == f"{OTHER}!M1001"
    override = rules(idp={"member_ids": "organisation"},
                     idps=[{"entity_id": OTHER, "member_ids": "scoped"}])
    assert override.principal(signed_in(ALICE, idp=OTHER)).subject == f"{OTHER}!M1001"


def test_allowed_entitlements_drop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    identities = rules(idps=[{"entity_id": OTHER, "allowed_entitlements": [MEMBER]}])
    with caplog.at_level(logging.INFO, logger="gateway.identities"):
        assert identities.principal(signed_in(ALICE, idp=OTHER)).entitlements == (MEMBER,)
    assert f"dropped entitlements {ADMIN} asserted by IdP {OTHER} for member M1001" \
        in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gateway.identities"):
        assert identities.principal(signed_in(ALICE)).entitlements == (ADMIN, MEMBER)
    assert "dropped" not in caplog.text  # None: every entitlement kept
    everyone = rules(idp={"allowed_entitlements": []},
                     idps=[{"entity_id": IDP, "allowed_entitlements": [ADMIN]}])
    assert everyone.principal(signed_in(ALICE, idp=OTHER)).entitlements == ()
    assert everyone.principal(signed_in(ALICE)).entitlements == (ADMIN,)


def test_warnings_shared_identity_and_owner_rules_nobody_can_own() -> None:
    owner = [Rule(path="/members/{member_id}/notes/**", access="owner")]
    assert rules(rules=owner, idps=[{"entity_id": IDP, "member_ids": "organisation"}]
                 ).warnings([IDP, OTHER]) == []
    shared = rules(idp={"member_ids": "organisation"}).warnings([IDP, OTHER])
    assert len(shared) == 1
    assert shared[0].startswith("shared identity: 2 IdPs assert the organisation's own "
                                "member numbers")
    assert f"{IDP}, {OTHER}" in shared[0] and "signs in as the same member" in shared[0]
    nobody = rules(rules=owner).warnings([IDP, OTHER])
    assert len(nobody) == 1 and "no one can own a path" in nobody[0]
    assert rules().warnings([IDP, OTHER]) == []  # scoped only, no owner rules: fine
    # only the IdPs given count: an [[idps]] entry for an IdP that is not configured
    assert len(rules(rules=owner, idps=[{"entity_id": OTHER, "member_ids": "organisation"}]
                     ).warnings([IDP])) == 1
