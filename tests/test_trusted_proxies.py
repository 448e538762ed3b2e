"""Rate limits per client behind the reference deployment (issue 14, item 8).

X-Forwarded-For is believed only from an address in ``trusted_proxies``: a client that
is not a trusted proxy cannot rotate the header to get a fresh limit, in ``serve``, in
the demo and in the tests' gateway alike. Behind the reference nginx (``deploy/nginx.conf``,
which sets X-Forwarded-For to the address it saw) and with nginx's address in
``trusted_proxies``, each client has its own limit, and a forged header changes nothing.
"""

from __future__ import annotations

import re
import ssl
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx

from gateway.config import load_settings
from gateway.demo.stack import DemoStack, prepare, servers
from gateway.errors import ConfigError
from tests.conftest import TLSFiles, bound_socket, nginx_process, port_of, run_stack, seed_demo_keys

ROOT = Path(__file__).resolve().parent.parent
FIVE = "\n[limits]\nlogins = 5\n"


def sign_in_starts(base: str, entity_id: str, count: int, *, local: str = "127.0.0.1",
                   verify: ssl.SSLContext | bool = True, rotate: bool = True) -> list[int]:
    """``count`` sign-in starts, each with another X-Forwarded-For; their status codes."""
    url = f"{base}/saml/login?idp={quote(entity_id, safe='')}"
    transport = httpx.HTTPTransport(local_address=local, verify=verify)
    with httpx.Client(transport=transport, timeout=20) as http:
        return [http.get(url, headers={"X-Forwarded-For": f"198.51.100.{i}"} if rotate else {}
                         ).status_code for i in range(count)]


def test_rotated_forwarded_for_from_an_untrusted_client_is_one_client(
        tmp_path: Path, tls: TLSFiles) -> None:
    with run_stack(tmp_path, tls, extra_config=FIVE) as stack:
        codes = sign_in_starts(stack.url, stack.demo.idp.entity_id, 40,
                               verify=tls.client_context())
    assert codes == [302] * 5 + [429] * 35


def _trusting(address: str) -> Callable[[DemoStack], None]:
    def setup(demo: DemoStack) -> None:
        toml = demo.workdir / "gateway.toml"
        toml.write_text(f'trusted_proxies = ["{address}"]\n' + toml.read_text())
    return setup


def test_trusted_proxy_forwarded_for_is_believed(tmp_path: Path, tls: TLSFiles) -> None:
    """The other side: from an address in trusted_proxies, each forwarded client counts."""
    with run_stack(tmp_path, tls, extra_config=FIVE, setup=_trusting("127.0.0.1")) as stack:
        codes = sign_in_starts(stack.url, stack.demo.idp.entity_id, 10,
                               verify=tls.client_context())
    assert codes == [302] * 10


@contextmanager
def demo_gateway(workdir: Path) -> Iterator[DemoStack]:
    """The gateway of ``sso-gateway demo``, as ``demo.stack.servers`` builds it."""
    ports = []
    for _ in range(3):
        with bound_socket() as sock:
            ports.append(port_of(sock))
    seed_demo_keys(workdir)
    stack = prepare(workdir, gateway_url=f"http://127.0.0.1:{ports[0]}",
                    idp_url=f"http://127.0.0.1:{ports[1]}",
                    reader_url=f"http://127.0.0.1:{ports[2]}", extra_config=FIVE)
    gateway = servers(stack)[0]
    thread = threading.Thread(target=gateway.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not gateway.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the demo gateway did not start"
        time.sleep(0.01)
    try:
        yield stack
    finally:
        gateway.should_exit = True
        thread.join(timeout=10)


def test_demo_gateway_does_not_believe_forwarded_for(tmp_path: Path) -> None:
    """The issue's reproduction: 40 of 40 sign-in starts passed with a rotated header."""
    with demo_gateway(tmp_path) as stack:
        codes = sign_in_starts(stack.gateway_url, stack.idp.entity_id, 40)
    assert codes == [302] * 5 + [429] * 35


# -- the reference deployment -----------------------------------------------------------------

def _block(text: str, start: int) -> str:
    """The ``{ … }`` block that opens at or after ``start``, braces balanced."""
    depth, i = 0, text.index("{", start)
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j + 1]
    raise AssertionError("unbalanced braces")


