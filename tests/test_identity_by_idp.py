"""An identity is tied to the IdP that asserted it; any mapped attribute can be used.

Two dev IdPs over real sockets: A (the demo's, whose member numbers are the
organisation's own) and B (its own key), where B's user asserts the member number
that A gave alice. By default B's member numbers are scoped by B's entity ID, so B's
session cannot open alice's notes, see or end her sessions, and gets another token
``sub``. With the config saying B's numbers are the organisation's own, the same login
is treated as alice, and ``sso-gateway check`` warns about the shared identity.

Then an attribute outside the five the gateway needs (``eduPersonAffiliation``) is
mapped in the config and used in a rule, an identity header and a token claim.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import pytest

from gateway.cli import main
from gateway.demo.stack import MEMBER, DemoStack
from gateway.devidp import DevIdPSettings
from gateway.devidp import create_app as create_idp_app
from gateway.devidp.metadata import idp_metadata
from gateway.devidp.users import DemoUser
from gateway.keys import generate_self_signed
from tests.browser import client, login, post_to_acs, sign_in_at_idp
from tests.conftest import Stack, TLSFiles, bound_socket, port_of, run_stack, serving

ALICE_NOTES = "/members/M1001/notes"
MALLORY = DemoUser("mallory", "demo", "Mallory Mimic", {
    "memberId": ["M1001"], "mail": ["mallory@other.example.org"],
    "displayName": ["Mallory Mimic"], "eduPersonEntitlement": [MEMBER],
    "memberStatus": ["active"]})
_HANDLE = re.compile(r'name="end" value="([0-9a-f]{16})"')


@dataclass
class TwoIdPs:
    stack: Stack
    b: DevIdPSettings


@contextmanager
def two_idps(workdir: Path, tls: TLSFiles, b_member_ids: str) -> Iterator[TwoIdPs]:
    """The demo stack plus IdP B, whose ``[[idps]] member_ids`` is ``b_member_ids``."""
    sock = bound_socket()
    key, cert = generate_self_signed("second dev IdP")
    found: dict[str, DevIdPSettings] = {}

    def add_b(demo: DemoStack) -> None:
        b = DevIdPSettings(
            base_url=f"http://127.0.0.1:{port_of(sock)}", key_pem=key, cert_pem=cert,
            sp_entity_id=demo.settings.sp_entity_id,
            sp_acs_url=demo.settings.public_url + "/saml/acs",
            sp_cert_pem=(demo.workdir / "certs" / "sp.crt").read_text(),
            display_name="Other Society", users=(MALLORY,))
        found["b"] = b
        (demo.workdir / "idp_metadata" / "other.xml").write_text(idp_metadata(b))
        with (demo.workdir / "gateway.toml").open("a") as config:
            config.write(f'\n[[idps]]\nentity_id = "{b.entity_id}"\n'
                         f'member_ids = "{b_member_ids}"\n')

    with (run_stack(workdir, tls, setup=add_b) as stack,
          serving(create_idp_app(found["b"]), sock)):
        yield TwoIdPs(stack, found["b"])


def sign_in_at_b(http: httpx.Client, idps: TwoIdPs, path: str) -> None:
    started = http.get(idps.stack.url + "/saml/login",
                       params={"idp": idps.b.entity_id, "next": path})
    assert started.status_code == 302, started.text
    answer = sign_in_at_idp(http, http.get(started.headers["location"]), "mallory")
    done = post_to_acs(http, answer)
    assert done.status_code == 302, done.text


def subject_of_last_request(stack: Stack) -> str:
    """The ``sub`` of the identity token the upstream got last (its signature is checked
    by the identity tests; here only who it names matters)."""
    token = stack.upstream.requests[-1]["headers"]
    value = next(v for k, v in token if k == "x-gateway-identity")
    return str(jwt.decode(value, options={"verify_signature": False})["sub"])


def session_handles(http: httpx.Client, stack: Stack) -> list[str]:
    page = http.get(stack.url + "/_gateway/sessions")
    assert page.status_code == 200, page.text
    return _HANDLE.findall(page.text)


@pytest.fixture
def scoped(tmp_path: Path, tls: TLSFiles) -> Iterator[TwoIdPs]:
    with two_idps(tmp_path, tls, "scoped") as idps:
        yield idps


def test_another_idp_cannot_assert_alices_member_number(scoped: TwoIdPs) -> None:
    stack = scoped.stack
    with client(stack) as alice, client(stack) as mallory:
        login(alice, stack, ALICE_NOTES, "alice")
        assert alice.get(stack.url + ALICE_NOTES).status_code == 200
        alice_sub = subject_of_last_request(stack)
        sign_in_at_b(mallory, scoped, "/issues/2023-03/pages/14")

        # B's member with alice's number: refused at her notes, nothing reaches upstream.
        reached = len(stack.upstream.requests)
        refused = mallory.get(stack.url + ALICE_NOTES)
        assert refused.status_code == 403
        assert len(stack.upstream.requests) == reached

        # B's session has its own subject in the token.
        assert mallory.get(stack.url + "/issues/2023-03/pages/14").status_code == 200
        mallory_sub = subject_of_last_request(stack)
        assert alice_sub == "M1001"
        assert mallory_sub == f"{scoped.b.entity_id}!M1001" != alice_sub

        # "Your sessions" shows B's member only their own session, and ending all of
        # them leaves alice signed in.
        assert len(session_handles(mallory, stack)) == 1
        assert len(session_handles(alice, stack)) == 1
        assert set(session_handles(mallory, stack)).isdisjoint(session_handles(alice, stack))
        form = mallory.get(stack.url + "/_gateway/sessions").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', form)
        assert csrf is not None
        ended = mallory.post(stack.url + "/_gateway/sessions",
                             data={"csrf": csrf.group(1), "end": "all"},
                             headers={"origin": stack.url})
        assert ended.status_code == 303
        assert mallory.get(stack.url + ALICE_NOTES).status_code == 302  # signed out
        assert alice.get(stack.url + ALICE_NOTES).status_code == 200  # alice is not


def test_an_idp_trusted_with_the_organisations_numbers_signs_in_as_alice(
        tmp_path: Path, tls: TLSFiles, capsys: pytest.CaptureFixture[str]) -> None:
    with two_idps(tmp_path, tls, "organisation") as idps, client(idps.stack) as mallory:
        stack = idps.stack
        sign_in_at_b(mallory, idps, ALICE_NOTES)
        assert mallory.get(stack.url + ALICE_NOTES).status_code == 200
        assert subject_of_last_request(stack) == "M1001"
        assert main(["check", "--config", str(stack.demo.workdir / "gateway.toml")]) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert any("shared identity" in line and idps.b.entity_id in line
               and stack.demo.idp.entity_id in line for line in warnings), out


AFFILIATION = """
[attributes]
affiliation = ["eduPersonAffiliation", "urn:oid:1.3.6.1.4.1.5923.1.1.1.1"]

