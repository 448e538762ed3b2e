"""Subject identifiers over real sockets: the subject from ``subject-id``, ``pairwise-id``
or a persistent NameID, chosen per IdP, and the NameID format each AuthnRequest asks for.

Five IdPs sign with one test key and list the scope ``example.org``: A and B take the
subject from ``subject-id``; PAIRWISE from ``pairwise-id``; PERSISTENT from a persistent
NameID (and ask for one); ORGANISATION from ``subject-id`` with ``member_ids =
"organisation"``. None of them needs to release a member number.
"""

from __future__ import annotations

import base64
import logging
import zlib
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from lxml import etree

from gateway.demo.stack import DemoStack
from gateway.devidp import DevIdPSettings
from gateway.devidp.metadata import idp_metadata
from gateway.keys import generate_self_signed
from gateway.saml.scopes import SHIBMD_NS
from tests.browser import client
from tests.conftest import Stack
from tests.forge import PAGE, Forge, acs, begin, encode

KEY, CERT = generate_self_signed("subject identifier test IdPs")
A = "https://a.example/idp"
B = "https://b.example/idp"
PAIRWISE = "https://pairwise.example/idp"
PERSISTENT = "https://persistent.example/idp"
ORGANISATION = "https://organisation.example/idp"
SUBJECT_ID = "urn:oasis:names:tc:SAML:attribute:subject-id"
PAIRWISE_ID = "urn:oasis:names:tc:SAML:attribute:pairwise-id"
NAMEID = "urn:oasis:names:tc:SAML:{}:nameid-format:{}"
MD = "urn:oasis:names:tc:SAML:2.0:metadata"
#: No member number, e-mail and the rest only.
RELEASED = {"mail": ["alice@example.org"], "displayName": ["Alice Archer"],
            "memberStatus": ["active"],
            "eduPersonEntitlement": ["urn:mace:example.org:entitlement:member"]}
OPTIONS = {A: 'subject = "subject-id"', B: 'subject = "subject-id"',
           PAIRWISE: 'subject = "pairwise-id"',
           PERSISTENT: 'subject = "persistent"\nname_id_format = "persistent"',
           ORGANISATION: 'subject = "subject-id"\nmember_ids = "organisation"'}


def add_idps(demo: DemoStack) -> None:
    for number, (entity_id, options) in enumerate(OPTIONS.items()):
        settings = DevIdPSettings(base_url="http://127.0.0.1:9", key_pem=KEY, cert_pem=CERT,
                                  sp_entity_id=demo.settings.sp_entity_id,
                                  sp_acs_url=demo.settings.public_url + "/saml/acs",
                                  entity_id=entity_id, require_signed_requests=False)
        root = etree.fromstring(idp_metadata(settings).encode())
        extensions = root.find(f"{{{MD}}}IDPSSODescriptor/{{{MD}}}Extensions")
        etree.SubElement(extensions, f"{{{SHIBMD_NS}}}Scope", regexp="false",
                         nsmap={"shibmd": SHIBMD_NS}).text = "example.org"
        (demo.workdir / "idp_metadata" / f"idp{number}.xml").write_bytes(etree.tostring(root))
        with (demo.workdir / "gateway.toml").open("a") as config:
            config.write(f'\n[[idps]]\nentity_id = "{entity_id}"\n{options}\n')


pytestmark = pytest.mark.stack(shared=True, setup=add_idps)


def forge(stack: Stack, idp: str, released: dict[str, list[str]]) -> Forge:
    return Forge(idp_entity_id=idp, key_pem=KEY, cert_pem=CERT,
                 acs_url=stack.url + "/saml/acs", sp_entity_id=stack.demo.settings.sp_entity_id,
                 attributes={**RELEASED, **released})


def post(stack: Stack, http: httpx.Client, idp: str, released: dict[str, list[str]],
         **changes: str) -> httpx.Response:
    pending = begin(http, stack.url, idp)
    xml = forge(stack, idp, released).xml(pending.request_id, **changes)
    return acs(http, stack.url, encode(xml), pending.relay_state)


def subject_after_sign_in(stack: Stack, idp: str, released: dict[str, list[str]],
                          **changes: str) -> str:
    """Sign in at ``idp``; the subject the upstream learns (token ``sub`` and header)."""
    with client(stack) as http:
        answer = post(stack, http, idp, released, **changes)
        assert answer.status_code == 302, answer.text
        assert http.get(stack.url + PAGE).status_code == 200
    headers = dict(stack.upstream.requests[-1]["headers"])
    sub = jwt.decode(headers["x-gateway-identity"], options={"verify_signature": False})["sub"]
    assert headers["x-member-id"] == sub
    return str(sub)


