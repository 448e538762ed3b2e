"""IdP-initiated SSO: off by default, on per IdP (``[[idps]] allow_unsolicited``).

Two IdPs: the demo's dev IdP (no opt-in) and a second IdP with its own key that opted
in. Unsolicited Responses (no InResponseTo, no login state in the browser) are refused
for the first and accepted once for the second; RelayState is still only a local path
and the replay cache still applies.
"""

from __future__ import annotations

import httpx
import pytest
from lxml import etree

from gateway.demo.stack import DemoStack
from gateway.devidp import DevIdPSettings
from gateway.devidp.metadata import idp_metadata
from gateway.keys import generate_self_signed
from tests.browser import client
from tests.conftest import Stack
from tests.forge import PAGE, Forge, encode, parse

OPTED_IN = "https://staff-idp.example/idp"
KEY, CERT = generate_self_signed("staff IdP")


def add_opted_in_idp(demo: DemoStack) -> None:
    staff = DevIdPSettings(base_url="http://127.0.0.1:9", key_pem=KEY, cert_pem=CERT,
                           sp_entity_id=demo.settings.sp_entity_id,
                           sp_acs_url=demo.settings.public_url + "/saml/acs",
                           entity_id=OPTED_IN, display_name="Staff IdP",
                           require_signed_requests=False)
    (demo.workdir / "idp_metadata" / "staff.xml").write_text(idp_metadata(staff))
    with (demo.workdir / "gateway.toml").open("a") as config:
        config.write(f'\n[[idps]]\nentity_id = "{OPTED_IN}"\nallow_unsolicited = true\n')


pytestmark = pytest.mark.stack(shared=True, setup=add_opted_in_idp)


def staff_forge(stack: Stack) -> Forge:
    return Forge(idp_entity_id=OPTED_IN, key_pem=KEY, cert_pem=CERT,
                 acs_url=stack.url + "/saml/acs", sp_entity_id=stack.demo.settings.sp_entity_id)


def post(http: httpx.Client, stack: Stack, xml: str | bytes, relay_state: str | None
         ) -> httpx.Response:
    data = {"SAMLResponse": encode(xml)}
    if relay_state is not None:
        data["RelayState"] = relay_state
    return http.post(stack.url + "/saml/acs", data=data)


def test_refused_for_an_idp_without_opt_in(stack: Stack, forge: Forge,
                                           caplog: pytest.LogCaptureFixture) -> None:
    with client(stack) as http:
        answer = post(http, stack, forge.xml(None), PAGE)
    assert answer.status_code == 400
    assert "kind=unsolicited" in caplog.text
    assert stack.session_count() == 0


def test_accepted_once_for_an_idp_with_opt_in(stack: Stack) -> None:
    xml = staff_forge(stack).xml(None)
    with client(stack) as http:
        answer = post(http, stack, xml, PAGE)
        assert answer.status_code == 302, answer.text
        assert answer.headers["location"] == PAGE
        assert http.get(stack.url + PAGE).status_code == 200
    assert stack.session_count() == 1
    with client(stack) as replayer:  # the same Response again: the replay cache refuses it
        assert post(replayer, stack, xml, PAGE).status_code == 400
    assert stack.session_count() == 1


def test_relay_state_is_only_a_local_path(stack: Stack) -> None:
    forge = staff_forge(stack)
    with client(stack) as http:
        for relay, target in (("https://evil.example/phish", "/"), ("//evil.example", "/"),
                              (None, "/"), ("/issues?x=1", "/issues?x=1")):
            answer = post(http, stack, forge.xml(None), relay)
            assert answer.status_code == 302, answer.text
            assert answer.headers["location"] == target


def test_subject_confirmation_must_not_answer_a_request(stack: Stack) -> None:
    """No InResponseTo on the Response, but one in the (signed) SubjectConfirmationData:
    an answer to some request, re-wrapped as unsolicited. Refused."""
    root = parse(staff_forge(stack).xml("_someone-elses-request"))
    del root.attrib["InResponseTo"]
    before = stack.session_count()
    with client(stack) as http:
        assert post(http, stack, etree.tostring(root), PAGE).status_code == 400
    assert stack.session_count() == before
