"""``sso-gateway``: serve · reload · demo · check · certs · sessions · registrations · idp ·
explain · selftest · nginx-config. This package's CLI modules (``cli*.py``) are the only ones
that print and exit.

Exit codes: 0 success, 1 operation failed, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gateway import cli_admin, cli_edge, cli_explain, cli_idp, cli_selftest
from gateway.config import Settings, load_settings
from gateway.errors import ConfigError, StoreError
from gateway.sessions import Backend
from gateway.tls import check as tls_check
from gateway.tls import tls_files
from gateway.version import VERSION

if TYPE_CHECKING:
    from gateway.app import Gateway

DESCRIPTION = """sso-gateway: sign members in through their organisation's SAML IdP and
proxy what the access rules allow.

Exit codes: 0 success, 1 operation failed, 2 bad configuration or usage."""
CONFIG_HELP = "gateway.toml to use (default: $GATEWAY_CONFIG or ./gateway.toml)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sso-gateway", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"sso-gateway {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help=CONFIG_HELP)
    serve.add_argument("--workers", type=int, default=1,
                       help="worker processes (default: 1)")
    serve.add_argument("--host", help="address to listen on (overrides the configuration's "
                                      "listen)")
    serve.add_argument("--port", type=int,
                       help="port to listen on (overrides the configuration's listen)")

    check = sub.add_parser("check", help="validate the configuration, keys and IdP metadata")
    check.add_argument("--config", help=CONFIG_HELP)

    reload = sub.add_parser(
        "reload", help="check the configuration, then make the running gateway use it "
                       "(SIGHUP to serve's process, named by [server] pid_file or --pid)")
    reload.add_argument("--config", help=CONFIG_HELP)
    reload.add_argument("--pid", type=int, help="process ID of `sso-gateway serve`")
    reload.add_argument("--wait", type=float, default=10.0,
                        help="seconds to wait for the gateway's answer on /readyz "
                             "(default: 10; 0: do not wait)")

    metadata = sub.add_parser("metadata", help="print the SP metadata (/saml/metadata)")
    metadata.add_argument("--config", help=CONFIG_HELP)
    metadata.add_argument("--out", type=Path, help="write it to this file instead")

    demo = sub.add_parser("demo", help="gateway + development IdP + sample reader on loopback")
    demo.add_argument("--dir", default=".demo", help="work directory (default: .demo)")
    demo.add_argument("--port", type=int, default=8000, help="gateway port (IdP +1, reader +2)")

    certs = sub.add_parser("certs", help="SP key and certificate")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    gen = certs_sub.add_parser("generate", help="write a new SP key (0600) and certificate")
    gen.add_argument("--dir", default="certs")
    gen.add_argument("--name", default="sso-gateway SP", help="certificate common name")
    gen.add_argument("--force", action="store_true", help="overwrite existing files")
    rotate = certs_sub.add_parser(
        "rotate-identity", help="add a new identity-token signing key (the old ones stay in "
                                "the JWKS until pruned); `sso-gateway reload` to use it")
    rotate.add_argument("--dir", default="certs/identity")
    prune = certs_sub.add_parser("prune-identity",
                                 help="drop all but the newest identity-token keys")
    prune.add_argument("--dir", default="certs/identity")
    prune.add_argument("--keep", type=int, default=2, help="how many to keep (default 2)")

    cli_admin.add_parsers(sub, CONFIG_HELP)
    cli_selftest.add_parsers(sub)
    cli_idp.add_parsers(sub, CONFIG_HELP)
    cli_explain.add_parsers(sub, CONFIG_HELP)
    cli_edge.add_parsers(sub, CONFIG_HELP)

    args = parser.parse_args(argv)
    try:
        if args.command in ("sessions", "registrations"):
            return cli_admin.run(args)
        if args.command == "selftest":
            return cli_selftest.run(args)
        if args.command == "idp":
            return cli_idp.run(args)
        if args.command == "explain":
            return cli_explain.run(args)
        if args.command == "nginx-config":
            return cli_edge.run(args)
        if args.command == "serve":
            return _serve(args.config, args.workers, args.host, args.port)
        if args.command == "check":
            return _check(args.config)
        if args.command == "reload":
            return _reload(args.config, args.pid, args.wait)
        if args.command == "metadata":
            return cli_idp.sp_metadata(args.config, args.out)
        if args.command == "demo":
            return _demo(Path(args.dir), args.port)
        if args.certs_command == "rotate-identity":
            return _rotate_identity(Path(args.dir))
        if args.certs_command == "prune-identity":
            return _prune_identity(Path(args.dir), args.keep)
        return _certs_generate(Path(args.dir), args.name, args.force)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


def _check(config: str | None) -> int:
    settings, gateway, warnings = _validate(config)
    entity_ids = [idp.entity_id for idp in gateway.registry.all()]
    idps = ", ".join(entity_ids)
    unreachable = _store_problem(gateway.stores.backend, settings)
    if unreachable:
        print(f"error: {unreachable}", file=sys.stderr)
        return 1
    print(f"OK: {settings.source}")
    print(f"  public_url  {settings.public_url}")
    print(f"  SP entity   {settings.sp_entity_id}")
    print(f"  IdPs        {idps}")
    print(f"  upstreams   {', '.join(f'{u.prefix} -> {u.url}' for u in settings.upstreams)}")
    print(f"  rules       {len(settings.rules)} (+ default: {settings.policy.default}, "
          "for every path no rule matches)")
    print(f"  matching    {'; '.join(f'{u.name}: {u.path_reading}' for u in settings.upstreams)}")
    print(f"  store       {settings.store.display_url}")
    files = tls_files(settings)
    if files is not None:
        print(f"  tls         {files.cert} (TLS 1.2+)")
    print(f"  sha256      {gateway.config_sha256}")
    for warning in warnings:
        print(f"warning: {warning}")
    return 0


def _validate(config: str | None) -> tuple[Settings, Gateway, list[str]]:
    """What ``check`` and ``reload`` validate: the configuration, the gateway built from
    it (keys, IdP metadata, rules) and the TLS pair; ``ConfigError`` lists every problem.
    Returns the warnings too."""
    from gateway.app import create_app
    from gateway.identities import IdentityRules
    from gateway.saml import SamlProtocol

    settings = load_settings(config)
    gateway = create_app(settings)  # loads keys and IdP metadata: every ConfigError surfaces
    warnings: list[str] = []
    for protocol in gateway.protocols:
        if isinstance(protocol, SamlProtocol):
            protocol.sp.metadata()  # checked against the metadata schema
            warnings += protocol.sp.metadata_warnings()
    entity_ids = [idp.entity_id for idp in gateway.registry.all()]
    warnings = [*IdentityRules(settings).warnings(entity_ids), *warnings]
    files = tls_files(settings)
    if files is not None:
        warnings += tls_check(files, time.time())
        if not settings.public_url.startswith("https://"):
            warnings.append("[server] tls_cert_file is set but public_url is not https://")
    return settings, gateway, warnings


def _reload(config: str | None, pid: int | None, wait: float) -> int:
    """``reload``: validate as ``check`` does; only then SIGHUP the running ``serve``, and
    wait for its answer on ``/readyz``."""
    try:
        settings, gateway, warnings = _validate(config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        print("not reloaded: the running gateway keeps its configuration", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"warning: {warning}")
    if pid is None:
        path = pid_path(settings)
        if path is None:
            print("error: no --pid given and [server] pid_file is not set", file=sys.stderr)
            return 2
        try:
            pid = int(path.read_text().strip())
        except (OSError, ValueError) as exc:
            print(f"error: cannot read the process ID from {path}: {exc} (is the gateway "
                  "running?)", file=sys.stderr)
            return 1
    not_serving = _not_serving(pid)
    if not_serving is not None:
        print(f"error: {not_serving}", file=sys.stderr)
        return 1
    sent = time.time()
    os.kill(pid, signal.SIGHUP)
    print(f"sent SIGHUP to sso-gateway serve (pid {pid}); config_sha256 {gateway.config_sha256}")
    return _await_reload(settings, sent, wait) if wait > 0 else 0


def _not_serving(pid: int) -> str | None:
    """Why ``pid`` is not an ``sso-gateway serve`` this user may signal, or ``None``: a
    stale pid file must not make ``reload`` signal another program."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"no process {pid} (the gateway is not running, or the pid file is stale)"
    except PermissionError:
        return f"not allowed to signal process {pid}: run as the gateway's user"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None  # no /proc: trust the pid file
    if b"serve" not in argv:
        return f"process {pid} is not `sso-gateway serve`: the pid file is stale"
    return None


