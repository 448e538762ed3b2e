"""``sso-gateway explain`` for two failures an admin meets early: an IdP that signs only
the Response (not the Assertion), and a login whose attributes carry no usable member ID.

Each login fails for real at the running gateway; the explanation is read back from the
store as a second process would.
"""

from __future__ import annotations

import pytest

from gateway.selftest.forge import ALICE
from tests.conftest import Stack
from tests.forge import Forge
from tests.test_explain import explain, refused

pytestmark = pytest.mark.stack(shared=True)


def test_only_the_response_signed_says_the_idp_must_sign_assertions(
        stack: Stack, forge: Forge, capsys: pytest.CaptureFixture[str]) -> None:
    out = explain(stack, refused(stack, forge, sign_assertion=False, sign_response=True),
                  capsys)
    assert "Check failed: signature" in out
    assert "must sign its assertions" in out
    assert "tampered" not in out and "Compare the certificate fingerprints" not in out


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
