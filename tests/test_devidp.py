"""The development IdP, end to end over a real socket, checked by python3-saml as the SP."""

from __future__ import annotations

import base64
import dataclasses
import socket
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest
import xmlsec
from lxml import etree
from onelogin.saml2.auth import OneLogin_Saml2_Auth
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C
from onelogin.saml2.idp_metadata_parser import OneLogin_Saml2_IdPMetadataParser
from onelogin.saml2.response import OneLogin_Saml2_Response
from onelogin.saml2.settings import OneLogin_Saml2_Settings
from onelogin.saml2.utils import OneLogin_Saml2_Utils
from onelogin.saml2.xml_utils import OneLogin_Saml2_XML

from gateway.devidp import DEMO_USERS, DevIdPSettings, create_app, ensure_keys, run
from gateway.devidp.app import is_loopback
from gateway.devidp.response import (
    AuthnRequestError,
    build_response,
    parse_authn_request,
    verify_redirect_signature,
)
from gateway.devidp.users import DEMO_CODE, NAMEID_PERSISTENT, authenticate, persistent_name_id
from gateway.keys import generate_self_signed, pem_body
from tests.conftest import serving

SP_HOST = "gateway.example.test"
SP_ENTITY_ID = f"https://{SP_HOST}/saml/metadata"
SP_ACS_URL = f"https://{SP_HOST}/saml/acs"
ACS_REQUEST_DATA = {"https": "on", "http_host": SP_HOST, "script_name": "/saml/acs"}
BANNER = "DEVELOPMENT ONLY — not a real identity provider"


# -- fixtures ------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPairs:
    idp_key: str
    idp_cert: str
    sp_key: str
    sp_cert: str


@dataclass(frozen=True)
class RunningIdP:
    settings: DevIdPSettings
    keys: KeyPairs

    @property
    def base_url(self) -> str:
        return self.settings.base_url


@pytest.fixture(scope="module")
def keys() -> KeyPairs:
    idp_key, idp_cert = generate_self_signed("devidp-test")
    sp_key, sp_cert = generate_self_signed("sp-test")
    return KeyPairs(idp_key, idp_cert, sp_key, sp_cert)


@pytest.fixture(scope="module")
def idp(keys: KeyPairs) -> Iterator[RunningIdP]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        settings = DevIdPSettings(
            base_url=f"http://127.0.0.1:{sock.getsockname()[1]}",
            key_pem=keys.idp_key,
            cert_pem=keys.idp_cert,
            sp_entity_id=SP_ENTITY_ID,
            sp_acs_url=SP_ACS_URL,
            sp_cert_pem=keys.sp_cert,
        )
        with serving(create_app(settings), sock, lifespan="off"):
            yield RunningIdP(settings, keys)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


# -- helpers: an SP built from python3-saml, and a small HTML form reader --------


def sp_settings(
    idp: RunningIdP,
    *,
    entity_id: str = SP_ENTITY_ID,
    acs_url: str = SP_ACS_URL,
    sp_key: str | None = None,
    sig_alg: str = C.RSA_SHA256,
    requested: list[str] | bool = True,
    comparison: str = "exact",
) -> OneLogin_Saml2_Settings:
    return OneLogin_Saml2_Settings(
        {
            "strict": True,
            "sp": {
                "entityId": entity_id,
                "assertionConsumerService": {"url": acs_url, "binding": C.BINDING_HTTP_POST},
                "NameIDFormat": NAMEID_PERSISTENT,
                "x509cert": idp.keys.sp_cert,
                "privateKey": sp_key or idp.keys.sp_key,
            },
            "idp": {
                "entityId": idp.settings.entity_id,
                "singleSignOnService": {
                    "url": idp.settings.sso_url,
                    "binding": C.BINDING_HTTP_REDIRECT,
                },
                "x509cert": idp.keys.idp_cert,
            },
            "security": {
                "authnRequestsSigned": True,
                "wantAssertionsSigned": True,
                "rejectDeprecatedAlgorithm": True,
                "signatureAlgorithm": sig_alg,
                "digestAlgorithm": C.SHA256,
                "requestedAuthnContext": requested,
                "requestedAuthnContextComparison": comparison,
            },
        }
    )


def login_url(idp: RunningIdP, return_to: str = "/issues/42", **kwargs: Any) -> tuple[str, str]:
    """A signed HTTP-Redirect AuthnRequest URL, as the gateway would send the browser."""
    request_data = {"https": "on", "http_host": SP_HOST, "script_name": "/saml/login"}
    auth = OneLogin_Saml2_Auth(request_data, sp_settings(idp, **kwargs))
    url = auth.login(return_to=return_to)
    return url, auth.get_last_request_id()


