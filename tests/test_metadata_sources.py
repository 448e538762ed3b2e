"""IdP metadata from URLs: a real HTTP server on loopback serves documents the tests
change; the refresher fetches, verifies against the pinned certificate, caches on disk.

Key rollover is tested at the SP level (refresher + ServiceProvider, a Response signed
by the dev IdP's new key); one full-stack test proves the app's lifespan loads a URL
IdP that a member then signs in with.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C
from onelogin.saml2.utils import OneLogin_Saml2_Utils
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.audit import validate
from gateway.config import MetadataSource
from gateway.demo.stack import DemoStack, prepare
from gateway.devidp import DevIdPSettings
from gateway.devidp.metadata import idp_metadata
from gateway.devidp.response import build_response
from gateway.errors import LoginFailed
from gateway.keys import generate_self_signed, pem_body
from gateway.saml import IdPRegistry, ServiceProvider
from gateway.saml.metadata_source import MetadataRefresher, cache_paths, duration
from gateway.saml.registry import idps_from_tree, parse_xml
from tests.browser import client, login
from tests.conftest import (
    TLSFiles,
    audit_lines,
    bound_socket,
    certificate,
    port_of,
    run_stack,
    seed_demo_keys,
    serving,
)

FED = generate_self_signed("federation signer")
OTHER = generate_self_signed("someone else")
PERSISTENT = "urn:oasis:names:tc:SAML:2.0:nameid-format:persistent"


@dataclass
class MetadataServer:
    """Serves ``docs[path]`` (bytes) at ``url + path``; 404 for anything else."""

    docs: dict[str, bytes] = field(default_factory=dict)
    url: str = ""

    def app(self) -> Starlette:
        async def serve(request: Request) -> Response:
            body = self.docs.get(request.url.path)
            if body is None:
                return Response("not here", status_code=404)
            return Response(body, media_type="application/samlmetadata+xml")

        return Starlette(routes=[Route("/{path:path}", serve)])


@pytest.fixture
def server() -> Iterator[MetadataServer]:
    metadata = MetadataServer()
    sock = bound_socket()
    metadata.url = f"http://127.0.0.1:{port_of(sock)}"
    with serving(metadata.app(), sock):
        yield metadata


def sign(xml: str, key: tuple[str, str] = FED, **algorithms: str) -> bytes:
    signed = OneLogin_Saml2_Utils.add_sign(xml, key[0], key[1], **algorithms)
    return signed if isinstance(signed, bytes) else signed.encode()


def with_valid_until(xml: str, seconds: float) -> str:
    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
    stamp = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    return re.sub(r"(<md:EntityDescriptor)\b", rf'\1 validUntil="{stamp}"', xml, count=1)


def source(tmp_path: Path, url: str, **options: Any) -> MetadataSource:
    cert = tmp_path / "federation.pem"
    cert.write_text(FED[1])
    return MetadataSource(url=url, signing_cert=cert, cache_dir=tmp_path / "cache", **options)


@pytest.fixture
def demo(tmp_path: Path) -> DemoStack:
    seed_demo_keys(tmp_path / "demo")
    return prepare(tmp_path / "demo")


def from_url_only(demo: DemoStack, server: MetadataServer, document: str) -> None:
    """The demo's IdPs come from ``document`` (signed with the federation key, served at
    ``/fed.xml``) through ``[[metadata]] url``, not from the dev IdP's metadata file."""
    (demo.workdir / "idp_metadata" / "devidp.xml").unlink()
    server.docs["/fed.xml"] = sign(document)
    (demo.workdir / "fed.pem").write_text(FED[1])
    with (demo.workdir / "gateway.toml").open("a") as toml:
        toml.write(f'\n[[metadata]]\nurl = "{server.url}/fed.xml"\nsigning_cert = "fed.pem"\n')


