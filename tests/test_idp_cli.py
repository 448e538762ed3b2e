"""``sso-gateway idp add · list · check`` on sample metadata files."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C
from onelogin.saml2.utils import OneLogin_Saml2_Utils

from gateway.cli import main
from gateway.config import load_settings
from gateway.devidp import DevIdPSettings
from gateway.devidp.metadata import idp_metadata
from gateway.keys import generate_self_signed, pem_body
from gateway.saml.metadata_report import cert_info
from gateway.saml.metadata_source import cache_paths
from tests.conftest import bound_socket, certificate, port_of, serving
from tests.test_metadata_sources import MetadataServer

ROOT = Path(__file__).resolve().parent.parent
FED = generate_self_signed("federation")


def metadata(base_url: str, *, days: int = 3650, slo: bool = True) -> tuple[str, str]:
    """(metadata XML, certificate PEM) of an IdP at ``base_url``."""
    cert = certificate(base_url, days=days)  # the IdP's key never signs here
    xml = idp_metadata(DevIdPSettings(base_url=base_url, key_pem="", cert_pem=cert,
                                      sp_entity_id="sp", sp_acs_url="https://sp/acs",
                                      require_signed_requests=False))
    if not slo:
        xml = re.sub(r"<md:SingleLogoutService[^>]*/>", "", xml)
    return xml, cert


@pytest.fixture
def site(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "gateway.example.toml", tmp_path / "gateway.toml")
    assert main(["certs", "generate", "--dir", str(tmp_path / "certs")]) == 0
    (tmp_path / "idp_metadata").mkdir()
    (tmp_path / "idp_metadata" / "staff.xml").write_text(
        metadata("https://staff.example.org")[0])
    return tmp_path


def run(site: Path, *args: str) -> int:
    return main(["idp", *args, "--config", str(site / "gateway.toml")])


def test_add_shows_what_it_adds_and_writes_with_yes(
        site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    xml, cert = metadata("https://members.example.org")
    new = site / "members.xml"
    new.write_text(xml)
    assert run(site, "add", str(new), "--yes") == 0
    out = capsys.readouterr().out
    assert "entity ID    https://members.example.org/metadata" in out
    assert "SSO          https://members.example.org/sso" in out
    assert f"SHA-256 {cert_info(pem_body(cert)).sha256}" in out and "expires 20" in out
    written = site / "idp_metadata" / "members-example-org-metadata.xml"
    assert written.read_bytes() == new.read_bytes()
    assert "restart the gateway" in out


def test_add_asks_and_a_no_writes_nothing(site: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    new = site / "members.xml"
    new.write_text(metadata("https://members.example.org")[0])
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    assert run(site, "add", str(new), "--name", "members.xml") == 1
    out = capsys.readouterr().out
    assert "Write " in out and "[y/N]" in out and "Nothing written." in out
    assert not (site / "idp_metadata" / "members.xml").exists()


def test_add_refuses_duplicates_and_non_idp_metadata(
        site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    again = site / "again.xml"
    again.write_text(metadata("https://staff.example.org")[0])
    assert run(site, "add", str(again), "--yes") == 1
    assert "is already configured in" in capsys.readouterr().err
    sp_only = site / "sp.xml"
    sp_only.write_text(f'<md:EntityDescriptor xmlns:md="{C.NS_MD}" entityID="https://sp">'
                       f'<md:SPSSODescriptor protocolSupportEnumeration="{C.NS_SAMLP}"/>'
                       "</md:EntityDescriptor>")
    assert run(site, "add", str(sp_only), "--yes") == 1
    assert "no md:IDPSSODescriptor" in capsys.readouterr().err
    assert sorted(p.name for p in (site / "idp_metadata").iterdir()) == ["staff.xml"]


def test_add_from_url_verifies_the_signature(site: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    xml = metadata("https://members.example.org")[0]
    signed = OneLogin_Saml2_Utils.add_sign(xml, FED[0], FED[1])
    pinned = site / "fed.pem"
    pinned.write_text(FED[1])
    server = MetadataServer({"/ok.xml": signed, "/bad.xml": xml.encode()})
    sock = bound_socket()
    url = f"http://127.0.0.1:{port_of(sock)}"
    with serving(server.app(), sock):
        assert run(site, "add", url + "/bad.xml", "--signing-cert", str(pinned), "--yes") == 1
        assert "not signed" in capsys.readouterr().err
        assert run(site, "add", url + "/ok.xml", "--signing-cert", str(pinned), "--yes") == 0
    out = capsys.readouterr().out
    assert "(signature verified)" in out and "will not be refreshed" in out


def test_list_shows_files_and_cached_urls(site: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    pinned = site / "fed.pem"
    pinned.write_text(FED[1])
    url = "https://fed.example.org/idps.xml"
    with (site / "gateway.toml").open("a") as toml:
        toml.write(f'\n[[metadata]]\nurl = "{url}"\nsigning_cert = "fed.pem"\n')
    settings = load_settings(site / "gateway.toml", environ={})
    xml, soon = metadata("https://soon.example.org", days=10)
    cached, state = cache_paths(settings.metadata[0])
    cached.parent.mkdir()
    cached.write_bytes(OneLogin_Saml2_Utils.add_sign(xml, FED[0], FED[1]))
    state.write_text(json.dumps({"url": url, "fetched_at": 1.7e9, "checked_at": 1.7e9,
                                 "error": "https://fed.example.org/idps.xml: answered HTTP 503"}))
    assert run(site, "list") == 0
    out = capsys.readouterr().out
    blocks = {b.split("\n", 1)[0]: b for b in re.split(r"\n(?=\S)", out.strip())}
    staff = blocks["https://staff.example.org/metadata"]
    assert "name         Development IdP" in staff
    assert f"source       {site / 'idp_metadata' / 'staff.xml'}" in staff
    assert "signing cert SHA-256" in staff and "last refresh file modified" in staff
    assert "status       ok" in staff
    fed = blocks["https://soon.example.org/metadata"]
    assert f"source       {url}" in fed
    assert "last refresh 2023-11-14 22:13 UTC" in fed
    assert f"SHA-256 {cert_info(pem_body(soon)).sha256}" in fed
    assert "status       last refresh failed: " in fed and "HTTP 503" in fed
    assert "signing certificate expires within 30 days" in fed


def test_check_warns_and_exits_1(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(site, "check") == 0  # the https staff IdP is fine
    assert "1 IdP checked, 0 warnings" in capsys.readouterr().out

    xml = metadata("http://old.example.org", days=10, slo=False)[0]
    sha1 = OneLogin_Saml2_Utils.add_sign(xml, FED[0], FED[1], sign_algorithm=C.RSA_SHA1,
                                         digest_algorithm=C.SHA1)
    (site / "idp_metadata" / "old.xml").write_bytes(sha1)
    assert run(site, "check") == 1
    out = capsys.readouterr().out
    old = "warning: http://old.example.org/metadata:"
    assert re.search(rf"{old} signing certificate \S+ expires in (9|10) days", out)
    assert f"{old} no SingleLogoutService" in out
    assert f"{old} SSO endpoint uses plain http: http://old.example.org/sso" in out
    assert "XML signature uses SHA-1" in out
    assert "2 IdPs checked, 4 warnings" in out