def with_query(url: str, **changes: str | None) -> str:
    """``url`` with some parameters replaced (or removed when None), re-encoded."""
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query))
    for name, value in changes.items():
        if value is None:
            params.pop(name, None)
        else:
            params[name] = value
    return parts._replace(query=urlencode(params)).geturl()


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[dict[str, str | None], dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "form":
            self.forms.append((dict(attrs), {}))
        elif tag == "input" and self.forms:
            a = dict(attrs)
            if a.get("name"):
                self.forms[-1][1][a["name"] or ""] = a.get("value") or ""


def forms(html: str) -> list[tuple[dict[str, str | None], dict[str, str]]]:
    """Every form on the page: (form attributes, {input name: value})."""
    parser = _Forms()
    parser.feed(html)
    return parser.forms


def password_form(html: str) -> dict[str, str]:
    return next(fields for _, fields in forms(html) if "password" in fields)


def sign_in(
    client: httpx.Client, idp: RunningIdP, url: str, username: str, password: str = "demo"
) -> httpx.Response:
    page = client.get(url)
    assert page.status_code == 200, page.text
    fields = password_form(page.text) | {"username": username, "password": password}
    return client.post(idp.base_url + "/login", data=fields)


def validated(
    idp: RunningIdP, saml_response: str, request_id: str | None
) -> OneLogin_Saml2_Response:
    """The Response, after python3-saml's strict validation passed (raises otherwise)."""
    response = OneLogin_Saml2_Response(sp_settings(idp), saml_response)
    request_data = ACS_REQUEST_DATA | {"post_data": {"SAMLResponse": saml_response}}
    assert response.is_valid(request_data, request_id=request_id, raise_exceptions=True)
    return response


# -- metadata ------------------------------------------------------------------


def test_metadata_parses_with_python3_saml(idp: RunningIdP, client: httpx.Client) -> None:
    reply = client.get(idp.base_url + "/metadata")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("application/samlmetadata+xml")
    assert isinstance(
        OneLogin_Saml2_XML.validate_xml(reply.content, "saml-schema-metadata-2.0.xsd"),
        etree._Element,
    )
    parsed = OneLogin_Saml2_IdPMetadataParser.parse(reply.text)["idp"]
    assert parsed["entityId"] == idp.base_url + "/metadata"
    assert parsed["singleSignOnService"]["url"] == idp.base_url + "/sso"
    assert parsed["singleLogoutService"]["url"] == idp.base_url + "/slo"
    assert parsed["x509cert"] == pem_body(idp.keys.idp_cert)
    assert 'WantAuthnRequestsSigned="true"' in reply.text
    assert NAMEID_PERSISTENT in reply.text


def test_metadata_offers_both_slo_bindings(idp: RunningIdP, client: httpx.Client) -> None:
    text = client.get(idp.base_url + "/metadata").text
    for binding in (C.BINDING_HTTP_REDIRECT, C.BINDING_HTTP_POST):
        assert f'Binding="{binding}" Location="{idp.settings.slo_url}"' in text
    assert idp.settings.sp_sls_url == f"https://{SP_HOST}/saml/sls"  # derived from the ACS


# -- single logout -----------------------------------------------------------------


SLS_URL = f"https://{SP_HOST}/saml/sls"
SLS_REQUEST_DATA = {"https": "on", "http_host": SP_HOST, "script_name": "/saml/sls"}


def slo_settings(
    idp: RunningIdP, sp_key: str | None = None, want_signed: bool = True
) -> OneLogin_Saml2_Settings:
    """An SP (python3-saml, strict) that knows the dev IdP's SLO endpoint."""
    data = sp_settings(idp, sp_key=sp_key).get_sp_data()
    return OneLogin_Saml2_Settings({
        "strict": True,
        "sp": {**data, "singleLogoutService": {"url": SLS_URL,
                                               "binding": C.BINDING_HTTP_REDIRECT},
               "privateKey": sp_key or idp.keys.sp_key},
        "idp": {
            "entityId": idp.settings.entity_id,
            "singleSignOnService": {"url": idp.settings.sso_url,
                                    "binding": C.BINDING_HTTP_REDIRECT},
            "singleLogoutService": {"url": idp.settings.slo_url,
                                    "binding": C.BINDING_HTTP_REDIRECT},
            "x509cert": idp.keys.idp_cert,
        },
        "security": {"logoutRequestSigned": True, "logoutResponseSigned": True,
                     "wantMessagesSigned": want_signed, "rejectDeprecatedAlgorithm": True,
                     "signatureAlgorithm": C.RSA_SHA256, "digestAlgorithm": C.SHA256},
    })


def sp_processes(idp: RunningIdP, url: str, request_id: str | None = None) -> OneLogin_Saml2_Auth:
    """python3-saml's SP handles a message the IdP redirected to the SLS; errors fail."""
    query = urlsplit(url).query
    request_data = SLS_REQUEST_DATA | {"get_data": dict(parse_qsl(query)), "query_string": query,
                                       "validate_signature_from_qs": True}
    auth = OneLogin_Saml2_Auth(request_data, slo_settings(idp))
    auth.process_slo(request_id=request_id, keep_local_session=True)
    assert auth.get_errors() == [], auth.get_last_error_reason()
    return auth


def signed_in_alice(idp: RunningIdP, client: httpx.Client) -> str:
    """Sign alice in; return the SessionIndex of her login."""
    url, request_id = login_url(idp)
    page = sign_in(client, idp, url, "alice")
    response = validated(idp, forms(page.text)[0][1]["SAMLResponse"], request_id)
    assert client.cookies.get("devidp_session")
    return str(response.get_session_index())


def test_sp_initiated_logout_ends_the_idp_session(idp: RunningIdP, client: httpx.Client) -> None:
    session_index = signed_in_alice(idp, client)
    auth = OneLogin_Saml2_Auth(SLS_REQUEST_DATA, slo_settings(idp))
    name_id = persistent_name_id(idp.settings.entity_id, "alice")
    url = auth.logout(return_to="/bye", name_id=name_id, session_index=session_index,
                      name_id_format=NAMEID_PERSISTENT)
    answer = client.get(url)
    assert answer.status_code == 302 and answer.headers["location"].startswith(SLS_URL + "?")
    assert client.cookies.get("devidp_session") is None
    assert dict(parse_qsl(urlsplit(answer.headers["location"]).query))["RelayState"] == "/bye"
    sp_processes(idp, answer.headers["location"], request_id=auth.get_last_request_id())
    assert "Already signed in" not in client.get(login_url(idp)[0]).text


def test_unsigned_or_foreign_logout_request_is_refused(idp: RunningIdP,
                                                       client: httpx.Client) -> None:
    auth = OneLogin_Saml2_Auth(SLS_REQUEST_DATA, slo_settings(idp, sp_key=idp.keys.idp_key))
    foreign = auth.logout(name_id="x", name_id_format=NAMEID_PERSISTENT)
    unsigned = with_query(foreign, Signature=None, SigAlg=None)
    for url in (foreign, unsigned, idp.base_url + "/slo"):
        answer = client.get(url)
        assert answer.status_code == 400 and BANNER in answer.text


@pytest.mark.parametrize("binding", ["redirect", "post"])
def test_idp_initiated_logout_names_the_login(idp: RunningIdP, client: httpx.Client,
                                              binding: str) -> None:
    session_index = signed_in_alice(idp, client)
    started = client.post(idp.base_url + "/slo/initiate",
                          data={"username": "alice", "binding": binding, "relay_state": "r"})
    if binding == "redirect":
        assert started.status_code == 302
        auth = sp_processes(idp, started.headers["location"])  # signed query verifies
        xml = auth.get_last_request_xml()
        back = auth.process_slo(keep_local_session=True)
    else:
        assert started.status_code == 200 and BANNER in started.text
        (attrs, fields), = forms(started.text)
        assert attrs["action"] == SLS_URL and fields["RelayState"] == "r"
        xml = OneLogin_Saml2_Utils.b64decode(fields["SAMLRequest"]).decode()
        assert OneLogin_Saml2_Utils.validate_sign(
            xml, idp.keys.idp_cert, xpath="/samlp:LogoutRequest/ds:Signature")
        request_data = SLS_REQUEST_DATA | {"get_data": {"SAMLRequest": fields["SAMLRequest"],
                                                        "RelayState": "r"}}
        # python3-saml never checks a POSTed message's XML signature, and with
        # wantMessagesSigned it refuses it as unsigned: the signature was checked above.
        auth = OneLogin_Saml2_Auth(request_data, slo_settings(idp, want_signed=False))
        back = auth.process_slo(keep_local_session=True)
    assert client.cookies.get("devidp_session") is None
    root = OneLogin_Saml2_XML.to_etree(xml)
    assert OneLogin_Saml2_XML.query(root, "//samlp:SessionIndex")[0].text == session_index
    assert OneLogin_Saml2_XML.query(root, "//saml:NameID")[0].text == persistent_name_id(
        idp.settings.entity_id, "alice")
    assert root.get("Destination") == SLS_URL
    confirmed = client.get(back)  # the SP's signed LogoutResponse, checked by the IdP
    assert confirmed.status_code == 200 and "confirmed that alice is signed out" in confirmed.text
    assert client.get(back).status_code == 400  # answered once only


def test_initiate_needs_a_known_user(idp: RunningIdP, client: httpx.Client) -> None:
    for data in ({"username": "mallory"}, {"username": "alice", "binding": "soap"}):
        assert client.post(idp.base_url + "/slo/initiate", data=data).status_code == 400


# -- the AuthnRequest ------------------------------------------------------------


def test_signed_request_shows_login_page(idp: RunningIdP, client: httpx.Client) -> None:
    url, _ = login_url(idp)
    page = client.get(url)
    assert page.status_code == 200, page.text
    assert "<title>Development IdP — sign in</title>" in page.text
    assert BANNER in page.text
    assert page.headers["cache-control"] == "no-store"
    assert 'autocomplete="username"' in page.text
    assert 'autocomplete="current-password"' in page.text
    assert '<label for="username">' in page.text and '<label for="password">' in page.text
    for user in DEMO_USERS:
        assert user.username in page.text and user.display_name in page.text
    assert "lapsed member" in page.text and "admin" in page.text
    assert "<code>demo</code>" in page.text
    assert "Continue as" not in page.text


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"Signature": None, "SigAlg": None}, "not signed"),
        ({"Signature": None}, "not signed"),
        ({"RelayState": "https://evil.example/"}, "does not verify"),
        ({"Signature": base64.b64encode(b"\0" * 384).decode()}, "does not verify"),
        ({"Signature": "not base64!"}, "does not verify"),
        ({"SigAlg": C.RSA_SHA512}, "does not verify"),
        ({"SigAlg": C.RSA_SHA1}, "is not accepted"),
        ({"SAMLRequest": None}, "no SAMLRequest"),
    ],
)
def test_unsigned_or_tampered_request_is_refused(
    idp: RunningIdP, client: httpx.Client, change: dict[str, str | None], reason: str
) -> None:
    url, _ = login_url(idp)
    page = client.get(with_query(url, **change))
    assert page.status_code == 400
    assert reason in page.text
    assert BANNER in page.text


