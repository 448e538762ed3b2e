"""Which IdP may decide what: the admin console's rule must be bound to trusted IdPs,
scopes compare as ASCII domains, the console is for members, tokens name their issuer.

The stack tests add a federation IdP (FED, its own metadata, signing with a test key)
to the demo; the demo's own IdP stays the one trusted for admins.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from gateway.cli import main
from gateway.config import Settings
from gateway.demo.stack import ADMIN, MEMBER, DemoStack, prepare
from gateway.errors import LoginFailed
from gateway.identities import IdentityRules
from gateway.identity import verify_token
from gateway.protocol import SignedIn
from gateway.saml.scopes import Scope
from tests.browser import client
from tests.conftest import Stack, seed_demo_keys
from tests.forge import ALICE, Forge, acs, begin, encode
from tests.test_scoped_attributes import CERT, EPPN, KEY, metadata

FED = "https://idp.some-college.example/idp"
OWN = "https://idp.example.org/idp"
SUBJECT_ID = "urn:oasis:names:tc:SAML:attribute:subject-id"
ADMIN_RULE = 'path = "/_gateway/admin/**"\naccess = "member"\n'
UNBOUND = f'{ADMIN_RULE}require = {{ entitlement = "{ADMIN}" }}\n'


# -- Scopes: ASCII domains only ---------------------------------------------------------

@pytest.mark.parametrize(("in_metadata", "asserted"), [
    ("\u017fchool.edu", "school.edu"),   # long s: casefold() makes it "s"
    ("\u212ath.se", "kth.se"),           # Kelvin sign: casefold() makes it "k"
    ("stra\u00dfe.de", "strasse.de"),    # sharp s: casefold() makes it "ss"
])
def test_a_non_ascii_scope_in_metadata_is_unusable(in_metadata: str, asserted: str) -> None:
    scope = Scope.read(in_metadata, False)
    assert scope.problem == ("the scope is not ASCII (a domain; an internationalised one "
                             "is written in its xn-- form)")
    assert not scope.matches(asserted)
    assert not scope.matches(in_metadata)


def test_scopes_fold_ascii_letters_only() -> None:
    assert Scope.read("School.EDU", False).matches("school.edu")
    assert not Scope.read("school.edu", False).matches("\u017fchool.edu")
    assert not Scope.read("kth.se", False).matches("\u212ath.se")
    pattern = Scope.read(r"(?i)[a-z]+\.school\.edu", True)
    assert pattern.problem == "" and pattern.matches("Maths.school.edu")
    assert not pattern.matches("math\u017f.school.edu")
    assert Scope.read("(?i)\u017fchool\\.edu", True).problem.startswith("the scope is not ASCII")
    # re's IGNORECASE would let "K" (Kelvin) match "k": ASCII matching only
    assert not Scope.read(r"(?i)[a-z]+\.se", True).matches("\u212ath.se")


def _rules(**idp: object) -> IdentityRules:
    return IdentityRules(Settings.model_validate({
        "public_url": "https://gw.example.org",
        "idps": [{"entity_id": e, "subject": "subject-id", "member_ids": "organisation",
                  **idp} for e in (FED, OWN)]}))


def test_a_long_s_scope_cannot_take_over_a_subject() -> None:
    forged = SignedIn(idp=FED, protocol="saml", scopes=(Scope.read("\u017fchool.edu", False),),
                      released={SUBJECT_ID: ["dean@school.edu"]})
    with pytest.raises(LoginFailed) as refused:
        _rules().principal(forged)
    assert refused.value.reason == (
        f"The assertion from IdP {FED!r}: its subject-id is out of its scope (school.edu is "
        "not a scope its metadata lists, nor one of its [[idps]] scopes); refusing the login.")


def test_a_value_whose_scope_is_not_ascii_is_dropped() -> None:
    signed_in = SignedIn(idp=OWN, protocol="saml", scopes=(Scope.read("school.edu", False),),
                         released={SUBJECT_ID: ["dean@\u017fchool.edu"]})
    with pytest.raises(LoginFailed, match="its subject-id is out of its scope"):
        _rules().principal(signed_in)
    vouched = SignedIn(idp=OWN, protocol="saml", released={SUBJECT_ID: ["dean@\u017fchool.edu"]})
    with pytest.raises(LoginFailed, match="its subject-id is out of its scope"):
        _rules(scopes=["school.edu"]).principal(vouched)
    ok = SignedIn(idp=OWN, protocol="saml", released={SUBJECT_ID: ["Dean@School.EDU"]})
    assert _rules(scopes=["school.edu"]).principal(ok).subject == "dean@school.edu"


# -- The admin rule must name whom it trusts ---------------------------------------------

@pytest.fixture
def site(tmp_path: Path) -> DemoStack:
    """The demo's files (no servers): what `sso-gateway check` reads."""
    seed_demo_keys(tmp_path)
    return prepare(tmp_path)


