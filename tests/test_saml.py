"""gateway.saml: IdP registry, SP (AuthnRequest, Response validation, metadata), what a
validated Response hands the gateway (``SignedIn``), and whom an IdP's logout names.

Real keys, real signatures: responses come from the dev IdP's ``build_response`` (which
signs with ``OneLogin_Saml2_Utils.add_sign``); the few forgeries it cannot express
(a missing AudienceRestriction, a duplicated attribute) are re-signed here, so that the
only thing wrong with them is the thing under test.
"""

from __future__ import annotations

import base64
import dataclasses
import re
import secrets
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from lxml import etree
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C
from onelogin.saml2.response import OneLogin_Saml2_Response
from onelogin.saml2.settings import OneLogin_Saml2_Settings
from onelogin.saml2.utils import OneLogin_Saml2_Utils

from gateway.config import Settings, load_settings
from gateway.devidp.authn_request import verify_redirect_signature
from gateway.devidp.response import build_response
from gateway.errors import ConfigError, LoginFailed, UnknownIdP
from gateway.identities import IdentityRules
from gateway.keys import ensure_identity_key, generate_self_signed, pem_body
from gateway.principal import Principal
from gateway.saml import IdP, IdPRegistry, LoginResult, ServiceProvider
from gateway.saml.identifiers import logout_handle
from gateway.saml.slo import IdPLogout

PUBLIC_URL = "https://gw.example.org"
ACS = f"{PUBLIC_URL}/saml/acs"
SP_ENTITY = f"{PUBLIC_URL}/saml/metadata"
IDP_ENTITY = "https://idp.example.org/idp"
SSO_URL = "https://idp.example.org/sso"
SLO_URL = "https://idp.example.org/slo"
PERSISTENT = "urn:oasis:names:tc:SAML:2.0:nameid-format:persistent"
MEMBER_ENT = "urn:mace:example.org:entitlement:member"
ATTRS = {
    "memberId": ["M-1001"],
    "mail": ["alice@example.org"],
    "displayName": ["  Alice   Example "],
    "eduPersonEntitlement": [MEMBER_ENT, "urn:b", MEMBER_ENT],
    "memberStatus": ["Active"],
}
NS = {"md": C.NS_MD, "ds": C.NS_DS, "saml": C.NS_SAML, "samlp": C.NS_SAMLP}


# Keys, metadata and settings -------------------------------------------------------------


@pytest.fixture(scope="session")
def keys() -> dict[str, tuple[str, str]]:
    return {name: generate_self_signed(name) for name in ("sp", "idp", "other")}


def entity_xml(
    entity_id: str = IDP_ENTITY,
    cert_pem: str | None = None,
    *,
    sso_binding: str = C.BINDING_HTTP_REDIRECT,
    key_use: str | None = "signing",
    idp: bool = True,
    display_name: str = "",
) -> str:
    keyinfo = ""
    if cert_pem is not None:
        use = f' use="{key_use}"' if key_use else ""
        keyinfo = (
            f"<md:KeyDescriptor{use}><ds:KeyInfo><ds:X509Data><ds:X509Certificate>"
            f"{pem_body(cert_pem)}</ds:X509Certificate></ds:X509Data></ds:KeyInfo>"
            "</md:KeyDescriptor>"
        )
    ext = ""
    if display_name:
        ext = (
            '<md:Extensions><mdui:UIInfo xmlns:mdui="urn:oasis:names:tc:SAML:metadata:ui">'
            f'<mdui:DisplayName xml:lang="en">{display_name}</mdui:DisplayName></mdui:UIInfo>'
            "</md:Extensions>"
        )
    role = "IDPSSODescriptor" if idp else "SPSSODescriptor"
    endpoints = (
        f'<md:SingleLogoutService Binding="{C.BINDING_HTTP_REDIRECT}" Location="{SLO_URL}"/>'
        f'<md:SingleSignOnService Binding="{sso_binding}" Location="{SSO_URL}"/>'
        if idp
        else f'<md:AssertionConsumerService Binding="{C.BINDING_HTTP_POST}" '
        f'Location="https://sp.example/acs" index="0"/>'
    )
    return (
        f'<md:EntityDescriptor xmlns:md="{C.NS_MD}" xmlns:ds="{C.NS_DS}" entityID="{entity_id}">'
        f'<md:{role} protocolSupportEnumeration="{C.NS_SAMLP}">{ext}{keyinfo}{endpoints}'
        f"</md:{role}></md:EntityDescriptor>"
    )


