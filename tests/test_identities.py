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
from gateway.saml.scopes import Scope

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


# -- scoped attributes and subject identifiers ---------------------------------------------

EPPN = "urn:oid:1.3.6.1.4.1.5923.1.1.1.6"
AFFILIATION = "urn:oid:1.3.6.1.4.1.5923.1.1.1.9"
SUBJECT_ID = "urn:oasis:names:tc:SAML:attribute:subject-id"
PAIRWISE_ID = "urn:oasis:names:tc:SAML:attribute:pairwise-id"
SCOPES = (Scope.read("example.org", False), Scope.read(r"[a-z]+\.example\.ac\.uk", True))
SCOPED_MAP = {"eppn": [EPPN, "eduPersonPrincipalName"], "affiliation": [AFFILIATION]}


def test_scoped_values_out_of_the_idps_scopes_are_dropped(
        caplog: pytest.LogCaptureFixture) -> None:
    identities = rules(attributes=SCOPED_MAP)
    released = {**ALICE, EPPN: ["alice@EXAMPLE.org", "bob@evil.org", "nobody", "a@b@example.org",
                                "@example.org"],
                AFFILIATION: ["member@maths.example.ac.uk", "staff@x.maths.example.ac.uk",
                              "staff@example.ac.uk"]}
    with caplog.at_level(logging.WARNING, logger="gateway.identities"):
        p = identities.principal(signed_in(released, scopes=SCOPES))
    assert p.values("eppn") == ("alice@EXAMPLE.org",)  # a literal scope ignores case
    assert p.values("affiliation") == ("member@maths.example.ac.uk",)  # a full match only
    assert (f"dropped 4 value(s) of {EPPN} asserted by IdP {IDP}: scope (no scope), "
            "evil.org is not one of its scopes") in caplog.text
    assert (f"dropped 2 value(s) of {AFFILIATION} asserted by IdP {IDP}: scope "
            "example.ac.uk, x.maths.example.ac.uk is not one of its scopes") in caplog.text
    assert "bob@" not in caplog.text  # the scope is logged, never the value
    # An attribute that is not in [idp] scoped_attributes is not checked.
    unchecked = rules(attributes=SCOPED_MAP, idp={"scoped_attributes": [AFFILIATION]})
    assert unchecked.principal(signed_in(released, scopes=SCOPES)).values("eppn") == (
        "alice@EXAMPLE.org", "bob@evil.org", "nobody", "a@b@example.org", "@example.org")


def test_an_idp_without_scopes_loses_every_scoped_value_unless_the_admin_vouches(
        caplog: pytest.LogCaptureFixture) -> None:
    released = {**ALICE, EPPN: ["alice@example.org"]}
    with caplog.at_level(logging.WARNING, logger="gateway.identities"):
        assert rules(attributes=SCOPED_MAP).principal(signed_in(released)).values("eppn") == ()
    assert (f"IdP {IDP} has no scope (no shibmd:Scope in its metadata, no [[idps]] scopes): "
            f"dropped every value of its scoped attributes {EPPN}") in caplog.text
    vouched = rules(attributes=SCOPED_MAP, idps=[{"entity_id": IDP, "scopes": ["Example.org"]}])
    assert vouched.principal(signed_in(released)).values("eppn") == ("alice@example.org",)
    # A bad regular expression in metadata is unusable, never an error.
    broken = Scope.read("(unclosed", True)
    assert broken.problem.startswith("the regular expression does not compile")
    assert rules(attributes=SCOPED_MAP).principal(
        signed_in(released, scopes=(broken,))).values("eppn") == ()


def test_scopes_in_the_config_must_be_domains() -> None:
    for bad in ("@example.org", "example.org/x", " ", "a b"):
        with pytest.raises(ValueError, match="is not a scope"):
            rules(idps=[{"entity_id": IDP, "scopes": [bad]}])


@pytest.mark.parametrize(("source", "name"), [("subject-id", SUBJECT_ID),
                                              ("pairwise-id", PAIRWISE_ID)])
