"""Deployment files: docker-compose.yml validates, and the pieces agree with each other.

Debian's ``docker-compose`` validates without a Docker daemon; ``make test`` installs it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import load_settings

ROOT = Path(__file__).resolve().parent.parent


def compose(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is missing: `make test` installs the Debian package "
                    "docker-compose (apt-get install -y docker-compose)", pytrace=False)
    return subprocess.run([exe, "-f", str(ROOT / "docker-compose.yml"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)


def test_compose_file_is_valid() -> None:
    done = compose("config", "-q")
    assert done.returncode == 0, done.stderr


def test_compose_runs_two_replicas_redis_reader_idp_and_a_balancer() -> None:
    done = compose("config", "--services")
    assert done.returncode == 0, done.stderr
    services = set(done.stdout.split())
    assert {"gateway-a", "gateway-b", "redis", "reader", "devidp", "nginx"} <= services
    balanced = re.findall(r"server (\S+):8000", (ROOT / "deploy/nginx.conf").read_text())
    assert sorted(balanced) == ["gateway-a", "gateway-b"]


def test_trial_files_and_compose_gateway_config_load(tmp_path: Path) -> None:
    """``trial_idp.py init`` writes what deploy/gateway.toml needs; the gateway loads it."""
    from gateway.app import create_app

    done = subprocess.run([sys.executable, str(ROOT / "deploy/trial_idp.py"), "init"],
                          env={**os.environ, "TRIAL_DATA": str(tmp_path)}, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    text = (ROOT / "deploy/gateway.toml").read_text().replace("/data/", f"{tmp_path}/")
    (tmp_path / "gateway.toml").write_text(text)
    settings = load_settings(tmp_path / "gateway.toml", environ={})
    assert settings.store.url == "redis://redis:6379/0"
    assert settings.listen == "0.0.0.0:8000"
    gateway = create_app(settings)
    assert [idp.entity_id for idp in gateway.registry.all()] == ["http://localhost:8081/metadata"]


def test_dockerfile_runs_unprivileged_with_a_healthcheck() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert re.search(r"^USER (?!root)\S+", dockerfile, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*urllib.*?/healthz", dockerfile, re.M)
    assert 'CMD ["sso-gateway", "serve"]' in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"certs", ".venv", ".git"} <= set(ignored)  # no keys in the build context