def test_tampered_saml_request_is_refused(idp: RunningIdP, client: httpx.Client) -> None:
    url, _ = login_url(idp)
    other_url, _ = login_url(idp, return_to="/elsewhere")
    other_request = dict(parse_qsl(urlsplit(other_url).query))["SAMLRequest"]
    assert client.get(with_query(url, SAMLRequest=other_request)).status_code == 400


def test_duplicated_parameter_is_refused(idp: RunningIdP, client: httpx.Client) -> None:
    url, _ = login_url(idp)
    page = client.get(url + "&RelayState=%2Fother")
    assert page.status_code == 400
    assert "more than once" in page.text


def test_sha1_signed_request_is_refused(idp: RunningIdP, client: httpx.Client) -> None:
    url, _ = login_url(idp, sig_alg=C.RSA_SHA1)
    page = client.get(url)
    assert page.status_code == 400
    assert "rsa-sha1 is not accepted" in page.text


def test_request_signed_by_another_key_is_refused(idp: RunningIdP, client: httpx.Client) -> None:
    other_key, _ = generate_self_signed("intruder")
    url, _ = login_url(idp, sp_key=other_key)
    assert client.get(url).status_code == 400


def test_request_from_another_sp_is_refused(idp: RunningIdP, client: httpx.Client) -> None:
    url, _ = login_url(idp, entity_id="https://other.example.test/metadata")
    page = client.get(url)
    assert page.status_code == 400
    assert "https://other.example.test/metadata" in page.text


