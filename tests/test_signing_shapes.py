"""Which signatures a Response may carry: ``signed_response`` (``[idp]``, per IdP in
``[[idps]]``).

A Response signed as a whole over an unsigned Assertion (Keycloak's default) logs in
when ``signed_response = "accept"`` (the default) and is refused with ``"refuse"``; the
per-IdP value wins over ``[idp]``'s. With the shape accepted, the whole attack corpus
(``gateway.selftest.attacks.ATTACKS``: XML Signature Wrapping in every shape, including
the same attacks on the Response-signed shape) is still refused with the exact check,
creates no session and burns no Assertion ID. An encrypted Assertion under a signed
Response follows the same setting.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C

from gateway.errors import LoginFailed
from gateway.saml import IdPRegistry, ServiceProvider
from gateway.saml.response import Auth, check_response
from gateway.saml.structure import Signed, check_structure
from gateway.selftest.attacks import RESPONSE_SIGNED
from tests.browser import client
from tests.conftest import Stack, TLSFiles, run_stack
from tests.forge import (
    ATTACKS,
    NS,
    SAML,
    SAMLP,
    Forge,
    acs,
    assertion_of,
    begin,
    encode,
    forge_attack,
    now_id,
    parse,
    signature_of,
)
from tests.pysaml2_idp import (
    DIGEST_SHA256,
    PASSWORD_PROTECTED_TRANSPORT,
    SIG_RSA_SHA256,
    NameID,
    PySaml2IdP,
)
from tests.test_attacks_saml import login_page_refusal, refused_at_the_acs
from tests.test_interop_pysaml2 import IDENTITY, post_response, start_login

ACCEPT = '\n[idp]\nsigned_response = "accept"\n'
REFUSE = '\n[idp]\nsigned_response = "refuse"\n'
RESPONSE_ONLY = {"sign_assertion": False, "sign_response": True}


def dev_idp_says(value: str) -> Any:
    """A ``setup`` that gives the demo's own IdP its own ``signed_response``."""
    def setup(demo: Any) -> None:
        toml = demo.workdir / "gateway.toml"
        text = toml.read_text()
        assert text.count('member_ids = "organisation"') == 1
        toml.write_text(text.replace('member_ids = "organisation"',
                                     f'signed_response = "{value}"\nmember_ids = "organisation"'))
    return setup


def dev_idp_accepts(demo: Any) -> None:
    dev_idp_says("accept")(demo)


def dev_idp_refuses(demo: Any) -> None:
    dev_idp_says("refuse")(demo)


def post(stack: Stack, forge: Forge, caplog: pytest.LogCaptureFixture,
         **changes: Any) -> tuple[int, str]:
    """One login answered with the honest Response changed: (status, logged kind)."""
    with caplog.at_level(logging.WARNING, logger="gateway"), client(stack) as http:
        pending = begin(http, stack.url, forge.idp_entity_id)
        answer = acs(http, stack.url, encode(forge.xml(pending.request_id, **changes)),
                     pending.relay_state)
    if answer.status_code != 400:
        return answer.status_code, ""
    reference = login_page_refusal(answer)
    lines = [r.getMessage() for r in caplog.records if f"ref={reference}" in r.getMessage()]
    return 400, lines[0].split("kind=", 1)[1].split()[0] if lines else "?"


# -- The setting ---------------------------------------------------------------------------


@pytest.mark.stack(shared=True)
def test_by_default_a_signed_response_over_an_unsigned_assertion_logs_in(
        stack: Stack, forge: Forge, caplog: pytest.LogCaptureFixture) -> None:
    sessions = stack.session_count()
    assert post(stack, forge, caplog, **RESPONSE_ONLY)[0] == 302
    assert stack.session_count() == sessions + 1
    # … and nothing signed at all is still refused
    assert post(stack, forge, caplog, sign_assertion=False) == (400, "signature")
    assert stack.session_count() == sessions + 1


@pytest.mark.stack(shared=True, extra_config=REFUSE)
def test_refuse_refuses_that_shape_and_keeps_the_others(
        stack: Stack, forge: Forge, caplog: pytest.LogCaptureFixture) -> None:
    sessions = stack.session_count()
    assert post(stack, forge, caplog, **RESPONSE_ONLY) == (400, "signature")
    assert stack.session_count() == sessions
    assert stack.upstream.requests == []
    assert post(stack, forge, caplog)[0] == 302  # assertion signed
    assert post(stack, forge, caplog, sign_response=True)[0] == 302  # both
    assert stack.session_count() == sessions + 2


@pytest.mark.stack(extra_config=REFUSE, setup=dev_idp_accepts)
def test_the_idps_own_setting_wins_over_the_default(
        stack: Stack, forge: Forge, caplog: pytest.LogCaptureFixture) -> None:
    assert stack.demo.settings.idp.signed_response == "refuse"
    assert post(stack, forge, caplog, **RESPONSE_ONLY)[0] == 302