def _await_reload(settings: Settings, sent: float, wait: float) -> int:
    """Read ``/readyz`` on the configured ``listen`` address (from this host) until it shows
    a reload after ``sent``; print its result. With several workers, it is the answer of
    the worker that took the request; each worker logs and audits its own."""
    import datetime as dt

    import httpx

    wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104
    host = wildcard.get(settings.listen_host, settings.listen_host)
    scheme = "https" if tls_files(settings) is not None else "http"
    url = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{settings.listen_port}/readyz"
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:  # our own gateway on this host: its certificate need not name the address
            body = httpx.get(url, timeout=2, verify=False).json()  # noqa: S501
        except (httpx.HTTPError, ValueError):
            body = {}
        last = (body.get("config") or {}).get("last_reload") if isinstance(body, dict) else None
        if isinstance(last, dict):
            when = dt.datetime.fromisoformat(str(last.get("time")).replace("Z", "+00:00"))
            if when.timestamp() >= sent - 0.001:
                if last.get("result") == "ok":
                    print(f"reloaded: config_sha256 {last.get('sha256')}")
                    return 0
                for problem in last.get("problems") or []:
                    print(f"error: {problem}", file=sys.stderr)
                print("reload refused: the running gateway keeps its configuration",
                      file=sys.stderr)
                return 1
        time.sleep(0.2)
    print(f"no reload seen on {url} within {wait:g} s: see the gateway's log "
          "(`reload of … refused` or `reloaded …`)", file=sys.stderr)
    return 1