def _with_admin_rule(demo: DemoStack, rule: str, extra: str = "") -> str:
    config = demo.workdir / "gateway.toml"
    text = config.read_text()
    start = text.index(ADMIN_RULE)
    config.write_text(text[:start] + rule + extra)
    return str(config)


def test_check_refuses_an_admin_rule_any_idp_can_meet(
        site: DemoStack, capsys: pytest.CaptureFixture[str]) -> None:
    config = _with_admin_rule(site, UNBOUND)
    assert main(["check", "--config", config]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: rule /_gateway/admin/** opens the admin console to any IdP that asserts the "
        f"entitlement {ADMIN} (every IdP keeps every entitlement it asserts: [idp] "
        "allowed_entitlements is not set). Name the IdPs trusted for it: require.idp = "
        "[\"<entity ID>\", …] in the rule, or [idp] allowed_entitlements without it and "
        "[[idps]] allowed_entitlements with it for each trusted IdP (docs/access-rules.md)"]


def test_check_refuses_a_default_that_lets_every_idp_assert_admin(
        site: DemoStack, capsys: pytest.CaptureFixture[str]) -> None:
    config = _with_admin_rule(site, UNBOUND, f'\n[idp]\nallowed_entitlements = ["{ADMIN}"]\n')
    assert main(["check", "--config", config]) == 2
    assert ("([idp] allowed_entitlements lets every IdP assert it)"
            in capsys.readouterr().err)


@pytest.mark.parametrize(("rule", "path"), [
    (f'{ADMIN_RULE}require = {{ attributes = {{ email = "boss@example.org" }} }}\n',
     "/_gateway/admin/**"),
    ('path = "/_gateway/**"\naccess = "member"\n', "/_gateway/**"),
])
def test_check_refuses_an_admin_rule_without_an_idp_binding(
        site: DemoStack, capsys: pytest.CaptureFixture[str], rule: str, path: str) -> None:
    config = _with_admin_rule(site, rule)
    assert main(["check", "--config", config]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: rule {path} opens the admin console to any member of any IdP "
        "(it requires no entitlement, no idp and no scoped attribute). Name the IdPs "
        "trusted for it: require.idp = [\"<entity ID>\", …] in the rule "
        "(docs/access-rules.md)"]


def test_bound_admin_rules_load(site: DemoStack, capsys: pytest.CaptureFixture[str]) -> None:
    entity = site.idp.entity_id
    config = _with_admin_rule(site, f'{ADMIN_RULE}require = {{ entitlement = "{ADMIN}", '
                                    f'idp = "{entity}" }}\n')
    assert main(["check", "--config", config]) == 0
    filtered = (f'\n[idp]\nallowed_entitlements = ["urn:x:member"]\n'
                f'[[idps]]\nentity_id = "https://other.example/idp"\n'
                f'allowed_entitlements = ["{ADMIN}"]\n')
    config = _with_admin_rule(site, UNBOUND, filtered)
    assert main(["check", "--config", config]) == 0
    capsys.readouterr()
    assert main(["check", "--config", str(site.workdir / "gateway.toml")]) == 0


def test_an_admin_rule_on_a_scoped_attribute_is_bound(
        site: DemoStack, capsys: pytest.CaptureFixture[str]) -> None:
    # An attribute only scoped attributes carry: only the IdP that vouches for example.org
    # can assert the value. Once an IdP may carry it in an attribute of its choosing, not.
    eppn = '\n[attributes]\neppn = ["eduPersonPrincipalName"]\n'
    config = _with_admin_rule(site, f'{ADMIN_RULE}require = {{ attributes = {{ '
                                    f'eppn = "boss@example.org" }} }}\n', eppn)
    assert main(["check", "--config", config]) == 0
    config = _with_admin_rule(site, f'{ADMIN_RULE}require = {{ attributes = {{ '
                                    f'eppn = "boss@example.org" }} }}\n',
                              eppn + '[[idps]]\nentity_id = "https://other.example/idp"\n'
                              'attributes = { eppn = ["mail"] }\n')
    capsys.readouterr()
    assert main(["check", "--config", config]) == 2
    assert "opens the admin console to any member of any IdP" in capsys.readouterr().err


def test_check_warns_about_entitlement_rules_several_idps_may_meet() -> None:
    settings = Settings.model_validate({
        "public_url": "https://gw.example.org",
        "rules": [{"path": "/reports/**", "access": "member",
                   "require": {"entitlement": "urn:x:staff"}}]})
    assert IdentityRules(settings).warnings([OWN, FED]) == [
        "rule /reports/**: 2 IdPs may assert urn:x:staff and so decide who gets in "
        f"({OWN}, {FED}); if only some are trusted for it, name them (require.idp) or "
        "filter the others' entitlements (allowed_entitlements)"]
    assert IdentityRules(settings).warnings([OWN]) == []


# -- Over real sockets ------------------------------------------------------------------

def add_federation_idp(demo: DemoStack) -> None:
    (demo.workdir / "idp_metadata" / "fed.xml").write_text(metadata(FED, (
        ("idp", "\u017fome-college.example", False),)))


def sign_in_at_fed(stack: Stack, released: dict[str, list[str]]) -> httpx.Client:
    http = client(stack)
    url = stack.url
    forge = Forge(idp_entity_id=FED, key_pem=KEY, cert_pem=CERT, acs_url=url + "/saml/acs",
                  sp_entity_id=stack.demo.settings.sp_entity_id,
                  attributes={**ALICE, **released})
    pending = begin(http, url, FED)
    answer = acs(http, url, encode(forge.xml(pending.request_id)), pending.relay_state)
    assert answer.status_code == 302, answer.text
    return http


@pytest.mark.stack(setup=add_federation_idp,
                   extra_config='\n[attributes]\neppn = ["urn:oid:1.3.6.1.4.1.5923.1.1.1.6"]\n'
                                '[identity_headers]\neppn = "X-Member-Eppn"\n')
def test_a_federation_idp_cannot_grant_the_admin_console(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        http = sign_in_at_fed(stack, {"eduPersonEntitlement": [MEMBER, ADMIN],
                                      EPPN: ["dean@some-college.example"]})
    url = stack.url
    try:
        console = http.get(url + "/_gateway/admin", headers={"accept": "application/json"})
        assert console.status_code == 403
        assert console.json()["reason"] == (
            f"signed in at {FED}, which this page does not accept")
        page = http.get(url + "/issues/2023-03/pages/14")
    finally:
        http.close()
    assert page.status_code == 200
    seen = dict(stack.upstream.requests[-1]["headers"])
    assert seen.get("x-member-eppn", "") == ""  # its long-s scope vouches for nothing
    assert (f"dropped 1 value(s) of {EPPN} asserted by IdP {FED}: scope some-college.example "
            "is not one of its scopes") in caplog.text


def _registered_console(demo: DemoStack) -> None:
    config = demo.workdir / "gateway.toml"
    text = config.read_text()
    config.write_text(text.replace(text[text.index(ADMIN_RULE):],
                                   'path = "/_gateway/**"\naccess = "registered"\n'))


@pytest.mark.stack(setup=_registered_console)
def test_a_registered_reader_does_not_get_the_console(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    url = stack.url
    with client(stack) as http:
        done = http.post(url + "/_gateway/register",
                         data={"email": "mallory@example.net", "consent": "yes",
                               "next": "/issues/free-2024/"},
                         headers={"origin": url})
        assert done.status_code == 303, done.text
        with caplog.at_level(logging.INFO, logger="gateway.admin"):
            console = http.get(url + "/_gateway/admin", headers={"accept": "application/json"})
            export = http.get(url + "/_gateway/admin/registrations.csv")
    assert console.status_code == 403 and export.status_code == 403
    assert console.json()["message"] == (
        "Admin pages need an admin rule in the gateway's configuration.")
    assert "mallory" not in export.text
    assert ("admin page /_gateway/admin refused: rule /_gateway/** gives access "
            "\"registered\"; admin pages need a member or owner rule") in caplog.text


# -- The identity token's issuer ---------------------------------------------------------

def test_verify_token_requires_the_issuer() -> None:
    with pytest.raises(TypeError, match="issuer"):
        verify_token("a.b.c", {"keys": []}, "reader")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="needs the gateway's public_url as issuer"):
        verify_token("a.b.c", {"keys": []}, "reader", issuer="")

