"""Running the self-test: discover the gateway, run every case, render the table.

Discovery uses only what any visitor can fetch: the IdPs from the sign-in page's
``/saml/login?idp=…`` links, the SP entity ID and the ACS URL from ``/saml/metadata``.
The deployment's names (released attribute names, identity headers, cookie, upstreams,
public paths, forward-auth headers, sign-in limit) come from ``--config`` when given
(``deployment``), else the gateway's defaults apply.
"""

from __future__ import annotations

import html
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from lxml import etree
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C

from gateway.keys import generate_self_signed
from gateway.selftest.cases import Case, all_cases
from gateway.selftest.client import Browser, Target
from gateway.selftest.deployment import ConfigUnreadable, Deployment, read_deployment
from gateway.selftest.flow import CaseError, Context, Outcome
from gateway.selftest.forge import Forge, alice_as
from gateway.selftest.hostile import RATE_LIMIT

_IDP_LINK = re.compile(r'href="(/saml/login\?[^"]*idp=[^"]*)"')
_MD = "urn:oasis:names:tc:SAML:2.0:metadata"


class SelftestError(Exception):
    """The self-test could not start: the gateway or the options are not usable."""


@dataclass(frozen=True)
class Options:
    url: str
    ca_file: str | None = None
    insecure: bool = False
    idp: str | None = None  # entity ID; default: the first the sign-in page lists
    idp_key_pem: str | None = None
    idp_cert_pem: str | None = None
    gated_path: str = "/sso-gateway-selftest/gated"
    config: Path | None = None  # the deployment's gateway.toml (read as data)
    public_path: str | None = None  # default: a public rule's path from the config, or /
    echo_path: str | None = None  # a path whose answer shows the upstream's request headers


@dataclass(frozen=True)
class Result:
    name: str
    expected: str
    outcome: Outcome
    seconds: float


def discover_idps(browser: Browser) -> list[str]:
    page = browser.get("/saml/login")
    if page.status != 200:
        raise SelftestError(f"/saml/login answered {page.status}, not the sign-in page "
                            "(with auto_redirect, name the IdP with --idp)")
    found: list[str] = []
    for href in _IDP_LINK.findall(page.text):
        for entity_id in parse_qs(urlsplit(html.unescape(href)).query).get("idp", []):
            if entity_id not in found:
                found.append(entity_id)
    if not found:
        raise SelftestError("the sign-in page at /saml/login lists no IdP")
    return found


def discover_sp(browser: Browser) -> tuple[str, str]:
    """``(SP entity ID, ACS URL for HTTP-POST)`` from ``/saml/metadata``."""
    answer = browser.get("/saml/metadata")
    if answer.status != 200:
        raise SelftestError(f"/saml/metadata answered {answer.status}")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    try:
        root = etree.fromstring(answer.body, parser)
    except etree.XMLSyntaxError as exc:
        raise SelftestError(f"/saml/metadata is not XML: {exc}") from None
    acs = [e.get("Location") for e in root.iter(f"{{{_MD}}}AssertionConsumerService")
           if e.get("Binding") == C.BINDING_HTTP_POST]
    if not root.get("entityID") or not acs or not acs[0]:
        raise SelftestError("/saml/metadata names no entityID or HTTP-POST ACS")
    return root.get("entityID"), acs[0]


def prepare(options: Options) -> Context:
    try:
        target = Target(options.url.rstrip("/"), options.ca_file, options.insecure)
    except ValueError as exc:
        raise SelftestError(str(exc)) from None
    try:
        deployment = (read_deployment(options.config) if options.config is not None
                      else Deployment())
    except ConfigUnreadable as exc:
        raise SelftestError(str(exc)) from None
    browser = Browser(target)
    try:
        idps = [options.idp] if options.idp else discover_idps(browser)
        sp_entity_id, acs_url = discover_sp(browser)
    except OSError as exc:
        raise SelftestError(f"cannot reach {target.url}: {exc}") from None
    key, cert = generate_self_signed("sso-gateway selftest (throwaway attacker key)")
    attributes = alice_as(deployment.released(idps[0]))

    def forge(key_pem: str, cert_pem: str) -> Forge:
        return Forge(idp_entity_id=idps[0], key_pem=key_pem, cert_pem=cert_pem,
                     acs_url=acs_url, sp_entity_id=sp_entity_id, attributes=attributes)

    idp = None
    if options.idp_key_pem and options.idp_cert_pem:
        idp = forge(options.idp_key_pem, options.idp_cert_pem)
    public = options.public_path or _public_path(deployment.public_paths)
    return Context(target, idps[0], sp_entity_id, acs_url, options.gated_path,
                   forge(key, cert), idp, deployment=deployment, public_path=public,
                   echo_path=options.echo_path)


def _public_path(configured: tuple[str, ...]) -> str:
    """``/`` when a rule makes it public (or nothing is known), else the first public
    rule's path."""
    return "/" if not configured or "/" in configured else configured[0]


def run_case(ctx: Context, case: Case) -> Result:
    started = time.monotonic()
    if case.needs_idp_key and ctx.idp is None:
        outcome = Outcome("SKIP", "needs --idp-key and --idp-cert")
    else:
        try:
            outcome = case.check(ctx)
        except CaseError as exc:
            outcome = Outcome("FAIL", str(exc))
        except OSError as exc:
            outcome = Outcome("FAIL", f"connection failed: {exc}")
    return Result(case.name, case.expected, outcome, time.monotonic() - started)


def run(options: Options) -> tuple[Context, list[Result]]:
    """Discover the gateway and run every case (``SelftestError`` if it cannot start);
    the shared test member is signed out before the rate-limit probe, which runs last."""
    ctx = prepare(options)
    try:
        results = [run_case(ctx, case) for case in all_cases(ctx)]
    finally:
        ctx.end_member()
    limit = RATE_LIMIT
    results.append(run_case(ctx, Case(limit.name, limit.expected, limit.check)))
    return ctx, results


def render(ctx: Context, results: list[Result]) -> str:
    header = ("case", "expected", "got", "result")
    rows = [(r.name, r.expected, r.outcome.got, r.outcome.status) for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    widths[2] = min(widths[2], 60)
    source = ctx.deployment.source or "none (the gateway's defaults; see --config)"
    lines = [f"sso-gateway selftest of {ctx.target.url}",
             f"  SP {ctx.sp_entity_id}, ACS {ctx.acs_url}, IdP {ctx.idp_entity_id}",
             f"  config {source}", ""]
    for row in [header, *rows]:
        got = row[2] if len(row[2]) <= widths[2] else row[2][: widths[2] - 1] + "…"
        lines.append(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  "
                     f"{got:<{widths[2]}}  {row[3]}")
    counts = {s: sum(r.outcome.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    lines.append("")
    lines.append(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped"
                 f" in {sum(r.seconds for r in results):.1f}s")
    if ctx.idp is not None:
        lines.append("note: the positive controls signed in a test member "
                     "(their sessions were signed out again)")
    if any(r.name == RATE_LIMIT.name and r.outcome.status == "PASS" for r in results):
        lines.append("note: this address used up its sign-in starts for the minute "
                     "(the rate-limit probe): wait a minute before signing in from here")
    return "\n".join(lines)


def failed(results: list[Result]) -> bool:
    return any(r.outcome.status == "FAIL" for r in results)