@pytest.mark.stack(setup=dev_idp_refuses)
def test_an_idp_can_refuse_what_the_default_accepts(
        stack: Stack, forge: Forge, caplog: pytest.LogCaptureFixture) -> None:
    assert stack.demo.settings.idp.signed_response == "accept"
    assert post(stack, forge, caplog, **RESPONSE_ONLY) == (400, "signature")
    assert stack.session_count() == 0


# -- The attack corpus with the shape accepted ---------------------------------------------


@pytest.mark.stack(shared=True, extra_config=ACCEPT)
@pytest.mark.parametrize("name", list(ATTACKS))
def test_every_attack_is_still_refused_with_the_response_signed_shape_accepted(
        stack: Stack, forge: Forge, name: str, caplog: pytest.LogCaptureFixture) -> None:
    refused_at_the_acs(stack, forge, name, caplog)


@pytest.mark.stack(shared=True, extra_config=REFUSE)
@pytest.mark.parametrize("name", [n for n, a in ATTACKS.items() if a.base == RESPONSE_SIGNED])
def test_the_response_signed_attacks_are_refused_with_the_shape_refused_too(
        stack: Stack, forge: Forge, name: str) -> None:
    sessions = stack.session_count()
    with client(stack) as http:
        pending = begin(http, stack.url, forge.idp_entity_id)
        forged = forge_attack(forge, name, pending.request_id, now_id())
        login_page_refusal(acs(http, stack.url, encode(forged), pending.relay_state))
    assert stack.session_count() == sessions


# -- Encrypted assertions, and the shape as read -------------------------------------------


@pytest.mark.stack(shared=True)
def test_an_encrypted_unsigned_assertion_follows_the_setting(stack: Stack, forge: Forge) -> None:
    """The Response signature covers the EncryptedAssertion (its ciphertext); with the
    shape refused, or no Response signature, the decrypted Assertion must be signed."""
    sp_cert = (stack.demo.workdir / "certs" / "sp.crt").read_text()
    registry = IdPRegistry.load_dir(stack.demo.settings.idp.metadata_dir)
    idp = registry.get(forge.idp_entity_id)
    accepting = ServiceProvider(stack.demo.settings, registry)
    refusing = ServiceProvider(stack.demo.settings.model_copy(update={
        "idp": stack.demo.settings.idp.model_copy(update={"signed_response": "refuse"})}),
        registry)
    idps = stack.demo.settings.idps
    assert all(o.signed_response is None for o in idps)  # [idp] decides for the dev IdP

    def login(sp: ServiceProvider, **changes: Any) -> Any:
        xml = forge.xml("_r", encrypt_to=sp_cert, sign_assertion=False, **changes)
        return sp.finish_login(encode(xml), request_id="_r", idp=idp)

    result = login(accepting, sign_response=True)
    assert result.encrypted and result.signed_in.released["memberId"] == ["M1001"]
    for sp, changes in ((refusing, {"sign_response": True}), (accepting, {})):
        with pytest.raises(LoginFailed) as refused:
            login(sp, **changes)
        assert refused.value.kind == "signature", refused.value.reason


@pytest.mark.parametrize(("changes", "shape"), [
    ({}, Signed(response=False, assertion=True)),
    (RESPONSE_ONLY, Signed(response=True, assertion=False)),
    ({"sign_response": True}, Signed(response=True, assertion=True)),
    ({"sign_assertion": False}, Signed(response=False, assertion=False)),
])
@pytest.mark.stack(shared=True)
def test_the_shape_is_read_before_anything_is_trusted(
        stack: Stack, forge: Forge, changes: dict[str, bool], shape: Signed) -> None:
    assert check_structure(forge.xml("_r", **changes).encode()) == shape


# -- The gateway's own checks, each on its own (python3-saml would refuse most of these too)


def _refused_shape(xml: bytes) -> LoginFailed:
    with pytest.raises(LoginFailed) as refused:
        check_structure(xml)
    return refused.value