def aggregate_xml(*entities: str) -> str:
    inner = "".join(e.replace(f' xmlns:md="{C.NS_MD}"', "") for e in entities)
    return f'<md:EntitiesDescriptor xmlns:md="{C.NS_MD}">{inner}</md:EntitiesDescriptor>'


@pytest.fixture
def settings(tmp_path: Path, keys: dict[str, tuple[str, str]]) -> Settings:
    (tmp_path / "certs").mkdir()
    ensure_identity_key(tmp_path / "certs" / "identity")
    (tmp_path / "certs" / "sp.key").write_text(keys["sp"][0])
    (tmp_path / "certs" / "sp.crt").write_text(keys["sp"][1])
    (tmp_path / "idp_metadata").mkdir()
    (tmp_path / "idp_metadata" / "idp.xml").write_text(
        entity_xml(cert_pem=keys["idp"][1], display_name="Example Members")
    )
    (tmp_path / "gateway.toml").write_text(
        f'public_url = "{PUBLIC_URL}"\n'
        '[session]\nsecrets = ["' + secrets.token_urlsafe(48) + '"]\n'
        '[[upstreams]]\nname = "reader"\nurl = "http://127.0.0.1:9000"\n'
    )
    return load_settings(tmp_path / "gateway.toml", environ={})


@pytest.fixture
def registry(settings: Settings) -> IdPRegistry:
    return IdPRegistry.load_dir(settings.idp.metadata_dir)


@pytest.fixture
def idp(registry: IdPRegistry) -> IdP:
    return registry.get(IDP_ENTITY)


@pytest.fixture
def sp(settings: Settings, registry: IdPRegistry) -> ServiceProvider:
    return ServiceProvider(settings, registry)


# Building responses ------------------------------------------------------------------------


def response_xml(keys: dict[str, tuple[str, str]], request_id: str | None, **overrides: Any) -> str:
    signer = overrides.pop("signer", "idp")
    kwargs: dict[str, Any] = {
        "idp_entity_id": IDP_ENTITY,
        "key_pem": keys[signer][0],
        "cert_pem": keys[signer][1],
        "acs_url": ACS,
        "sp_entity_id": SP_ENTITY,
        "in_response_to": request_id,
        "name_id": "alice-persistent-id",
        "name_id_format": PERSISTENT,
        "attributes": ATTRS,
        "session_index": "_session-1",
    }
    kwargs.update(overrides)
    return build_response(**kwargs)


def forged(
    keys: dict[str, tuple[str, str]], request_id: str, mutate: Callable[[Any], None]
) -> str:
    """A response whose Assertion is changed by ``mutate`` and then properly re-signed."""
    root = etree.fromstring(response_xml(keys, request_id, sign_assertion=False).encode())
    assertion = root.find("saml:Assertion", NS)
    mutate(assertion)
    signed = OneLogin_Saml2_Utils.add_sign(
        etree.tostring(assertion),
        keys["idp"][0],
        keys["idp"][1],
        sign_algorithm=C.RSA_SHA256,
        digest_algorithm=C.SHA256,
    )
    root.replace(assertion, etree.fromstring(signed))
    return etree.tostring(root, encoding="unicode")


def b64(xml: str) -> str:
    return base64.b64encode(xml.encode()).decode()


def login(sp: ServiceProvider, idp: IdP, xml: str, request_id: str) -> LoginResult:
    return sp.finish_login(b64(xml), request_id=request_id, idp=idp)


# SP metadata and AuthnRequest --------------------------------------------------------------


