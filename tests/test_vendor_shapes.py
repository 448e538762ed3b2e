"""Members sign in through IdPs that shape their Responses as Keycloak, ADFS, Microsoft
Entra ID and Okta do by default.

Each product is an IdP of its own here: its own entity ID and signing key, its metadata
in the gateway's ``idp_metadata/``, and an ``[[idps]]`` entry that maps the attribute
names it releases. The Responses carry what those products send out of the box: their
attribute names and NameFormats, ``xsi:type="xs:string"`` values (Keycloak, Okta), the
assertion namespace as the default namespace (ADFS, Entra ID) or ``saml2:`` prefixes
(Okta), an entity-format Issuer (Okta), ADFS's ``Consent``, their NameID formats, and
their signing choices: the Response only (Keycloak), the Assertion (ADFS, Entra ID),
both (Okta, and ADFS when asked). The products themselves cannot run here; the shapes
are built with ``tests.forge.shaped_response`` and signed with each IdP's real key.

A member signs in for real at the running gateway, and the identity reaches the upstream.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C

from gateway.devidp import DevIdPSettings
from gateway.devidp.metadata import idp_metadata
from gateway.keys import generate_self_signed
from tests.browser import client
from tests.conftest import Stack
from tests.forge import Forge, VendorShape, acs, begin, encode, shaped_response

BASIC = "urn:oasis:names:tc:SAML:2.0:attrname-format:basic"
URI = "urn:oasis:names:tc:SAML:2.0:attrname-format:uri"
WS = "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/"
MS = "http://schemas.microsoft.com/identity/claims/"
PAGE = "/vendor/welcome"
EMAIL = "alice@members.example.org"


@functools.cache
def key_pair(vendor: str) -> tuple[str, str]:
    return generate_self_signed(f"{vendor} signing")


#: Per product: its entity ID, the gateway's [[idps]] attributes for it, its shape.
VENDORS: dict[str, tuple[str, str, VendorShape]] = {
    "keycloak": (
        "https://keycloak.example.org/realms/members",
        'member_id = ["username"], email = ["email"], display_name = ["firstName"]',
        VendorShape(
            attributes={"username": ["alice"], "email": [EMAIL], "firstName": ["Alice"],
                        "lastName": ["Archer"], "Role": ["offline_access", "member"]},
            name_id="alice", name_id_format=C.NAMEID_UNSPECIFIED,
            sign_assertion=False, sign_response=True, name_format=BASIC, typed_values=True)),
    "adfs": (
        "http://adfs.example.org/adfs/services/trust",
        f'member_id = ["{WS}upn"], email = ["{WS}emailaddress"], '
        f'display_name = ["http://schemas.xmlsoap.org/claims/CommonName"]',
        VendorShape(
            attributes={f"{WS}upn": [EMAIL], f"{WS}emailaddress": [EMAIL],
                        "http://schemas.xmlsoap.org/claims/CommonName": ["Alice Archer"],
                        "http://schemas.xmlsoap.org/claims/Group": ["Domain Users", "Members"]},
            name_id="_d1f4c0a9b7e2", name_id_format=C.NAMEID_TRANSIENT,
            sign_assertion=True, sign_response=False, assertion_prefix="",
            response_attributes={"Consent": "urn:oasis:names:tc:SAML:2.0:consent:unspecified"})),
    "entra": (
        "https://sts.windows.net/6a1f0c1e-3c9a-4c6e-9c1a-2d6b1e0f5a77/",
        f'member_id = ["{MS}objectidentifier"], email = ["{WS}emailaddress"], '
        f'display_name = ["{MS}displayname"]',
        VendorShape(
            attributes={f"{MS}tenantid": ["6a1f0c1e-3c9a-4c6e-9c1a-2d6b1e0f5a77"],
                        f"{MS}objectidentifier": ["0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"],
                        f"{MS}displayname": ["Alice Archer"],
                        f"{MS}identityprovider": ["https://sts.windows.net/6a1f0c1e/"],
                        "http://schemas.microsoft.com/claims/authnmethodsreferences": [
                            "http://schemas.microsoft.com/ws/2008/06/identity/"
                            "authenticationmethod/password"],
                        f"{WS}givenname": ["Alice"], f"{WS}surname": ["Archer"],
                        f"{WS}emailaddress": [EMAIL], f"{WS}name": [EMAIL]},
            name_id=EMAIL, name_id_format=C.NAMEID_EMAIL_ADDRESS,
            sign_assertion=True, sign_response=False, assertion_prefix="")),
    "okta": (
        "http://www.okta.com/exk1a2b3c4d5e6f7g8h9",
        'member_id = ["memberNumber"], email = ["email"], display_name = ["displayName"]',
        VendorShape(
            attributes={"memberNumber": ["M1001"], "email": [EMAIL], "firstName": ["Alice"],
                        "lastName": ["Archer"], "displayName": ["Alice Archer"]},
            name_id=EMAIL, name_id_format=C.NAMEID_UNSPECIFIED,
            sign_assertion=True, sign_response=True, name_format=BASIC, typed_values=True,
            protocol_prefix="saml2p", assertion_prefix="saml2", issuer_format=True)),
}
#: The member ID each product releases (the gateway's member_id attribute).
MEMBER_IDS = {"keycloak": "alice", "adfs": EMAIL,
              "entra": "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0", "okta": "M1001"}


def add_vendor_idps(demo: Any) -> None:
    """Each product's metadata into idp_metadata/, its [[idps]] entry into the config."""
    config = []
    for vendor, (entity_id, attributes, _) in VENDORS.items():
        key, cert = key_pair(vendor)
        settings = DevIdPSettings(base_url=f"https://{vendor}.example.org/saml", key_pem=key,
                                  cert_pem=cert, sp_entity_id=demo.settings.sp_entity_id,
                                  sp_acs_url=demo.settings.public_url + "/saml/acs",
                                  entity_id=entity_id, display_name=f"{vendor} members",
                                  require_signed_requests=False)
        (demo.workdir / "idp_metadata" / f"{vendor}.xml").write_text(idp_metadata(settings))
        config.append(f'\n[[idps]]\nentity_id = "{entity_id}"\n'
                      f"attributes = {{ {attributes} }}\n")
    with (demo.workdir / "gateway.toml").open("a") as toml:
        toml.write("".join(config))


