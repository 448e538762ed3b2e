"""Metadata refreshes in ``/metrics``: per source, a counter of failed refreshes and the
time of the last good fetch, so "metadata stopped refreshing" can be alerted on.

A real gateway fetches a metadata URL from a real HTTP server on loopback; the test
asks its refresher for a refresh now (on the gateway's own event loop) instead of
waiting the minimum interval of 60 s. The MDQ test drives a real ``MdqService`` against
a real MDQ server and reads the exposition ``Telemetry`` builds for a scrape.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import values

from gateway.config import load_settings
from gateway.demo.stack import DemoStack, prepare
from gateway.devidp.metadata import idp_metadata
from gateway.metrics import use_multiprocess_dir
from gateway.saml import IdPRegistry
from gateway.saml.mdq import MdqService
from gateway.saml.protocol import SamlProtocol
from gateway.sessions import open_store
from gateway.telemetry import Telemetry
from tests.conftest import ThreadServer, bound_socket, port_of, seed_demo_keys, serve_gateway
from tests.test_mdq import Clock, MdqServer, config, entity, settled
from tests.test_mdq import mdq_server as mdq_server  # the fixture, re-exported
from tests.test_metadata_sources import FED, MetadataServer, sign
from tests.test_metadata_sources import server as server  # the fixture, re-exported
from tests.test_metrics import scrape_families, value

FAILURES = "gateway_metadata_refresh_failures_total"
LAST_SUCCESS = "gateway_metadata_last_success_timestamp_seconds"
SECRET = "s3cret-pw"


@pytest.fixture
def url_gateway(tmp_path: Path, server: MetadataServer) -> Iterator[ThreadServer]:
    """A gateway whose only IdP comes from ``<server>/fed.xml``, fetched with
    credentials in the URL (which ``/metrics`` must never show)."""
    sock = bound_socket()
    seed_demo_keys(tmp_path)
    demo: DemoStack = prepare(tmp_path, gateway_url=f"http://127.0.0.1:{port_of(sock)}",
                              idp_url="http://127.0.0.1:9", reader_url="http://127.0.0.1:9")
    (tmp_path / "idp_metadata" / "devidp.xml").unlink()
    server.docs["/fed.xml"] = sign(idp_metadata(demo.idp))
    (tmp_path / "fed.pem").write_text(FED[1])
    with (tmp_path / "gateway.toml").open("a") as toml:
        toml.write(f'\n[[metadata]]\nurl = "http://user:{SECRET}@{server.url[7:]}/fed.xml"\n'
                   'signing_cert = "fed.pem"\n')
    settings = load_settings(tmp_path / "gateway.toml", environ={})
    with serve_gateway(settings, sock) as gateway:
        yield gateway


def refresh_now(gateway: ThreadServer) -> bool:
    """The gateway's refresher refreshes its one source now, on the gateway's loop."""
    saml = next(p for p in gateway.app.protocols if isinstance(p, SamlProtocol))
    assert saml.refresher is not None
    loop = gateway.server.servers[0].get_loop()
    refresh = saml.refresher.refresh(saml.refresher.sources[0])
    return asyncio.run_coroutine_threadsafe(refresh, loop).result(timeout=30)


def scrape(gateway: ThreadServer) -> tuple[str, dict[tuple[str, frozenset[tuple[str, str]]],
                                                    float]]:
    answer = httpx.get(gateway.url + "/metrics")
    assert answer.status_code == 200, answer.text
    return answer.text, scrape_families(answer.text)


def test_a_failed_refresh_is_counted_and_a_good_one_moves_the_last_success(
        url_gateway: ThreadServer, server: MetadataServer) -> None:
    label = f"http://user:*****@{server.url[7:]}/fed.xml"
    text, before = scrape(url_gateway)
    assert value(before, FAILURES, source=label) == 0
    assert (FAILURES, frozenset({("source", label)})) in before  # there from the start
    first = value(before, LAST_SUCCESS, source=label)
    assert time.time() - 60 < first <= time.time()
    assert SECRET not in text

    good = server.docs["/fed.xml"]
    assert b"http://127.0.0.1:9/" in good
    tampered = good.replace(b"http://127.0.0.1:9/", b"http://127.0.0.2:9/")
    server.docs["/fed.xml"] = tampered  # its signature no longer matches
    assert not refresh_now(url_gateway)
    text, failed = scrape(url_gateway)
    assert value(failed, FAILURES, source=label) == 1
    assert value(failed, LAST_SUCCESS, source=label) == first  # unchanged
    assert any(name == "gateway_idp_metadata_loaded_timestamp_seconds"
               for name, _ in failed)  # the last good copy is still in use

    del server.docs["/fed.xml"]  # answered with 404
    assert not refresh_now(url_gateway)
    assert value(scrape(url_gateway)[1], FAILURES, source=label) == 2

    time.sleep(0.01)
    server.docs["/fed.xml"] = good
    assert refresh_now(url_gateway)
    text, after = scrape(url_gateway)
    assert value(after, FAILURES, source=label) == 2
    assert value(after, LAST_SUCCESS, source=label) > first
    assert SECRET not in text


async def test_mdq_refresh_failures_are_counted_per_service(
        tmp_path: Path, mdq_server: MdqServer) -> None:
    """Failed refreshes of kept MDQ entities count under ``mdq:<service>``, never under
    an entity ID (clients choose those); the last good fetch is the service's gauge."""
    seed_demo_keys(tmp_path / "demo")
    demo = prepare(tmp_path / "demo", gateway_url="http://127.0.0.1:8000",
                   idp_url="http://127.0.0.1:8001", reader_url="http://127.0.0.1:8002")
    idp_id = "https://kept.example/idp"
    mdq_server.answers[idp_id] = sign(entity(idp_id, cacheDuration="PT1M"))
    clock, registry = Clock(), IdPRegistry()
    stores = open_store(f"sqlite:///{tmp_path}/store.db", time.time)
    await stores.backend.open()
    service = MdqService(config(tmp_path, mdq_server.url), registry, clock=clock)
    telemetry = Telemetry(demo.settings, registry, stores, clock)
    label = f"mdq:{mdq_server.url}"

    async def scraped() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        telemetry.refresh_state()
        return scrape_families((await telemetry.metrics.exposition(stores)).decode())

    await service.start()
    try:
        assert value(await scraped(), FAILURES, source=label) == 0
        assert await service.lookup(idp_id, stores.keys) is not None
        fetched = value(await scraped(), LAST_SUCCESS, source=label)
        assert fetched == clock.now

        mdq_server.down = True
        clock.now += 120  # past its cacheDuration: the next use refreshes it
        assert await service.lookup(idp_id, stores.keys) is not None
        await settled(service)
        samples = await scraped()
        assert value(samples, FAILURES, source=label) == 1
        assert value(samples, LAST_SUCCESS, source=label) == fetched
        assert not any(("source", idp_id) in labels for _, labels in samples)
    finally:
        await service.stop()
        await stores.backend.close()


