"""Several IdPs: the sign-in page, per-IdP attribute mapping, rules per IdP, discovery.

Three IdPs trusted at once: the demo's dev IdP (A), a second dev IdP (B: its own key,
its own attribute names, mapped by ``[[idps]] attributes``) and pysaml2. The sign-in
page lists all three; each login works and maps its attributes; a rule can require IdP
B; a Response claiming to be from A but signed with B's key is refused.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from gateway.demo.stack import MEMBER, DemoStack
from gateway.devidp import DevIdPSettings
from gateway.devidp import create_app as create_idp_app
from gateway.devidp.metadata import idp_metadata
from gateway.devidp.users import DemoUser
from gateway.keys import generate_self_signed
from tests.browser import client, login, post_to_acs, sign_in_at_idp
from tests.conftest import Stack, TLSFiles, bound_socket, port_of, run_stack, serving
from tests.forge import PAGE, Forge, acs, begin, encode
from tests.pysaml2_idp import PySaml2IdP

STAFF_PAGE = "/staff/handbook"
SAM = DemoUser("sam", "demo", "Sam Staff", {
    "employeeNumber": ["S77"], "email": ["sam@staff.example.org"], "cn": ["Sam Staff"],
    "staffEntitlement": [MEMBER], "memberStatus": ["active"]})
PAT = {"memberId": ["P2001"], "mail": ["pat@pysaml2.example.org"],
       "displayName": ["Pat Pysaml"], "eduPersonEntitlement": [MEMBER],
       "memberStatus": ["active"]}
_LINK = re.compile(r'href="/saml/login\?idp=([^"&]+)&amp;')


@dataclass
class Federation:
    stack: Stack
    staff: DevIdPSettings
    pysaml2: PySaml2IdP


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory,
               tls: TLSFiles) -> Iterator[Federation]:
    workdir = tmp_path_factory.mktemp("federation")
    sock = bound_socket()
    key, cert = generate_self_signed("staff dev IdP")
    pysaml2 = PySaml2IdP(workdir / "pysaml2")
    found: dict[str, DevIdPSettings] = {}

    def add_idps(demo: DemoStack) -> None:
        staff = DevIdPSettings(
            base_url=f"http://127.0.0.1:{port_of(sock)}", key_pem=key, cert_pem=cert,
            sp_entity_id=demo.settings.sp_entity_id,
            sp_acs_url=demo.settings.public_url + "/saml/acs",
            sp_cert_pem=(demo.workdir / "certs" / "sp.crt").read_text(),
            display_name="Staff Directory", users=(SAM,))
        found["staff"] = staff
        metadata = demo.workdir / "idp_metadata"
        (metadata / "staff.xml").write_text(idp_metadata(staff))
        (metadata / "pysaml2.xml").write_text(pysaml2.metadata())
        with (demo.workdir / "gateway.toml").open("a") as config:
            config.write(f"""
[[idps]]
entity_id = "{staff.entity_id}"
attributes = {{ member_id = ["employeeNumber"], display_name = ["cn"], email = ["email"], \
entitlements = ["staffEntitlement"] }}

