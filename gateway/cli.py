"""``sso-gateway``: serve · demo · check · certs · sessions · registrations · idp · explain ·
selftest. This package's CLI modules (``cli*.py``) are the only ones that print and exit.

Exit codes: 0 success, 1 operation failed, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway import cli_admin, cli_explain, cli_idp, cli_selftest
from gateway.config import Settings, load_settings
from gateway.errors import ConfigError, StoreError
from gateway.sessions import Backend
from gateway.version import VERSION

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
                                "the JWKS until pruned); restart the gateway to use it")
    rotate.add_argument("--dir", default="certs/identity")
    prune = certs_sub.add_parser("prune-identity",
                                 help="drop all but the newest identity-token keys")
    prune.add_argument("--dir", default="certs/identity")
    prune.add_argument("--keep", type=int, default=2, help="how many to keep (default 2)")

    cli_admin.add_parsers(sub, CONFIG_HELP)
    cli_selftest.add_parsers(sub)
    cli_idp.add_parsers(sub, CONFIG_HELP)
    cli_explain.add_parsers(sub, CONFIG_HELP)

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
        if args.command == "serve":
            return _serve(args.config, args.workers, args.host, args.port)
        if args.command == "check":
            return _check(args.config)
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
    for warning in [*IdentityRules(settings).warnings(entity_ids), *warnings]:
        print(f"warning: {warning}")
    return 0


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
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each worker keeps its metrics in files here; a scrape adds them all up. Removed
        # when serve exits (the values are this run's only).
        import tempfile

        metrics_dir = tempfile.mkdtemp(prefix="sso-gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    from gateway.server import run, uvicorn_options

    try:
        run("gateway.app:app_from_env", host=listen_host,
            port=listen_port, workers=workers, loop="uvloop",
            # X-Forwarded-For/-Proto only from configured proxies (uvicorn's own
            # right-most-untrusted-hop logic), so scope["client"] is the real client.
            proxy_headers=bool(settings.trusted_proxies),
            forwarded_allow_ips=",".join(settings.trusted_proxies) or None,
            # [server]: httptools with a head limit (431), a head timeout and an idle
            # cap (gateway.server); keep-alive and graceful-shutdown timeouts; no
            # Server header. Workers: a supervisor that refuses new connections on
            # SIGTERM and bounds the shutdown.
            **uvicorn_options(settings.server),
            log_level="info", log_config=None, access_log=False)
    finally:
        if metrics_dir is not None:
            import shutil

            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


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
    print("Restart the gateway (every replica, after copying the file) to sign with it.")
    return 0


def _prune_identity(directory: Path, keep: int) -> int:
    from gateway.keys import load_identity_keys, prune_identity_keys

    dropped = prune_identity_keys(directory, keep)
    for key in dropped:
        print(f"dropped {key.kid} ({key.path.name})")
    print(f"kept: {', '.join(k.kid for k in load_identity_keys(directory))}")
    print("Restart the gateway so the JWKS stops listing the dropped keys.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
