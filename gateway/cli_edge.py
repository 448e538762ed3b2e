"""``sso-gateway nginx-config``: the edge mode's nginx configuration, from ``gateway.toml``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gateway.config import load_settings
from gateway.nginx_config import EdgeConfigError, EdgeOptions, nginx_config, warnings


def add_parsers(sub: argparse._SubParsersAction, config_help: str) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "nginx-config", help="write the nginx configuration of the edge mode (nginx proxies, "
                             "the gateway decides)")
    parser.add_argument("--config", help=config_help)
    parser.add_argument("--out", help="write to this file (0600) instead of printing it")
    parser.add_argument("--listen", default="",
                        help="nginx's listen address (default: the public URL's port)")
    parser.add_argument("--gateway", default="",
                        help="where nginx reaches the gateway, host:port (default: its listen)")
    parser.add_argument("--tls-cert", type=Path, help="certificate file, for an https public_url")
    parser.add_argument("--tls-key", type=Path, help="its key file")
    parser.add_argument("--cache-dir", type=Path, default=EdgeOptions.cache_dir,
                        help="where nginx keeps the gateway's answers for one second "
                             "(default: %(default)s; a tmpfs is best)")
    parser.add_argument("--full", action="store_true",
                        help="a whole nginx.conf, not an include for the http{} block")


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    options = EdgeOptions(listen=args.listen, gateway=args.gateway, tls_cert=args.tls_cert,
                          tls_key=args.tls_key, cache_dir=args.cache_dir, full=args.full)
    try:
        text = nginx_config(settings, options)
    except EdgeConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for warning in warnings(settings):
        print(f"warning: {warning}", file=sys.stderr)
    if not args.out:
        sys.stdout.write(text)
        return 0
    # 0600 also when the file was there: it may hold [forward_auth] shared_secret.
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
