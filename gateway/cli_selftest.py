"""``sso-gateway selftest URL``: the CLI part (arguments, printing, exit codes).

Exit codes: 0 every check passed (or was skipped), 1 something got through (or a check
could not be made), 2 usage errors and a gateway that cannot be tested (unreachable,
no sign-in page, no metadata).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """\
A client, like an attacker: it reads nothing of the gateway but what --config names.
With --config gateway.toml (read as data: the file the gateway runs with, not
validated) it forges the attribute names the deployment maps (the first name of each
in [attributes], or its IdP's [[idps]] entry), spoofs its identity header names, uses
its session cookie name, forward-auth headers, upstreams and public paths, and knows
its [limits] logins; without it, the gateway's defaults are assumed.
With --idp-key/--idp-cert (the demo's certs/devidp-key.pem and devidp-cert.pem, or a
test IdP whose key you hold) it also runs a positive control, signature wrapping,
replay and wrong-audience checks, and completes logins: each signs in a test member
(the sessions are signed out again). It makes about 30 sign-in starts and ACS posts:
the gateway's [limits] logins (per client address, per minute) must allow that. The
last probe then sends unknown-IdP sign-in starts until the gateway answers 429: this
address can start no sign-in for up to a minute afterwards.
Whether authentication headers such as X-Remote-User reach the upstream is observable
only with --echo-path, a path whose answer shows the request headers it got.
"""


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    selftest = sub.add_parser(
        "selftest", help="attack a running gateway: forged logins, spoofed headers, "
                         "path and redirect tricks; exit 1 if anything gets through",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    selftest.add_argument("url", help="the gateway's public URL, e.g. https://sso.example.org")
    selftest.add_argument("--ca-file", help="CA certificate(s) to trust for an https gateway")
    selftest.add_argument("--insecure", action="store_true",
                          help="do not verify the gateway's TLS certificate")
    selftest.add_argument("--idp", help="entity ID of the IdP to test (default: the first "
                                        "the sign-in page lists)")
    selftest.add_argument("--idp-key", help="that IdP's private signing key (PEM)")
    selftest.add_argument("--idp-cert", help="that IdP's signing certificate (PEM)")
    selftest.add_argument("--gated-path", default="/sso-gateway-selftest/gated",
                          help="a path that needs a session (default: one no rule makes "
                               "public, so the default rule gates it)")
    selftest.add_argument("--config", help="the deployment's gateway.toml: attribute, "
                                           "header and cookie names, upstreams, limits")
    selftest.add_argument("--public-path", help="a path anyone may open (default: / or a "
                                                "public rule's path from --config)")
    selftest.add_argument("--echo-path", help="a path whose answer shows the request "
                                              "headers the upstream received")


def run(args: argparse.Namespace) -> int:
    from gateway.selftest import Options, SelftestError, failed, render
    from gateway.selftest import run as run_selftest

    if bool(args.idp_key) != bool(args.idp_cert):
        print("error: --idp-key and --idp-cert go together", file=sys.stderr)
        return 2
    for name in ("gated_path", "public_path", "echo_path"):
        value = getattr(args, name)
        if value is not None and not value.startswith("/"):
            print(f"error: --{name.replace('_', '-')} must start with '/'", file=sys.stderr)
            return 2
    try:
        key = Path(args.idp_key).read_text() if args.idp_key else None
        cert = Path(args.idp_cert).read_text() if args.idp_cert else None
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    options = Options(args.url, ca_file=args.ca_file, insecure=args.insecure, idp=args.idp,
                      idp_key_pem=key, idp_cert_pem=cert, gated_path=args.gated_path,
                      config=Path(args.config) if args.config else None,
                      public_path=args.public_path, echo_path=args.echo_path)
    try:
        ctx, results = run_selftest(options)
    except SelftestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render(ctx, results))
    return 1 if failed(results) else 0