def test_subject_from_a_subject_identifier_attribute(source: str, name: str) -> None:
    identities = rules(idps=[{"entity_id": IDP, "subject": source},
                             {"entity_id": OTHER, "subject": source}])
    released = {name: ["Abc-1=@Example.org"]}  # no member number: not needed
    p = identities.principal(signed_in(released, scopes=SCOPES))
    assert (p.subject, p.member_id) == (f"{IDP}!abc-1=@example.org", "")
    assert identities.principal(signed_in(released, idp=OTHER, scopes=SCOPES)).subject == (
        f"{OTHER}!abc-1=@example.org")  # the same value from another IdP: another member
    own = rules(idp={"member_ids": "organisation", "subject": source})
    assert own.principal(signed_in(released, scopes=SCOPES)).subject == "abc-1=@example.org"
    # The friendly name counts too.
    assert identities.principal(signed_in({source: ["x@example.org"]}, scopes=SCOPES)
                                ).subject == f"{IDP}!x@example.org"


@pytest.mark.parametrize("member_ids", ["scoped", "organisation"])
def test_a_subject_identifier_out_of_scope_or_malformed_refuses_the_login(
        member_ids: str) -> None:
    identities = rules(idp={"subject": "subject-id", "member_ids": member_ids})
    with pytest.raises(LoginFailed) as info:
        identities.principal(signed_in({**ALICE, SUBJECT_ID: ["alice@evil.org"]},
                                       scopes=SCOPES))
    assert info.value.reason == (
        f"The assertion from IdP {IDP!r}: its subject-id is out of its scope (evil.org is "
        "not a scope its metadata lists, nor one of its [[idps]] scopes); refusing the "
        "login.")
    assert info.value.details["scope"] == "evil.org"
    with pytest.raises(LoginFailed, match=r"no subject-id \(none of the attributes"):
        identities.principal(signed_in(ALICE, scopes=SCOPES))  # a member number is no help
    with pytest.raises(LoginFailed, match="2 different subject-id values"):
        identities.principal(signed_in({SUBJECT_ID: ["a@example.org", "b@example.org"]},
                                       scopes=SCOPES))
    # One '@', no '!' (it could pose as "<entity ID>!<value>"), no space, a domain.
    for bad in (f"{OTHER}!x@example.org", "x!y@example.org", "a b@example.org",
                "x@exa_mple.org"):
        with pytest.raises(LoginFailed, match=r"is not <id>@<scope>"):
            identities.principal(signed_in({SUBJECT_ID: [bad]},
                                           scopes=(Scope.read(".*", True),)))


def test_subject_from_a_persistent_name_id() -> None:
    identities = rules(idp={"subject": "persistent", "name_id_format": "persistent",
                            "member_ids": "organisation"})  # ignored: a NameID is per IdP
    p = identities.principal(signed_in({"memberId": ["M1"]}, persistent_id="Opaque/ID+1="))
    assert (p.subject, p.member_id) == (f"{IDP}!Opaque/ID+1=", "M1")  # kept byte-for-byte
    assert identities.principal(signed_in({}, idp=OTHER, persistent_id="Opaque/ID+1=")
                                ).subject == f"{OTHER}!Opaque/ID+1="
    with pytest.raises(LoginFailed, match="no persistent NameID"):
        identities.principal(signed_in(ALICE))
    with pytest.raises(LoginFailed, match="the persistent NameID contains '!'"):
        identities.principal(signed_in({}, persistent_id="a!b"))
    with pytest.raises(LoginFailed, match="control character"):
        identities.principal(signed_in({}, persistent_id="a\nb"))


def test_name_id_format_by_short_name_or_urn() -> None:
    def chosen(value: str) -> str | None:
        return Settings.model_validate(
            {"public_url": "https://gw.example.org",
             "idps": [{"entity_id": IDP, "name_id_format": value}]}).idp_options(IDP).name_id_format
    assert chosen("persistent") == "urn:oasis:names:tc:SAML:2.0:nameid-format:persistent"
    assert chosen("emailAddress") == "urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress"
    urn = "urn:oasis:names:tc:SAML:2.0:nameid-format:transient"
    assert chosen(urn) == urn
    default = Settings.model_validate({"public_url": "https://gw.example.org"})
    assert default.idp_options(IDP).name_id_format == (
        "urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified")
    for bad in ("Persistent", "urn:x", "urn:oasis:names:tc:SAML:2.0:nameid-format:"):
        with pytest.raises(ValueError, match="must be one of unspecified"):
            chosen(bad)


def test_warning_when_the_subject_is_a_name_id_not_asked_for() -> None:
    found = rules(idps=[{"entity_id": IDP, "subject": "persistent"}]).warnings([IDP, OTHER])
    assert len(found) == 1 and found[0].startswith(f"IdP {IDP}: subject = \"persistent\"")
    assert rules(idps=[{"entity_id": IDP, "subject": "persistent",
                        "name_id_format": "persistent"}]).warnings([IDP]) == []
