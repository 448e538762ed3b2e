"""The SP metadata's lifetime (issue 14, item 13).

python3-saml writes ``validUntil`` = now + 2 days and ``cacheDuration`` = 7 days into
metadata unless told otherwise: an IdP that imports ``/saml/metadata`` once (the
normal case) refuses the gateway two days later. The served metadata now has neither
by default; ``[sp] metadata_valid_for`` and ``metadata_cache_duration`` set them, the
document is rebuilt while the gateway runs so ``validUntil`` stays ahead, and
``sso-gateway check`` warns when the validity is short.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from lxml import etree
from onelogin.saml2.utils import OneLogin_Saml2_Utils
from onelogin.saml2.xml_utils import OneLogin_Saml2_XML

from gateway.cli import main
from gateway.config import load_settings
from gateway.demo.stack import prepare
from tests.conftest import bound_socket, port_of, seed_demo_keys, serve_gateway

DAY = 86400


@contextmanager
def gateway(workdir: Path, extra_config: str = "",
            clock: Callable[[], float] | None = None) -> Iterator[str]:
    """The gateway alone (its metadata needs no IdP to answer), over http on loopback."""
    sock = bound_socket()
    url = f"http://127.0.0.1:{port_of(sock)}"
    seed_demo_keys(workdir)
    prepare(workdir, gateway_url=url, idp_url="http://127.0.0.1:9",
            reader_url="http://127.0.0.1:9", extra_config=extra_config)
    settings = load_settings(workdir / "gateway.toml", environ={})
    with serve_gateway(settings, sock, clock=clock):
        yield url


def served_metadata(url: str) -> etree._Element:
    answer = httpx.get(url + "/saml/metadata", timeout=10)
    assert answer.status_code == 200
    schema_checked = OneLogin_Saml2_XML.validate_xml(answer.text,
                                                     "saml-schema-metadata-2.0.xsd")
    assert not isinstance(schema_checked, str), schema_checked  # a string is the error
    root: etree._Element = etree.fromstring(answer.content)
    return root


def sp_section(lines: str) -> str:
    """A ``[sp]`` table to append to the demo's gateway.toml (it has none)."""
    return f"\n[sp]\n{lines}\n"


def test_served_metadata_has_no_expiry_by_default(tmp_path: Path) -> None:
    with gateway(tmp_path) as url:
        root = served_metadata(url)
    assert root.get("validUntil") is None
    assert root.get("cacheDuration") is None
    assert root.get("entityID") == f"{url}/saml/metadata"


def test_configured_validity_and_cache_duration_are_served_and_kept_ahead(
        tmp_path: Path) -> None:
    now = [1_900_000_000.0]
    extra = sp_section(f"metadata_valid_for = {90 * DAY}\nmetadata_cache_duration = {DAY}")
    with gateway(tmp_path, extra_config=extra, clock=lambda: now[0]) as url:
        first = served_metadata(url)
        assert first.get("cacheDuration") == f"PT{DAY}S"
        until = OneLogin_Saml2_Utils.parse_SAML_to_time(first.get("validUntil"))
        assert until == int(now[0]) + 90 * DAY
        # Minutes later: the same document.
        now[0] += 600
        assert served_metadata(url).get("validUntil") == first.get("validUntil")
        # Months later the gateway still runs: validUntil moved along, never in the past.
        now[0] += 120 * DAY
        later = served_metadata(url)
        until = OneLogin_Saml2_Utils.parse_SAML_to_time(later.get("validUntil"))
        assert until == int(now[0]) + 90 * DAY
        assert later.get("cacheDuration") == f"PT{DAY}S"


def check_output(workdir: Path, capsys: pytest.CaptureFixture[str],
                 sp_lines: str = "") -> tuple[int, str]:
    seed_demo_keys(workdir)
    prepare(workdir, gateway_url="http://127.0.0.1:8000", idp_url="http://127.0.0.1:8001",
            reader_url="http://127.0.0.1:8002",
            extra_config=sp_section(sp_lines) if sp_lines else "")
    code = main(["check", "--config", str(workdir / "gateway.toml")])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_check_warns_about_short_validity(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check_output(tmp_path / "default", capsys)
    assert code == 0, out
    assert "metadata_valid_for" not in out

    code, out = check_output(tmp_path / "short", capsys, f"metadata_valid_for = {2 * DAY}")
    assert code == 0, out
    assert "warning: sp.metadata_valid_for = 172800 s (2.0 days)" in out

    code, out = check_output(tmp_path / "long", capsys, f"metadata_valid_for = {365 * DAY}")
    assert code == 0, out
    assert "warning" not in out

    code, out = check_output(tmp_path / "odd", capsys,
                             f"metadata_valid_for = {40 * DAY}\n"
                             f"metadata_cache_duration = {50 * DAY}")
    assert code == 0, out
    assert "warning: sp.metadata_cache_duration" in out

    silly = tmp_path / "silly"
    check_output(silly, capsys)
    with (silly / "gateway.toml").open("a") as config:
        config.write(sp_section("metadata_valid_for = 60"))
    code = main(["check", "--config", str(silly / "gateway.toml")])
    out = capsys.readouterr().err
    assert code == 2, out
    assert "key sp.metadata_valid_for (60): Input should be greater than or equal to 3600" in out
