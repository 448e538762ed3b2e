"""Scoped attributes over real sockets: a value whose scope the IdP's metadata does not
list (``shibmd:Scope``) never reaches the upstream, as in Shibboleth.

Three IdPs sign with one test key: SCOPED lists ``members.example.org`` (in its
IDPSSODescriptor), a regular expression for its sub-domains (in its EntityDescriptor)
and a regular expression that does not compile; UNSCOPED lists none; VOUCHED lists none
but its admin vouches for ``vouched.example.org`` in ``[[idps]] scopes``. The gateway
maps eduPersonPrincipalName and eduPersonScopedAffiliation to identity headers, so the
upstream shows what was kept.
"""

from __future__ import annotations

import logging

import httpx
import pytest
from lxml import etree

from gateway.cli import main
from gateway.demo.stack import DemoStack
from gateway.devidp import DevIdPSettings
from gateway.devidp.metadata import idp_metadata
from gateway.keys import generate_self_signed
from gateway.saml.scopes import SHIBMD_NS, read_scopes
from tests.browser import client
from tests.conftest import Stack
from tests.forge import ALICE, PAGE, Forge, acs, begin, encode

KEY, CERT = generate_self_signed("scoped test IdPs")
SCOPED = "https://scoped-idp.example/idp"
UNSCOPED = "https://unscoped-idp.example/idp"
VOUCHED = "https://vouched-idp.example/idp"
EPPN = "urn:oid:1.3.6.1.4.1.5923.1.1.1.6"
AFFILIATION = "urn:oid:1.3.6.1.4.1.5923.1.1.1.9"
MD = "urn:oasis:names:tc:SAML:2.0:metadata"
SUB_DOMAINS = r"[a-z]+\.members\.example\.org"
CLAIMS = ('claims = ["email", "display_name", "entitlements", "status", "idp", "eppn", '
          '"affiliation"]')
CONFIG = f"""
[attributes]
eppn = ["{EPPN}", "eduPersonPrincipalName"]
affiliation = ["{AFFILIATION}"]

[identity_headers]
eppn = "X-Member-Eppn"
affiliation = "X-Member-Affiliation"
"""


def metadata(entity_id: str, scopes: tuple[tuple[str, str, bool], ...] = ()) -> str:
    """IdP metadata with ``(where, text, regexp)`` scopes, ``where`` being "idp" (the
    IDPSSODescriptor's Extensions) or "entity" (the EntityDescriptor's)."""
    settings = DevIdPSettings(base_url="http://127.0.0.1:9", key_pem=KEY, cert_pem=CERT,
                              sp_entity_id="https://sp.example/saml/metadata",
                              sp_acs_url="https://sp.example/saml/acs",
                              entity_id=entity_id, require_signed_requests=False)
    root = etree.fromstring(idp_metadata(settings).encode())
    for where, text, regexp in scopes:
        if where == "idp":
            extensions = root.find(f"{{{MD}}}IDPSSODescriptor/{{{MD}}}Extensions")
        else:
            extensions = root.find(f"{{{MD}}}Extensions")
            if extensions is None:
                extensions = etree.Element(f"{{{MD}}}Extensions")
                root.insert(0, extensions)
        scope = etree.SubElement(extensions, f"{{{SHIBMD_NS}}}Scope",
                                 nsmap={"shibmd": SHIBMD_NS})
        scope.set("regexp", "true" if regexp else "false")
        scope.text = text
    return etree.tostring(root, encoding="unicode")


def add_idps(demo: DemoStack) -> None:
    folder = demo.workdir / "idp_metadata"
    (folder / "scoped.xml").write_text(metadata(SCOPED, (
        ("idp", "members.example.org", False), ("entity", SUB_DOMAINS, True),
        ("idp", "(unclosed", True))))
    (folder / "unscoped.xml").write_text(metadata(UNSCOPED))
    (folder / "vouched.xml").write_text(metadata(VOUCHED))
    config = demo.workdir / "gateway.toml"
    # The upstream learns the two scoped attributes (as headers) besides the defaults.
    text = config.read_text().replace('name = "reader"\n', f'name = "reader"\n{CLAIMS}\n', 1)
    config.write_text(text + f'\n[[idps]]\nentity_id = "{VOUCHED}"\n'
                      'scopes = ["vouched.example.org"]\n')


pytestmark = pytest.mark.stack(shared=True, setup=add_idps, extra_config=CONFIG)