def test_request_for_another_acs_is_refused(idp: RunningIdP, client: httpx.Client) -> None:
    url, _ = login_url(idp, acs_url=f"https://{SP_HOST}/saml/acs2")
    page = client.get(url)
    assert page.status_code == 400
    assert "assertion consumer service" in page.text


def test_stale_request_is_refused(idp: RunningIdP, client: httpx.Client) -> None:
    """The IdP's clock is an hour ahead, so the SP's fresh request looks an hour old."""
    later = dataclasses.replace(idp.settings, clock=lambda: time.time() + 3600)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        # Same base URL as the running IdP, so the request's Destination still matches.
        with serving(create_app(later), sock, lifespan="off"):
            url, _ = login_url(idp)
            port = sock.getsockname()[1]
            page = client.get(url.replace(idp.base_url, f"http://127.0.0.1:{port}"))
    assert page.status_code == 400
    assert "too old" in page.text


# -- signing in --------------------------------------------------------------------


def test_wrong_password_is_401_and_keeps_username(idp: RunningIdP, client: httpx.Client) -> None:
    url, _ = login_url(idp)
    page = sign_in(client, idp, url, "alice", "wrong")
    assert page.status_code == 401
    assert "Unknown user or wrong password" in page.text
    assert password_form(page.text)["username"] == "alice"
    assert BANNER in page.text
    assert "devidp_session" not in page.headers.get("set-cookie", "")
    assert sign_in(client, idp, url, "mallory").status_code == 401