async def test_with_several_workers_the_failures_are_summed(tmp_path: Path) -> None:
    """As under ``serve --workers 2``: counted in prometheus' multiprocess files, a
    scrape answered by either worker adds up both workers' failures; the last good fetch
    is the answering worker's own."""
    seed_demo_keys(tmp_path / "demo")
    demo = prepare(tmp_path / "demo", gateway_url="http://127.0.0.1:8000",
                   idp_url="http://127.0.0.1:8001", reader_url="http://127.0.0.1:8002")
    stores = open_store(f"sqlite:///{tmp_path}/store.db", time.time)
    await stores.backend.open()
    (tmp_path / "prom").mkdir()
    use_multiprocess_dir(str(tmp_path / "prom"))
    try:
        label = "https://federation.example/md.xml"
        workers = []
        for pid, fetched in ((70001, 1_800_000_000.0), (70002, 1_800_000_100.0)):
            # What a worker's own process would count in: its own file.
            values.ValueClass = values.MultiProcessValue(lambda pid=pid: pid)
            registry = IdPRegistry()
            workers.append(Telemetry(demo.settings, registry, stores, time.time))
            registry.refresh_outcome(label, succeeded_at=fetched)
            registry.refresh_outcome(label, failed=True)
        for telemetry, fetched in zip(workers, (1_800_000_000.0, 1_800_000_100.0),
                                      strict=True):
            telemetry.refresh_state()
            samples = scrape_families((await telemetry.metrics.exposition(stores)).decode())
            assert value(samples, FAILURES, source=label) == 2
            assert value(samples, LAST_SUCCESS, source=label) == fetched
    finally:
        use_multiprocess_dir(None)
        await stores.backend.close()
