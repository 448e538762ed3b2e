"""The identity sections of gateway.toml: attributes, per-IdP member numbers and
entitlements, identity headers, upstream claims and attribute requirements."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from gateway.config import load_settings
from gateway.errors import ConfigError
from gateway.keys import ensure_identity_key, write_keypair

IDP = "https://idp.example.org/idp"
BASE = """\
public_url = "https://gw.example.org"
[session]
secrets_file = "secrets"
[[upstreams]]
name = "reader"
url = "http://127.0.0.1:9000"
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A directory with every file a config needs, so only the config text is tested."""
    write_keypair(tmp_path / "certs" / "sp.key", tmp_path / "certs" / "sp.crt", "sp")
    ensure_identity_key(tmp_path / "certs" / "identity")
    (tmp_path / "idp_metadata").mkdir()
    (tmp_path / "secrets").write_text(secrets.token_urlsafe(48) + "\n")
    return tmp_path


def problems(site: Path, text: str) -> list[str]:
    config = site / "gateway.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(config, environ={})
    return info.value.problems


def test_defaults_match_the_old_fixed_fields(site: Path) -> None:
    (site / "gateway.toml").write_text(BASE)
    settings = load_settings(site / "gateway.toml", environ={})
    assert settings.attribute_map(IDP) == {
        "member_id": ("memberId", "urn:oid:1.3.6.1.4.1.5923.1.1.1.6"),
        "email": ("mail", "email", "urn:oid:0.9.2342.19200300.100.1.3"),
        "display_name": ("displayName", "urn:oid:2.16.840.1.113730.3.1.241"),
        "entitlements": ("eduPersonEntitlement", "urn:oid:1.3.6.1.4.1.5923.1.1.1.7"),
        "status": ("memberStatus",)}
    assert settings.identity_headers == {
        "subject": "X-Member-Id", "email": "X-Member-Email",
        "email_verified": "X-Member-Email-Verified", "display_name": "X-Member-Name",
        "entitlements": "X-Member-Entitlements", "status": "X-Member-Status",
        "idp": "X-Member-Idp"}
    assert settings.upstreams[0].claims == ["email", "email_verified", "display_name",
                                            "entitlements", "status", "idp"]
    options = settings.idp_options(IDP)
    assert (options.member_ids, options.allowed_entitlements, options.allow_unsolicited) \
        == ("scoped", None, False)


def test_an_added_attribute_is_usable_everywhere(site: Path) -> None:
    (site / "gateway.toml").write_text(BASE.replace(
        'url = "http://127.0.0.1:9000"',
        'url = "http://127.0.0.1:9000"\nclaims = ["affiliation", "member_id", "idp"]') + f"""
[idp]
member_ids = "organisation"
allowed_entitlements = ["urn:x:member"]
[attributes]
email = ["mail"]
affiliation = ["eduPersonAffiliation", "urn:oid:1.3.6.1.4.1.5923.1.1.1.1"]
[[idps]]
entity_id = "{IDP}"
attributes = {{ affiliation = ["staffType"] }}
member_ids = "scoped"
[identity_headers]
affiliation = "X-Member-Affiliation"
email = ""
[[rules]]
path = "/staff/**"
access = "member"
require = {{ attributes = {{ affiliation = "staff", idp = ["{IDP}"] }} }}
""")
    settings = load_settings(site / "gateway.toml", environ={})
    assert settings.attribute_map(IDP)["affiliation"] == ("staffType",)
    assert settings.attribute_map("https://other")["affiliation"] == (
        "eduPersonAffiliation", "urn:oid:1.3.6.1.4.1.5923.1.1.1.1")
    assert settings.attribute_map(IDP)["member_id"][0] == "memberId"  # defaults kept
    assert settings.attribute_map(IDP)["email"] == ("mail",)
    assert settings.identity_headers["affiliation"] == "X-Member-Affiliation"
    assert settings.identity_headers["subject"] == "X-Member-Id"
    assert settings.rules[0].require.attributes == {"affiliation": ["staff"], "idp": [IDP]}
    assert settings.idp_options(IDP).member_ids == "scoped"
    assert settings.idp_options(IDP).allowed_entitlements == ["urn:x:member"]
    assert settings.idp_options("https://other").member_ids == "organisation"


def test_unknown_attributes_are_errors_naming_the_key(site: Path) -> None:
    config = site / "gateway.toml"
    found = problems(site, BASE.replace(
        'url = "http://127.0.0.1:9000"',
        'url = "http://127.0.0.1:9000"\nclaims = ["email", "colour"]') + f"""
[identity_headers]
shoe_size = "X-Shoe-Size"
[[idps]]
entity_id = "{IDP}"
attributes = {{ colour = ["c"] }}
[[rules]]
path = "/x/**"
access = "member"
require = {{ attributes = {{ colour = "blue" }} }}
""")
    known = "display_name, email, entitlements, member_id, status"
    assert found == [
        f"{config}: key identity_headers.shoe_size ('shoe_size'): unknown attribute "
        f"(configured in [attributes]: {known}, email_verified, idp, subject)",
        f"{config}: key upstreams[0].claims[1] ('colour'): unknown attribute "
        f"(configured in [attributes]: {known}, email_verified, idp)",
        f"{config}: key rules[0].require.attributes.colour ('colour'): unknown attribute "
        f"(configured in [attributes]: {known}, email_verified, idp, subject)",
        f"{config}: key idps[0].attributes.colour ('colour'): unknown attribute "
        f"(configured in [attributes]: {known})",
    ]


def test_subject_is_always_sent_not_a_claim(site: Path) -> None:
    found = problems(site, BASE + 'claims = ["subject"]\n')
    assert len(found) == 1 and "key upstreams[0].claims[0] ('subject'): unknown" in found[0]


@pytest.mark.parametrize(("table", "message"), [
    ('Colour = ["x"]', "key attributes: attribute name 'Colour' must be lower-case letters"),
    ('subject = ["x"]', "key attributes: 'subject' is built in"),
    ('idp = ["x"]', "key attributes: 'idp' is built in"),
    # An IdP's released attribute can never stand in for the gateway's own marker.
    ('email_verified = ["email_verified"]', "key attributes: 'email_verified' is built in"),
    ("member_id = []", "key attributes: member_id must name at least one released attribute"),
])
def test_attribute_names_are_checked(site: Path, table: str, message: str) -> None:
    found = problems(site, BASE + f"[attributes]\n{table}\n")
    assert len(found) == 1 and message in found[0], found


def test_header_names_are_checked(site: Path) -> None:
    config = site / "gateway.toml"
    assert problems(site, BASE + '[identity_headers]\nmember_id = "X-Member-Id"\n') == [
        f"{config}: key identity_headers.member_id ('X-Member-Id'): is also the header of "
        "subject (give one of them another name, or \"\" for no header)"]
    assert problems(site, BASE + '[identity_headers]\nemail = "x-gateway_identity"\n') == [
        f"{config}: key identity_headers.email ('x-gateway_identity'): is also "
        "identity.token_header"]
    found = problems(site, BASE + '[identity_headers]\nemail = "X Mail"\n')
    assert len(found) == 1 and "'X Mail' (for email) is not a valid header name" in found[0]


def test_member_ids_must_be_organisation_or_scoped(site: Path) -> None:
    config = site / "gateway.toml"
    assert problems(site, BASE + f'[[idps]]\nentity_id = "{IDP}"\nmember_ids = "own"\n') == [
        f"{config}: key idps[0].member_ids ('own'): must be one of 'organisation' or 'scoped'"]