def test_tampered_pending_field_is_refused(idp: RunningIdP, client: httpx.Client) -> None:
    url, _ = login_url(idp)
    fields = password_form(client.get(url).text)
    fields |= {"username": "alice", "password": "demo", "pending": fields["pending"] + "x"}
    page = client.post(idp.base_url + "/login", data=fields)
    assert page.status_code == 400
    assert "expired or was altered" in page.text


def test_sign_in_posts_a_response_that_python3_saml_accepts(
    idp: RunningIdP, client: httpx.Client
) -> None:
    url, request_id = login_url(idp, return_to="/issues/42?page=3")
    page = sign_in(client, idp, url, "carol")
    assert page.status_code == 200
    assert BANNER in page.text
    (form_attrs, fields), *_ = forms(page.text)
    assert form_attrs["method"] == "post" and form_attrs["action"] == SP_ACS_URL
    assert fields["RelayState"] == "/issues/42?page=3"
    assert '<button type="submit">Continue</button>' in page.text
    assert ".submit()" in page.text

    response = validated(idp, fields["SAMLResponse"], request_id)
    assert response.get_nameid_format() == NAMEID_PERSISTENT
    assert response.get_nameid() == persistent_name_id(idp.settings.entity_id, "carol")
    assert response.get_attributes() == {
        "memberId": ["M1003"],
        "mail": ["carol@members.example.org"],
        "displayName": ["Carol Clarke"],
        "eduPersonEntitlement": [
            "urn:mace:example.org:entitlement:member",
            "urn:mace:example.org:entitlement:admin",
        ],
        "memberStatus": ["active"],
        "eduPersonAffiliation": ["staff"],
    }
    assert response.get_session_index()
    assert response.get_session_not_on_or_after() is not None

    cookie = page.headers["set-cookie"]
    assert cookie.startswith("devidp_session=")
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie.replace("Lax", "lax")


def test_response_is_bound_to_its_request_id(idp: RunningIdP, client: httpx.Client) -> None:
    url, _ = login_url(idp)
    saml_response = forms(sign_in(client, idp, url, "alice").text)[0][1]["SAMLResponse"]
    response = OneLogin_Saml2_Response(sp_settings(idp), saml_response)
    request_data = ACS_REQUEST_DATA | {"post_data": {"SAMLResponse": saml_response}}
    assert not response.is_valid(request_data, request_id="_some_other_request")


def test_two_tabs_complete_independently(idp: RunningIdP, client: httpx.Client) -> None:
    url_a, id_a = login_url(idp, return_to="/issues/1")
    url_b, id_b = login_url(idp, return_to="/issues/2")
    form_a = password_form(client.get(url_a).text)
    form_b = password_form(client.get(url_b).text)
    results = {}
    for name, form, user in (("b", form_b, "dave"), ("a", form_a, "bob")):
        page = client.post(
            idp.base_url + "/login", data=form | {"username": user, "password": "demo"}
        )
        results[name] = forms(page.text)[0][1]
    assert results["a"]["RelayState"] == "/issues/1"
    assert results["b"]["RelayState"] == "/issues/2"
    bob = validated(idp, results["a"]["SAMLResponse"], id_a).get_attributes()
    dave = validated(idp, results["b"]["SAMLResponse"], id_b).get_attributes()
    assert bob["memberId"] == ["M1002"] and bob["memberStatus"] == ["lapsed"]
    assert dave["memberId"] == ["M1004"] and dave["displayName"] == ["Dave Dalton"]


def test_signed_in_user_continues_with_one_click(idp: RunningIdP, client: httpx.Client) -> None:
    first_url, _ = login_url(idp)
    sign_in(client, idp, first_url, "alice")
    url, request_id = login_url(idp, return_to="/issues/7")
    page = client.get(url)
    assert "Continue as Alice Archer" in page.text
    continue_form = next(fields for _, fields in forms(page.text) if "use_session" in fields)
    posted = client.post(idp.base_url + "/login", data=continue_form)
    assert posted.status_code == 200
    fields = forms(posted.text)[0][1]
    assert fields["RelayState"] == "/issues/7"
    assert validated(idp, fields["SAMLResponse"], request_id).get_attributes()["memberId"] == [
        "M1001"
    ]


def test_continue_without_session_asks_for_password(idp: RunningIdP, client: httpx.Client) -> None:
    url, _ = login_url(idp)
    fields = password_form(client.get(url).text)
    page = client.post(
        idp.base_url + "/login", data={"pending": fields["pending"], "use_session": "1"}
    )
    assert page.status_code == 401
    assert "session has ended" in page.text


# -- the response builder, on its own ----------------------------------------------


