"""The processes a benchmark run starts: nginx (upstream), Apache httpd (plain and with
mod_auth_mellon), the gateway.

Each runs in the foreground as a child process with a config written into the run's
work directory, on a free loopback port; ``Proc`` reads CPU time and RSS of the
process and its children from ``/proc``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.demo.stack import DemoStack, prepare
from gateway.keys import pem_body, write_keypair

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


@dataclass
class Proc:
    """A started server: its process, port and log file."""

    name: str
    popen: subprocess.Popen[bytes]
    port: int

    def pids(self) -> list[int]:
        """The process and all its descendants (uvicorn workers, Apache children)."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    ppid = int(_stat(int(entry))[1])
                except (OSError, IndexError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        out, todo = [], [self.popen.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, []))
        return out

    def cpu_seconds(self) -> float:
        """utime + stime of the whole tree (children still running; none are reaped)."""
        total = 0
        for pid in self.pids():
            try:
                fields = _stat(pid)
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime after the comm field
        return total / CLK_TCK

    def rss_bytes(self) -> int:
        total = 0
        for pid in self.pids():
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
            except OSError:
                continue
        return total

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def _stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after ``comm`` (which may contain spaces): state, ppid…"""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()


def _start(name: str, args: list[str], port: int, workdir: Path,
           env: dict[str, str] | None = None) -> Proc:
    log = (workdir / f"{name}.log").open("wb")
    popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                             cwd=workdir)
    proc = Proc(name, popen, port)
    try:
        wait_for_port(port, popen)
    except RuntimeError:
        proc.stop()
        raise RuntimeError(f"{name} did not start; see {workdir / (name + '.log')}") from None
    return proc


NGINX_CONF = """\
daemon off;
worker_processes 1;
error_log {dir}/nginx-error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    client_body_temp_path {dir}/nginx-tmp;
    default_type text/html;
    server {{
        listen 127.0.0.1:{port};
        root {dir}/www;
    }}
}}
"""


def start_upstream(workdir: Path, pages: dict[str, int]) -> Proc:
    """nginx serving static pages ``{path: size}``: the fastest upstream there is here."""
    for path, size in pages.items():
        file = workdir / "www" / path.lstrip("/")
        file.parent.mkdir(parents=True, exist_ok=True)
        line = b"<p>Member-only issue text, the same line again and again.</p>\n"
        file.write_bytes((line * (size // len(line) + 1))[:size])
    (workdir / "nginx-tmp").mkdir(exist_ok=True)
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, port=port))
    return _start("nginx", ["nginx", "-p", str(workdir), "-c", str(conf)], port, workdir)


APACHE_CONF = """\
ServerRoot /etc/apache2
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile {dir}/httpd.pid
DefaultRuntimeDir {dir}
ErrorLog {dir}/apache-error.log
LogLevel warn
{user}
LoadModule mpm_event_module /usr/lib/apache2/modules/mod_mpm_event.so
# Without an authz module every request fails with "couldn't check user" (AH00025).
LoadModule authz_core_module /usr/lib/apache2/modules/mod_authz_core.so
LoadModule proxy_module /usr/lib/apache2/modules/mod_proxy.so
LoadModule proxy_http_module /usr/lib/apache2/modules/mod_proxy_http.so
# The same per-request work the gateway does: one access-log line.
LogFormat "%h %l %u %t \\"%r\\" %>s %b" common
CustomLog {dir}/apache-access.log common
KeepAlive On
MaxKeepAliveRequests 0
KeepAliveTimeout 75
ServerLimit 4
StartServers 2
ThreadsPerChild 64
MaxRequestWorkers 256
<Location "/">
    Require all granted
</Location>
ProxyPass / http://127.0.0.1:{upstream}/
ProxyPassReverse / http://127.0.0.1:{upstream}/
"""


def start_apache(workdir: Path, upstream: int) -> Proc:
    """Debian's Apache httpd (mpm_event, mod_proxy_http) as a plain reverse proxy."""
    port = free_port()
    # As root, Apache must drop to a user; as anyone else it runs as that user.
    user = "User www-data\nGroup www-data" if os.getuid() == 0 else ""
    conf = workdir / "apache2.conf"
    conf.write_text(APACHE_CONF.format(dir=workdir, port=port, upstream=upstream, user=user))
    return _start("apache", ["apache2", "-DFOREGROUND", "-f", str(conf)], port, workdir)


MELLON_CONF = APACHE_CONF.replace(
    "<Location \"/\">\n    Require all granted\n</Location>\n", """\
LoadModule authn_core_module /usr/lib/apache2/modules/mod_authn_core.so
LoadModule authz_user_module /usr/lib/apache2/modules/mod_authz_user.so
LoadModule headers_module /usr/lib/apache2/modules/mod_headers.so
LoadModule auth_mellon_module /usr/lib/apache2/modules/mod_auth_mellon.so
MellonCacheSize 20000
<Location "/">
    AuthType Mellon
    MellonEnable auth
    MellonEndpointPath /mellon
    MellonSPentityId "{entity_id}"
    MellonSPPrivateKeyFile {dir}/mellon-sp.key
    MellonSPCertFile {dir}/mellon-sp.crt
    MellonSPMetadataFile {dir}/mellon-sp.xml
    MellonIdPMetadataFile {dir}/mellon-idp.xml
    MellonSecureCookie Off
    MellonSessionLength 28800
    MellonUser NAME_ID
    Require valid-user
    # What the gateway does too: the identity goes upstream in a header.
    RequestHeader set X-Remote-User "%{{MELLON_NAME_ID}}e"
</Location>
""")

