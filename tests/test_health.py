"""``/healthz`` and ``/readyz``: 503 naming each failed check — store stopped, upstream
health URL down, IdP metadata missing or expired — and 200 again once it is fixed."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from gateway.config import load_settings
from gateway.config_state import fingerprint
from gateway.demo.stack import prepare
from gateway.version import VERSION
from tests.browser import client, login
from tests.conftest import (
    RedisServer,
    Stack,
    bound_socket,
    port_of,
    seed_demo_keys,
    serve_gateway,
    serving,
)


@contextmanager
def gateway(workdir: Path, *, extra_config: str = "", clock: Callable[[], float] | None = None,
            edit: Callable[[Path], None] | None = None) -> Iterator[str]:
    """The gateway alone (no IdP is needed to answer probes), over plain http on loopback."""
    sock = bound_socket()
    url = f"http://127.0.0.1:{port_of(sock)}"
    seed_demo_keys(workdir)
    prepare(workdir, gateway_url=url, idp_url="http://127.0.0.1:9",
            reader_url="http://127.0.0.1:9", extra_config=extra_config)
    if edit is not None:
        edit(workdir)
    settings = load_settings(workdir / "gateway.toml", environ={})
    with serve_gateway(settings, sock, clock=clock):
        yield url


def behind_local_proxy(workdir: Path) -> None:
    """``trusted_proxies = ["127.0.0.1"]``: the client address is the one a proxy on
    loopback names in X-Forwarded-For."""
    toml = workdir / "gateway.toml"
    text = toml.read_text()
    toml.write_text(text.replace("\nlisten = ", '\ntrusted_proxies = ["127.0.0.1"]\nlisten = ', 1))


def ready_from(url: str, client: str, **headers: str) -> httpx.Response:
    """``/readyz`` as a client at ``client`` sees it through a proxy on loopback, on a Host
    the gateway does not serve (probes use addresses)."""
    return httpx.get(url + "/readyz", timeout=10,
                     headers={"X-Forwarded-For": client, "Host": "10.1.2.3:8080", **headers})


#: What anyone but a local client or an admin learns from a failing /readyz.
UNAVAILABLE = {"status": "unavailable", "version": VERSION}


def ready(url: str) -> httpx.Response:
    return httpx.get(url + "/readyz", timeout=10)


def test_healthz_is_trivial(tmp_path: Path) -> None:
    with gateway(tmp_path, edit=behind_local_proxy) as url:
        answer = httpx.get(url + "/healthz")
        assert (answer.status_code, answer.json()) == (200, {"status": "ok"})
        # The configuration served (its fingerprint, since when) to a local client only.
        local = ready(url).json()
        settings = load_settings(tmp_path / "gateway.toml", environ={})
        assert local == {"status": "ok", "version": VERSION,
                         "config": {"sha256": fingerprint(settings),
                                    "loaded": local["config"]["loaded"]}}
        assert ready_from(url, "203.0.113.9").json() == {"status": "ok", "version": VERSION}


def test_store_stopped_and_back(tmp_path: Path) -> None:
    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis").start()  # its own: this test stops it

    def use_redis(workdir: Path) -> None:
        toml = workdir / "gateway.toml"
        toml.write_text(toml.read_text().replace(
            'url = "sqlite:///gateway.db"',
            f'url = "{redis.url}"\nconnect_timeout = 0.5\nsocket_timeout = 0.5'))

    try:
        def use_redis_behind_proxy(workdir: Path) -> None:
            use_redis(workdir)
            behind_local_proxy(workdir)

        with gateway(tmp_path / "gw", edit=use_redis_behind_proxy) as url:
            assert ready(url).status_code == 200
            redis.stop()
            down = ready(url)
            assert down.status_code == 503
            assert list(down.json()["failed"]) == ["store"]
            assert str(redis.port) in down.json()["failed"]["store"]
            # Anyone else learns that it is not ready, not why (the store's host and port).
            outside = ready_from(url, "203.0.113.9")
            assert (outside.status_code, outside.json()) == (503, UNAVAILABLE)
            assert str(redis.port) not in outside.text
            redis.start()  # same port
            assert ready(url).status_code == 200
    finally:
        redis.stop()


def test_upstream_health_url_down_and_back(tmp_path: Path) -> None:
    now = [1_900_000_000.0]
    sock = bound_socket()  # bound, not listening yet: the health URL is refused
    health = f"http://127.0.0.1:{port_of(sock)}/health"
    extra = (f'\n[[upstreams]]\nname = "search"\nprefix = "/search-api"\n'
             f'url = "http://127.0.0.1:{port_of(sock)}"\nhealth_url = "{health}"\n')
    with gateway(tmp_path, extra_config=extra, clock=lambda: now[0]) as url:
        down = ready(url)
        assert down.status_code == 503
        failed = down.json()["failed"]
        assert list(failed) == ["upstream:search"]
        assert "unreachable" in failed["upstream:search"]
        calls: list[str] = []

        async def ok(request: object) -> PlainTextResponse:
            calls.append("health")
            return PlainTextResponse("ok")

        with serving(Starlette(routes=[Route("/health", ok)]), sock):
            assert ready(url).status_code == 503  # the result is kept a few seconds
            now[0] += 6
            assert ready(url).status_code == 200
            assert ready(url).status_code == 200
        assert calls == ["health"]  # probes in between were answered from the cache


def _set_valid_until(workdir: Path, when: str) -> None:
    metadata = workdir / "idp_metadata" / "devidp.xml"
    text = re.sub(r'\svalidUntil="[^"]*"', "", metadata.read_text())
    metadata.write_text(re.sub(r"(<(?:md:)?EntityDescriptor)\b", rf'\1 validUntil="{when}"',
                               text, count=1))


def test_metadata_expired_or_missing(tmp_path: Path) -> None:
    with gateway(tmp_path, edit=lambda d: _set_valid_until(d, "2001-01-01T00:00:00Z")) as url:
        expired = ready(url)
    assert expired.status_code == 503
    [(name, reason)] = expired.json()["failed"].items()
    assert name.startswith("idp_metadata:") and "expired" in reason and "2001-01-01" in reason

    # Fixed: fresh metadata, and a restart (the registry is loaded at startup).
    with gateway(tmp_path, edit=lambda d: _set_valid_until(d, "2999-01-01T00:00:00Z")) as url:
        assert ready(url).status_code == 200

    with gateway(tmp_path, edit=lambda d: (d / "idp_metadata" / "devidp.xml").unlink()) as url:
        missing = ready(url)
    assert missing.status_code == 503
    assert missing.json()["failed"] == {"idp_metadata": "no IdP metadata is loaded"}


def _failing_upstream(port: int) -> str:
    """An upstream whose health URL is refused (nothing listens on ``port``)."""
    return (f'\n[[upstreams]]\nname = "search"\nprefix = "/search-api"\n'
            f'url = "http://127.0.0.1:{port}"\nhealth_url = "http://127.0.0.1:{port}/health"\n')


def test_readiness_details_only_for_local_clients_and_allow_from(tmp_path: Path) -> None:
    with bound_socket() as closed:
        extra = _failing_upstream(port_of(closed)) + (
            '\n[metrics]\nallow_from = ["127.0.0.1", "::1", "198.51.100.0/24"]\n')
        with gateway(tmp_path / "proxied", extra_config=extra, edit=behind_local_proxy) as url:
            local = ready(url)
            assert local.status_code == 503
            assert list(local.json()["failed"]) == ["upstream:search"]
            assert ready_from(url, "198.51.100.20").json() == local.json()  # allow_from
            for stranger in ("203.0.113.9", "2001:db8::1"):
                outside = ready_from(url, stranger)
                assert (outside.status_code, outside.json()) == (
                    503, UNAVAILABLE), stranger
            assert httpx.get(url + "/healthz", headers={"Host": "10.1.2.3"}).status_code == 200

        # No trusted proxy: a proxy on this host relays everyone from 127.0.0.1. What it
        # relays (it adds X-Forwarded-For, Forwarded or X-Real-IP) is not a local client.
        with gateway(tmp_path / "plain", extra_config=extra) as url:
            assert "failed" in ready(url).json()
            for relay in ({"X-Forwarded-For": "203.0.113.9"}, {"X-Real-IP": "203.0.113.9"},
                          {"Forwarded": "for=203.0.113.9"}):
                relayed = httpx.get(url + "/readyz", headers=relay)
                assert (relayed.status_code, relayed.json()) == (
                    503, UNAVAILABLE), relay


@pytest.mark.stack(extra_config=_failing_upstream(9))
def test_readiness_details_for_admins_from_anywhere(stack: Stack) -> None:
    far = {"X-Forwarded-For": "203.0.113.9"}  # believed or not, this is no local client
    with client(stack) as carol, client(stack) as bob, client(stack) as nobody:
        login(carol, stack, "/_gateway/admin", "carol")  # carol has the admin entitlement
        login(bob, stack, "/issues/2023-03/pages/1", "bob")
        answer = carol.get(stack.url + "/readyz", headers=far)
        assert answer.status_code == 503
        assert list(answer.json()["failed"]) == ["upstream:search"]
        for who in (bob, nobody):
            answer = who.get(stack.url + "/readyz", headers=far)
            assert (answer.status_code, answer.json()) == (503, UNAVAILABLE)