async def test_signed_metadata_loads_and_bad_copies_never_replace_it(
        tmp_path: Path, server: MetadataServer, demo: DemoStack,
        caplog: pytest.LogCaptureFixture) -> None:
    good = idp_metadata(demo.idp)
    server.docs["/md.xml"] = sign(with_valid_until(good, 86400))
    config = source(tmp_path, server.url + "/md.xml")
    registry = IdPRegistry()
    refresher = MetadataRefresher([config], registry)
    await refresher.start()
    try:
        idp = registry.get(demo.idp.entity_id)
        assert idp.url == config.url and idp.origin == config.url
        assert idp.valid_until is not None and idp.valid_until > dt.datetime.now().timestamp()
        assert idp.source == cache_paths(config)[0] and idp.source.read_bytes().startswith(b"<")
        assert refresher.sources[0].state.fetched_at is not None

        signed = sign(good).decode()
        tampered = signed.replace(demo.idp.sso_url, "https://evil.example/sso")
        assert tampered != signed
        refused = {  # case: (document, why)
            "tampered": (tampered.encode(), "does not verify with the pinned"),
            "unsigned": (good.encode(), "not signed"),
            "other key, its cert in KeyInfo": (sign(good, OTHER), "does not verify"),
            "SHA-1": (sign(good, sign_algorithm=C.RSA_SHA1, digest_algorithm=C.SHA1),
                      "SHA-1 is not accepted"),
            "expired validUntil": (sign(with_valid_until(good, -60)), "expired (validUntil"),
            "DOCTYPE": (b"<!DOCTYPE x []>" + sign(good), "DOCTYPE is not allowed"),
            "not XML": (b"<<<", "not well-formed"),
            "reference elsewhere": (re.sub(r'URI="#[^"]+"', 'URI="#elsewhere"', signed).encode(),
                                    "does not cover the root"),
        }
        for case, (body, why) in refused.items():
            server.docs["/md.xml"] = body
            caplog.clear()
            assert not await refresher.refresh(refresher.sources[0]), case
            assert registry.get(demo.idp.entity_id) is idp, case  # the last good copy
            assert "last good copy stays in use" in caplog.text, case
            assert why in refresher.sources[0].state.error, (case, refresher.sources[0].state)
        del server.docs["/md.xml"]
        assert not await refresher.refresh(refresher.sources[0])
        assert "HTTP 404" in refresher.sources[0].state.error
        assert registry.get(demo.idp.entity_id) is idp
    finally:
        await refresher.stop()


async def test_size_limit_and_expired_metadata(tmp_path: Path, server: MetadataServer,
                                               demo: DemoStack) -> None:
    server.docs["/md.xml"] = sign(with_valid_until(idp_metadata(demo.idp), -60))
    registry = IdPRegistry()
    small = MetadataRefresher([source(tmp_path, server.url + "/md.xml", max_bytes=1024)],
                              registry)
    assert not await small.refresh(small.sources[0])
    assert "larger than max_bytes" in small.sources[0].state.error
    expired = MetadataRefresher([source(tmp_path, server.url + "/md.xml")], registry)
    await expired.start()
    await expired.stop()
    assert len(registry) == 0 and "expired" in expired.sources[0].state.error

    # A good copy whose validUntil passes before any newer one arrives stops being used.
    server.docs["/md.xml"] = sign(with_valid_until(idp_metadata(demo.idp), 120))
    now = [dt.datetime.now(dt.UTC).timestamp()]
    later = MetadataRefresher([source(tmp_path, server.url + "/md.xml")], registry,
                              clock=lambda: now[0])
    assert await later.refresh(later.sources[0])
    assert demo.idp.entity_id in registry
    now[0] += 300
    later.drop_expired()
    assert demo.idp.entity_id not in registry


async def test_refresh_rolls_the_idp_key_without_restart(
        tmp_path: Path, server: MetadataServer, demo: DemoStack,
        caplog: pytest.LogCaptureFixture, audit_records: list[logging.LogRecord]) -> None:
    (demo.workdir / "idp_metadata" / "devidp.xml").unlink()
    registry = IdPRegistry()
    sp = ServiceProvider(demo.settings, registry)
    server.docs["/md.xml"] = sign(idp_metadata(demo.idp))
    refresher = MetadataRefresher([source(tmp_path, server.url + "/md.xml")], registry, sp)
    await refresher.start()
    await refresher.stop()
    assert sign_in(sp, registry, demo.idp).signed_in.released["memberId"]

    key, cert = generate_self_signed("rolled dev IdP key")
    rolled = replace(demo.idp, key_pem=key, cert_pem=cert)
    server.docs["/md.xml"] = sign(idp_metadata(rolled))
    caplog.set_level(logging.INFO, "gateway.metadata")
    assert await refresher.refresh(refresher.sources[0])
    assert "signing certificate added" in caplog.text
    assert "signing certificate removed" in caplog.text
    [line] = [x for x in audit_lines(audit_records) if x["event"] == "metadata_change"]
    assert line["change"] == "updated" and line["entity_id"] == demo.idp.entity_id
    assert line["source"] == server.url + "/md.xml" and validate(line) == []

    assert sign_in(sp, registry, rolled).signed_in.released["memberId"]  # the new key works
    with pytest.raises(LoginFailed):
        sign_in(sp, registry, demo.idp)  # the old one no longer does


def sign_in(sp: ServiceProvider, registry: IdPRegistry, idp: DevIdPSettings) -> Any:
    entity = registry.get(idp.entity_id)
    request = sp.start_login(entity, "/")
    xml = build_response(
        idp_entity_id=idp.entity_id, key_pem=idp.key_pem, cert_pem=idp.cert_pem,
        acs_url=sp.acs_url, sp_entity_id=sp.entity_id, in_response_to=request.request_id,
        name_id="alice-id", name_id_format=PERSISTENT, session_index="_s1",
        attributes={"memberId": ["M-1"], "memberStatus": ["active"]})
    return sp.finish_login(base64.b64encode(xml.encode()).decode(),
                           request_id=request.request_id, idp=entity)