def test_subject_id_is_the_subject_and_stays_tied_to_its_idp(stack: Stack) -> None:
    released = {SUBJECT_ID: ["Alice.Archer_1@Example.org"]}
    from_a = subject_after_sign_in(stack, A, released)
    from_b = subject_after_sign_in(stack, B, released)
    assert from_a == f"{A}!alice.archer_1@example.org"  # lower-cased: compared that way
    assert from_b == f"{B}!alice.archer_1@example.org" != from_a
    # "organisation": the validated scope makes the value unique on its own.
    assert subject_after_sign_in(stack, ORGANISATION, released) == "alice.archer_1@example.org"


def test_pairwise_id_is_the_subject(stack: Stack) -> None:
    released = {PAIRWISE_ID: ["HTQ4ODYXNWO3Y2ZHJUTPMJLS@example.org"]}
    assert subject_after_sign_in(stack, PAIRWISE, released) == (
        f"{PAIRWISE}!htq4odyxnwo3y2zhjutpmjls@example.org")
    assert subject_after_sign_in(stack, A, {**released, SUBJECT_ID: ["a@example.org"]}) == (
        f"{A}!a@example.org")  # A takes the subject-id, not the pairwise-id


def test_a_persistent_name_id_is_the_subject(stack: Stack) -> None:
    assert subject_after_sign_in(stack, PERSISTENT, {}, name_id="Zx8/Opaque+Id=") == (
        f"{PERSISTENT}!Zx8/Opaque+Id=")  # kept byte-for-byte
    # The same NameID from an IdP whose subject is its subject-id is another member.
    assert subject_after_sign_in(stack, A, {SUBJECT_ID: ["zx8@example.org"]},
                                 name_id="Zx8/Opaque+Id=") == f"{A}!zx8@example.org"


def test_an_owner_rule_uses_the_subject(stack: Stack) -> None:
    """The demo's owner rule (/members/{member_id}/notes/**) compares the subject."""
    with client(stack) as http:
        assert post(stack, http, ORGANISATION,
                    {SUBJECT_ID: ["owner@example.org"]}).status_code == 302
        assert http.get(stack.url + "/members/owner@example.org/notes/").status_code == 200
        assert http.get(stack.url + "/members/other@example.org/notes/").status_code == 403


def refused(stack: Stack, idp: str, released: dict[str, list[str]],
            caplog: pytest.LogCaptureFixture, **changes: str) -> str:
    """Post a sign-in that must be refused; the reason logged. No session is created."""
    before = stack.session_count()
    with client(stack) as http, caplog.at_level(logging.INFO):
        answer = post(stack, http, idp, released, **changes)
    assert answer.status_code == 400, answer.text
    assert "Sign-in failed" in answer.text
    assert not any("gw_session=" in c for c in answer.headers.get_list("set-cookie"))
    assert stack.session_count() == before
    return caplog.text


def test_a_subject_id_out_of_scope_refuses_the_login(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    text = refused(stack, A, {SUBJECT_ID: ["alice@other.example.com"], "memberId": ["M1"]},
                   caplog)
    assert (f"The assertion from IdP '{A}': its subject-id is out of its scope "
            "(other.example.com is not a scope its metadata lists, nor one of its [[idps]] "
            "scopes); refusing the login.") in text
    assert "alice@other" not in text


def test_a_missing_or_malformed_subject_refuses_the_login(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    assert "no subject-id (none of the attributes" in refused(
        stack, A, {"memberId": ["M1001"]}, caplog)
    assert "is not <id>@<scope>" in refused(
        stack, A, {SUBJECT_ID: [f"{B}!x@example.org"]}, caplog)  # poses as B's subject
    assert "no persistent NameID" in refused(
        stack, PERSISTENT, {}, caplog, name_id="t-123", name_id_format=NAMEID.format(
            "2.0", "transient"))
    assert "the persistent NameID contains '!'" in refused(
        stack, PERSISTENT, {}, caplog, name_id="x!y")


def name_id_policy(stack: Stack, idp: str) -> str:
    """The NameIDPolicy Format of the AuthnRequest a login at ``idp`` sends."""
    with client(stack) as http:
        answer = http.get(stack.url + "/saml/login", params={"idp": idp, "next": PAGE})
    assert answer.status_code == 302, answer.text
    query = parse_qs(urlsplit(answer.headers["location"]).query)
    request = etree.fromstring(zlib.decompress(base64.b64decode(query["SAMLRequest"][0]), -15))
    policy = request.find("{urn:oasis:names:tc:SAML:2.0:protocol}NameIDPolicy")
    return str(policy.get("Format"))


def test_the_authn_request_asks_for_the_configured_name_id_format(stack: Stack) -> None:
    assert name_id_policy(stack, PERSISTENT) == NAMEID.format("2.0", "persistent")
    assert name_id_policy(stack, A) == NAMEID.format("1.1", "unspecified")  # the default
    assert name_id_policy(stack, stack.demo.idp.entity_id) == NAMEID.format("1.1", "unspecified")