def pid_path(settings: Settings) -> Path | None:
    """``[server] pid_file``, relative to gateway.toml's directory, or ``None``."""
    if settings.server.pid_file is None:
        return None
    return Path(settings.source).parent / settings.server.pid_file.expanduser()


def _store_problem(store: Backend, settings: Settings) -> str | None:
    """Why a network store cannot be reached now, or ``None``. SQLite is not opened here:
    ``check`` must not create the database file."""
    if settings.store.url.startswith("sqlite:"):
        return None

    async def ping() -> None:
        await store.open()
        try:
            await store.ping()
        finally:
            await store.close()

    try:
        asyncio.run(ping())
    except StoreError as exc:
        return f"session store {settings.store.display_url} is not reachable: {exc.reason}"
    return None


def listen_address(settings: Settings, host: str | None, port: int | None) -> tuple[str, int]:
    """Where ``serve`` listens: ``listen`` from the configuration, with ``--host`` and
    ``--port`` taking precedence."""
    return (host or settings.listen_host,
            port if port is not None else settings.listen_port)


def _serve(config: str | None, workers: int, host: str | None = None,
           port: int | None = None) -> int:
    settings = load_settings(config)
    if port is not None and not 0 < port < 65536:
        print(f"error: --port {port} is not a TCP port (1-65535)", file=sys.stderr)
        return 2
    listen_host, listen_port = listen_address(settings, host, port)
    from gateway.app import create_app

    gateway = create_app(settings)  # fail fast, with exit 2, before uvicorn starts workers
    files = tls_files(settings)
    if files is not None:  # a pair that cannot serve: exit 2 here, not in every worker
        for warning in tls_check(files, time.time()):
            print(f"warning: {warning}", file=sys.stderr)
    unreachable = _store_problem(gateway.stores.backend, settings)
    if unreachable:
        # Serve anyway: replicas often start before Redis, and the gateway reconnects on its
        # own. Until then /readyz answers 503 (so a balancer sends no traffic) and every
        # request that needs a session gets a 503 page, never anonymous access.
        print(f"warning: {unreachable}; serving anyway: /readyz answers 503 until it is back",
              file=sys.stderr)
    if config:
        os.environ["GATEWAY_CONFIG"] = str(Path(config).resolve())
    # Logs: JSON lines by default ([logging] format); uvicorn's loggers go through the same
    # handler (log_config=None), and the gateway writes its own line per request.
    from gateway.logs import configure_logging

    configure_logging(settings.logging.format or "json")
    metrics_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each worker keeps its metrics in files here; a scrape adds them all up, and a
        # reload (a new Gateway in the same process) continues the counters. Removed
        # when serve exits (the values are this run's only).
        import tempfile

        from gateway.metrics import use_multiprocess_dir

        metrics_dir = tempfile.mkdtemp(prefix="sso-gateway-metrics-")
        use_multiprocess_dir(metrics_dir)
    from gateway.server import Redirect, TLSContextFactory, run, uvicorn_options

    tls_options = {} if files is None else {"ssl_context_factory": TLSContextFactory(files)}
    redirect = None
    if settings.server.http_redirect_listen:
        redirect_host, _, redirect_port = settings.server.http_redirect_listen.rpartition(":")
        redirect = Redirect(redirect_host.strip("[]"), int(redirect_port), settings.public_url)
    pid_file = pid_path(settings)
    if pid_file is not None:
        _write_pid(pid_file)
    try:
        # gateway.reload: the application reloads its configuration on SIGHUP.
        run("gateway.reload:app_from_env", host=listen_host, redirect=redirect,
            port=listen_port, workers=workers, loop="uvloop", **tls_options,
            # X-Forwarded-For/-Proto only from configured proxies (uvicorn's own
            # right-most-untrusted-hop logic), so scope["client"] is the real client.
            proxy_headers=bool(settings.trusted_proxies),
            forwarded_allow_ips=",".join(settings.trusted_proxies) or None,
            # [server]: httptools with a head limit (431), a head timeout and an idle
            # cap (gateway.server); keep-alive and graceful-shutdown timeouts; no
            # Server header. Workers: a supervisor that refuses new connections on
            # SIGTERM and bounds the shutdown.
            **uvicorn_options(settings.server, settings.websocket),
            log_level="info", log_config=None, access_log=False)
    finally:
        if metrics_dir is not None:
            import shutil

            shutil.rmtree(metrics_dir, ignore_errors=True)
            use_multiprocess_dir(None)  # the directory is gone
        if pid_file is not None:
            _remove_pid(pid_file)
    return 0


