"""``sso-gateway selftest`` against a running gateway: all pass; a weakened build fails.

The weakened build is the real gateway with one defence switched off (the replay cache:
its store's ``add_once`` claims every ``assertion:`` key is new); the self-test must
notice, exit 1 and name the replay case.

The self-test learns the deployment's names from ``--config``: against a gateway that
maps URI-named attributes (and renames its identity headers), its positive control
forges those names, where the defaults (``memberId`` …) are refused. It also carries
the hostile-input probes of issue 14 that run from outside, and passes against the
stack ``make demo`` runs (``sso-gateway demo``, started here as a process).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.cli import main
from gateway.config_schema import (
    DEFAULT_ATTRIBUTES,
    DEFAULT_IDENTITY_HEADERS,
    FRONT_PROXY_HEADERS,
    IdentitySettings,
    LimitSettings,
    SessionSettings,
)
from gateway.demo.stack import MEMBER, DemoStack, prepare
from gateway.devidp import DevIdPSettings
from gateway.devidp import create_app as create_idp_app
from gateway.devidp.metadata import idp_metadata
from gateway.devidp.users import DemoUser
from gateway.keys import generate_self_signed
from gateway.selftest import deployment as selftest_defaults
from gateway.sessions.store import Namespace
from tests.browser import client, post_to_acs, sign_in_at_idp
from tests.conftest import (
    Stack,
    TLSFiles,
    bound_socket,
    port_of,
    run_stack,
    seed_demo_keys,
    serve_gateway,
    serving,
    wait_until_healthy,
)

#: What no probe can observe from outside: reported as SKIP, never as PASS.
NOT_OBSERVABLE = {"upstream Set-Cookie of the gateway's cookies"}
#: The probes of issue 14's items, by the name the table gives them.
HOSTILE = ("forward-auth: client adds another URI header",
           "forward-auth: cross-site POST on a member's cookie",
           "forward-auth: ?upstream=OTHER with a public path",
           "kept form: junk session cookie", "kept form: cross-site POST",
           "upstream gets no X-Remote-User & co.", "1 MB request header",
           "cross-origin WebSocket upgrade", "second Host header",
           "unknown-IdP sign-in starts rate limited")


def selftest_args(url: str, tls: TLSFiles | None, certs: Path, *extra: str) -> list[str]:
    trust = ["--ca-file", str(tls.cert)] if tls is not None else []
    return ["selftest", url, *trust, "--idp-key", str(certs / "devidp-key.pem"),
            "--idp-cert", str(certs / "devidp-cert.pem"), *extra]


def rows(output: str) -> dict[str, str]:
    """Case name → PASS/FAIL/SKIP, from the printed table."""
    found = {}
    for line in output.splitlines():
        match = re.match(r"(\S.*?)\s{2,}.*\s(PASS|FAIL|SKIP)$", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def not_passed(results: dict[str, str]) -> dict[str, str]:
    return {name: status for name, status in results.items() if status != "PASS"}


# -- the demo stack, with an upstream that echoes headers and a second upstream -------------

LIMITED = "\n[limits]\nlogins = 40\n"  # the probe spends what the run leaves of it
ECHO_AND_BILLING = """
[[rules]]
path = "/echo.json"
access = "public"
[[rules]]
path = "/billing/**"
access = "member"
require = { entitlement = "urn:mace:example.org:entitlement:billing" }
"""


def add_billing(demo: DemoStack) -> None:
    """A second upstream (the same echo server): ``?upstream=billing`` must mint nothing
    for a member the billing rule does not let in."""
    with (demo.workdir / "gateway.toml").open("a") as config:
        config.write(f'\n[[upstreams]]\nname = "billing"\nprefix = "/billing"\n'
                     f'url = "{demo.reader_url}"\n')


@pytest.mark.stack(extra_config=LIMITED + ECHO_AND_BILLING, setup=add_billing)
def test_selftest_passes_against_the_demo_stack(stack: Stack, tls: TLSFiles,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    config = str(stack.demo.workdir / "gateway.toml")
    code = main(selftest_args(stack.url, tls, stack.demo.workdir / "certs",
                              "--config", config, "--echo-path", "/echo.json"))
    sessions_left = stack.session_count()
    out = capsys.readouterr().out
    results = rows(out)
    assert code == 0, out
    assert len(results) >= 30, out
    assert not_passed(results) == dict.fromkeys(NOT_OBSERVABLE, "SKIP"), out
    for name in ("forged: unsigned response", "control: valid response (IdP key) accepted",
                 "wrapped: XSW1", "replayed: same Assertion ID, new response",
                 "off-audience: Audience of another SP", "path GET /a%2fb",
                 "spoofed X_Member_Id at /auth/check", "open redirect next=//evil.example",
                 *HOSTILE):
        assert name in results, (name, out)
    assert sessions_left == 0  # the positive controls and the shared member signed out
    assert re.search(r"\b0 failed", out)
    assert f"config {config}" in out
    # The probe that shows what reaches the upstream sent every header in question.
    assert stack.upstream.header_values("x-selftest-echo"), "the echo probe never got there"
    assert not stack.upstream.header_values("x-remote-user")


@pytest.mark.stack(extra_config=LIMITED)
def test_selftest_without_the_idp_key_skips_what_needs_it(
        stack: Stack, tls: TLSFiles, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["selftest", stack.url, "--ca-file", str(tls.cert)])
    assert main(["selftest", stack.url]) == 2  # the test CA is not trusted: cannot run
    assert main(["selftest", stack.url, "--idp-key", "x.pem"]) == 2
    assert main(["selftest", stack.url, "--config", "/nonexistent/gateway.toml",
                 "--ca-file", str(tls.cert)]) == 2
    captured = capsys.readouterr()
    results = rows(captured.out)
    assert code == 0, captured.out
    assert results["replayed: same Assertion ID, new response"] == "SKIP"
    assert results["forward-auth: cross-site POST on a member's cookie"] == "SKIP"
    assert results["forged: self-signed, certificate in KeyInfo"] == "PASS"
    assert results["kept form: junk session cookie"] == "PASS"
    assert results["unknown-IdP sign-in starts rate limited"] == "PASS"
    assert results["upstream gets no X-Remote-User & co."] == "SKIP"  # no --echo-path
    assert "certificate verify failed" in captured.err
    assert "/nonexistent/gateway.toml: cannot read" in captured.err


def test_selftest_names_the_replay_when_the_replay_cache_is_off(
        tmp_path: Path, tls: TLSFiles, capsys: pytest.CaptureFixture[str]) -> None:
    sock = bound_socket()
    url = f"https://127.0.0.1:{port_of(sock)}"
    # Only the gateway runs: the self-test signs as the IdP itself and never visits it.
    seed_demo_keys(tmp_path)
    demo = prepare(tmp_path, gateway_url=url, idp_url="http://127.0.0.1:9",
                   reader_url="http://127.0.0.1:9")
    with serve_gateway(demo.settings, sock, tls=tls) as server:
        weakened: Gateway = server.app
        store = weakened.stores.backend
        add_once = store.add_once

        async def replay_cache_off(key: str, value: str, ttl: float) -> bool:
            replayable = key.startswith(Namespace.ASSERTION)
            return True if replayable else await add_once(key, value, ttl)

        store.add_once = replay_cache_off  # type: ignore[method-assign]
        code = main(selftest_args(url, tls, demo.workdir / "certs",
                                  "--config", str(demo.workdir / "gateway.toml")))
    out = capsys.readouterr().out
    results = rows(out)
    assert code == 1, out
    assert results["replayed: same Assertion ID, new response"] == "FAIL", out
    assert [name for name, status in results.items() if status == "FAIL"] == [
        "replayed: same Assertion ID, new response"], out


# -- a deployment with URI-named attributes and its own header names ------------------------

URI = {
    "member_id": "urn:oid:2.16.840.1.113730.3.1.3",  # employeeNumber (not a scoped one)
    "email": "urn:oid:0.9.2342.19200300.100.1.3",
    "display_name": "urn:oid:2.16.840.1.113730.3.1.241",
    "entitlements": "urn:oid:1.3.6.1.4.1.5923.1.1.1.7",
    "status": "urn:example:attribute:member-status",
}
URI_CONFIG = "\n[attributes]\n" + "".join(f'{k} = ["{v}"]\n' for k, v in URI.items()) + """
[identity_headers]
subject = "X-Reader-Id"
email = "X-Reader-Email"
display_name = "X-Reader-Name"
entitlements = "X-Reader-Entitlements"
status = "X-Reader-Status"
idp = "X-Reader-Idp"
"""
URI_ALICE = DemoUser("uri-alice", "demo", "Alice Archer", {
    URI["member_id"]: ["M1001"], URI["email"]: ["alice@members.example.org"],
    URI["display_name"]: ["Alice Archer"], URI["entitlements"]: [MEMBER],
    URI["status"]: ["active"]})


@dataclass
class UriDeployment:
    stack: Stack
    idp: DevIdPSettings
    certs: Path  # the URI IdP's key and certificate, as devidp-key.pem / devidp-cert.pem


@pytest.fixture
def uri_deployment(tmp_path: Path, tls: TLSFiles) -> Iterator[UriDeployment]:
    """The demo gateway mapping only URI-named attributes, with a dev IdP that releases
    them (the demo's IdP releases friendly names, which this gateway no longer maps)."""
    sock = bound_socket()
    key, cert = generate_self_signed("URI-naming dev IdP")
    certs = tmp_path / "uri-idp"
    certs.mkdir()
    (certs / "devidp-key.pem").write_text(key)
    (certs / "devidp-cert.pem").write_text(cert)
    found: dict[str, DevIdPSettings] = {}

    def add_uri_idp(demo: DemoStack) -> None:
        idp = DevIdPSettings(
            base_url=f"http://127.0.0.1:{port_of(sock)}", key_pem=key, cert_pem=cert,
            sp_entity_id=demo.settings.sp_entity_id,
            sp_acs_url=demo.settings.public_url + "/saml/acs",
            sp_cert_pem=(demo.workdir / "certs" / "sp.crt").read_text(),
            display_name="URI-naming Society", users=(URI_ALICE,))
        found["idp"] = idp
        (demo.workdir / "idp_metadata" / "uri.xml").write_text(idp_metadata(idp))
        with (demo.workdir / "gateway.toml").open("a") as config:
            config.write(f'\n[[idps]]\nentity_id = "{idp.entity_id}"\n'
                         'member_ids = "organisation"\n')

    with (run_stack(tmp_path / "stack", tls, extra_config=URI_CONFIG,
                    setup=add_uri_idp) as stack,
          serving(create_idp_app(found["idp"]), sock)):
        yield UriDeployment(stack, found["idp"], certs)


def test_selftest_uses_the_deployments_attribute_and_header_names(
        uri_deployment: UriDeployment, tls: TLSFiles,
        capsys: pytest.CaptureFixture[str]) -> None:
    stack, idp = uri_deployment.stack, uri_deployment.idp
    # The deployment works: a member of the URI-naming IdP signs in and is seen upstream
    # under the configured header names.
    with client(stack) as http:
        started = http.get(stack.url + "/saml/login",
                           params={"idp": idp.entity_id, "next": "/issues/2023-03/pages/1"})
        assert started.status_code == 302, started.text
        done = post_to_acs(http, sign_in_at_idp(http, http.get(started.headers["location"]),
                                                "uri-alice"))
        assert done.status_code == 302, done.text
        assert http.get(stack.url + "/issues/2023-03/pages/1").status_code == 200
    assert stack.upstream.header_values("x-reader-id")[-1] == "M1001"

    args = selftest_args(stack.url, tls, uri_deployment.certs, "--idp", idp.entity_id)
    # Without its config the self-test forges memberId & co., which this gateway does
    # not map: its own positive control fails (as it did before it read configs).
    assert main(args) == 1
    blind = rows(capsys.readouterr().out)
    assert blind["control: valid response (IdP key) accepted"] == "FAIL"

    config = str(stack.demo.workdir / "gateway.toml")
    code = main([*args, "--config", config])
    out = capsys.readouterr().out
    results = rows(out)
    assert code == 0, out
    assert results["control: valid response (IdP key) accepted"] == "PASS", out
    assert results["replayed: same Assertion ID, new response"] == "PASS", out
    for name in ("spoofed X-Reader-Id at /auth/check", "spoofed X_Reader_Id at /auth/check",
                 "spoofed X-Reader-Id (twice, in Connection) on a gated page"):
        assert results[name] == "PASS", (name, out)
    assert "spoofed X-Member-Id at /auth/check" not in results
    allowed = {*NOT_OBSERVABLE, "upstream gets no X-Remote-User & co.",  # no --echo-path
               "forward-auth: ?upstream=OTHER with a public path",  # one upstream
               "unknown-IdP sign-in starts rate limited"}  # the test stack's limit is huge
    assert set(not_passed(results)) <= allowed, out
    assert set(not_passed(results).values()) == {"SKIP"}, out
    assert stack.session_count() == 1  # the browser login above; the self-test's are gone


def test_selftest_defaults_are_the_gateways() -> None:
    """Without --config the self-test assumes the gateway's defaults: its copies of them
    (it may not import the gateway's server side) must not drift."""
    copies = {"attributes": selftest_defaults.DEFAULT_RELEASED,
              "headers": selftest_defaults.DEFAULT_HEADERS,
              "front proxies": selftest_defaults.FRONT_PROXY_HEADERS,
              "token header": selftest_defaults.DEFAULT_TOKEN_HEADER,
              "cookie": selftest_defaults.DEFAULT_COOKIE,
              "logins": selftest_defaults.DEFAULT_LOGINS}
    gateway = {"attributes": {role: names[0] for role, names in DEFAULT_ATTRIBUTES.items()},
               "headers": DEFAULT_IDENTITY_HEADERS, "front proxies": FRONT_PROXY_HEADERS,
               "token header": IdentitySettings().token_header,
               "cookie": SessionSettings().cookie_name, "logins": LimitSettings().logins}
    assert copies == gateway


# -- `make demo` -----------------------------------------------------------------------------


def three_free_ports() -> int:
    """A port P with P, P+1 and P+2 free on loopback (``demo`` takes three in a row)."""
    for _ in range(50):
        with bound_socket() as probe:
            base = port_of(probe)
        if base > 65000:
            continue
        try:
            with socket.socket() as a, socket.socket() as b, socket.socket() as c:
                for sock, port in ((a, base), (b, base + 1), (c, base + 2)):
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    pytest.fail("no three free ports in a row on loopback")


def test_selftest_passes_against_sso_gateway_demo(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """What `make demo` runs (``sso-gateway demo``, default limits, the sample reader),
    as a process of its own; the self-test with the demo's config and IdP key."""
    port = three_free_ports()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    work = tmp_path / "demo"
    with (tmp_path / "demo.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "demo", "--dir", str(work),
             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, tmp_path / "demo.log", timeout=30)
        code = main(selftest_args(url, None, work / "certs",
                                  "--config", str(work / "gateway.toml")))
    finally:
        process.terminate()
        process.wait(timeout=20)
    out = capsys.readouterr().out
    results = rows(out)
    assert code == 0, out
    assert not_passed(results) == {
        **dict.fromkeys(NOT_OBSERVABLE, "SKIP"),
        "upstream gets no X-Remote-User & co.": "SKIP",  # the reader shows no headers
        "forward-auth: ?upstream=OTHER with a public path": "SKIP",  # one upstream
    }, out
    assert results["unknown-IdP sign-in starts rate limited"] == "PASS", out
    assert results["control: valid response (IdP key) accepted"] == "PASS", out