@pytest.mark.stack(shared=True)
def test_structure_refuses_signatures_and_assertions_out_of_place(
        stack: Stack, forge: Forge) -> None:
    def moved(mutate: Any) -> bytes:
        root = parse(forge.xml("_r", **RESPONSE_ONLY))
        mutate(root)
        return etree.tostring(root)

    def signature_into_subject(root: Any) -> None:
        assertion_of(root).find("saml:Subject", NS).append(signature_of(root))

    def assertion_into_extensions(root: Any) -> None:
        extensions = etree.Element(SAMLP + "Extensions")
        root.find("saml:Issuer", NS).addnext(extensions)
        extensions.append(assertion_of(root))

    def second_response_signature(root: Any) -> None:
        signature_of(root).addnext(copy.deepcopy(signature_of(root)))

    def split_name_id(root: Any) -> None:
        name_id = assertion_of(root).find("saml:Subject/saml:NameID", NS)
        etree.SubElement(name_id, SAML + "x").tail = "tail"

    refused = _refused_shape(moved(signature_into_subject))
    assert (refused.kind, refused.reason) == (
        "signature", "The SAMLResponse has a signature that is neither the Response's nor "
                     "its Assertion's.")
    refused = _refused_shape(moved(assertion_into_extensions))
    assert (refused.kind, refused.reason) == (
        "malformed", "The SAMLResponse's Assertion is not a child of the Response.")
    refused = _refused_shape(moved(second_response_signature))
    assert (refused.kind, refused.reason) == (
        "signature", "The SAMLResponse has an element signed more than once.")
    refused = _refused_shape(moved(split_name_id))
    assert (refused.kind, refused.reason) == (
        "malformed", "The SAMLResponse has a NameID whose text is split by an element "
                     "inside it.")


@pytest.mark.stack(shared=True)
def test_an_unsigned_assertion_needs_the_response_signature_the_library_was_told_to_require(
        stack: Stack, forge: Forge) -> None:
    """``check_response`` on its own: a Response-signed message the library accepted is
    refused unless the caller chose the settings that require the Response signature."""
    registry = IdPRegistry.load_dir(stack.demo.settings.idp.metadata_dir)
    idp = registry.get(forge.idp_entity_id)
    sp = ServiceProvider(stack.demo.settings, registry)
    message = encode(forge.xml("_r", **RESPONSE_ONLY))
    auth = Auth({"https": "on", "http_host": sp.acs_url.split("/")[2],
                 "script_name": "/saml/acs", "get_data": {},
                 "post_data": {"SAMLResponse": message}}, sp.settings_for(idp, by_response=True))
    auth.process_response(request_id="_r")
    assert auth.get_errors() == []
    options = {"request_id": "_r", "idp_entity_id": idp.entity_id,
               "sp_entity_id": sp.entity_id, "acs_url": sp.acs_url, "now": time.time()}
    assert check_response(auth, by_response=True, **options) is not None
    with pytest.raises(LoginFailed) as refused:
        check_response(auth, by_response=False, **options)
    assert refused.value.kind == "signature"
    assert "unsigned Assertion that no signature of its Response covers" in refused.value.reason


# -- An IdP the gateway did not write ------------------------------------------------------


@pytest.fixture
def pysaml2_stack(tmp_path: Path, tls: TLSFiles) -> Iterator[tuple[Stack, PySaml2IdP]]:
    """The stack with a pysaml2 IdP trusted next to the dev IdP (as in
    ``tests/test_interop_pysaml2.py``); pysaml2 trusts the SP."""
    idp = PySaml2IdP(tmp_path / "pysaml2")

    def add_pysaml2_idp(demo: Any) -> None:
        (demo.workdir / "idp_metadata" / "pysaml2.xml").write_text(idp.metadata())

    with run_stack(tmp_path / "stack", tls, setup=add_pysaml2_idp) as stack:
        with client(stack) as http:
            idp.trust_sp(http.get(stack.url + "/saml/metadata").text)
        yield stack, idp


def test_pysaml2_signing_only_the_response_signs_a_member_in(
        pysaml2_stack: tuple[Stack, PySaml2IdP]) -> None:
    """pysaml2 (its own keys, xmlsec1) signs the Response and not the Assertion, as
    Keycloak does by default: accepted under the default ``signed_response``."""
    stack, idp = pysaml2_stack
    with client(stack) as http:
        request = idp.parse_redirect(start_login(http, stack, idp.entity_id))
        response = idp.server.create_authn_response(
            identity=IDENTITY, in_response_to=request.id, destination=request.acs_url,
            sp_entity_id=request.sp_entity_id,
            name_id=NameID(format=C.NAMEID_TRANSIENT, text="_pysaml2-transient-1"),
            authn={"class_ref": PASSWORD_PROTECTED_TRANSPORT, "authn_auth": idp.entity_id},
            sign_assertion=False, sign_response=True,
            sign_alg=SIG_RSA_SHA256, digest_alg=DIGEST_SHA256)
        root = parse(str(response))
        assert root.find("ds:Signature", NS) is not None
        assert assertion_of(root).find("ds:Signature", NS) is None
        done = post_response(http, request, encode(str(response)))
        assert done.status_code == 302, done.text
        assert http.get(stack.url + "/issues/2023-03/pages/14").status_code == 200
    seen = dict(stack.upstream.requests[-1]["headers"])
    assert seen["x-member-id"] == f"{idp.entity_id}!P2001"