[[rules]]
path = "/staff/**"
access = "member"
require = {{ idp = "{staff.entity_id}" }}
""")

    with (run_stack(workdir / "stack", tls, setup=add_idps) as stack,
          serving(create_idp_app(found["staff"]), sock), client(stack) as http):
        pysaml2.trust_sp(http.get(stack.url + "/saml/metadata").text)
        yield Federation(stack, found["staff"], pysaml2)


def listed(page: httpx.Response) -> list[str]:
    assert page.status_code == 200, page.text
    return [html.unescape(e).replace("%3A", ":").replace("%2F", "/")
            for e in _LINK.findall(page.text)]


def test_the_sign_in_page_lists_all_three(federation: Federation) -> None:
    stack = federation.stack
    with client(stack) as http:
        entities = listed(http.get(stack.url + "/saml/login", params={"next": PAGE}))
        assert sorted(entities) == sorted([stack.demo.idp.entity_id,
                                           federation.staff.entity_id,
                                           federation.pysaml2.entity_id])
        page = http.get(stack.url + "/saml/login", params={"next": PAGE, "q": "staff dir"})
        assert listed(page) == [federation.staff.entity_id]
        assert 'name="q"' in page.text and "sign_in.js" in page.text
        none = http.get(stack.url + "/saml/login", params={"q": "no such org"})
        assert listed(none) == [] and "No organisation matches" in none.text


def test_each_idp_logs_in_with_its_own_attribute_names(federation: Federation) -> None:
    stack = federation.stack
    with client(stack) as http:  # A: the demo dev IdP, chosen on the sign-in page
        login(http, stack, PAGE, "alice")
        assert http.get(stack.url + PAGE).status_code == 200
        assert http.get(stack.url + STAFF_PAGE).status_code == 403  # the rule wants IdP B
    with client(stack) as http:  # B: its own key and attribute names
        started = http.get(stack.url + "/saml/login",
                           params={"idp": federation.staff.entity_id, "next": STAFF_PAGE})
        assert started.status_code == 302
        assert started.headers["location"].startswith(federation.staff.sso_url + "?")
        done = post_to_acs(http, sign_in_at_idp(http, http.get(started.headers["location"]),
                                                "sam"))
        assert done.status_code == 302 and done.headers["location"] == STAFF_PAGE
        assert http.get(stack.url + STAFF_PAGE).status_code == 200
        # The choice is remembered: B comes first next time, marked as last used.
        page = http.get(stack.url + "/saml/login")
        assert listed(page)[0] == federation.staff.entity_id and "(last used)" in page.text
    with client(stack) as http:  # pysaml2
        location = http.get(stack.url + "/saml/login", params={
            "idp": federation.pysaml2.entity_id, "next": PAGE}).headers["location"]
        request = federation.pysaml2.parse_redirect(location)
        saml_response = federation.pysaml2.respond(request, PAT, name_id="pysaml2-opaque")
        done = http.post(request.acs_url, data={"SAMLResponse": saml_response,
                                                "RelayState": request.relay_state})
        assert done.status_code == 302, done.text
        assert http.get(stack.url + PAGE).status_code == 200

    # X-Member-Id is the subject: the demo IdP's member numbers are the organisation's own,
    # the other two IdPs' are scoped by their entity IDs.
    seen: list[dict[str, Any]] = [dict(r["headers"]) for r in stack.upstream.requests]
    assert [(h["x-member-id"], h["x-member-name"], h["x-member-idp"]) for h in seen] == [
        ("M1001", "Alice Archer", stack.demo.idp.entity_id),
        (f"{federation.staff.entity_id}!S77", "Sam Staff", federation.staff.entity_id),
        (f"{federation.pysaml2.entity_id}!P2001", "Pat Pysaml", federation.pysaml2.entity_id)]
    assert seen[1]["x-member-email"] == "sam@staff.example.org"
    assert seen[1]["x-member-entitlements"] == MEMBER


def test_a_remembered_choice_must_be_a_configured_idp(federation: Federation) -> None:
    stack = federation.stack
    with client(stack) as http:
        http.cookies.set("__Secure-gw_idp", "https%3A%2F%2Fevil.example%2Fidp")
        page = http.get(stack.url + "/saml/login")
    assert "(last used)" not in page.text and "evil.example" not in page.text


def test_a_response_from_a_signed_with_bs_key_is_refused(federation: Federation) -> None:
    stack = federation.stack
    a_claimed = Forge(idp_entity_id=stack.demo.idp.entity_id, key_pem=federation.staff.key_pem,
                      cert_pem=federation.staff.cert_pem, acs_url=stack.url + "/saml/acs",
                      sp_entity_id=stack.demo.settings.sp_entity_id)
    before = stack.session_count()
    with client(stack) as http:
        pending = begin(http, stack.url, stack.demo.idp.entity_id)
        answer = acs(http, stack.url, encode(a_claimed.xml(pending.request_id)),
                     pending.relay_state)
    assert answer.status_code == 400
    assert stack.session_count() == before


DISCOVERY = '\n[idp]\ndiscovery_url = "https://ds.example.org/ds?federation=demo"\n'


def test_discovery_service_protocol(tmp_path: Path, tls: TLSFiles) -> None:
    with run_stack(tmp_path, tls, extra_config=DISCOVERY) as stack, client(stack) as http:
        sent = http.get(stack.url + "/saml/login", params={"next": PAGE})
        assert sent.status_code == 302
        target = urlsplit(sent.headers["location"])
        assert f"{target.scheme}://{target.netloc}{target.path}" == "https://ds.example.org/ds"
        query = parse_qs(target.query)
        assert query["federation"] == ["demo"]
        assert query["entityID"] == [stack.demo.settings.sp_entity_id]
        assert query["returnIDParam"] == ["idp"]
        back = query["return"][0]
        assert back.startswith(stack.url + "/saml/login?") and "ds=1" in back
        # The DS sends the browser back with the chosen entity ID …
        chosen = http.get(back, params={"idp": stack.demo.idp.entity_id})
        assert chosen.status_code == 302
        assert chosen.headers["location"].startswith(stack.demo.idp.sso_url + "?")
        assert parse_qs(urlsplit(chosen.headers["location"]).query)["RelayState"]
        # … or without one (the member gave up): our own list, not a loop.
        assert listed(http.get(back)) == [stack.demo.idp.entity_id]
        unknown = http.get(back, params={"idp": "https://nobody.example/idp"})
        assert unknown.status_code == 400 and "not known to this site" in unknown.text
