"""Interoperability: pysaml2 acts as the IdP (its own keys, its own Response) and the
gateway accepts its login, over real sockets.

The gateway trusts two IdPs here: the dev IdP that ``prepare`` writes and a pysaml2
IdP whose metadata (built by pysaml2) is dropped into ``idp_metadata/`` before the
gateway loads. Once the gateway runs, pysaml2 is given the SP metadata the gateway
serves at ``/saml/metadata``; it then parses (and signature-checks) the gateway's
AuthnRequest from the redirect and builds a Response signed with xmlsec1.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from lxml import etree

from gateway.demo.stack import MEMBER, DemoStack
from tests.browser import client
from tests.conftest import Stack, TLSFiles, run_stack
from tests.pysaml2_idp import ParsedRequest, PySaml2IdP

PAGE = "/issues/2023-03/pages/14"
SAMLP = "urn:oasis:names:tc:SAML:2.0:protocol"
SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
DS = "http://www.w3.org/2000/09/xmldsig#"
IDENTITY = {
    "memberId": ["P2001"],
    "mail": ["pat@pysaml2.example.org"],
    "displayName": ["Pat Pysaml"],
    "eduPersonEntitlement": [MEMBER],
    "memberStatus": ["active"],
}


@pytest.fixture
def interop(tmp_path: Path, tls: TLSFiles) -> Iterator[tuple[Stack, PySaml2IdP]]:
    """The stack with the pysaml2 IdP trusted next to the dev IdP; pysaml2 trusts the SP."""
    idp = PySaml2IdP(tmp_path / "pysaml2")

    def add_pysaml2_idp(demo: DemoStack) -> None:
        (demo.workdir / "idp_metadata" / "pysaml2.xml").write_text(idp.metadata())

    with run_stack(tmp_path / "stack", tls, setup=add_pysaml2_idp) as stack:
        with client(stack) as http:
            metadata = http.get(stack.url + "/saml/metadata")
        assert metadata.status_code == 200
        idp.trust_sp(metadata.text)
        yield stack, idp


def start_login(http: httpx.Client, stack: Stack, idp_entity_id: str) -> str:
    """``/saml/login`` for one IdP; returns the redirect's Location (the IdP's SSO URL)."""
    answer = http.get(stack.url + "/saml/login", params={"idp": idp_entity_id, "next": PAGE})
    assert answer.status_code == 302, answer.text
    return answer.headers["location"]


def post_response(http: httpx.Client, request: ParsedRequest, saml_response: str
                  ) -> httpx.Response:
    return http.post(request.acs_url,
                     data={"SAMLResponse": saml_response, "RelayState": request.relay_state})


def test_gateway_accepts_a_login_from_pysaml2(interop: tuple[Stack, PySaml2IdP]) -> None:
    stack, idp = interop
    with client(stack) as http:
        location = start_login(http, stack, idp.entity_id)
        assert location.startswith(idp.sso_url + "?")
        # pysaml2 parses the AuthnRequest and verifies its redirect signature with the
        # certificate from the gateway's SP metadata (want_authn_requests_signed).
        request = idp.parse_redirect(location)
        assert request.acs_url == stack.url + "/saml/acs"
        assert request.sp_entity_id == stack.url + "/saml/metadata"
        assert request.relay_state

        saml_response = idp.respond(request, IDENTITY, name_id="pysaml2-opaque-7f3a")
        _check_pysaml2_built_it(saml_response, idp, request)

        done = post_response(http, request, saml_response)
        assert done.status_code == 302, done.text
        assert done.headers["location"] == PAGE
        assert stack.session_count() == 1

        page = http.get(stack.url + PAGE)
        assert page.status_code == 200, page.text
        assert "Upstream page /issues/2023-03/pages/14" in page.text
        assert "Pat Pysaml" in page.text

    seen = dict(stack.upstream.requests[-1]["headers"])
    # pysaml2's member numbers are not the organisation's own: the subject is scoped.
    assert seen["x-member-id"] == f"{idp.entity_id}!P2001"
    assert seen["x-member-idp"] == idp.entity_id
    assert seen["x-member-email"] == "pat@pysaml2.example.org"
    assert seen["x-member-status"] == "active"
    assert seen["x-member-entitlements"] == MEMBER


def test_gateway_accepts_a_signed_response_and_assertion(
    interop: tuple[Stack, PySaml2IdP],
) -> None:
    """Both the Response and the Assertion signed by pysaml2 (the other common profile)."""
    stack, idp = interop
    with client(stack) as http:
        request = idp.parse_redirect(start_login(http, stack, idp.entity_id))
        saml_response = idp.respond(request, IDENTITY, name_id="pysaml2-opaque-7f3a",
                                    sign_response=True)
        root = etree.fromstring(base64.b64decode(saml_response))
        assert root.find(f"{{{DS}}}Signature") is not None
        done = post_response(http, request, saml_response)
        assert done.status_code == 302, done.text
        page = http.get(stack.url + PAGE)
    assert page.status_code == 200
    assert dict(stack.upstream.requests[-1]["headers"])["x-member-id"] == f"{idp.entity_id}!P2001"


def test_pysaml2_response_to_a_login_started_for_the_dev_idp_is_refused(
    interop: tuple[Stack, PySaml2IdP], caplog: pytest.LogCaptureFixture,
) -> None:
    """The login was started for the dev IdP: a valid pysaml2 Response to it is refused."""
    stack, idp = interop
    with client(stack) as http:
        location = urlsplit(start_login(http, stack, stack.demo.idp.entity_id))
        assert f"{location.scheme}://{location.netloc}{location.path}" == stack.demo.idp.sso_url
        query = parse_qs(location.query)
        authn = etree.fromstring(zlib.decompress(base64.b64decode(query["SAMLRequest"][0]), -15))
        # pysaml2 answers that very request (right ID, ACS, audience, RelayState), signed
        # with its own key: only the issuer is wrong for this login.
        request = ParsedRequest(authn.get("ID"), authn.get("AssertionConsumerServiceURL"),
                                authn.findtext(f"{{{SAML}}}Issuer"), query["RelayState"][0])
        saml_response = idp.respond(request, IDENTITY, name_id="pysaml2-opaque-7f3a")

        refused = post_response(http, request, saml_response)
        assert refused.status_code == 400, refused.text
        assert "__Host-gw_session=" not in " ".join(refused.headers.get_list("set-cookie"))
        page = http.get(stack.url + PAGE)
    assert page.status_code == 302  # still anonymous
    assert "login failed" in caplog.text and "kind=issuer" in caplog.text
    assert stack.session_count() == 0
    assert stack.upstream.requests == []


def _check_pysaml2_built_it(saml_response: str, idp: PySaml2IdP,
                            request: ParsedRequest) -> None:
    """The Response is pysaml2's: signed assertion, RSA-SHA256/SHA-256, persistent NameID."""
    root = etree.fromstring(base64.b64decode(saml_response))
    assert root.tag == f"{{{SAMLP}}}Response"
    assert root.get("InResponseTo") == request.id
    assert root.find(f"{{{DS}}}Signature") is None  # assertion signed, response not
    assertion = root.find(f"{{{SAML}}}Assertion")
    assert assertion is not None
    assert assertion.findtext(f"{{{SAML}}}Issuer") == idp.entity_id
    signature = assertion.find(f"{{{DS}}}Signature")
    assert signature is not None
    method = signature.find(f"{{{DS}}}SignedInfo/{{{DS}}}SignatureMethod")
    digest = signature.find(f".//{{{DS}}}DigestMethod")
    assert method is not None and digest is not None
    assert method.get("Algorithm") == "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"
    assert digest.get("Algorithm") == "http://www.w3.org/2001/04/xmlenc#sha256"
    name_id = assertion.find(f"{{{SAML}}}Subject/{{{SAML}}}NameID")
    assert name_id is not None
    assert name_id.get("Format") == "urn:oasis:names:tc:SAML:2.0:nameid-format:persistent"
    names = {a.get("Name") for a in assertion.iter(f"{{{SAML}}}Attribute")}
    # pysaml2's URI converters turn the names it knows into OIDs; the gateway maps both.
    assert names == {
        "memberId", "memberStatus",
        "urn:oid:0.9.2342.19200300.100.1.3",  # mail
        "urn:oid:2.16.840.1.113730.3.1.241",  # displayName
        "urn:oid:1.3.6.1.4.1.5923.1.1.1.7",  # eduPersonEntitlement
    }
