"""The login explainer: each failure kind, triggered for real, then ``sso-gateway explain``.

Every test makes one login fail at the running gateway, takes the reference from the
member's error page and runs ``sso-gateway explain CODE`` against the same config (so
the failure is read back from the store, as a second process would). The explanation
must name the check and the values involved.
"""

from __future__ import annotations

import re
import sqlite3
import time

import httpx
import pytest

from gateway.cli import main
from gateway.keys import generate_self_signed
from gateway.saml.sp_keys import fingerprint
from tests.browser import client
from tests.conftest import Stack
from tests.forge import Forge, acs, begin, encode

_REFERENCE = re.compile(r"reference <strong><code>([0-9A-Z]+)</code>")


pytestmark = pytest.mark.stack(shared=True)


def reference(answer: httpx.Response) -> str:
    assert answer.status_code == 400, answer.text
    match = _REFERENCE.search(answer.text)
    assert match, answer.text
    return match.group(1)


def explain(stack: Stack, code: str, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    status = main(["explain", code.lower(), "--config", str(stack.demo.workdir / "gateway.toml")])
    out = capsys.readouterr().out
    assert status == 0, out
    return out


def refused(stack: Stack, forge: Forge, **changes: object) -> str:
    """Start a login, answer it with the honest Response changed; the reference."""
    with client(stack) as http:
        pending = begin(http, stack.url, forge.idp_entity_id)
        xml = forge.xml(pending.request_id, **changes)
        return reference(acs(http, stack.url, encode(xml), pending.relay_state))


def test_bad_signature_shows_the_fingerprints_seen_and_expected(
        stack: Stack, forge: Forge, capsys: pytest.CaptureFixture[str]) -> None:
    key, cert = generate_self_signed("not the IdP")
    out = explain(stack, refused(stack, forge, key_pem=key, cert_pem=cert), capsys)
    assert "Check failed: signature" in out
    assert f"certificates_seen      {fingerprint(cert)}" in out
    assert f"certificates_expected  {fingerprint(forge.cert_pem)}" in out
    assert "update its metadata" in out


def test_clock_skew_shows_the_measured_offset(
        stack: Stack, forge: Forge, capsys: pytest.CaptureFixture[str]) -> None:
    # 200 s ahead: within python3-saml's fixed 300 s, beyond the configured 120 s.
    out = explain(stack, refused(stack, forge, now=time.time() + 200), capsys)
    assert "Check failed: not_yet_valid" in out and "Clock skew" in out
    offset = int(re.search(r"offset_seconds\s+\+(\d+)", out).group(1))  # type: ignore[union-attr]
    assert 195 <= offset <= 205
    assert re.search(r"allowed_skew_seconds\s+120", out)
    # An hour behind: the library refuses it first; the offset is measured all the same.
    out = explain(stack, refused(stack, forge, now=time.time() - 3600), capsys)
    assert "Check failed: expired" in out
    offset = int(re.search(r"offset_seconds\s+-(\d+)", out).group(1))  # type: ignore[union-attr]
    assert 3290 <= offset <= 3310  # NotOnOrAfter (issued an hour ago, valid 300 s)


def test_audience_mismatch_shows_both_values(
        stack: Stack, forge: Forge, capsys: pytest.CaptureFixture[str]) -> None:
    out = explain(stack, refused(stack, forge, audience="https://other-sp.example/sp"), capsys)
    assert "Check failed: audience" in out
    assert re.search(r"audience\s+https://other-sp.example/sp", out)
    assert re.search(rf"expected\s+{re.escape(forge.sp_entity_id)}", out)


def test_destination_mismatch_shows_both_values(
        stack: Stack, forge: Forge, capsys: pytest.CaptureFixture[str]) -> None:
    out = explain(stack, refused(stack, forge, destination="https://elsewhere.example/acs"),
                  capsys)
    assert "Check failed: destination" in out
    assert re.search(r"destination\s+https://elsewhere.example/acs", out)
    assert re.search(rf"expected\s+{re.escape(forge.acs_url)}", out)


def test_unknown_idp_is_a_clear_400_and_explained(
        stack: Stack, forge: Forge, capsys: pytest.CaptureFixture[str]) -> None:
    with client(stack) as http:
        page = http.get(stack.url + "/saml/login",
                        params={"idp": "https://nobody.example/idp", "next": "/issues/x"})
        assert "not known to this site" in page.text
        code = reference(page)
        # An unsolicited Response from an issuer that is not configured.
        stranger = Forge(**{**forge.__dict__, "idp_entity_id": "https://stranger.example/idp"})
        unsolicited = reference(acs(http, stack.url, encode(stranger.xml(None)), ""))
    out = explain(stack, code, capsys)
    assert "Check failed: unknown_idp" in out and "https://nobody.example/idp" in out
    out = explain(stack, unsolicited, capsys)
    assert "Check failed: unknown_idp" in out and "https://stranger.example/idp" in out


def test_in_response_to_unknown_or_expired(
        stack: Stack, forge: Forge, capsys: pytest.CaptureFixture[str]) -> None:
    with client(stack) as http:
        pending = begin(http, stack.url, forge.idp_entity_id)
        with sqlite3.connect(stack.db) as db:  # the pending request expires
            db.execute("DELETE FROM once WHERE key = ?", (f"authn:{pending.relay_state}",))
        expired = reference(acs(http, stack.url, encode(forge.xml(pending.request_id)),
                                pending.relay_state))
        pending = begin(http, stack.url, forge.idp_entity_id)
        other = reference(acs(http, stack.url, encode(forge.xml("_another-request")),
                              pending.relay_state))
    out = explain(stack, expired, capsys)
    assert "Check failed: in_response_to" in out and "login_timeout" in out
    assert pending.relay_state[:24] not in out  # the first login's state, not this one's
    out = explain(stack, other, capsys)
    assert "Check failed: in_response_to" in out
    assert re.search(r"in_response_to\s+_another-request", out)
    assert re.search(rf"expected\s+{pending.request_id}", out)


def test_lost_relay_state(stack: Stack, forge: Forge,
                          capsys: pytest.CaptureFixture[str]) -> None:
    with client(stack) as started_here:
        pending = begin(started_here, stack.url, forge.idp_entity_id)
    with client(stack) as other_browser:
        code = reference(acs(other_browser, stack.url, encode(forge.xml(pending.request_id)),
                             pending.relay_state))
        no_relay = reference(other_browser.post(stack.url + "/saml/acs", data={
            "SAMLResponse": encode(forge.xml(pending.request_id))}))
    out = explain(stack, code, capsys)
    assert "Check failed: login_state" in out and "Lost RelayState" in out
    assert re.search(r"binding_cookie\s+missing", out)
    out = explain(stack, no_relay, capsys)
    assert re.search(r"relay_state\s+missing", out)


def test_unknown_code(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["explain", "00000000", "--config", str(stack.demo.workdir / "gateway.toml")])
    assert status == 1
    assert "no login failure with reference '00000000'" in capsys.readouterr().err