def sign_in(stack: Stack, idp: str, released: dict[str, list[str]]) -> httpx.Client:
    """A browser signed in at ``idp`` with Alice's attributes plus ``released``."""
    http = client(stack)
    forge = Forge(idp_entity_id=idp, key_pem=KEY, cert_pem=CERT,
                  acs_url=stack.url + "/saml/acs", sp_entity_id=stack.demo.settings.sp_entity_id,
                  attributes={**ALICE, **released})
    pending = begin(http, stack.url, idp)
    answer = acs(http, stack.url, encode(forge.xml(pending.request_id)), pending.relay_state)
    assert answer.status_code == 302, answer.text
    return http


def upstream_sees(stack: Stack, http: httpx.Client) -> dict[str, str]:
    """The identity headers of the upstream request a page view makes."""
    try:
        assert http.get(stack.url + PAGE).status_code == 200
    finally:
        http.close()
    headers = dict(stack.upstream.requests[-1]["headers"])
    return {name: headers.get(name, "") for name in ("x-member-eppn", "x-member-affiliation")}


def test_values_out_of_scope_are_dropped_in_scope_and_regexp_kept(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.identities"):
        http = sign_in(stack, SCOPED, {
            EPPN: ["alice@members.example.org"],
            AFFILIATION: ["member@members.example.org", "staff@evil.example.com",
                          "member@maths.members.example.org", "faculty",
                          "staff@x.maths.members.example.org"]})
    assert upstream_sees(stack, http) == {
        "x-member-eppn": "alice@members.example.org",
        "x-member-affiliation": "member@members.example.org,member@maths.members.example.org"}
    assert (f"dropped 3 value(s) of {AFFILIATION} asserted by IdP {SCOPED}: scope (no scope), "
            "evil.example.com, x.maths.members.example.org is not one of its scopes"
            ) in caplog.text
    assert "staff@" not in caplog.text  # the scope is logged, never the value


def test_another_institutions_scope_is_dropped(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.identities"):
        http = sign_in(stack, SCOPED, {EPPN: ["victim@vouched.example.org"]})
    assert upstream_sees(stack, http)["x-member-eppn"] == ""
    assert (f"dropped 1 value(s) of {EPPN} asserted by IdP {SCOPED}: scope "
            "vouched.example.org is not one of its scopes") in caplog.text


def test_an_idp_without_a_scope_loses_every_scoped_value(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.identities"):
        http = sign_in(stack, UNSCOPED, {EPPN: ["alice@members.example.org"],
                                         AFFILIATION: ["member@members.example.org"]})
    assert upstream_sees(stack, http) == {"x-member-eppn": "", "x-member-affiliation": ""}
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.identities"]
    assert lines == [f"IdP {UNSCOPED} has no scope (no shibmd:Scope in its metadata, no "
                     f"[[idps]] scopes): dropped every value of its scoped attributes "
                     f"{EPPN}, {AFFILIATION}"]


def test_scopes_an_admin_vouches_for(stack: Stack) -> None:
    http = sign_in(stack, VOUCHED, {EPPN: ["alice@vouched.example.org"],
                                    AFFILIATION: ["member@members.example.org"]})
    assert upstream_sees(stack, http) == {"x-member-eppn": "alice@vouched.example.org",
                                          "x-member-affiliation": ""}


def test_idp_list_shows_the_scopes(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["idp", "list", "--config", str(stack.demo.workdir / "gateway.toml")]) == 0
    out = capsys.readouterr().out
    assert ("  scopes       members.example.org, (unclosed (regexp) (unusable: the regular "
            "expression does not compile (missing ), unterminated subpattern at position 0)), "
            f"{SUB_DOMAINS} (regexp)") in out
    assert "  scopes       (none: every scoped attribute value it asserts is dropped)" in out
    assert "  scopes       vouched.example.org ([[idps]] scopes)" in out


def test_scopes_are_read_from_both_places_and_a_bad_one_is_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    root = etree.fromstring(metadata(SCOPED, (
        ("idp", " members.example.org ", False), ("entity", SUB_DOMAINS, True),
        ("idp", "(unclosed", True), ("idp", "members.example.org", False))).encode())
    with caplog.at_level(logging.WARNING, logger="gateway.metadata"):
        scopes = read_scopes(root, "scoped.xml: IdP x", {"md": MD})
    assert [(s.text, s.regexp, bool(s.problem)) for s in scopes] == [
        ("members.example.org", False, False), ("(unclosed", True, True),
        (SUB_DOMAINS, True, False)]  # each once, the IdP's own first
    assert "scoped.xml: IdP x: shibmd:Scope '(unclosed' is unusable" in caplog.text
    regexp = scopes[2]
    assert regexp.matches("maths.members.example.org")
    assert not regexp.matches("maths.members.example.org.evil.com")  # a full match
    assert not regexp.matches("MATHS.members.example.org")  # as the admin wrote it
    assert scopes[0].matches("Members.Example.ORG")  # a literal is a domain