pytestmark = pytest.mark.stack(shared=True, setup=add_vendor_idps)


def vendor_forge(stack: Stack, vendor: str) -> Forge:
    key, cert = key_pair(vendor)
    return Forge(idp_entity_id=VENDORS[vendor][0], key_pem=key, cert_pem=cert,
                 acs_url=stack.url + "/saml/acs", sp_entity_id=stack.demo.settings.sp_entity_id)


def sign_in_as(stack: Stack, vendor: str, shape: VendorShape) -> dict[str, str]:
    """Sign in through ``vendor``'s IdP with a Response of ``shape``; open the page; the
    identity headers the upstream got for it."""
    forge = vendor_forge(stack, vendor)
    with client(stack) as http:
        pending = begin(http, stack.url, forge.idp_entity_id, next_path=PAGE)
        answer = acs(http, stack.url, encode(shaped_response(forge, shape, pending.request_id)),
                     pending.relay_state)
        assert answer.status_code == 302, answer.text
        assert answer.headers["location"].endswith(PAGE)
        page = http.get(stack.url + PAGE)
        assert page.status_code == 200, page.text
    seen = [r for r in stack.upstream.requests if r["path"] == PAGE][-1]
    return {k.lower(): v for k, v in seen["headers"]}


@pytest.mark.parametrize("vendor", list(VENDORS))
def test_a_member_signs_in_with_the_products_default_response(
        stack: Stack, vendor: str) -> None:
    entity_id, _, shape = VENDORS[vendor]
    sessions = stack.session_count()
    headers = sign_in_as(stack, vendor, shape)
    assert headers["x-member-id"] == f"{entity_id}!{MEMBER_IDS[vendor]}"
    assert headers["x-member-email"] == EMAIL
    assert headers["x-member-name"].startswith("Alice")
    assert headers["x-member-idp"] == entity_id
    assert stack.session_count() == sessions + 1


def test_adfs_signing_response_and_assertion(stack: Stack) -> None:
    """ADFS's other common setting (SamlResponseSignature = MessageAndAssertion)."""
    entity_id, _, shape = VENDORS["adfs"]
    both = VendorShape(**{**shape.__dict__, "sign_response": True})
    assert sign_in_as(stack, "adfs", both)["x-member-id"] == f"{entity_id}!{EMAIL}"


@pytest.mark.parametrize("name_id_format", [
    C.NAMEID_EMAIL_ADDRESS, C.NAMEID_PERSISTENT, C.NAMEID_TRANSIENT, C.NAMEID_UNSPECIFIED])
def test_every_common_nameid_format_signs_in(stack: Stack, name_id_format: str) -> None:
    """The member comes from the mapped attribute whatever NameID format the IdP uses
    (Keycloak's client setting "Name ID format")."""
    entity_id, _, shape = VENDORS["keycloak"]
    shaped = VendorShape(**{**shape.__dict__, "name_id_format": name_id_format})
    assert sign_in_as(stack, "keycloak", shaped)["x-member-id"] == f"{entity_id}!alice"


def test_the_shapes_are_what_the_products_send(stack: Stack) -> None:
    """The test's own check on its builder: the signing choices, typed values and
    prefixes are really in the messages posted above."""
    texts = {vendor: shaped_response(vendor_forge(stack, vendor), shape, "_r")
             for vendor, (_, _, shape) in VENDORS.items()}
    keycloak, adfs, entra, okta = (texts[v] for v in ("keycloak", "adfs", "entra", "okta"))
    assert keycloak.count("<ds:Signature ") == 1
    assert keycloak.index("<ds:Signature ") < keycloak.index("<saml:Assertion")
    assert 'xsi:type="xs:string"' in keycloak and 'xsi:type="xs:string"' in okta
    assert "<Assertion " in adfs and "<Assertion " in entra and 'Consent="' in adfs
    assert adfs.count("<ds:Signature ") == 1 and entra.count("<ds:Signature ") == 1
    assert adfs.index("<Assertion ") < adfs.index("<ds:Signature ")
    assert okta.count("<ds:Signature ") == 2 and "<saml2p:Response" in okta
    assert "<saml2:Assertion" in okta