def test_metadata_is_valid_and_uses_public_url(sp: ServiceProvider, keys: Any) -> None:
    xml = sp.metadata()
    root = etree.fromstring(xml.encode())
    assert root.get("entityID") == SP_ENTITY
    descriptor = root.find("md:SPSSODescriptor", NS)
    assert descriptor.get("AuthnRequestsSigned") == "true"
    assert descriptor.get("WantAssertionsSigned") == "true"
    acs = descriptor.find("md:AssertionConsumerService", NS)
    assert (acs.get("Location"), acs.get("Binding")) == (ACS, C.BINDING_HTTP_POST)
    sls = descriptor.find("md:SingleLogoutService", NS)
    assert (sls.get("Location"), sls.get("Binding")) == (
        f"{PUBLIC_URL}/saml/sls",
        C.BINDING_HTTP_REDIRECT,
    )
    uses = {kd.get("use") for kd in descriptor.findall("md:KeyDescriptor", NS)}
    assert uses == {"signing", "encryption"}
    certs = {c.text for c in descriptor.iterfind(".//ds:X509Certificate", NS)}
    assert certs == {pem_body(keys["sp"][1])}


def test_start_login_gives_signed_redirect(sp: ServiceProvider, idp: IdP, keys: Any) -> None:
    request = sp.start_login(idp, "/issues/42")
    parts = urlsplit(request.url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == SSO_URL
    query = parse_qs(parts.query)
    assert query["RelayState"] == ["/issues/42"]
    assert query["SigAlg"] == [C.RSA_SHA256]
    assert verify_redirect_signature(parts.query, keys["sp"][1])
    assert not verify_redirect_signature(parts.query, keys["other"][1])
    xml = zlib.decompress(base64.b64decode(query["SAMLRequest"][0]), -15)
    authn = etree.fromstring(xml)
    assert authn.tag == f"{{{C.NS_SAMLP}}}AuthnRequest"
    assert authn.get("ID") == request.request_id
    assert authn.get("AssertionConsumerServiceURL") == ACS
    assert authn.get("Destination") == SSO_URL
    assert authn.findtext("saml:Issuer", namespaces=NS) == SP_ENTITY
    assert sp.start_login(idp, "/").request_id != request.request_id


def test_public_url_with_port(tmp_path: Path, keys: Any) -> None:
    """With a port in public_url the ACS URL (and the library's view of it) keeps it."""
    base = Settings.model_validate(
        {
            "public_url": "http://127.0.0.1:8080",
            "sp": {"key_file": str(tmp_path / "k"), "cert_file": str(tmp_path / "c")},
        }
    )
    (tmp_path / "k").write_text(keys["sp"][0])
    (tmp_path / "c").write_text(keys["sp"][1])
    (tmp_path / "md").mkdir()
    (tmp_path / "md" / "idp.xml").write_text(entity_xml(cert_pem=keys["idp"][1]))
    registry = IdPRegistry.load_dir(tmp_path / "md")
    local = ServiceProvider(base, registry)
    acs = "http://127.0.0.1:8080/saml/acs"
    request = local.start_login(registry.get(IDP_ENTITY), "/")
    xml = response_xml(
        keys, request.request_id, acs_url=acs, sp_entity_id="http://127.0.0.1:8080/saml/metadata"
    )
    result = login(local, registry.get(IDP_ENTITY), xml, request.request_id)
    assert result.signed_in.released["memberId"] == ["M-1001"]


def test_sp_refuses_mismatched_key_and_cert(settings: Settings, registry: IdPRegistry,
                                             keys: Any) -> None:
    settings.sp.cert_file.write_text(keys["other"][1])
    with pytest.raises(ConfigError, match="does not match"):
        ServiceProvider(settings, registry)


# A valid login ---------------------------------------------------------------------------


def test_valid_response_gives_what_the_idp_released(sp: ServiceProvider, idp: IdP,
                                                     keys: Any) -> None:
    """The attributes as released (mapping and canonicalising is the gateway's identity
    rules' job), how the user authenticated, and SAML's own logout data."""
    request = sp.start_login(idp, "/")
    now = time.time()
    xml = response_xml(
        keys, request.request_id, assertion_id="_a1", response_id="_r1",
        session_not_on_or_after=now + 3600,
    )
    result = login(sp, idp, xml, request.request_id)
    signed_in = result.signed_in
    # python3-saml strips the ends; collapsing inner whitespace is the identity rules' job.
    assert signed_in.released == {**ATTRS, "displayName": ["Alice   Example"]}
    assert (signed_in.idp, signed_in.protocol) == (IDP_ENTITY, "saml")
    assert signed_in.authn_context == \
        "urn:oasis:names:tc:SAML:2.0:ac:classes:PasswordProtectedTransport"
    assert dict(signed_in.protocol_data) == {
        "name_id": "alice-persistent-id", "name_id_format": PERSISTENT,
        "session_index": "_session-1"}
    assert signed_in.logout_handle == logout_handle(IDP_ENTITY, "alice-persistent-id")
    assert re.fullmatch(r"[0-9a-f]{64}", signed_in.logout_handle)
    assert logout_handle(IDP_ENTITY, "alice") != logout_handle("https://other/idp", "alice")
    assert abs(signed_in.authn_instant - now) < 2
    assert signed_in.session_not_on_or_after is not None
    assert abs(signed_in.session_not_on_or_after - (now + 3600)) < 2
    assert (result.assertion_id, result.response_id) == ("_a1", "_r1")
    assert now + 295 < result.not_on_or_after <= now + 301


@pytest.mark.parametrize("field", ["name_id", "session_index"])
@pytest.mark.parametrize("bad", ["a\u2028b", "a\u2029b", "x" * 1025])
def test_saml_identifiers_are_checked(sp: ServiceProvider, idp: IdP, keys: Any,
                                      field: str, bad: str) -> None:
    """NameID and SessionIndex are kept byte-for-byte for the logout, but a line separator
    or an oversized value refuses the login (they end up in the store and in messages)."""
    request = sp.start_login(idp, "/")
    with pytest.raises(LoginFailed) as info:
        login(sp, idp, response_xml(keys, request.request_id, **{field: bad}),
              request.request_id)
    assert info.value.kind == "attributes"
    assert IDP_ENTITY in info.value.reason


def test_signed_response_and_assertion_pass(sp: ServiceProvider, idp: IdP, keys: Any) -> None:
    request = sp.start_login(idp, "/")
    xml = response_xml(keys, request.request_id, sign_response=True)
    assert login(sp, idp, xml, request.request_id).signed_in.released["memberId"] == ["M-1001"]


def test_request_id_is_mandatory(sp: ServiceProvider, idp: IdP, keys: Any) -> None:
    xml = response_xml(keys, None)
    with pytest.raises(ValueError, match="request_id"):
        sp.finish_login(b64(xml), request_id="", idp=idp)


def test_injected_clock_bounds_the_assertion(settings: Settings, registry: IdPRegistry,
                                             idp: IdP, keys: Any) -> None:
    late = ServiceProvider(settings, registry, clock=lambda: time.time() + 3600)
    request = late.start_login(idp, "/")
    with pytest.raises(LoginFailed) as info:
        login(late, idp, response_xml(keys, request.request_id), request.request_id)
    assert info.value.kind == "expired"


# Refused responses ---------------------------------------------------------------------------


def _drop_audience(assertion: Any) -> None:
    conditions = assertion.find("saml:Conditions", NS)
    conditions.remove(conditions.find("saml:AudienceRestriction", NS))


def _duplicate_attribute(assertion: Any) -> None:
    statement = assertion.find("saml:AttributeStatement", NS)
    first = statement.find("saml:Attribute[@Name='memberId']", NS)
    twin = etree.fromstring(etree.tostring(first))
    twin.find("saml:AttributeValue", NS).text = "M-6666"
    statement.append(twin)


def _two_audiences(assertion: Any) -> None:
    restriction = assertion.find("saml:Conditions/saml:AudienceRestriction", NS)
    extra = etree.SubElement(restriction, f"{{{C.NS_SAML}}}Audience")
    extra.text = "https://other-sp.example/"


BAD: dict[str, tuple[str, Callable[[Any, str, str], str]]] = {
    "no InResponseTo": ("in_response_to", lambda k, rid, other: response_xml(k, None)),
    "InResponseTo of another request": (
        "in_response_to", lambda k, rid, other: response_xml(k, other),
    ),
    "signed by a key not in metadata": (
        "signature", lambda k, rid, other: response_xml(k, rid, signer="other"),
    ),
    "response signed by a key not in metadata": (
        "signature",
        lambda k, rid, other: response_xml(k, rid, signer="other", sign_response=True),
    ),
    "unsigned assertion": (
        "signature", lambda k, rid, other: response_xml(k, rid, sign_assertion=False),
    ),
    "wrong audience": (
        "audience", lambda k, rid, other: response_xml(k, rid, audience="https://evil.example/"),
    ),
    "missing audience": ("audience", lambda k, rid, other: forged(k, rid, _drop_audience)),
    "extra audience": ("audience", lambda k, rid, other: forged(k, rid, _two_audiences)),
    "destination that starts with the ACS URL": (
        "destination", lambda k, rid, other: response_xml(k, rid, destination=ACS + "/evil"),
    ),
    "recipient that contains the ACS URL": (
        "destination", lambda k, rid, other: response_xml(k, rid, recipient=ACS + "/evil"),
    ),
    "expired assertion": (
        "expired", lambda k, rid, other: response_xml(k, rid, now=time.time() - 3600),
    ),
    "not yet valid": (
        "not_yet_valid", lambda k, rid, other: response_xml(k, rid, now=time.time() + 3600),
    ),
    "wrong issuer": (
        "issuer",
        lambda k, rid, other: response_xml(k, rid, idp_entity_id="https://evil.example/idp"),
    ),
    "duplicate attribute names": (
        "attributes", lambda k, rid, other: forged(k, rid, _duplicate_attribute),
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_response_is_refused(sp: ServiceProvider, idp: IdP, keys: Any, case: str) -> None:
    kind, build = BAD[case]
    request = sp.start_login(idp, "/")
    other = sp.start_login(idp, "/")
    xml = build(keys, request.request_id, other.request_id)
    with pytest.raises(LoginFailed) as info:
        login(sp, idp, xml, request.request_id)
    assert info.value.kind == kind, info.value.reason
    assert "<" not in info.value.reason  # never the raw message


# Validly signed, but the identity is unusable: the SP hands the values over as released,
# and the gateway's identity rules refuse them (the same rules for every login protocol).
UNUSABLE: dict[str, Callable[[Any, str], str]] = {
    "CR/LF in an attribute": lambda k, rid: response_xml(
        k, rid, attributes={**ATTRS, "displayName": ["Alice\r\nX-Member-Id: root"]}),
    "DEL in the member ID": lambda k, rid: response_xml(
        k, rid, attributes={**ATTRS, "memberId": ["M\x7f1"]}),
    "missing memberId": lambda k, rid: response_xml(
        k, rid, attributes={n: v for n, v in ATTRS.items() if n != "memberId"}),
}


@pytest.mark.parametrize("case", list(UNUSABLE))
def test_unusable_identity_is_refused_by_the_identity_rules(
        sp: ServiceProvider, idp: IdP, keys: Any, settings: Settings, case: str) -> None:
    request = sp.start_login(idp, "/")
    result = login(sp, idp, UNUSABLE[case](keys, request.request_id), request.request_id)
    with pytest.raises(LoginFailed) as info:
        IdentityRules(settings).principal(result.signed_in)
    assert info.value.kind == "attributes", info.value.reason
    assert IDP_ENTITY in info.value.reason


def test_response_issuer_is_required(sp: ServiceProvider, idp: IdP, keys: Any) -> None:
    request = sp.start_login(idp, "/")
    root = etree.fromstring(response_xml(keys, request.request_id).encode())
    root.remove(root.find("saml:Issuer", NS))
    with pytest.raises(LoginFailed) as info:
        login(sp, idp, etree.tostring(root, encoding="unicode"), request.request_id)
    assert info.value.kind == "issuer"


def test_destination_is_required(sp: ServiceProvider, idp: IdP, keys: Any) -> None:
    request = sp.start_login(idp, "/")
    root = etree.fromstring(response_xml(keys, request.request_id).encode())
    del root.attrib["Destination"]
    with pytest.raises(LoginFailed) as info:
        login(sp, idp, etree.tostring(root, encoding="unicode"), request.request_id)
    assert info.value.kind == "destination"


def test_second_unsigned_assertion_is_refused(sp: ServiceProvider, idp: IdP, keys: Any) -> None:
    """Signature wrapping: the signed assertion stays, an evil twin rides along."""
    request = sp.start_login(idp, "/")
    root = etree.fromstring(response_xml(keys, request.request_id).encode())
    evil = etree.fromstring(
        response_xml(
            keys, request.request_id, sign_assertion=False,
            attributes={**ATTRS, "memberId": ["M-0"]},
        ).encode()
    ).find("saml:Assertion", NS)
    root.insert(2, evil)
    with pytest.raises(LoginFailed) as info:
        login(sp, idp, etree.tostring(root, encoding="unicode"), request.request_id)
    assert info.value.kind == "malformed", info.value.reason


def test_concurrent_logins(sp: ServiceProvider, idp: IdP, keys: Any) -> None:
    requests = [sp.start_login(idp, "/") for _ in range(8)]
    bodies = [
        (b64(response_xml(keys, r.request_id, attributes={**ATTRS, "memberId": [str(i)]})),
         r.request_id)
        for i, r in enumerate(requests)
    ]
    with ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(lambda b: sp.finish_login(b[0], request_id=b[1], idp=idp), bodies)
        )
    assert [r.signed_in.released["memberId"] for r in results] == [[str(i)] for i in range(8)]


def test_doctype_is_refused_before_parsing(sp: ServiceProvider, idp: IdP, keys: Any) -> None:
    request = sp.start_login(idp, "/")
    xml = '<!DOCTYPE r [<!ENTITY x "y">]>' + response_xml(keys, request.request_id)
    with pytest.raises(LoginFailed, match="DOCTYPE") as info:
        login(sp, idp, xml, request.request_id)
    assert info.value.kind == "malformed"


def test_oversized_body_is_refused(sp: ServiceProvider, idp: IdP) -> None:
    with pytest.raises(LoginFailed) as info:
        sp.finish_login("A" * (256 * 1024 + 4), request_id="_r", idp=idp)
    assert info.value.kind == "too_large"


@pytest.mark.parametrize("body", ["not base64!", b64("<unclosed"), b64("   ")])
def test_garbage_is_malformed(sp: ServiceProvider, idp: IdP, body: str) -> None:
    with pytest.raises(LoginFailed) as info:
        sp.finish_login(body, request_id="_r", idp=idp)
    assert info.value.kind == "malformed"


# Registry ----------------------------------------------------------------------------------


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


def test_registry_loads_single_idp(tmp_path: Path, keys: Any) -> None:
    path = write(tmp_path / "md", "a.xml", entity_xml(cert_pem=keys["idp"][1], display_name="Ex"))
    registry = IdPRegistry.load_dir(tmp_path / "md")
    idp = registry.get(IDP_ENTITY)
    assert (idp.display_name, idp.sso_url, idp.slo_url) == ("Ex", SSO_URL, SLO_URL)
    assert idp.source == path
    assert idp.signing_certs == (pem_body(keys["idp"][1]),)
    assert idp.settings["x509certMulti"] == {"signing": [pem_body(keys["idp"][1])]}
    assert registry.default() is idp
    assert registry.all() == [idp]
    with pytest.raises(UnknownIdP):
        registry.get("https://nope.example/")


def test_registry_aggregate_with_two_idps(tmp_path: Path, keys: Any) -> None:
    write(
        tmp_path / "md",
        "federation.xml",
        aggregate_xml(
            entity_xml("https://b.example/idp", keys["idp"][1], key_use=None),
            entity_xml("https://a.example/idp", keys["other"][1]),
            entity_xml("https://sp.example/sp", keys["other"][1], idp=False),
        ),
    )
    registry = IdPRegistry.load_dir(tmp_path / "md")
    assert [i.entity_id for i in registry.all()] == ["https://a.example/idp", "https://b.example/idp"]
    assert registry.default() is None
    assert registry.get("https://b.example/idp").signing_certs == (pem_body(keys["idp"][1]),)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("<md:EntityDescriptor", "not well-formed XML"),
        ('<!DOCTYPE x [<!ENTITY e "e">]><x/>', "DOCTYPE"),
        ("<root/>", "root element is 'root'"),
        (entity_xml(cert_pem=None), "no signing certificate"),
        ("ENC", "no signing certificate"),
        (entity_xml(idp=False), "no md:IDPSSODescriptor"),
        ("POST", "no SingleSignOnService with the HTTP-Redirect binding"),
        ("BADCERT", "not a valid certificate"),
    ],
)
def test_registry_reports_bad_files(tmp_path: Path, keys: Any, text: str, problem: str) -> None:
    if text == "ENC":
        text = entity_xml(cert_pem=keys["idp"][1], key_use="encryption")
    elif text == "POST":
        text = entity_xml(cert_pem=keys["idp"][1], sso_binding=C.BINDING_HTTP_POST)
    elif text == "BADCERT":
        text = entity_xml(cert_pem="-----BEGIN X-----\nQUJD\n-----END X-----")
    path = write(tmp_path / "md", "bad.xml", text)
    write(tmp_path / "md", "good.xml", entity_xml("https://good/idp", keys["idp"][1]))
    with pytest.raises(ConfigError) as info:
        IdPRegistry.load_dir(tmp_path / "md")
    assert len(info.value.problems) == 1, info.value.problems
    assert info.value.problems[0].startswith(f"{path}: ")
    assert problem in info.value.problems[0]