async def test_background_refresh_and_restart_without_network(
        tmp_path: Path, demo: DemoStack) -> None:
    metadata = MetadataServer({"/md.xml": sign(idp_metadata(demo.idp))})
    sock = bound_socket()
    metadata.url = f"http://127.0.0.1:{port_of(sock)}"
    config = source(tmp_path, metadata.url + "/md.xml")
    rolled = replace(demo.idp, cert_pem=generate_self_signed("rolled")[1])
    with serving(metadata.app(), sock):
        first = MetadataRefresher([config], IdPRegistry())
        await first.start()
        await first.stop()
        metadata.docs["/md.xml"] = sign(idp_metadata(rolled))
        registry = IdPRegistry()
        second = MetadataRefresher([config], registry)
        await second.start()  # serves the cached copy, refreshes in the background
        try:
            old = registry.get(demo.idp.entity_id).signing_certs
            assert old == (pem_body(demo.idp.cert_pem),)
            for _ in range(200):
                if registry.get(demo.idp.entity_id).signing_certs != old:
                    break
                await asyncio.sleep(0.05)
            assert registry.get(demo.idp.entity_id).signing_certs == (pem_body(rolled.cert_pem),)
        finally:
            await second.stop()
    registry = IdPRegistry()
    third = MetadataRefresher([config], registry)
    await third.start()  # the server is gone: the newest cached copy is used
    try:
        assert registry.get(demo.idp.entity_id).signing_certs == (pem_body(rolled.cert_pem),)
        assert not await third.refresh(third.sources[0])
        assert "unreachable" in third.sources[0].state.error
        assert demo.idp.entity_id in registry
    finally:
        await third.stop()


def _entity(entity_id: str, authority: str = "") -> str:
    cert = certificate(entity_id)
    settings = DevIdPSettings(base_url="https://idp.example", key_pem="", cert_pem=cert,
                              sp_entity_id="sp", sp_acs_url="https://sp/acs",
                              require_signed_requests=False, entity_id=entity_id)
    xml = idp_metadata(settings)
    xml = re.sub(r"<\?xml[^>]*\?>", "", xml)
    if authority:
        xml = re.sub(r"(<md:EntityDescriptor[^>]*>)", r"\1<md:Extensions><mdrpi:RegistrationInfo "
                     r'xmlns:mdrpi="urn:oasis:names:tc:SAML:metadata:rpi" '
                     rf'registrationAuthority="{authority}"/></md:Extensions>', xml, count=1)
    return xml


async def test_aggregate_filters(tmp_path: Path, server: MetadataServer) -> None:
    aggregate = (f'<md:EntitiesDescriptor xmlns:md="{C.NS_MD}" cacheDuration="PT2H">'
                 + _entity("https://a.example/idp", "https://fed-one.example")
                 + _entity("https://b.example/idp", "https://fed-two.example")
                 + _entity("https://c.example/idp", "https://fed-one.example")
                 + "</md:EntitiesDescriptor>")
    server.docs["/agg.xml"] = sign(aggregate)
    url = server.url + "/agg.xml"
    for options, expected in (
            ({}, {"a", "b", "c"}),
            ({"entities": ["https://b.example/idp", "https://c.example/idp"]}, {"b", "c"}),
            ({"registration_authority": "https://fed-one.example"}, {"a", "c"})):
        registry = IdPRegistry()
        refresher = MetadataRefresher([source(tmp_path, url, refresh=86400, **options)],
                                      registry)
        assert await refresher.refresh(refresher.sources[0])
        assert {i.entity_id[8] for i in registry.all()} == expected
        assert refresher.sources[0].next_at - refresher.sources[0].state.checked_at == 7200
    assert duration("P1DT1H30M") == 25 * 3600 + 1800 and duration("junk") is None


def test_expiring_idp_certificate_is_flagged_in_the_logs(
        caplog: pytest.LogCaptureFixture) -> None:
    registry = IdPRegistry()
    xml = _entity("https://soon.example/idp")
    soon_cert = certificate("soon", days=10)
    old = re.search(r"<ds:X509Certificate>([^<]+)<", xml)
    assert old
    xml = xml.replace(old.group(1), pem_body(soon_cert))
    idps = idps_from_tree(parse_xml(xml.encode(), "x", []), Path("x.xml"), [])
    registry.replace_source("x", idps)
    caplog.set_level(logging.WARNING, "gateway.metadata")
    refresher = MetadataRefresher([], registry)
    refresher.flag_expiring()
    refresher.flag_expiring()  # once a day, not on every pass
    assert caplog.text.count("https://soon.example/idp") == 1
    assert "days left" in caplog.text


def test_a_member_signs_in_with_an_idp_from_a_metadata_url(
        tmp_path: Path, tls: TLSFiles, server: MetadataServer) -> None:
    def setup(demo: DemoStack) -> None:
        from_url_only(demo, server, idp_metadata(demo.idp))

    with run_stack(tmp_path, tls, setup=setup) as stack, client(stack) as http:
        done = login(http, stack, "/issues/2023-03/pages/14", "alice")
        assert done.headers["location"] == "/issues/2023-03/pages/14"
    assert list((tmp_path / "metadata_cache").glob("*.xml"))
