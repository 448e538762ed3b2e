"""The SAML attack suite: every forgery in ``tests/forge.py`` posted to a running gateway.

Each attack starts from one valid, freshly signed Response (the control test shows that
Response logs in) and changes one thing. At the ACS every one must get the same generic
400 "Sign-in failed" page with a reference (the reason only in the log, under that
reference), create no session, send nothing upstream, and leave the Assertion ID out
of the replay cache: the genuine Response with the same Assertion ID still logs in
afterwards, so a forged copy can never burn a real login.

The same attacks are also run against ``ServiceProvider.finish_login`` directly (which
check refuses them: the ``LoginFailed`` kind) and against python3-saml alone (which of
them the library would accept: the gaps the gateway closes itself).

One stack serves the whole module; tests compare session counts before and after.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from onelogin.saml2.response import OneLogin_Saml2_Response

from gateway.errors import LoginFailed
from gateway.saml import IdP, IdPRegistry, ServiceProvider
from gateway.selftest.attacks import RESPONSE_SIGNED
from tests.browser import client
from tests.conftest import Stack, TLSFiles, run_stack
from tests.forge import (
    ATTACKS,
    Forge,
    acs,
    begin,
    consumed_assertion_ids,
    encode,
    forge_attack,
    forge_for_demo,
    now_id,
)

# If the edge's per-client rate limits on /saml/* need raising for this module (it sends
# a few hundred requests from 127.0.0.1), the config goes here.
EXTRA_CONFIG = ""
_REFERENCE = re.compile(r"reference <strong><code>([0-9A-Z]+)</code>")


pytestmark = pytest.mark.stack(shared=True, extra_config=EXTRA_CONFIG)


@pytest.fixture(scope="module")
def _sp_by_stack() -> dict[int, tuple[Stack, ServiceProvider, IdP]]:
    return {}


@pytest.fixture
def sp_and_idp(stack: Stack, _sp_by_stack: dict[int, tuple[Stack, ServiceProvider, IdP]]
               ) -> tuple[ServiceProvider, IdP]:
    """The stack's SP and dev IdP, built once per (shared) stack as the gateway builds its
    own once: an SP keeps only caches, and building one reads its RSA key (0.1 s)."""
    if id(stack) not in _sp_by_stack:  # the entry holds the stack: its id stays its own
        settings = stack.demo.settings
        registry = IdPRegistry.load_dir(settings.idp.metadata_dir)
        _sp_by_stack[id(stack)] = (stack, ServiceProvider(settings, registry),
                                   registry.get(stack.demo.idp.entity_id))
    _, sp, idp = _sp_by_stack[id(stack)]
    return sp, idp


def login_page_refusal(answer: httpx.Response) -> str:
    """Assert the generic refusal; return its reference code."""
    assert answer.status_code == 400, answer.text
    assert "Sign-in failed" in answer.text
    match = _REFERENCE.search(answer.text)
    assert match, answer.text
    assert not any(c.startswith("__Host-gw_session=")
                   for c in answer.headers.get_list("set-cookie"))
    return match.group(1)


def genuine_login(stack: Stack, forge: Forge, assertion_id: str) -> httpx.Response:
    with client(stack) as http:
        pending = begin(http, stack.url, forge.idp_entity_id)
        return acs(http, stack.url, encode(forge.valid(pending.request_id,
                                                       assertion_id=assertion_id)),
                   pending.relay_state)


def test_control_the_unmodified_forgery_logs_in(stack: Stack, forge: Forge) -> None:
    before = stack.session_count()
    assertion_id = now_id()
    answer = genuine_login(stack, forge, assertion_id)
    assert answer.status_code == 302, answer.text
    assert stack.session_count() == before + 1
    assert assertion_id in consumed_assertion_ids(stack.db)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_refused_at_the_acs(stack: Stack, forge: Forge, name: str,
                                      caplog: pytest.LogCaptureFixture) -> None:
    sessions = stack.session_count()
    refused_at_the_acs(stack, forge, name, caplog)
    assert stack.session_count() == sessions + 1


def refused_at_the_acs(stack: Stack, forge: Forge, name: str,
                       caplog: pytest.LogCaptureFixture) -> None:
    """The attack ``name`` is refused at the ACS with its kind, and changes nothing; then
    the genuine Response with the same Assertion ID signs in (one session more)."""
    sessions = stack.session_count()
    assertion_id = now_id()
    with caplog.at_level(logging.WARNING, logger="gateway"), client(stack) as http:
        pending = begin(http, stack.url, forge.idp_entity_id)
        forged = forge_attack(forge, name, pending.request_id, assertion_id)
        answer = acs(http, stack.url, encode(forged), pending.relay_state)
    reference = login_page_refusal(answer)
    # The reason is in the log only, under the reference the user sees.
    lines = [r.getMessage() for r in caplog.records if f"ref={reference}" in r.getMessage()]
    assert lines and f"kind={ATTACKS[name].kind}" in lines[0], lines
    assert stack.session_count() == sessions
    assert stack.upstream.requests == []
    # The forged copy did not consume the Assertion ID: the genuine one still logs in.
    assert assertion_id not in consumed_assertion_ids(stack.db)
    assert genuine_login(stack, forge, assertion_id).status_code == 302


def test_every_refusal_is_the_same_page(stack: Stack, forge: Forge) -> None:
    """Nothing in the page tells one failure from another (only the codes differ: the
    reference, and any per-request ID)."""
    pages = set()
    for name in ("XSW3", "expired", "attacker-key-with-cert-in-KeyInfo", "XXE"):
        with client(stack) as http:
            pending = begin(http, stack.url, forge.idp_entity_id)
            forged = forge_attack(forge, name, pending.request_id, now_id())
            answer = acs(http, stack.url, encode(forged), pending.relay_state)
        login_page_refusal(answer)
        pages.add(re.sub(r"<code>[^<]*</code>", "<code></code>", answer.text))
    assert len(pages) == 1


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_refused_by_the_expected_check(
    sp_and_idp: tuple[ServiceProvider, IdP], forge: Forge, name: str
) -> None:
    sp, idp = sp_and_idp
    forged = forge_attack(forge, name, "_pending-request", now_id())
    with pytest.raises(LoginFailed) as info:
        sp.finish_login(encode(forged), request_id="_pending-request", idp=idp)
    assert info.value.kind == ATTACKS[name].kind, info.value.reason


def library_verdict(sp: ServiceProvider, idp: IdP, message: str, request_id: str,
                    by_response: bool = False) -> Any:
    """What python3-saml alone makes of it, with the settings the gateway gives it for the
    message's signing shape: the library's own getters, or None if refused."""
    request_data = {"https": "on", "http_host": sp.acs_url.split("/")[2],
                    "script_name": "/saml/acs", "get_data": {},
                    "post_data": {"SAMLResponse": message}}
    try:
        response = OneLogin_Saml2_Response(sp.settings_for(idp, by_response=by_response),
                                           message)
        if not response.is_valid(request_data, request_id):
            return None
        return response.get_attributes(), response.get_nameid()
    except Exception:
        return None


@pytest.mark.parametrize("name", list(ATTACKS))
def test_which_attacks_the_library_alone_would_accept(
    sp_and_idp: tuple[ServiceProvider, IdP], forge: Forge, name: str
) -> None:
    """The gaps: ``library_accepts`` attacks pass python3-saml (strict, our settings) and
    only the gateway's own checks stop them. If a library upgrade closes or opens one,
    this says so."""
    sp, idp = sp_and_idp
    message = encode(forge_attack(forge, name, "_pending-request", now_id()))
    by_response = ATTACKS[name].base == RESPONSE_SIGNED  # what the gateway would choose
    accepted = library_verdict(sp, idp, message, "_pending-request", by_response) is not None
    assert accepted == ATTACKS[name].library_accepts


@pytest.mark.parametrize("name", ["comment-in-memberId", "comment-in-NameID"])
def test_a_comment_never_changes_the_identity_the_library_reads(
    sp_and_idp: tuple[ServiceProvider, IdP], forge: Forge, name: str
) -> None:
    """python3-saml parses with ``remove_comments=True``: ``M1001<!---->1`` reads as the
    signed ``M10011``, never ``M1001``. The gateway refuses the comment anyway."""
    sp, idp = sp_and_idp
    message = encode(forge_attack(forge, name, "_pending-request", now_id()))
    verdict = library_verdict(sp, idp, message, "_pending-request")
    assert verdict is not None
    attributes, name_id = verdict
    signed = ATTACKS[name].base.get("attributes", {}).get("memberId", ["M1001"])
    assert attributes["memberId"] == signed
    assert name_id == "alice-persistent-id"


def test_20_megabyte_body_is_refused(stack: Stack, forge: Forge) -> None:
    sessions = stack.session_count()
    with client(stack) as http:
        pending = begin(http, stack.url, forge.idp_entity_id)
        body = (b"RelayState=" + pending.relay_state.encode() + b"&SAMLResponse="
                + b"A" * (20 * 1024 * 1024))
        answer = http.post(stack.url + "/saml/acs", content=body,
                           headers={"content-type": "application/x-www-form-urlencoded"})
    assert answer.status_code == 413
    assert stack.session_count() == sessions
    assert stack.upstream.requests == []


def test_replayed_assertion_in_a_new_response_is_refused(stack: Stack, forge: Forge) -> None:
    assertion_id = now_id()
    assert genuine_login(stack, forge, assertion_id).status_code == 302
    sessions = stack.session_count()
    login_page_refusal(genuine_login(stack, forge, assertion_id))
    assert stack.session_count() == sessions
    assert stack.upstream.requests == []


def test_replay_is_refused_after_a_gateway_restart(tmp_path: Path, tls: TLSFiles) -> None:
    """A new gateway on the same SQLite file still knows the Assertion ID. The dev IdP's
    entity ID contains its port, so the second run trusts the first run's IdP metadata
    (same key: the work directory keeps it)."""
    assertion_id = now_id()
    with run_stack(tmp_path, tls) as first:
        forge = forge_for_demo(first.demo)
        assert genuine_login(first, forge, assertion_id).status_code == 302
        metadata = (first.demo.workdir / "idp_metadata" / "devidp.xml").read_text()
    saved = tmp_path.parent / f"{tmp_path.name}-devidp.xml"
    saved.write_text(metadata)

    def same_idp(demo: Any) -> None:
        shutil.copy(saved, demo.workdir / "idp_metadata" / "devidp.xml")

    with run_stack(tmp_path, tls, setup=same_idp) as second:
        assert second.session_count() == 1
        forge = forge_for_demo(second.demo, idp_entity_id=first.demo.idp.entity_id)
        fresh = now_id()
        assert genuine_login(second, forge, fresh).status_code == 302  # the restart works
        login_page_refusal(genuine_login(second, forge, assertion_id))
        assert second.session_count() == 2
        assert second.upstream.requests == []
    assert {assertion_id, fresh} <= consumed_assertion_ids(second.db)

