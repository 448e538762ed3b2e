"""Aggregates that never fall over: an entity the gateway cannot use is skipped with a
logged, counted and ``idp list``-visible reason; the rest of the document is used.

The aggregate is served over a real HTTP server (``tests.test_metadata_sources``) and,
in the last test, a member signs in through one of the IdPs of the generated 5,000-IdP
aggregate (``bench.aggregate``) in the full stack.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import pytest
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C

from bench.aggregate import entities
from gateway.audit import validate
from gateway.cli import main
from gateway.demo.stack import DemoStack
from gateway.devidp.metadata import idp_metadata
from gateway.errors import ConfigError
from gateway.saml import IdPRegistry
from gateway.saml.metadata_source import MetadataRefresher, Source
from gateway.saml.registry import idps_from_tree, parse_xml
from tests.browser import client, login, post_to_acs, sign_in_at_idp
from tests.conftest import TLSFiles, audit_lines, bound_socket, port_of, run_stack, serving
from tests.test_metadata_sources import MetadataServer, _entity, from_url_only, sign, source

_IDP_LINK = re.compile(r'href="(/saml/login\?idp=[^"]+)"')
_SSO_REDIRECT = f'Binding="{C.BINDING_HTTP_REDIRECT}" Location="https://idp.example/sso"'
_CERT = re.compile(r"<ds:X509Certificate>[^<]+</ds:X509Certificate>")
_KEY = re.compile(r"<md:KeyDescriptor use=\"signing\">.*?</md:KeyDescriptor>", re.S)
_SP = (f'<md:EntityDescriptor xmlns:md="{C.NS_MD}" entityID="https://sp.example/sp">'
       '<md:SPSSODescriptor protocolSupportEnumeration="urn:oasis:names:tc:SAML:2.0:protocol">'
       f'<md:AssertionConsumerService Binding="{C.BINDING_HTTP_POST}" '
       'Location="https://sp.example/acs" index="0"/></md:SPSSODescriptor>'
       '</md:EntityDescriptor>')


def broken_entities() -> dict[str, str]:
    """Entity ID → an IdP entity the gateway cannot use, and why (a word of the reason)."""
    post_only = _entity("https://post-only.example/idp").replace(
        _SSO_REDIRECT, f'Binding="{C.BINDING_HTTP_POST}" Location="https://idp.example/sso"')
    no_cert = _KEY.sub("", _entity("https://fingerprint-only.example/idp"))
    bad_cert = _CERT.sub("<ds:X509Certificate>AAAA</ds:X509Certificate>",
                         _entity("https://bad-cert.example/idp"))
    encryption_only = _entity("https://encryption-only.example/idp").replace(
        'use="signing"', 'use="encryption"')
    return {"https://post-only.example/idp": post_only,
            "https://fingerprint-only.example/idp": no_cert,
            "https://bad-cert.example/idp": bad_cert,
            "https://encryption-only.example/idp": encryption_only}


def aggregate(*entities: str) -> str:
    return (f'<md:EntitiesDescriptor xmlns:md="{C.NS_MD}" Name="https://fed.example">'
            + "".join(entities) + "</md:EntitiesDescriptor>")


REASONS = {
    "https://post-only.example/idp": "no SingleSignOnService with the HTTP-Redirect binding",
    "https://fingerprint-only.example/idp": "no signing certificate",
    "https://bad-cert.example/idp": "not a valid certificate",
    "https://encryption-only.example/idp": "no signing certificate",
}


@pytest.fixture
def server() -> Iterator[MetadataServer]:
    metadata = MetadataServer()
    sock = bound_socket()
    metadata.url = f"http://127.0.0.1:{port_of(sock)}"
    with serving(metadata.app(), sock):
        yield metadata


def _good(n: int) -> list[str]:
    return [_entity(f"https://good{i}.example/idp") for i in range(n)]


async def test_aggregate_with_broken_entities_loads_and_skips_exactly_those(
        tmp_path: Path, server: MetadataServer, caplog: pytest.LogCaptureFixture) -> None:
    broken = broken_entities()
    good = _good(3)
    server.docs["/agg.xml"] = sign(aggregate(good[0], *broken.values(), _SP, *good[1:]))
    config = source(tmp_path, server.url + "/agg.xml")
    registry = IdPRegistry()
    refresher = MetadataRefresher([config], registry)
    caplog.set_level(logging.WARNING, "gateway.metadata")
    assert await refresher.refresh(refresher.sources[0])

    assert {i.entity_id for i in registry.all()} == {
        f"https://good{i}.example/idp" for i in range(3)}
    skipped = registry.skipped[config.url]
    assert len(skipped) == registry.skipped_count() == len(broken)  # the SP is not counted
    for entity_id, reason in REASONS.items():
        [line] = [s for s in skipped if repr(entity_id) in s]
        assert reason in line and config.url in line
        assert line in caplog.text
    assert "3 IdPs in use, 4 skipped as unusable" in caplog.text
    # Kept with the cached copy's state, so a restart and `idp list` know it too.
    assert Source.open(config).state.skipped == list(skipped)

    # A corrected copy clears the list; the next refresh counts again.
    server.docs["/agg.xml"] = sign(aggregate(*good))
    assert await refresher.refresh(refresher.sources[0])
    assert registry.skipped_count() == 0 and len(registry) == 3


async def test_a_refresh_that_changes_many_idps_is_one_audit_line(
        tmp_path: Path, server: MetadataServer, audit_records: list[logging.LogRecord]) -> None:
    good = _good(30)
    server.docs["/agg.xml"] = sign(aggregate(*good))
    config = source(tmp_path, server.url + "/agg.xml")
    registry = IdPRegistry()
    refresher = MetadataRefresher([config], registry)
    assert await refresher.refresh(refresher.sources[0])
    audit_records.clear()
    more = [_entity(f"https://new{i}.example/idp") for i in range(25)]
    server.docs["/agg.xml"] = sign(aggregate(*good[5:], *more))  # 5 gone, 25 new
    assert await refresher.refresh(refresher.sources[0])
    [line] = [x for x in audit_lines(audit_records) if x["event"] == "metadata_change"]
    assert (line["change"], line["entity_id"], line["idps"]) == ("refreshed", "30 IdPs", 50)
    assert (line["added"], line["removed"], line["updated"]) == (25, 5, 0)
    assert validate(line) == []


async def test_an_aggregate_of_only_unusable_idps_is_refused(
        tmp_path: Path, server: MetadataServer) -> None:
    server.docs["/agg.xml"] = sign(aggregate(*broken_entities().values()))
    registry = IdPRegistry()
    refresher = MetadataRefresher([source(tmp_path, server.url + "/agg.xml")], registry)
    assert not await refresher.refresh(refresher.sources[0])
    assert "no IdP the gateway can use (4 skipped)" in refresher.sources[0].state.error


def test_files_aggregate_skips_but_a_single_broken_entity_is_still_refused(
        tmp_path: Path) -> None:
    broken = broken_entities()
    (tmp_path / "fed.xml").write_text(aggregate(*_good(2), *broken.values()))
    registry = IdPRegistry.load_dir(tmp_path)
    assert len(registry) == 2 and registry.skipped_count() == 4
    assert all(str(tmp_path / "fed.xml") in line for line in registry.skipped[""])

    # One EntityDescriptor on its own can only be a mistake: refused as before.
    (tmp_path / "post.xml").write_text(broken["https://post-only.example/idp"])
    with pytest.raises(ConfigError, match="HTTP-Redirect binding"):
        IdPRegistry.load_dir(tmp_path)
    # Without a list for skipped entities (the callers that want every problem).
    problems: list[str] = []
    root = parse_xml(aggregate(*broken.values()).encode(), "x", problems)
    assert idps_from_tree(root, Path("x.xml"), problems) == [] and len(problems) == 4


def test_a_member_signs_in_through_a_5000_idp_aggregate_with_unusable_entities(
        tmp_path: Path, tls: TLSFiles, server: MetadataServer,
        caplog: pytest.LogCaptureFixture) -> None:
    """The acceptance case: the bench's generated aggregate of 5,000 IdPs (50 of them
    POST-only or without a signing certificate), plus the four broken shapes above and
    the dev IdP, signed and served over HTTP; exactly the broken ones are skipped, with
    their reasons, and the member finds the dev IdP by searching the sign-in page."""
    generated, unusable = entities(5000, certs=2)
    broken = broken_entities()

    def setup(demo: DemoStack) -> None:
        dev = re.sub(r"<\?xml[^>]*\?>", "", idp_metadata(demo.idp))
        end = "</md:EntitiesDescriptor>"
        from_url_only(demo, server,
                      generated.replace(end, "".join([*broken.values(), dev]) + end))

    caplog.set_level(logging.WARNING, "gateway.metadata")
    path = "/issues/2023-03/pages/14"
    with run_stack(tmp_path, tls, setup=setup) as stack, client(stack) as http:
        sign_in = http.get(urljoin(stack.url, http.get(stack.url + path).headers["location"]))
        assert sign_in.status_code == 200 and "/saml/login?idp=" not in sign_in.text
        found = http.get(stack.url + "/saml/login",
                         params={"next": path, "q": "development idp"})
        [link] = [html.unescape(href) for href in _IDP_LINK.findall(found.text)]
        assert parse_qs(urlsplit(link).query)["idp"] == [stack.demo.idp.entity_id]
        started = http.get(urljoin(stack.url, link))
        done = post_to_acs(http, sign_in_at_idp(http, http.get(started.headers["location"]),
                                                "alice"))
        assert done.status_code == 302 and done.headers["location"] == path

    usable = 5000 - unusable + 1
    assert f"{usable} IdPs in use, {unusable + len(broken)} skipped as unusable" in caplog.text
    skipped = [r.getMessage() for r in caplog.records
               if r.getMessage().startswith("IdP skipped")]
    assert len(skipped) == unusable + len(broken) == 54
    for entity_id, reason in REASONS.items():
        [line] = [x for x in skipped if repr(entity_id) in x]
        assert reason in line
    generated_reasons = {x.rsplit(": ", 1)[1] for x in skipped if "university" in x}
    assert generated_reasons == {"no SingleSignOnService with the HTTP-Redirect binding",
                                 'no signing certificate (KeyDescriptor use="signing")'}


def test_a_member_signs_in_through_an_aggregate_with_unusable_entities(
        tmp_path: Path, tls: TLSFiles, server: MetadataServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    def setup(demo: DemoStack) -> None:
        dev = re.sub(r"<\?xml[^>]*\?>", "", idp_metadata(demo.idp))
        from_url_only(demo, server, aggregate(*broken_entities().values(), dev, *_good(2)))

    with run_stack(tmp_path, tls, setup=setup) as stack, client(stack) as http:
        done = login(http, stack, "/issues/2023-03/pages/14", "alice")
        assert done.headers["location"] == "/issues/2023-03/pages/14"

    # `idp list` shows the IdPs in use and every skipped entity with its reason.
    assert main(["idp", "list", "--config", str(tmp_path / "gateway.toml")]) == 0
    out = capsys.readouterr().out
    assert stack.demo.idp.entity_id in out and "https://good1.example/idp" in out
    for entity_id, reason in REASONS.items():
        [line] = [x for x in out.splitlines() if repr(entity_id) in x]
        assert line.startswith("note: skipped: ") and reason in line
    # `idp check` shows them too, but they are not warnings (nothing here can fix them).
    main(["idp", "check", "--config", str(tmp_path / "gateway.toml")])
    out = capsys.readouterr().out
    assert out.count("note: skipped: ") == len(REASONS)
    assert not [x for x in out.splitlines() if x.startswith("warning:") and "skipped" in x]