def test_registry_reports_duplicate_entity_id(tmp_path: Path, keys: Any) -> None:
    write(tmp_path / "md", "a.xml", entity_xml(cert_pem=keys["idp"][1]))
    dup = write(tmp_path / "md", "b.xml", entity_xml(cert_pem=keys["other"][1]))
    with pytest.raises(ConfigError) as info:
        IdPRegistry.load_dir(tmp_path / "md")
    assert info.value.problems == [
        f"{dup}: entityID {IDP_ENTITY!r} is already defined in {tmp_path / 'md' / 'a.xml'}"
    ]


def test_registry_reports_every_problem(tmp_path: Path, keys: Any) -> None:
    write(tmp_path / "md", "a.xml", "garbage")
    write(tmp_path / "md", "b.xml", entity_xml(cert_pem=None, sso_binding=C.BINDING_HTTP_POST))
    with pytest.raises(ConfigError) as info:
        IdPRegistry.load_dir(tmp_path / "md")
    assert len(info.value.problems) == 3


# Whom an IdP's LogoutRequest names ---------------------------------------------------------


def _logout(idp: IdP, name_id: str = "alice-persistent-id", name_id_format: str = PERSISTENT,
            session_indexes: tuple[str, ...] = ()) -> IdPLogout:
    return IdPLogout(idp=idp, request_id="_lr", name_id=name_id,
                     name_id_format=name_id_format, session_indexes=session_indexes,
                     relay_state=None)