def _build(idp: RunningIdP, **overrides: Any) -> str:
    args: dict[str, Any] = {
        "idp_entity_id": idp.settings.entity_id,
        "key_pem": idp.keys.idp_key,
        "cert_pem": idp.keys.idp_cert,
        "acs_url": SP_ACS_URL,
        "sp_entity_id": SP_ENTITY_ID,
        "in_response_to": "_request1",
        "name_id": "opaque-id",
        "name_id_format": NAMEID_PERSISTENT,
        "attributes": {"memberId": ["M1001"], "eduPersonEntitlement": ["a", "b"]},
        "session_index": "_session1",
    }
    return build_response(**(args | overrides))


def _b64(xml: str) -> str:
    return base64.b64encode(xml.encode()).decode()


def _is_valid(idp: RunningIdP, xml: str, request_id: str | None = "_request1") -> bool:
    response = OneLogin_Saml2_Response(sp_settings(idp), _b64(xml))
    request_data = ACS_REQUEST_DATA | {"post_data": {"SAMLResponse": _b64(xml)}}
    return bool(response.is_valid(request_data, request_id=request_id))


@pytest.mark.parametrize("sign_response", [False, True])
def test_built_response_is_valid_in_strict_mode(idp: RunningIdP, sign_response: bool) -> None:
    xml = _build(idp, sign_response=sign_response, session_not_on_or_after=time.time() + 3600)
    validated(idp, _b64(xml), "_request1")
    root = etree.fromstring(xml.encode())
    ns = {"saml": C.NS_SAML, "samlp": C.NS_SAMLP, "ds": C.NS_DS}
    assertion = root.find("saml:Assertion", ns)
    assert assertion is not None
    assert [etree.QName(e).localname for e in assertion][:3] == ["Issuer", "Signature", "Subject"]
    assert (
        assertion.find("ds:Signature/ds:SignedInfo/ds:SignatureMethod", ns).get("Algorithm")
        == C.RSA_SHA256
    )
    assert assertion.find(".//ds:DigestMethod", ns).get("Algorithm") == C.SHA256
    assert (root.find("ds:Signature", ns) is not None) is sign_response


def test_unsigned_assertion_is_refused_even_in_a_signed_response(idp: RunningIdP) -> None:
    assert not _is_valid(idp, _build(idp, sign_assertion=False, sign_response=True))


def test_altered_assertion_no_longer_verifies(idp: RunningIdP) -> None:
    xml = _build(idp)
    assert _is_valid(idp, xml)
    assert not _is_valid(idp, xml.replace(">M1001<", ">M1003<"))


@pytest.mark.parametrize(
    "override",
    [
        {"audience": "https://other.example.test/metadata"},
        {"recipient": "https://other.example.test/acs"},
        {"destination": "https://other.example.test/acs"},
        {"now": time.time() - 3600},
    ],
)
def test_dishonest_fields_are_caught_by_the_sp(idp: RunningIdP, override: dict[str, Any]) -> None:
    assert not _is_valid(idp, _build(idp, **override))


def test_python3_saml_does_not_require_in_response_to(idp: RunningIdP) -> None:
    """A library gap the gateway must close itself (DESIGN.md: unsolicited is refused).

    Even with ``request_id`` given, python3-saml accepts a Response without InResponseTo.
    """
    assert _is_valid(idp, _build(idp, in_response_to=None), request_id="_request1")


def test_explicit_ids_and_omitted_in_response_to(idp: RunningIdP) -> None:
    xml = _build(idp, in_response_to=None, assertion_id="_a1", response_id="_r1")
    root = etree.fromstring(xml.encode())
    assert root.get("ID") == "_r1" and "InResponseTo" not in root.attrib
    assert 'ID="_a1"' in xml and "InResponseTo" not in xml
    assert _is_valid(idp, xml, request_id=None)  # unsolicited: python3-saml leaves it to us


# -- request parsing and redirect signatures, on their own ----------------------------


def _deflate(xml: bytes) -> str:
    compressor = zlib.compressobj(wbits=-15)
    return base64.b64encode(compressor.compress(xml) + compressor.flush()).decode()


def test_parse_authn_request(idp: RunningIdP) -> None:
    url, request_id = login_url(idp)
    info = parse_authn_request(dict(parse_qsl(urlsplit(url).query))["SAMLRequest"])
    assert info.id == request_id
    assert info.issuer == SP_ENTITY_ID
    assert info.acs_url == SP_ACS_URL
    assert info.issue_instant.endswith("Z")


