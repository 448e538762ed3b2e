"""``deploy/sso-gateway.service``: systemd accepts it, and it agrees with the gateway.

``systemd-analyze verify`` (Debian package ``systemd``, which ``make test`` installs)
parses every directive and checks that ExecStart's program exists and is executable;
the test points ExecStart at this checkout's ``sso-gateway`` and treats every warning
(an ignored directive or value) as a failure.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config_schema import ServerSettings

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "sso-gateway.service"
EXEC = "/usr/local/bin/sso-gateway"


def unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is missing: `make test` installs the Debian package "
                    "systemd (apt-get install -y systemd)")
    program = Path(sys.executable).with_name("sso-gateway")
    assert program.exists(), program
    text = UNIT.read_text()
    assert f"ExecStart={EXEC} " in text
    copy = tmp_path / "sso-gateway.service"
    copy.write_text(text.replace(EXEC, str(program)))
    done = subprocess.run([exe, "verify", str(copy)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr  # nothing ignored, nothing unknown


def test_the_unit_runs_serve_unprivileged_and_hardened() -> None:
    service = unit()["Service"]
    assert service["User"] == "sso-gateway"
    command = service["ExecStart"].split()
    assert command[1:] == ["serve", "--config", "/etc/sso-gateway/gateway.toml"]
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    for option in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                   "RestrictNamespaces", "LockPersonality"):
        assert service[option] == "yes", option
    assert service["ProtectSystem"] == "strict"
    assert service["CapabilityBoundingSet"] == ""
    # The command line the unit runs is one the CLI accepts.
    with pytest.raises(SystemExit) as shown:
        main([*command[1:], "--help"])
    assert shown.value.code == 0


def test_reload_is_a_sighup_to_serve() -> None:
    """``systemctl reload`` sends SIGHUP to the main process (serve, or its supervisor,
    which forwards it to every worker): ``gateway.reload`` re-reads the configuration."""
    service = unit()["Service"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"  # verify checks /bin/kill


def test_stop_timeout_outlasts_the_graceful_shutdown() -> None:
    """Requests in progress get ``shutdown_timeout`` seconds, a straggling worker is
    killed 5 s later: systemd must not SIGKILL before that."""
    match = re.fullmatch(r"(\d+)s?", unit()["Service"]["TimeoutStopSec"])
    assert match is not None
    default = ServerSettings().shutdown_timeout
    assert int(match.group(1)) > default + 5