MELLON_SP_METADATA = """\
<md:EntityDescriptor xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata"
    xmlns:ds="http://www.w3.org/2000/09/xmldsig#" entityID="{entity_id}">
  <md:SPSSODescriptor protocolSupportEnumeration="urn:oasis:names:tc:SAML:2.0:protocol"
      AuthnRequestsSigned="true" WantAssertionsSigned="true">
    <md:KeyDescriptor use="signing"><ds:KeyInfo><ds:X509Data>
      <ds:X509Certificate>{cert}</ds:X509Certificate>
    </ds:X509Data></ds:KeyInfo></md:KeyDescriptor>
    <md:AssertionConsumerService index="0" isDefault="true"
        Binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST"
        Location="{base}/mellon/postResponse"/>
  </md:SPSSODescriptor>
</md:EntityDescriptor>
"""


@dataclass(frozen=True)
class MellonSP:
    """What the dev IdP must know of the mod_auth_mellon service provider."""

    port: int
    entity_id: str
    acs_url: str
    cert_pem: str


def prepare_mellon(workdir: Path) -> MellonSP:
    """Keys and SP metadata for Apache with mod_auth_mellon, on a port chosen now."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    entity_id = base + "/mellon/metadata"
    write_keypair(workdir / "mellon-sp.key", workdir / "mellon-sp.crt", "bench mellon SP")
    cert = (workdir / "mellon-sp.crt").read_text()
    (workdir / "mellon-sp.xml").write_text(
        MELLON_SP_METADATA.format(entity_id=entity_id, cert=pem_body(cert), base=base))
    return MellonSP(port, entity_id, base + "/mellon/postResponse", cert)


def start_mellon(workdir: Path, sp: MellonSP, upstream: int, idp_metadata: str) -> Proc:
    """Apache httpd with mod_auth_mellon in front of mod_proxy_http: the product a
    membership IT team would otherwise run (a SAML session check in C, then the proxy)."""
    (workdir / "mellon-idp.xml").write_text(idp_metadata)
    user = "User www-data\nGroup www-data" if os.getuid() == 0 else ""
    conf = workdir / "mellon.conf"
    text = MELLON_CONF.format(dir=workdir, port=sp.port, upstream=upstream, user=user,
                              entity_id=sp.entity_id)
    conf.write_text(text.replace("/apache-", "/mellon-").replace("/httpd.pid", "/mellon.pid"))
    return _start("mellon", ["apache2", "-DFOREGROUND", "-f", str(conf)], sp.port, workdir)


def start_edge(workdir: Path, port: int, gateway_port: int) -> Proc:
    """nginx in the gateway's edge mode, its configuration from ``sso-gateway nginx-config``."""
    exe = Path(sys.executable).with_name("sso-gateway")
    conf = workdir / "edge.conf"
    subprocess.run([str(exe), "nginx-config", "--config", str(workdir / "gateway.toml"),
                    "--full", "--listen", f"127.0.0.1:{port}",
                    "--gateway", f"127.0.0.1:{gateway_port}",
                    "--cache-dir", str(workdir / "edge-cache"), "--out", str(conf)],
                   check=True, capture_output=True)
    edge = workdir / "edge"
    edge.mkdir(exist_ok=True)
    # In the foreground (measured as our child); the run's directory, not /var/lib/nginx.
    conf.write_text("daemon off;\n" + conf.read_text().replace("/var/lib/nginx", str(edge)))
    return _start("edge", ["nginx", "-p", str(edge), "-c", str(conf)], port, workdir)


def start_gateway(workdir: Path, port: int, workers: int, *, name: str = "",
                  env: dict[str, str] | None = None) -> Proc:
    """``sso-gateway serve`` exactly as in production (uvicorn, uvloop, httptools) on
    ``port``, with ``env`` overrides; named ``gateway-<workers>w`` unless ``name``."""
    exe = Path(sys.executable).with_name("sso-gateway")
    args = [str(exe), "serve", "--config", str(workdir / "gateway.toml"),
            "--workers", str(workers), "--port", str(port)]
    proc = _start(name or f"gateway-{workers}w", args, port, workdir,
                  env={**os.environ, **(env or {})})
    if workers > 1:  # the supervisor listens before its workers have started
        wait_for_processes(proc, workers + 1)
    return proc


def wait_for_processes(proc: Proc, count: int) -> None:
    """Until ``proc``'s tree has ``count`` processes (at most 20 s), then a second more for
    the last to start serving."""
    deadline = time.monotonic() + 20
    while len(proc.pids()) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)


# Every benchmark login comes from 127.0.0.1: lift the per-address sign-in limit.
BENCH_LIMITS = "\n[limits]\nlogins = 1000000\n"


def prepare_stack(workdir: Path, upstream_port: int) -> tuple[DemoStack, int, int]:
    """The demo's files in ``workdir`` for a gateway and a dev IdP on free loopback ports,
    in front of the upstream on ``upstream_port``, with ``BENCH_LIMITS``: the stack, the
    gateway's port and the IdP's port."""
    gw_port, idp_port = free_port(), free_port()
    stack = prepare(workdir, gateway_url=f"http://127.0.0.1:{gw_port}",
                    idp_url=f"http://127.0.0.1:{idp_port}",
                    reader_url=f"http://127.0.0.1:{upstream_port}", extra_config=BENCH_LIMITS)
    return stack, gw_port, idp_port