def balancer_location() -> str:
    """``location / { … }`` of the gateways' server in deploy/nginx.conf, as shipped."""
    text = (ROOT / "deploy/nginx.conf").read_text()
    text = re.sub(r"#[^\n]*", "", text)
    server = text.index("listen 8080;")
    return "location / " + _block(text, text.index("location /", server))


def test_deploy_files_agree() -> None:
    """nginx sets X-Forwarded-For/-Proto, and the gateway trusts exactly nginx's address."""
    location = balancer_location()
    assert re.search(r"proxy_set_header\s+X-Forwarded-For\s+\$remote_addr;", location)
    assert re.search(r"proxy_set_header\s+X-Forwarded-Proto\s+\$scheme;", location)
    gateway = tomllib.loads((ROOT / "deploy/gateway.toml").read_text())
    compose = (ROOT / "docker-compose.yml").read_text()
    nginx_address = re.search(r"nginx:.*?ipv4_address:\s*(\S+)", compose, re.S)
    assert nginx_address, "docker-compose.yml gives nginx a fixed address"
    assert gateway["trusted_proxies"] == [nginx_address.group(1)]


@contextmanager
def reference_nginx(tmp: Path, port: int, gateway: int) -> Iterator[None]:
    (tmp / "nginx.conf").write_text(f"""
daemon off; master_process off; worker_processes 1;
pid {tmp}/nginx.pid; error_log {tmp}/error.log warn;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  upstream gateways {{ server 127.0.0.1:{gateway}; keepalive 4; }}
  server {{
    listen 127.0.0.1:{port};
    {balancer_location()}
  }}
}}
""")
    with nginx_process(tmp, f"http://127.0.0.1:{port}/healthz"):
        yield


def test_behind_the_reference_nginx_each_client_has_its_own_limit(
        tmp_path: Path, tls: TLSFiles) -> None:
    """Clients on 127.0.0.2 and 127.0.0.3 reach nginx; nginx (127.0.0.1) is the trusted
    proxy. One client's rotated X-Forwarded-For neither escapes its own limit nor spends
    the other's."""
    probe = bound_socket()
    port = port_of(probe)
    probe.close()
    with run_stack(tmp_path / "stack", tls, gateway_tls=False, extra_config=FIVE,
                   public_url=f"http://127.0.0.1:{port}",
                   setup=_trusting("127.0.0.1")) as stack:
        gateway = urlsplit(stack.direct_url).port
        assert gateway
        with reference_nginx(tmp_path, port, gateway):
            entity = stack.demo.idp.entity_id
            mallory = sign_in_starts(stack.url, entity, 20, local="127.0.0.2")
            alice = sign_in_starts(stack.url, entity, 5, local="127.0.0.3", rotate=False)
    assert mallory == [302] * 5 + [429] * 15
    assert alice == [302] * 5


def test_trusted_proxies_are_addresses_or_networks(tmp_path: Path) -> None:
    """A host name would be compared as a literal and never match: refused, by key."""
    seed_demo_keys(tmp_path)
    stack = prepare(tmp_path)
    toml = tmp_path / "gateway.toml"
    text = toml.read_text()
    for entry, ok in (("nginx", False), ("10.0.0.1/24", False), ("10.0.0.0/24", True),
                      ("172.30.80.10", True), ("::1", True), ("*", True)):
        toml.write_text(f'trusted_proxies = ["{entry}"]\n' + text)
        try:
            settings = load_settings(toml, environ={})
        except ConfigError as exc:
            assert not ok, (entry, str(exc))
            assert f"key trusted_proxies: {entry!r} is not an IP address" in str(exc), str(exc)
            continue
        assert ok, entry
        assert settings.proxy_header_options == {"proxy_headers": True,
                                                 "forwarded_allow_ips": entry}
    assert stack.settings.proxy_header_options["proxy_headers"] is False
