"""SP metadata federations take (issue 16): mdui:UIInfo, Organization, ContactPersons
(with the REFEDS SIRTFI security contact), an AttributeConsumingService from
``[attributes]``, entity categories and SIRTFI as entity attributes, both SLO bindings,
and an optional signature with the SP key.

The metadata is fetched over a real socket from a running gateway, checked against the
metadata schema together with the mdui and mdattr extension schemas, and loaded by
pysaml2's metadata store (signature verified with xmlsec1) which must read back every
element.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from lxml import etree
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C

from gateway.cli import main
from gateway.errors import ConfigError
from gateway.saml.sp_keys import (
    ASSURANCE_CERTIFICATION,
    ENTITY_CATEGORY,
    MDUI,
    REMD,
    REMD_SECURITY,
    SIRTFI,
    schema_problems,
)
from tests.test_sp_metadata import gateway, sp_section

RANDS = "http://refeds.org/category/research-and-scholarship"
COCO = "https://refeds.org/category/code-of-conduct/v2"
FEDERATION = sp_section("sign_metadata = true") + f"""
[sp.metadata]
display_name = {{ en = "Members' library", de = "Mitgliederbibliothek" }}
description = {{ en = "The society's journal archive", de = "Das Zeitschriftenarchiv" }}
information_url = {{ en = "https://example.org/about" }}
privacy_url = {{ en = "https://example.org/privacy", de = "https://example.org/datenschutz" }}
logos = [{{ url = "https://example.org/logo.png", width = 80, height = 60, lang = "en" }}]
organization_name = {{ en = "Example Society" }}
organization_display_name = {{ en = "The Example Society" }}
organization_url = {{ en = "https://example.org/" }}
entity_categories = ["{RANDS}", "{COCO}"]
sirtfi = true
required_attributes = ["member_id", "email"]
contacts = [
  {{ type = "technical", email = ["it@example.org"], given_name = "IT", company = "Ex" }},
  {{ type = "support", email = ["mailto:help@example.org"] }},
  {{ type = "administrative", email = ["admin@example.org"], surname = "Admin" }},
  {{ type = "security", email = ["csirt@example.org"], given_name = "CSIRT" }},
]
"""


def _pysaml2_store(xml_url: str, cert_file: Path) -> object:
    from saml2.attribute_converter import ac_factory
    from saml2.config import SPConfig
    from saml2.mdstore import MetadataStore

    config = SPConfig()
    config.load({"entityid": "urn:test", "xmlsec_binary": "/usr/bin/xmlsec1",
                 "service": {"sp": {}}})
    store = MetadataStore(ac_factory(), config)
    # "remote" is pysaml2's fetch-and-verify: the signature must verify with the SP cert.
    store.load("remote", url=xml_url, cert=str(cert_file))
    return store


def test_federation_metadata_is_schema_valid_signed_and_read_by_pysaml2(
        tmp_path: Path) -> None:
    with gateway(tmp_path, FEDERATION) as url:
        answer = httpx.get(url + "/saml/metadata", timeout=10)
        assert answer.status_code == 200
        assert schema_problems(answer.text) == []
        store = _pysaml2_store(url + "/saml/metadata", tmp_path / "certs" / "sp.crt")
    entity_id = url + "/saml/metadata"
    sp = store[entity_id]  # type: ignore[index]
    # Signed with the SP key (pysaml2 verified it against the SP certificate above).
    assert etree.fromstring(answer.content)[0].tag == f"{{{C.NS_DS}}}Signature"

    # mdui:UIInfo, every language.
    ui = store.mdui_uiinfo(entity_id)  # type: ignore[attr-defined]
    [info] = list(ui)
    names = {(n["lang"], n["text"]) for n in info["display_name"]}
    assert names == {("en", "Members' library"), ("de", "Mitgliederbibliothek")}
    assert {(d["lang"], d["text"]) for d in info["description"]} == {
        ("en", "The society's journal archive"), ("de", "Das Zeitschriftenarchiv")}
    assert [(i["lang"], i["text"]) for i in info["information_url"]] == [
        ("en", "https://example.org/about")]
    assert {(p["lang"], p["text"]) for p in info["privacy_statement_url"]} == {
        ("en", "https://example.org/privacy"), ("de", "https://example.org/datenschutz")}
    [logo] = info["logo"]
    assert (logo["text"], logo["width"], logo["height"], logo["lang"]) == (
        "https://example.org/logo.png", "80", "60", "en")

    # Organization.
    org = sp["organization"]
    assert org["organization_name"][0]["text"] == "Example Society"
    assert org["organization_display_name"][0]["text"] == "The Example Society"
    assert org["organization_url"][0]["text"] == "https://example.org/"

    # ContactPersons, with the SIRTFI security contact (REFEDS contactType).
    contacts = {c["contact_type"]: c for c in sp["contact_person"]}
    assert set(contacts) == {"technical", "support", "administrative", "other"}
    assert contacts["technical"]["email_address"][0]["text"] == "mailto:it@example.org"
    assert contacts["technical"]["company"]["text"] == "Ex"
    assert contacts["support"]["email_address"][0]["text"] == "mailto:help@example.org"
    assert contacts["administrative"]["sur_name"]["text"] == "Admin"
    security = contacts["other"]
    assert security["extension_attributes"][f"{{{REMD}}}contactType"] == REMD_SECURITY
    assert security["email_address"][0]["text"] == "mailto:csirt@example.org"

    # Entity categories and SIRTFI (entity attributes).
    attributes = store.entity_attributes(entity_id)  # type: ignore[attr-defined]
    assert set(attributes[ENTITY_CATEGORY]) == {RANDS, COCO}
    assert attributes[ASSURANCE_CERTIFICATION] == [SIRTFI]
    assert set(store.entity_categories(entity_id)) == {RANDS, COCO}  # type: ignore[attr-defined]
    assert list(store.assurance_certifications(entity_id)) == [SIRTFI]  # type: ignore[attr-defined]

    # RequestedAttributes from [attributes]: member_id's and email's names are required.
    wants = store.attribute_requirement(entity_id)  # type: ignore[attr-defined]
    required = {a["name"] for a in wants["required"]}
    optional = {a["name"] for a in wants["optional"]}
    assert required == {"memberId", "urn:oid:1.3.6.1.4.1.5923.1.1.1.6", "mail", "email",
                        "urn:oid:0.9.2342.19200300.100.1.3"}
    assert {"displayName", "eduPersonEntitlement", "memberStatus"} <= optional

    # The ACS, and the SLS for both bindings.
    acs = store.assertion_consumer_service(entity_id, C.BINDING_HTTP_POST)  # type: ignore[attr-defined]
    assert [a["location"] for a in acs] == [url + "/saml/acs"]
    for binding in (C.BINDING_HTTP_REDIRECT, C.BINDING_HTTP_POST):
        slo = store.single_logout_service(entity_id, binding, "spsso")  # type: ignore[attr-defined]
        assert [s["location"] for s in slo] == [url + "/saml/sls"], binding


def test_a_tampered_signature_is_refused_by_pysaml2(tmp_path: Path) -> None:
    """The signature covers the document: pysaml2 refuses the metadata when it is
    checked against a certificate that did not sign it."""
    from gateway.keys import generate_self_signed

    other = tmp_path / "other.crt"
    other.write_text(generate_self_signed("not the SP")[1])
    with gateway(tmp_path, FEDERATION) as url, pytest.raises(Exception):  # noqa: B017
        _pysaml2_store(url + "/saml/metadata", other)


def test_defaults_add_both_slo_bindings_and_requested_attributes_only(
        tmp_path: Path) -> None:
    with gateway(tmp_path) as url:
        xml = httpx.get(url + "/saml/metadata", timeout=10).text
    assert schema_problems(xml) == []
    root = etree.fromstring(xml.encode())
    md = {"md": C.NS_MD, "ds": C.NS_DS}
    assert root.find("ds:Signature", md) is None  # unsigned unless asked
    assert root.find("md:Extensions", md) is None  # no entity attributes configured
    assert [s.get("Binding") for s in root.iterfind(".//md:SingleLogoutService", md)] == [
        C.BINDING_HTTP_REDIRECT, C.BINDING_HTTP_POST]
    requested = root.findall(".//md:RequestedAttribute", md)
    assert {r.get("Name") for r in requested if r.get("isRequired") == "true"} == {
        "memberId", "urn:oid:1.3.6.1.4.1.5923.1.1.1.6"}
    assert root.find("md:Organization", md) is None


def test_the_extension_schemas_are_checked() -> None:
    """A logo without its size is an mdui schema error, not just a metadata one."""
    bad = (f'<md:EntityDescriptor xmlns:md="{C.NS_MD}" xmlns:mdui="{MDUI}" entityID="x">'
           '<md:SPSSODescriptor protocolSupportEnumeration="urn:oasis:names:tc:SAML:2.0:protocol">'
           '<md:Extensions><mdui:UIInfo><mdui:Logo>https://e/l.png</mdui:Logo></mdui:UIInfo>'
           f'</md:Extensions><md:AssertionConsumerService Binding="{C.BINDING_HTTP_POST}" '
           'Location="https://e/acs" index="1"/></md:SPSSODescriptor></md:EntityDescriptor>')
    problems = schema_problems(bad)
    assert problems and "Logo" in problems[0]


def test_sso_gateway_metadata_prints_and_writes_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with gateway(tmp_path, FEDERATION) as url:
        served = httpx.get(url + "/saml/metadata", timeout=10).text
    config = str(tmp_path / "gateway.toml")
    capsys.readouterr()  # the served gateway's log lines
    assert main(["metadata", "--config", config]) == 0
    printed = capsys.readouterr().out
    assert "mdui:UIInfo" in printed and schema_problems(printed) == []
    out = tmp_path / "sp-metadata.xml"
    assert main(["metadata", "--config", config, "--out", str(out)]) == 0
    written = out.read_text()
    assert written.startswith("<md:EntityDescriptor") and schema_problems(written) == []
    assert etree.fromstring(served.encode()).get("entityID") == \
        etree.fromstring(written.encode()).get("entityID")


def test_sirtfi_needs_a_security_contact(tmp_path: Path) -> None:
    from gateway.demo.stack import prepare

    with pytest.raises(ConfigError, match="security"):
        prepare(tmp_path, extra_config="\n[sp.metadata]\nsirtfi = true\n")