[identity_headers]
affiliation = "X-Member-Affiliation"

[[rules]]
path = "/staff-room/**"
access = "member"
require = { attributes = { affiliation = ["staff"] } }
"""


def with_affiliation_claim(demo: DemoStack) -> None:
    config = demo.workdir / "gateway.toml"
    text = config.read_text().replace(
        'name = "reader"\n', 'name = "reader"\nclaims = ["email", "display_name", '
        '"entitlements", "status", "idp", "affiliation"]\n', 1)
    assert text != config.read_text(), "the demo config has no reader upstream to extend"
    config.write_text(text)


def test_a_mapped_attribute_feeds_a_rule_a_header_and_a_claim(tmp_path: Path,
                                                              tls: TLSFiles) -> None:
    with (run_stack(tmp_path, tls, extra_config=AFFILIATION, setup=with_affiliation_claim)
          as stack, client(stack) as alice, client(stack) as bob):
        login(alice, stack, "/staff-room/rota", "alice")  # affiliation: member, staff
        login(bob, stack, "/staff-room/rota", "bob")  # affiliation: member
        assert alice.get(stack.url + "/staff-room/rota").status_code == 200
        headers = dict(stack.upstream.requests[-1]["headers"])
        assert headers["x-member-affiliation"] == "member,staff"
        claims = jwt.decode(headers["x-gateway-identity"], options={"verify_signature": False})
        assert claims["affiliation"] == ["member", "staff"]
        reached = len(stack.upstream.requests)
        assert bob.get(stack.url + "/staff-room/rota").status_code == 403
        assert len(stack.upstream.requests) == reached
