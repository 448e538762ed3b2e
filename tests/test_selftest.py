"""``sso-gateway selftest`` against a running gateway: all pass; a weakened build fails.

The weakened build is the real gateway with one defence switched off (the replay cache:
its store's ``add_once`` claims every ``assertion:`` key is new); the self-test must
notice, exit 1 and name the replay case.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.cli import main
from gateway.demo.stack import DemoStack, prepare
from gateway.sessions.store import Namespace
from tests.conftest import Stack, TLSFiles, bound_socket, port_of, serve_gateway


def selftest_args(url: str, tls: TLSFiles, demo: DemoStack) -> list[str]:
    certs = demo.workdir / "certs"
    return ["selftest", url, "--ca-file", str(tls.cert),
            "--idp-key", str(certs / "devidp-key.pem"),
            "--idp-cert", str(certs / "devidp-cert.pem")]


def rows(output: str) -> dict[str, str]:
    """Case name → PASS/FAIL/SKIP, from the printed table."""
    found = {}
    for line in output.splitlines():
        match = re.match(r"(\S.*?)\s{2,}.*\s(PASS|FAIL|SKIP)$", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def test_selftest_passes_against_the_demo_stack(stack: Stack, tls: TLSFiles,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code = main(selftest_args(stack.url, tls, stack.demo))
    sessions_left = stack.session_count()
    out = capsys.readouterr().out
    results = rows(out)
    assert code == 0, out
    assert len(results) >= 20, out
    assert set(results.values()) == {"PASS"}, out
    for name in ("forged: unsigned response", "control: valid response (IdP key) accepted",
                 "wrapped: XSW1", "replayed: same Assertion ID, new response",
                 "off-audience: Audience of another SP", "path GET /a%2fb",
                 "spoofed X_Member_Id at /auth/check", "open redirect next=//evil.example"):
        assert name in results, out
    assert sessions_left == 0  # the positive controls signed out again
    assert "failed" in out and re.search(r"\b0 failed", out)


def test_selftest_without_the_idp_key_skips_what_needs_it(
        stack: Stack, tls: TLSFiles, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["selftest", stack.url, "--ca-file", str(tls.cert)])
    assert main(["selftest", stack.url]) == 2  # the test CA is not trusted: cannot run
    assert main(["selftest", stack.url, "--idp-key", "x.pem"]) == 2
    captured = capsys.readouterr()
    results = rows(captured.out)
    assert code == 0, captured.out
    assert results["replayed: same Assertion ID, new response"] == "SKIP"
    assert results["forged: self-signed, certificate in KeyInfo"] == "PASS"
    assert "certificate verify failed" in captured.err


def test_selftest_names_the_replay_when_the_replay_cache_is_off(
        tmp_path: Path, tls: TLSFiles, capsys: pytest.CaptureFixture[str]) -> None:
    sock = bound_socket()
    url = f"https://127.0.0.1:{port_of(sock)}"
    # Only the gateway runs: the self-test signs as the IdP itself and never visits it.
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
        code = main(selftest_args(url, tls, demo))
    out = capsys.readouterr().out
    results = rows(out)
    assert code == 1, out
    assert results["replayed: same Assertion ID, new response"] == "FAIL", out
    assert [name for name, status in results.items() if status == "FAIL"] == [
        "replayed: same Assertion ID, new response"], out