def _signed_in_as(name_id: str = "alice-persistent-id", *, idp: str = IDP_ENTITY,
                  protocol: str = "saml", name_id_format: str = PERSISTENT,
                  session_index: str = "_session-1") -> Principal:
    return Principal(subject="M-1001", idp=idp, protocol=protocol,
                     logout_handle=logout_handle(idp, name_id),
                     protocol_data={"name_id": name_id, "name_id_format": name_id_format,
                                    "session_index": session_index})


def test_idp_logout_names_sessions_by_handle_and_protocol_data(idp: IdP) -> None:
    logout = _logout(idp)
    assert logout.handle == _signed_in_as().logout_handle
    assert logout.ends(_signed_in_as())
    assert logout.ends(_signed_in_as(name_id_format=C.NAMEID_UNSPECIFIED))
    assert not logout.ends(_signed_in_as("bob-persistent-id"))
    assert not logout.ends(_signed_in_as(idp="https://other.example/idp"))
    assert not logout.ends(_signed_in_as(protocol="ticket"))
    assert not logout.ends(_signed_in_as(name_id_format=C.NAMEID_TRANSIENT))
    only = _logout(idp, session_indexes=("_session-2",))
    assert not only.ends(_signed_in_as()) and only.ends(_signed_in_as(session_index="_session-2"))


