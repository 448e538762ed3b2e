"""``/metrics`` after a scripted run: logins (one good, one refused), allowed and denied
requests, an upstream that is down — every counter and the histogram moved as they should."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from gateway.demo.stack import prepare
from gateway.errors import StoreError
from gateway.metrics import FLUSH_INTERVAL, Metrics, use_multiprocess_dir
from gateway.sessions import best_effort_failed
from tests.browser import client, login, post_to_acs, sign_in_at_idp, start_login
from tests.conftest import Stack, TLSFiles, bound_socket, run_stack, seed_demo_keys

PAGE = "/issues/2023-03/pages/14"


def scrape(http: httpx.Client, stack: Stack) -> dict[tuple[str, frozenset[tuple[str, str]]],
                                                   float]:
    answer = http.get(stack.url + "/metrics")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return scrape_families(answer.text)


def scrape_families(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_counters_and_histogram_after_a_scripted_run(tmp_path: Path, tls: TLSFiles) -> None:
    dead = bound_socket()  # bound, never listening: connections are refused
    extra = (f'\n[[upstreams]]\nname = "dead"\nprefix = "/public/dead"\n'
             f'url = "http://127.0.0.1:{dead.getsockname()[1]}"\n')
    with run_stack(tmp_path, tls, extra_config=extra) as stack, client(stack) as http:
        idp = stack.demo.idp.entity_id
        before = scrape(http, stack)
        assert value(before, "gateway_logins_total", idp=idp, result="success", kind="none") == 0

        login(http, stack, PAGE, "alice")
        for _ in range(3):
            assert http.get(stack.url + PAGE).status_code == 200
        assert http.get(stack.url + "/members/M1002/notes/").status_code == 403  # owner
        assert http.get(stack.url + "/public/dead/x").status_code == 502
        with client(stack) as other:  # a refused login: garbage where the Response goes
            answer = sign_in_at_idp(other, start_login(other, stack, PAGE), "dave")
            assert post_to_acs(other, answer, SAMLResponse="bm90IFNBTUw=").status_code == 400
        with client(stack) as lapsed:
            login(lapsed, stack, PAGE, "bob")
            assert lapsed.get(stack.url + PAGE).status_code == 403  # status: lapsed

        after = scrape(http, stack)
    dead.close()

    assert value(after, "gateway_logins_total", idp=idp, result="success", kind="none") == 2
    assert value(after, "gateway_logins_total", idp=idp, result="failure",
                 kind="malformed") == 1
    assert value(after, "gateway_proxied_requests_total", upstream="reader",
                 status_class="2xx") >= 3
    assert value(after, "gateway_proxied_requests_total", upstream="dead",
                 status_class="5xx") == 1
    assert value(after, "gateway_upstream_errors_total", upstream="dead",
                 kind="unreachable") == 1
    assert value(after, "gateway_policy_denials_total", reason="owner") == 1
    assert value(after, "gateway_policy_denials_total", reason="status") == 1
    proxied = value(after, "gateway_proxied_requests_total", upstream="reader",
                    status_class="2xx")
    # Every answered upstream request is timed; the failed one to "dead" is not.
    assert value(after, "gateway_upstream_response_seconds_count", upstream="reader") \
        == proxied
    assert value(after, "gateway_upstream_response_seconds_sum", upstream="reader") > 0
    assert value(after, "gateway_upstream_response_seconds_bucket", upstream="reader",
                 le="+Inf") == proxied
    assert value(after, "gateway_upstream_response_seconds_count", upstream="dead") == 0
    assert value(after, "gateway_store_errors_total") == 0

    certs = {labels: v for (name, labels), v in after.items()
             if name == "gateway_certificate_expiry_days"}
    roles = {dict(labels)["role"] for labels in certs}
    assert roles == {"sp", "idp"} and all(v > 300 for v in certs.values())
    assert value(after, "gateway_idp_metadata_loaded_timestamp_seconds", idp=idp) > 0
    assert after[("gateway_sessions_active", frozenset())] == 2
    assert ("gateway_login_requests_outstanding", frozenset()) in after


def test_metrics_are_refused_outside_allow_from(tmp_path: Path, tls: TLSFiles) -> None:
    extra = '\n[metrics]\nallow_from = ["10.0.0.0/8"]\n'
    with run_stack(tmp_path, tls, extra_config=extra) as stack, client(stack) as http:
        refused = http.get(stack.url + "/metrics")
        assert refused.status_code == 403
        assert "gateway_" not in refused.text


def test_idps_added_while_running_get_gauges_and_labels(tmp_path: Path) -> None:
    """A metadata URL can add an IdP after start-up: its certificate expiry and its
    logins are reported under its own name, not lumped into "other"."""
    from gateway.devidp import DevIdPSettings
    from gateway.devidp.metadata import idp_metadata
    from gateway.keys import generate_self_signed
    from gateway.saml import IdPRegistry
    from gateway.saml.registry import idps_from_tree, parse_xml
    from gateway.sessions import open_store
    from gateway.telemetry import Telemetry

    seed_demo_keys(tmp_path)
    demo = prepare(tmp_path, gateway_url="http://127.0.0.1:8000",
                   idp_url="http://127.0.0.1:8001", reader_url="http://127.0.0.1:8002")
    registry = IdPRegistry.load_dir(demo.settings.idp.metadata_dir)
    stores = open_store(f"sqlite:///{tmp_path}/m.db", lambda: 1.0)
    telemetry = Telemetry(demo.settings, registry, stores, lambda: 1_800_000_000.0)
    key, cert = generate_self_signed("later IdP")
    later = DevIdPSettings(base_url="https://later.example.org", key_pem=key, cert_pem=cert,
                           sp_entity_id="sp", sp_acs_url="https://sp/acs",
                           require_signed_requests=False)
    problems: list[str] = []
    root = parse_xml(idp_metadata(later).encode(), "url", problems)
    registry.replace_source("https://federation.example.org/md.xml",
                            idps_from_tree(root, tmp_path / "x.xml", problems, url="u"))
    assert problems == []
    assert later.entity_id in {c.entity_id for c in telemetry.certificates}
    telemetry.metrics.login(later.entity_id, None)

    async def scrape_text() -> str:
        await stores.backend.open()
        try:
            telemetry.refresh_state()
            return (await telemetry.metrics.exposition(stores)).decode()
        finally:
            await stores.backend.close()

    samples = scrape_families(asyncio.run(scrape_text()))
    assert samples[("gateway_logins_total", frozenset({("idp", later.entity_id),
                                                    ("result", "success"),
                                                    ("kind", "none")}))] == 1
    assert any(name == "gateway_certificate_expiry_days"
               and ("entity_id", later.entity_id) in labels for name, labels in samples)


def _exported(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    assert metrics._registry is not None
    return {key: sample for key, sample in
            scrape_families(generate_latest(metrics._registry).decode()).items()
            if not key[0].endswith("_created")}  # when each series was made: differs


LATENCIES = [0.0, 0.001, 0.005, 0.0050001, 0.01, 0.3, 1.0, 29.9, 30.0, 31.0, 1e9]


def test_proxied_requests_added_in_bulk_are_what_observe_gives() -> None:
    """The bulk flush puts every latency in the bucket ``Histogram.observe`` would (a bound
    inclusive, past the last one in +Inf) and adds the same sum and counts."""
    bulk = Metrics(["reader"], [], time.time)
    one_by_one = Metrics(["reader"], [], time.time)
    for latency in LATENCIES:
        bulk.proxied("reader", 200, latency)
        one_by_one.latency.labels("reader").observe(latency)
        one_by_one.requests.labels("reader", "2xx").inc()
    bulk.proxied("reader", 503, None)
    one_by_one.requests.labels("reader", "5xx").inc()
    bulk.proxied("elsewhere", 200, 0.1)  # not a configured upstream: not a new series
    bulk.flush()
    exported = _exported(bulk)
    assert exported == _exported(one_by_one)
    assert value(exported, "gateway_upstream_response_seconds_count",
                 upstream="reader") == len(LATENCIES)
    assert value(exported, "gateway_upstream_response_seconds_bucket", upstream="reader",
                 le="0.005") == 3  # 0, 0.001 and the bound itself
    assert not any(("elsewhere" in dict(labels).values()) for _, labels in exported)


def test_proxied_requests_reach_the_counters_within_a_second() -> None:
    metrics = Metrics(["reader"], [], time.time)

    async def count() -> tuple[float, float, float]:
        metrics.proxied("reader", 200, 0.02)
        before = value(_exported(metrics), "gateway_proxied_requests_total",
                       upstream="reader", status_class="2xx")
        await asyncio.sleep(FLUSH_INTERVAL / 2)
        halfway = value(_exported(metrics), "gateway_proxied_requests_total",
                        upstream="reader", status_class="2xx")
        await asyncio.sleep(FLUSH_INTERVAL / 2 + 0.2)
        after = value(_exported(metrics), "gateway_proxied_requests_total",
                      upstream="reader", status_class="2xx")
        return before, halfway, after

    assert asyncio.run(count()) == (0.0, 0.0, 1.0)


def test_a_reload_in_one_process_loses_no_counts(tmp_path: Path) -> None:
    """Under ``serve`` counters live in prometheus' multiprocess files, and a reload
    builds a second gateway (and ``Metrics``) in the same process while the first one
    finishes its requests. Both count into the same values: neither writes over what the
    other counted."""
    use_multiprocess_dir(str(tmp_path))
    try:
        old = Metrics(["u"], ["idp"], time.time)
        old.requests.labels("u", "2xx").inc(5)
        new = Metrics(["u"], ["idp"], time.time)  # the reload
        new.requests.labels("u", "2xx").inc(3)
        old.requests.labels("u", "2xx").inc(1)  # the old gateway's last request
        new.login("idp", None)
        old.login("idp", None)
        # A best-effort failure is told to every listener of the process: counted once.
        best_effort_failed("touch", StoreError("the disk is full"))
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(tmp_path))
        samples = scrape_families(generate_latest(registry).decode())
        assert value(samples, "gateway_proxied_requests_total", upstream="u",
                     status_class="2xx") == 9
        assert value(samples, "gateway_logins_total", idp="idp", result="success",
                     kind="none") == 2
        assert value(samples, "gateway_best_effort_failures_total", what="touch") == 1
    finally:
        use_multiprocess_dir(None)
