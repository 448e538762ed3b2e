"""Encrypted assertions and SP key rollover.

During a rollover (``[sp] next_key_file``/``next_cert_file``) the SP metadata lists
both certificates, for signing and encryption, and assertions encrypted to either are
accepted at the ACS; after completing it (the next pair becomes ``key_file``/
``cert_file``) only the new certificate is listed and the old key decrypts nothing.
The decrypted assertion goes through every check a plain one does.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from lxml import etree

from gateway.config import IdPOptions, Settings
from gateway.demo.stack import DemoStack
from gateway.devidp.response import encrypt_assertion
from gateway.errors import LoginFailed
from gateway.keys import generate_self_signed, pem_body, write_keypair
from gateway.saml import IdPRegistry, ServiceProvider
from tests.browser import client
from tests.conftest import Stack
from tests.forge import PAGE, Forge, acs, assertion_of, begin, encode

MD = "urn:oasis:names:tc:SAML:2.0:metadata"
DS = "http://www.w3.org/2000/09/xmldsig#"
ROLLOVER = """
[sp]
next_key_file = "certs/sp-next.key"
next_cert_file = "certs/sp-next.crt"
"""


def start_rollover(demo: DemoStack) -> None:
    """The next SP key pair, and the config naming it."""
    certs = demo.workdir / "certs"
    write_keypair(certs / "sp-next.key", certs / "sp-next.crt", "sso-gateway next SP")
    with (demo.workdir / "gateway.toml").open("a") as config:
        config.write(ROLLOVER)


pytestmark = pytest.mark.stack(shared=True, setup=start_rollover)


def certs(stack: Stack) -> tuple[str, str]:
    directory = stack.demo.workdir / "certs"
    return (directory / "sp.crt").read_text(), (directory / "sp-next.crt").read_text()


def key_descriptors(metadata: str) -> list[tuple[str, str]]:
    root = etree.fromstring(metadata.encode())
    return [(d.get("use"), "".join(d.findtext(f".//{{{DS}}}X509Certificate", "").split()))
            for d in root.iter(f"{{{MD}}}KeyDescriptor")]


def test_rollover_publishes_both_certificates_and_decrypts_with_either_key(
        stack: Stack, forge: Forge) -> None:
    current, upcoming = certs(stack)
    with client(stack) as http:
        metadata = http.get(stack.url + "/saml/metadata").text
    assert key_descriptors(metadata) == [
        ("signing", pem_body(current)), ("encryption", pem_body(current)),
        ("signing", pem_body(upcoming)), ("encryption", pem_body(upcoming))]

    for cert, cipher in ((current, "aes256-gcm"), (upcoming, "aes256-gcm"),
                         (upcoming, "aes128-cbc")):
        with client(stack) as http:
            pending = begin(http, stack.url, forge.idp_entity_id)
            xml = forge.xml(pending.request_id, encrypt_to=cert, encryption=cipher)
            assert "EncryptedAssertion" in xml and "memberId" not in xml
            done = acs(http, stack.url, encode(xml), pending.relay_state)
            assert done.status_code == 302, done.text
            assert http.get(stack.url + PAGE).status_code == 200
    assert stack.upstream.header_values("x-member-id") == ["M1001"] * 3

    _, stranger = generate_self_signed("not our SP")
    with client(stack) as http:
        pending = begin(http, stack.url, forge.idp_entity_id)
        xml = forge.xml(pending.request_id, encrypt_to=stranger)
        assert acs(http, stack.url, encode(xml), pending.relay_state).status_code == 400
    assert stack.session_count() == 3


def completed(settings: Settings, workdir: Path) -> Settings:
    """The config after completing the rollover: next → current, no next."""
    sp = settings.sp.model_copy(update={
        "key_file": workdir / "certs" / "sp-next.key",
        "cert_file": workdir / "certs" / "sp-next.crt",
        "next_key_file": None, "next_cert_file": None})
    return settings.model_copy(update={"sp": sp})


def sp_for(settings: Settings) -> ServiceProvider:
    return ServiceProvider(settings, IdPRegistry.load_dir(settings.idp.metadata_dir))


def test_after_completing_the_rollover_only_the_new_key_is_listed(
        stack: Stack, forge: Forge) -> None:
    old, new = certs(stack)
    sp = sp_for(completed(stack.demo.settings, stack.demo.workdir))
    assert {body for _, body in key_descriptors(sp.metadata())} == {pem_body(new)}
    idp = sp._registry.get(forge.idp_entity_id)
    result = sp.finish_login(encode(forge.xml("_r1", encrypt_to=new)), request_id="_r1",
                             idp=idp)
    assert result.encrypted and result.signed_in.released["memberId"] == ["M1001"]
    with pytest.raises(LoginFailed) as refused:
        sp.finish_login(encode(forge.xml("_r2", encrypt_to=old)), request_id="_r2", idp=idp)
    assert refused.value.kind == "decryption"


def test_decrypted_assertions_get_every_check(stack: Stack, forge: Forge) -> None:
    settings = stack.demo.settings
    sp = sp_for(settings)
    idp = sp._registry.get(forge.idp_entity_id)
    current, _ = certs(stack)

    def kind(xml: str | bytes) -> str:
        with pytest.raises(LoginFailed) as refused:
            sp.finish_login(encode(xml), request_id="_r", idp=idp)
        return refused.value.kind

    assert kind(forge.xml("_r", encrypt_to=current, audience="https://other.example")) \
        == "audience"
    assert kind(forge.xml("_r", encrypt_to=current, recipient=forge.acs_url + "/x")) \
        == "destination"
    assert kind(forge.xml("_r", encrypt_to=current, sign_assertion=False)) == "signature"
    assert kind(forge.xml("_other", encrypt_to=current)) == "in_response_to"
    # A comment inside the signed, then encrypted Assertion (invisible before decryption).
    root = forge.valid("_r")
    assertion = assertion_of(root)
    name_id = assertion.find(".//{urn:oasis:names:tc:SAML:2.0:assertion}NameID")
    name_id.append(etree.Comment("x"))
    root.replace(assertion, encrypt_assertion(copy.deepcopy(assertion), current))
    assert kind(etree.tostring(root)) == "malformed"

    # Per IdP, admins can require encryption: then a plain assertion is refused.
    strict = sp_for(settings.model_copy(update={
        "idps": [IdPOptions(entity_id=forge.idp_entity_id, require_encryption=True)]}))
    with pytest.raises(LoginFailed) as plain:
        strict.finish_login(encode(forge.xml("_r")), request_id="_r", idp=idp)
    assert plain.value.kind == "encryption"
    assert strict.finish_login(encode(forge.xml("_r", encrypt_to=current)), request_id="_r",
                               idp=idp).encrypted