# Trust: only the configured certificates ----------------------------------------------------


def _fingerprint_idp(idp: IdP, cert_pem: str) -> IdP:
    fingerprint = OneLogin_Saml2_Utils.calculate_x509_fingerprint(cert_pem, "sha256")
    settings = {k: v for k, v in idp.settings.items() if k != "x509certMulti"}
    settings.update(certFingerprint=fingerprint, certFingerprintAlgorithm="sha256")
    return dataclasses.replace(idp, signing_certs=(), settings=settings)


def test_library_in_fingerprint_mode_trusts_the_certificate_in_keyinfo(
    sp: ServiceProvider, idp: IdP, keys: Any
) -> None:
    """Why fingerprint mode is refused: python3-saml then verifies with whatever
    certificate the message carries in KeyInfo, if its fingerprint matches. A fingerprint
    is not a trust anchor we can rotate or check against metadata."""
    attacker = _fingerprint_idp(idp, keys["other"][1])
    settings = OneLogin_Saml2_Settings({
        "strict": True, "idp": dict(attacker.settings),
        "sp": {"entityId": SP_ENTITY,
               "assertionConsumerService": {"url": ACS, "binding": C.BINDING_HTTP_POST}},
        "security": {"wantAssertionsSigned": True, "wantAttributeStatement": False},
    })
    xml = response_xml(keys, "_r", signer="other")  # attacker's key, its cert in KeyInfo
    response = OneLogin_Saml2_Response(settings, b64(xml))
    request_data = {"https": "on", "http_host": "gw.example.org", "script_name": "/saml/acs",
                    "get_data": {}, "post_data": {}}
    assert response.is_valid(request_data, "_r"), response.get_error()


def test_fingerprint_mode_and_missing_certificates_are_refused(sp: ServiceProvider,
                                                               idp: IdP, keys: Any) -> None:
    with pytest.raises(ConfigError, match="fingerprint mode"):
        sp.settings_for(_fingerprint_idp(idp, keys["idp"][1]))
    no_certs = dataclasses.replace(
        idp, entity_id="https://idp2.example.org/idp",
        settings={**idp.settings, "x509certMulti": {"signing": []}, "x509cert": keys["idp"][1]})
    with pytest.raises(ConfigError, match="no signing certificates"):
        sp.settings_for(no_certs)


def test_certificate_in_keyinfo_is_never_used(sp: ServiceProvider, idp: IdP, keys: Any) -> None:
    """The configured certificate verifies; the attacker's own certificate in KeyInfo is
    ignored (python3-saml sets the key on the xmlsec context, which then skips KeyInfo)."""
    request = sp.start_login(idp, "/")
    forged = response_xml(keys, request.request_id, signer="other", sign_response=True)
    assert pem_body(keys["other"][1]) in "".join(forged.split())
    with pytest.raises(LoginFailed) as info:
        login(sp, idp, forged, request.request_id)
    assert info.value.kind == "signature"
