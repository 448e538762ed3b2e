"""``sso-gateway explain`` for failures an admin meets early: a signing shape the gateway
was told to refuse (the Response signed, not the Assertion), nothing signed, a signed
Response changed on the way, and a login whose attributes carry no usable member ID.

Each login fails for real at the running gateway; the explanation is read back from the
store as a second process would.
"""

from __future__ import annotations

import re

import pytest

from gateway.selftest.forge import ALICE
from tests.browser import client
from tests.conftest import Stack
from tests.forge import Forge, acs, assertion_of, begin, encode, make_evil, parse
from tests.test_explain import explain, reference, refused

pytestmark = pytest.mark.stack(shared=True)


@pytest.mark.stack(shared=True, extra_config='\n[idp]\nsigned_response = "refuse"\n')
def test_only_the_response_signed_names_the_shape_and_the_setting_that_accepts_it(
        stack: Stack, forge: Forge, capsys: pytest.CaptureFixture[str]) -> None:
    out = explain(stack, refused(stack, forge, sign_assertion=False, sign_response=True),
                  capsys)
    assert "Check failed: signature" in out
    assert re.search(r"signed +response signed, assertion not signed", out), out
    assert re.search(r"signed_response +refuse", out), out
    assert re.search(r"certificate_known +yes", out), out
    assert 'set signed_response = "accept" in this IdP\'s [[idps]] entry' in out
    assert "tampered" not in out and "Compare the certificate fingerprints" not in out


def test_nothing_signed_says_so(stack: Stack, forge: Forge,
                                capsys: pytest.CaptureFixture[str]) -> None:
    out = explain(stack, refused(stack, forge, sign_assertion=False), capsys)
    assert re.search(r"signed +neither response nor assertion signed", out), out
    assert "Nothing signed" in out and "(here: accept)" in out
    assert "Compare the certificate fingerprints" not in out


def test_a_changed_signed_response_says_the_fingerprints_match(
        stack: Stack, forge: Forge, capsys: pytest.CaptureFixture[str]) -> None:
    """The IdP's own certificate, a signature that does not verify: not a key problem."""
    with client(stack) as http:
        pending = begin(http, stack.url, forge.idp_entity_id)
        root = parse(forge.xml(pending.request_id, sign_assertion=False, sign_response=True))
        make_evil(assertion_of(root))
        code = reference(acs(http, stack.url, encode(root), pending.relay_state))
    out = explain(stack, code, capsys)
    assert re.search(r"signed +response signed, assertion not signed", out), out
    assert "fingerprints match" in out and "update its metadata" not in out


def test_no_member_id_names_the_attributes_that_arrived_without_values(
        stack: Stack, forge: Forge, capsys: pytest.CaptureFixture[str]) -> None:
    released = {k: v for k, v in ALICE.items() if k != "memberId"}
    released["urn:example:memberNo"] = ["SECRET-VALUE-1001"]
    out = explain(stack, refused(stack, forge, attributes=released), capsys)
    assert "Check failed: attributes" in out
    assert "urn:example:memberNo" in out
    for name in released:
        assert name in out
    for secret in ("SECRET-VALUE-1001", *ALICE["mail"], *ALICE["displayName"]):
        assert secret not in out  # names only, never values
