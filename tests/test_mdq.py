"""IdPs from a Metadata Query (MDQ) service, over real sockets.

A small MDQ server (Starlette on a loopback port) answers ``/entities/<id>`` with
per-entity metadata signed by the federation key. The gateway has never seen the IdP:
it is fetched when a member picks it, checked, kept, and the member signs in through it.
Answers that are unsigned, signed by another key or describe another entity are refused;
what an anonymous client can make the gateway fetch and keep is bounded.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.cli import main
from gateway.config import MetadataSource
from gateway.demo.stack import DemoStack
from gateway.devidp import DevIdPSettings
from gateway.devidp.metadata import idp_metadata
from gateway.saml import IdPRegistry
from gateway.saml.mdq import ACCEPT, MdqService, askable, cache_dir, request_url
from gateway.sessions import KeyStore
from gateway.sessions.store import open_store
from tests.browser import client, post_to_acs, sign_in_at_idp
from tests.conftest import Stack, TLSFiles, bound_socket, certificate, port_of, run_stack, serving
from tests.forge import encode, forge_for_demo
from tests.test_metadata_sources import FED, OTHER, sign, with_valid_until

PAGE = "/issues/2023-03/pages/14"
SESSION = "__Host-gw_session"


@dataclass
class MdqServer:
    """Answers ``/entities/<URL-encoded entity ID or {sha1}hex>`` from ``answers``; 404
    for an entity it does not have; 503 for everything while ``down``."""

    answers: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (raw path, Accept)
    down: bool = False
    url: str = ""

    def app(self) -> Starlette:
        async def entity(request: Request) -> Response:
            self.requests.append((request.scope["raw_path"].decode(),
                                  request.headers.get("accept", "")))
            if self.down:
                return Response("down for maintenance", status_code=503)
            name = request.path_params["name"]
            by_sha1 = {"{sha1}" + hashlib.sha1(e.encode()).hexdigest(): e
                       for e in self.answers}
            body = self.answers.get(by_sha1.get(name, name))
            if body is None:
                return Response("no such entity", status_code=404)
            return Response(body, media_type=ACCEPT)

        return Starlette(routes=[Route("/entities/{name:path}", entity)])


@pytest.fixture
def mdq_server() -> Iterator[MdqServer]:
    server = MdqServer()
    sock = bound_socket()
    server.url = f"http://127.0.0.1:{port_of(sock)}"
    with serving(server.app(), sock):
        yield server


def entity(entity_id: str, **extra: str) -> str:
    """Metadata of an IdP (its own fresh certificate) with ``entity_id``."""
    cert = certificate(entity_id)
    settings = DevIdPSettings(base_url="https://idp.example", key_pem="", cert_pem=cert,
                              sp_entity_id="sp", sp_acs_url="https://sp/acs",
                              require_signed_requests=False, entity_id=entity_id)
    xml = re.sub(r"<\?xml[^>]*\?>", "", idp_metadata(settings))
    for name, value in extra.items():
        xml = re.sub(r"(<md:EntityDescriptor)\b", rf'\1 {name}="{value}"', xml, count=1)
    return xml


# -- end to end, through a running gateway -------------------------------------------------


@pytest.fixture
def mdq_stack(tmp_path: Path, tls: TLSFiles, mdq_server: MdqServer) -> Iterator[Stack]:
    """The demo stack without any IdP metadata file: only the MDQ service."""

    def setup(demo: DemoStack) -> None:
        (demo.workdir / "idp_metadata" / "devidp.xml").unlink()
        mdq_server.answers[demo.idp.entity_id] = sign(idp_metadata(demo.idp))
        (demo.workdir / "fed.pem").write_text(FED[1])
        toml = demo.workdir / "gateway.toml"
        text = toml.read_text().replace(  # the dev IdP may send unsolicited Responses
            'member_ids = "organisation"', 'member_ids = "organisation"\nallow_unsolicited = true',
            1)
        toml.write_text(text + f'\n[[metadata]]\nmdq = "{mdq_server.url}/"\n'
                        'signing_cert = "fed.pem"\n')

    with run_stack(tmp_path, tls, setup=setup) as stack:
        yield stack


def kept_files(stack: Stack) -> list[Path]:
    return sorted(stack.demo.workdir.glob("metadata_cache/mdq-*/*.xml"))


def start(http: httpx.Client, stack: Stack, entity_id: str) -> httpx.Response:
    return http.get(stack.url + "/saml/login", params={"idp": entity_id, "next": PAGE})


def test_a_member_signs_in_through_an_idp_the_gateway_never_saw(
        mdq_stack: Stack, mdq_server: MdqServer) -> None:
    stack, idp = mdq_stack, mdq_stack.demo.idp
    with client(stack) as http:
        assert idp.entity_id not in http.get(stack.url + "/saml/login").text
        assert not kept_files(stack)

        to_idp = start(http, stack, idp.entity_id)
        assert to_idp.status_code == 302, to_idp.text
        assert to_idp.headers["location"].startswith(idp.sso_url + "?SAMLRequest=")
        assert mdq_server.requests == [
            (f"/entities/{quote(idp.entity_id, safe='')}", ACCEPT)]
        answer = sign_in_at_idp(http, http.get(to_idp.headers["location"]), "alice")
        done = post_to_acs(http, answer)
        assert done.status_code == 302 and done.headers["location"] == PAGE, done.text
        assert http.get(stack.url + PAGE).status_code == 200
        assert stack.session_count() == 1
        assert len(kept_files(stack)) == 1

        # Known now: the next sign-in does not ask the service again, even while it is down.
        mdq_server.down = True
        assert start(http, stack, idp.entity_id).status_code == 302
        assert len(mdq_server.requests) == 1


def test_refused_and_unknown_entities_give_the_unknown_idp_page_and_keep_nothing(
        mdq_stack: Stack, mdq_server: MdqServer) -> None:
    stack = mdq_stack
    signed_elsewhere = "https://other-key.example/idp"
    mdq_server.answers.update({
        "https://unsigned.example/idp": entity("https://unsigned.example/idp").encode(),
        signed_elsewhere: sign(entity(signed_elsewhere), OTHER),
        # A valid, signed answer, but for another entity than the one asked for.
        "https://asked.example/idp": sign(entity("https://answered.example/idp")),
        "https://expired.example/idp": sign(with_valid_until(
            entity("https://expired.example/idp"), -60)),
    })
    refused = [*mdq_server.answers, "https://unknown.example/idp"]
    refused.remove(stack.demo.idp.entity_id)
    with client(stack) as http:
        for entity_id in refused:
            page = start(http, stack, entity_id)
            assert page.status_code == 400, (entity_id, page.text)
            assert "Unknown identity provider" in page.text
            assert SESSION not in page.headers.get("set-cookie", "")
            asked = len(mdq_server.requests)
            assert start(http, stack, entity_id).status_code == 400  # not asked again
            assert len(mdq_server.requests) == asked
        assert len(mdq_server.requests) == len(refused)

        # Not a URL or URN, or too long: never asked for at all.
        for entity_id in ("not an entity", "javascript:alert(1)", "https://x/" + "a" * 1100,
                          "file:///etc/passwd", "https://idp.example/a'b"):
            assert start(http, stack, entity_id).status_code == 400
        assert len(mdq_server.requests) == len(refused)
        sign_in_page = http.get(stack.url + "/saml/login").text
    assert not kept_files(stack) and stack.session_count() == 0
    assert "example/idp" not in sign_in_page


def test_an_unsolicited_response_fetches_an_idp_that_may_send_one(
        mdq_stack: Stack, mdq_server: MdqServer) -> None:
    stack = mdq_stack
    stranger = "https://stranger.example/idp"  # may not send unsolicited Responses
    mdq_server.answers[stranger] = sign(entity(stranger))
    with client(stack) as http:
        refused = http.post(stack.url + "/saml/acs", data={
            "SAMLResponse": encode(forge_for_demo(stack.demo, idp_entity_id=stranger)
                                   .xml(None)), "RelayState": PAGE})
        assert refused.status_code == 400 and not mdq_server.requests
        done = http.post(stack.url + "/saml/acs", data={
            "SAMLResponse": encode(forge_for_demo(stack.demo).xml(None)), "RelayState": PAGE})
        assert done.status_code == 302 and done.headers["location"] == PAGE, done.text
    assert [path for path, _ in mdq_server.requests] == [
        f"/entities/{quote(stack.demo.idp.entity_id, safe='')}"]
    assert stack.session_count() == 1


def test_idp_list_shows_the_mdq_entities(mdq_stack: Stack, mdq_server: MdqServer,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    stack = mdq_stack
    with client(stack) as http:
        assert start(http, stack, stack.demo.idp.entity_id).status_code == 302
    assert main(["idp", "list", "--config", str(stack.demo.workdir / "gateway.toml")]) == 0
    out = capsys.readouterr().out
    assert stack.demo.idp.entity_id in out
    assert f"source       {mdq_server.url}/entities/" in out
    assert "(MDQ, on first use)" in out


# -- the cache, its bounds and an unreachable service (a clock of our own) ------------------


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def keys(tmp_path: Path) -> AsyncIterator[KeyStore]:
    stores = open_store(f"sqlite:///{tmp_path}/store.db", time.time)
    await stores.backend.open()
    yield stores.keys
    await stores.backend.close()


def config(tmp_path: Path, url: str, **options: Any) -> MetadataSource:
    cert = tmp_path / "federation.pem"
    cert.write_text(FED[1])
    return MetadataSource(mdq=url, signing_cert=cert, cache_dir=tmp_path / "cache", **options)


async def settled(service: MdqService) -> None:
    """Wait for background refreshes to finish."""
    while service._inflight:
        await asyncio.gather(*service._inflight.values(), return_exceptions=True)


async def test_a_kept_entity_outlives_the_service_going_down(
        tmp_path: Path, mdq_server: MdqServer, keys: KeyStore,
        caplog: pytest.LogCaptureFixture) -> None:
    idp_id = "https://kept.example/idp"
    mdq_server.answers[idp_id] = sign(entity(idp_id, cacheDuration="PT1M"))
    clock, registry = Clock(), IdPRegistry()
    service = MdqService(config(tmp_path, mdq_server.url), registry, clock=clock)
    await service.start()
    try:
        assert (await service.lookup(idp_id, keys)) is not None and idp_id in registry
        assert registry.default() is None  # a visitor's choice is never the default IdP

        mdq_server.down = True
        clock.now += 120  # past its cacheDuration: the next use refreshes it
        with caplog.at_level(logging.ERROR, "gateway.metadata"):
            kept = await service.lookup(idp_id, keys)
            await settled(service)
        assert kept is not None and kept.entity_id == idp_id and idp_id in registry
        assert [r.failures for r in registry.refreshes()] == [1]
        assert "last good copy stays in use" in caplog.text and "HTTP 503" in caplog.text
        assert len(mdq_server.requests) == 2
    finally:
        await service.stop()

    # A restart while the service is still down: the kept copy is loaded from disk.
    registry = IdPRegistry()
    again = MdqService(config(tmp_path, mdq_server.url), registry, clock=clock)
    await again.start()
    try:
        assert idp_id in registry and len(mdq_server.requests) == 2
        assert (await again.lookup(idp_id, keys)) is not None
    finally:
        await again.stop()


async def test_an_expired_entity_is_dropped_when_no_newer_copy_comes(
        tmp_path: Path, mdq_server: MdqServer, keys: KeyStore) -> None:
    idp_id = "https://short.example/idp"
    mdq_server.answers[idp_id] = sign(with_valid_until(entity(idp_id), 600))
    clock, registry = Clock(), IdPRegistry()
    service = MdqService(config(tmp_path, mdq_server.url), registry, clock=clock)
    await service.start()
    try:
        assert await service.lookup(idp_id, keys) is not None
        mdq_server.down = True
        clock.now += 700
        assert await service.lookup(idp_id, keys) is None
        assert idp_id not in registry and not list(cache_dir(service.config).glob("*.xml"))
    finally:
        await service.stop()


async def test_bounds_on_what_clients_can_make_it_fetch_and_keep(
        tmp_path: Path, mdq_server: MdqServer, keys: KeyStore) -> None:
    ids = [f"urn:example:idp:{n}" for n in range(3)]
    for entity_id in ids:
        mdq_server.answers[entity_id] = sign(entity(entity_id))
    clock, registry = Clock(), IdPRegistry()
    service = MdqService(config(tmp_path, mdq_server.url, mdq_max_entities=2,
                                mdq_fetches_per_minute=5, mdq_identifier="sha1"),
                         registry, clock=clock)
    await service.start()
    try:
        for entity_id in ids:
            assert await service.lookup(entity_id, keys) is not None
        # The least recently used one is gone, from the registry and the disk.
        assert [i.entity_id for i in registry.all()] == ids[1:]
        assert len(list(cache_dir(service.config).glob("*.xml"))) == 2
        assert mdq_server.requests[0][0] == "/entities/%7Bsha1%7D" + hashlib.sha1(
            ids[0].encode()).hexdigest()

        # Not found: asked once, then not again until mdq_not_found_ttl has passed.
        assert await service.lookup("urn:example:nobody", keys) is None
        assert await service.lookup("urn:example:nobody", keys) is None
        assert len(mdq_server.requests) == 4
        clock.now += 61
        assert await service.lookup("urn:example:nobody", keys) is None
        assert len(mdq_server.requests) == 5
        # The gateway-wide limit: 5 fetches this minute, the sixth is not made.
        assert await service.lookup("urn:example:someone", keys) is None
        assert len(mdq_server.requests) == 5
        assert len(registry) == 2
    finally:
        await service.stop()


def test_which_entity_ids_may_be_asked_for(tmp_path: Path) -> None:
    assert askable("https://idp.example.org/idp") and askable("urn:mace:example.org:idp")
    for bad in ("", "idp", "javascript:alert(1)", "https://", "https://a b/",
                "https://x/" + "a" * 1100, "urn:", "https://idp.example/\x00"):
        assert not askable(bad), bad
    source = config(tmp_path, "https://mdq.example/global/")
    assert request_url(source, "https://idp.example/idp?x=1") == (
        "https://mdq.example/global/entities/https%3A%2F%2Fidp.example%2Fidp%3Fx%3D1")
    with pytest.raises(ValueError, match="exactly one of url"):
        MetadataSource(url="https://fed.example/md.xml", mdq="https://mdq.example",
                       signing_cert=tmp_path / "federation.pem")
    assert source.max_bytes == 1024 * 1024 and source.timeout == 10


async def test_an_entity_the_service_no_longer_knows_is_removed(
        tmp_path: Path, mdq_server: MdqServer, keys: KeyStore) -> None:
    idp_id = "https://gone.example/idp"
    mdq_server.answers[idp_id] = sign(entity(idp_id, cacheDuration="PT1M"))
    clock, registry = Clock(), IdPRegistry()
    service = MdqService(config(tmp_path, mdq_server.url), registry, clock=clock)
    await service.start()
    try:
        assert await service.lookup(idp_id, keys) is not None
        del mdq_server.answers[idp_id]  # the federation deregistered it
        clock.now += 120
        await service.lookup(idp_id, keys)  # the stale copy, while it is asked again
        await settled(service)
        assert idp_id not in registry and not list(cache_dir(service.config).glob("*.xml"))
        assert await service.lookup(idp_id, keys) is None
    finally:
        await service.stop()