@pytest.mark.parametrize(
    "encoded",
    [
        "%%%",
        base64.b64encode(b"not deflated").decode(),
        _deflate(b"<not-closed"),
        _deflate(b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><x>&e;</x>'),
        _deflate(f'<samlp:Response xmlns:samlp="{C.NS_SAMLP}"/>'.encode()),
        _deflate(f'<samlp:AuthnRequest xmlns:samlp="{C.NS_SAMLP}" ID="_1"/>'.encode()),
        _deflate(b"<x>" + b" " * 10_000_000 + b"</x>"),
    ],
)
def test_parse_authn_request_rejects_garbage(encoded: str) -> None:
    with pytest.raises(AuthnRequestError):
        parse_authn_request(encoded)


def test_verify_redirect_signature(idp: RunningIdP) -> None:
    url, _ = login_url(idp)
    query = urlsplit(url).query
    assert verify_redirect_signature(query, idp.keys.sp_cert)
    # Parameter order in the URL does not matter; the signed octets have a fixed order.
    assert verify_redirect_signature("&".join(reversed(query.split("&"))), idp.keys.sp_cert)
    assert not verify_redirect_signature(query, idp.keys.idp_cert)
    assert not verify_redirect_signature(query + "&SigAlg=x", idp.keys.sp_cert)
    assert not verify_redirect_signature(query, "not a certificate")


def test_verify_redirect_signature_checks_the_octets_as_sent(idp: RunningIdP) -> None:
    """A sender that encodes with lower-case hex (ADFS does) must still verify."""
    params = dict(parse_qsl(urlsplit(login_url(idp)[0]).query))

    def enc(value: str) -> str:
        return OneLogin_Saml2_Utils.escape_url(value, lowercase_urlencoding=True)

    signed = "&".join(
        f"{name}={enc(params[name])}" for name in ("SAMLRequest", "RelayState", "SigAlg")
    )
    assert "%3a" in signed
    signature = OneLogin_Saml2_Utils.sign_binary(
        signed, idp.keys.sp_key, xmlsec.Transform.RSA_SHA256
    )
    query = signed + "&Signature=" + enc(base64.b64encode(signature).decode())
    assert verify_redirect_signature(query, idp.keys.sp_cert)
    assert not verify_redirect_signature(query.replace("%3a", "%3A"), idp.keys.sp_cert)


# -- users, keys, run --------------------------------------------------------------


def test_demo_users() -> None:
    assert {u.username for u in DEMO_USERS} == {"alice", "bob", "carol", "dave"}
    alice = authenticate(DEMO_USERS, "alice", "demo")
    assert alice is not None and alice.attributes["memberId"] == ["M1001"]
    assert authenticate(DEMO_USERS, "alice", "Demo") is None
    name_id = persistent_name_id("https://idp.example/metadata", "alice")
    assert name_id == persistent_name_id("https://idp.example/metadata", "alice")
    assert "alice" not in name_id and name_id != persistent_name_id("https://idp2/", "alice")


def test_ensure_keys_creates_then_reloads(tmp_path: Path) -> None:
    key_pem, cert_pem = ensure_keys(tmp_path / "certs")
    assert "PRIVATE KEY" in key_pem and "CERTIFICATE" in cert_pem
    assert ensure_keys(tmp_path / "certs") == (key_pem, cert_pem)
    key_file = next((tmp_path / "certs").glob("*key*"))
    assert key_file.stat().st_mode & 0o777 == 0o600
    key_file.unlink()
    with pytest.raises(FileExistsError):
        ensure_keys(tmp_path / "certs")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.org", ""])
def test_run_refuses_non_loopback_hosts(idp: RunningIdP, host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        run(idp.settings, host, 0)


def test_loopback_hosts() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"))


def test_settings_require_sp_cert_for_signed_requests(keys: KeyPairs) -> None:
    with pytest.raises(ValueError, match="sp_cert_pem"):
        DevIdPSettings(
            base_url="http://127.0.0.1:1",
            key_pem=keys.idp_key,
            cert_pem=keys.idp_cert,
            sp_entity_id=SP_ENTITY_ID,
            sp_acs_url=SP_ACS_URL,
        )
    assert keys.idp_key not in repr(
        DevIdPSettings(
            base_url="http://127.0.0.1:1/",
            key_pem=keys.idp_key,
            cert_pem=keys.idp_cert,
            sp_entity_id=SP_ENTITY_ID,
            sp_acs_url=SP_ACS_URL,
            sp_cert_pem=keys.sp_cert,
        )
    )


# -- RequestedAuthnContext, ForceAuthn, IsPassive (issue 16) --------------------------------

MFA = "https://refeds.org/profile/mfa"


def asking_url(idp: RunningIdP, *, requested: list[str] | bool = True,
               comparison: str = "exact", force: bool = False,
               passive: bool = False) -> tuple[str, str]:
    request_data = {"https": "on", "http_host": SP_HOST, "script_name": "/saml/login"}
    auth = OneLogin_Saml2_Auth(request_data, sp_settings(idp, requested=requested,
                                                         comparison=comparison))
    url = auth.login(return_to="/mfa", force_authn=force, is_passive=passive)
    return url, auth.get_last_request_id()


def status_of(page: httpx.Response) -> str:
    """The second-level StatusCode of the refusal an auto-post page carries."""
    xml = base64.b64decode(forms(page.text)[0][1]["SAMLResponse"])
    root = etree.fromstring(xml)
    assert root.find(f"{{{C.NS_SAML}}}Assertion") is None
    codes = root.findall(f".//{{{C.NS_SAMLP}}}StatusCode")
    assert codes[0].get("Value") == C.STATUS_RESPONDER
    return str(codes[1].get("Value"))


def context_and_instant(response: OneLogin_Saml2_Response) -> tuple[str, float]:
    statement = response.document.find(f".//{{{C.NS_SAML}}}AuthnStatement")
    ref = statement.find(f".//{{{C.NS_SAML}}}AuthnContextClassRef")
    return ref.text, OneLogin_Saml2_Utils.parse_SAML_to_time(statement.get("AuthnInstant"))


def test_mfa_asks_a_user_with_a_second_factor_for_the_code(idp: RunningIdP,
                                                            client: httpx.Client) -> None:
    url, request_id = asking_url(idp, requested=[MFA])
    code_page = sign_in(client, idp, url, "alice")
    assert code_page.status_code == 200 and "One-time code" in code_page.text
    assert DEMO_CODE in code_page.text  # documented on the page: it is a demo
    step = forms(code_page.text)[0][1]["step"]
    wrong = client.post(idp.base_url + "/login/code", data={"step": step, "code": "000000"})
    assert wrong.status_code == 401 and "Wrong code" in wrong.text
    before = time.time()
    right = client.post(idp.base_url + "/login/code", data={"step": step, "code": DEMO_CODE})
    response = validated(idp, forms(right.text)[0][1]["SAMLResponse"], request_id)
    context, instant = context_and_instant(response)
    assert context == MFA
    assert before - 1 <= instant <= time.time() + 1  # when the code was given
    # The IdP session remembers the MFA: a passive request for it needs no page now.
    url, request_id = asking_url(idp, requested=[MFA], passive=True)
    again = client.get(url)
    assert 'name="password"' not in again.text
    assert context_and_instant(validated(
        idp, forms(again.text)[0][1]["SAMLResponse"], request_id))[0] == MFA


def test_without_mfa_requested_a_password_is_enough(idp: RunningIdP,
                                                     client: httpx.Client) -> None:
    url, request_id = asking_url(idp, requested=False)
    page = sign_in(client, idp, url, "alice")
    context, _ = context_and_instant(validated(idp, forms(page.text)[0][1]["SAMLResponse"],
                                               request_id))
    assert context == "urn:oasis:names:tc:SAML:2.0:ac:classes:PasswordProtectedTransport"


def test_no_second_factor_or_an_unknown_class_is_no_authn_context(
        idp: RunningIdP, client: httpx.Client) -> None:
    url, _ = asking_url(idp, requested=[MFA])
    assert status_of(sign_in(client, idp, url, "dave")).endswith(":NoAuthnContext")
    url, _ = asking_url(idp, requested=["urn:example:retina-scan"])
    assert status_of(client.get(url)).endswith(":NoAuthnContext")  # no page at all
    url, _ = asking_url(idp, requested=[MFA], comparison="minimum")
    refused = client.get(url)
    assert refused.status_code == 400 and "exact only" in refused.text


def test_force_authn_asks_for_the_password_again(idp: RunningIdP,
                                                 client: httpx.Client) -> None:
    url, _ = login_url(idp)
    sign_in(client, idp, url, "alice")
    forced_url, _ = asking_url(idp, force=True)
    page = client.get(forced_url)
    assert "Continue as" not in page.text and "sign in again" in page.text
    fields = password_form(page.text)
    refused = client.post(idp.base_url + "/login", data={"pending": fields["pending"],
                                                          "use_session": "1"})
    assert refused.status_code == 401 and 'name="password"' in refused.text


def test_is_passive_never_shows_a_page(idp: RunningIdP, client: httpx.Client) -> None:
    url, _ = asking_url(idp, passive=True)
    assert status_of(client.get(url)).endswith(":NoPassive")  # no IdP session
    first_url, _ = login_url(idp)
    sign_in(client, idp, first_url, "alice")
    signed_in_at = time.time()
    time.sleep(1.1)
    url, request_id = asking_url(idp, passive=True)
    page = client.get(url)
    _, instant = context_and_instant(validated(idp, forms(page.text)[0][1]["SAMLResponse"],
                                               request_id))
    assert instant <= signed_in_at  # the authentication's time, not the answer's
    url, _ = asking_url(idp, passive=True, force=True)
    assert status_of(client.get(url)).endswith(":NoPassive")