def _write_pid(path: Path) -> None:
    """Write this process's ID to ``path`` (replaced atomically, readable by all)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".new")
    partial.unlink(missing_ok=True)
    # A new file, never through a link someone placed there (the directory may be shared).
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{os.getpid()}\n")
    partial.replace(path)


def _remove_pid(path: Path) -> None:
    """Remove ``path`` if it still names this process."""
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass


def _demo(workdir: Path, port: int) -> int:
    from gateway.demo.stack import prepare, serve
    from gateway.devidp import DEMO_USERS

    stack = prepare(workdir.resolve(), gateway_url=f"http://127.0.0.1:{port}",
                    idp_url=f"http://127.0.0.1:{port + 1}",
                    reader_url=f"http://127.0.0.1:{port + 2}")
    from gateway.logs import configure_logging

    configure_logging(stack.settings.logging.format or "text")
    print("sso-gateway demo (DEVELOPMENT ONLY, loopback only)")
    print(f"  open        {stack.gateway_url}/issues/2023-03/pages/14")
    print(f"  dev IdP     {stack.idp.base_url}   reader (behind the gateway) {stack.reader_url}")
    print("  demo users  (password: demo)")
    for user in DEMO_USERS:
        print(f"    {user.username:<8} {user.role}")
    print(f"  files in    {workdir}  — Ctrl-C stops")
    asyncio.run(serve(stack))
    return 0


def _certs_generate(directory: Path, name: str, force: bool) -> int:
    from gateway.keys import ensure_identity_key, write_keypair

    key, cert = directory / "sp.key", directory / "sp.crt"
    try:
        write_keypair(key, cert, name, force=force)
    except FileExistsError as exc:
        print(f"error: {exc} already exists; use --force to replace it", file=sys.stderr)
        return 1
    print(f"wrote {key} (mode 0600) and {cert} (CN={name!r})")
    secret_file = directory / "session-secrets"
    if not secret_file.exists():
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48) + "\n")
        print(f"wrote {secret_file} (mode 0600): the session cookie secret")
    identity_key = ensure_identity_key(directory / "identity")
    if identity_key is not None:
        print(f"wrote {identity_key.path} (mode 0600): identity-token signing key, "
              f"kid {identity_key.kid}")
    print("Give the IdP the SP metadata from /saml/metadata once the gateway runs.")
    return 0


def _rotate_identity(directory: Path) -> int:
    from gateway.keys import generate_identity_key, load_identity_keys

    key = generate_identity_key(directory)
    kids = [k.kid for k in load_identity_keys(directory)]
    print(f"new signing key {key.kid} ({key.path})")
    print(f"published in the JWKS: {', '.join(kids)}")
    print("Run `sso-gateway reload` (every replica, after copying the file) to sign with it.")
    return 0


def _prune_identity(directory: Path, keep: int) -> int:
    from gateway.keys import load_identity_keys, prune_identity_keys

    dropped = prune_identity_keys(directory, keep)
    for key in dropped:
        print(f"dropped {key.kid} ({key.path.name})")
    print(f"kept: {', '.join(k.kid for k in load_identity_keys(directory))}")
    print("Run `sso-gateway reload` so the JWKS stops listing the dropped keys.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
