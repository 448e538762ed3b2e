"""Hostile-input probes that run from outside (issue 14): what a visitor with ``curl``
can try against forward-auth, the kept form, the proxy and the server.

* forward-auth (items 1 and 6): a client-added URI header beside the front proxy's, a
  cross-site write asked about on the member's cookie, and ``?upstream=OTHER`` with a
  public path, which must not mint a token for OTHER;
* the kept form (items 2 and 4): a form posted with a junk session cookie, and one
  posted cross-site, are not kept across a sign-in;
* authentication headers a content server may trust (``X-Remote-User`` & co., item 3)
  never reach the upstream: observable only where the upstream shows the request
  headers it got (``--echo-path``), else reported as not observable;
* an upstream's ``Set-Cookie`` for the gateway's own cookies (item 9): not observable
  from outside, and said so;
* the server (items 11 and 12): a 1 MB header gets 431, a cross-origin WebSocket
  upgrade 403, a second Host header 400;
* sign-in starts for an unknown IdP are rate limited (item 2): ``RATE_LIMIT`` runs last,
  since it spends the client's sign-in allowance for the minute.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable
from urllib.parse import quote

from gateway.selftest.client import Answer, Browser
from gateway.selftest.flow import CaseError, Context, Outcome, describe
from gateway.selftest.forward_auth import URI_HEADERS, forward_auth, forward_auth_names
from gateway.selftest.probes import Probe

EVIL_ORIGIN = "https://blog.example.org"
CROSS_SITE = [("Origin", EVIL_ORIGIN), ("Sec-Fetch-Site", "cross-site"),
              ("Sec-Fetch-Mode", "navigate"), ("Accept", "text/html")]
BIG_HEADER = 1024 * 1024
#: Headers an auth proxy in front of a content server sets, which that server may trust.
AUTH_HEADERS = ("X-Remote-User", "Remote-User", "X-Forwarded-User", "X-Auth-Request-User",
                "X-Auth-Request-Email", "X-Forwarded-Email", "X-Forwarded-Preferred-Username",
                "Shib-Identity-Provider", "Shib-Session-ID", "MELLON_NAME_ID",
                "X_Remote_User", "x-remote-user", "REMOTE_USER", "X-Remote-Group")
HOP = "X-Selftest-Hop"  # named in Connection: hop-by-hop, never forwarded
UNKNOWN_IDP = "https://sso-gateway-selftest.invalid/not-an-idp"
MOST_STARTS = 500  # a sign-in limit above this is not probed


def _no_forward_auth(ctx: Context) -> Outcome:
    return Outcome("SKIP", f"/auth/check does not answer 200 for the public path "
                           f"{ctx.public_path} (not reachable from outside, the front "
                           "proxy's secret, or not public: see --public-path)")


def _path_forgery(ctx: Context) -> Outcome:
    """Item 1: the front proxy names the path in its header; the client adds another
    spelling naming a public path (or the reverse). Neither may be answered 200."""
    names = forward_auth_names(ctx)
    if names is None:
        return _no_forward_auth(ctx)
    browser = ctx.browser()
    public = forward_auth(browser, ctx, names, "GET", ctx.public_path)
    gated = forward_auth(browser, ctx, names, "GET", ctx.gated_path)
    if public.status != 200:
        return _no_forward_auth(ctx)
    if gated.status == 200:
        return Outcome("SKIP", f"{ctx.gated_path} is open to anyone: see --gated-path")
    seen = []
    for other in (h for h in URI_HEADERS if h.lower() != names[1].lower()):
        for proxy_says, client_says in ((ctx.gated_path, ctx.public_path),
                                        (ctx.public_path, ctx.gated_path)):
            answer = forward_auth(browser, ctx, names, "GET", proxy_says,
                                  [(other, client_says)])
            if answer.status == 200:
                return Outcome("FAIL", f"{names[1]}: {proxy_says} with {other}: "
                                       f"{client_says} answered 200")
            seen.append(str(answer.status))
    return Outcome("PASS", f"{names[1]} beside {len(seen)} forged spellings: "
                           f"{', '.join(sorted(set(seen)))}")


def _forward_auth_cross_site(ctx: Context) -> Outcome:
    """Item 1: a cross-site POST, asked about on the member's cookie, is refused."""
    names = forward_auth_names(ctx)
    if names is None:
        return _no_forward_auth(ctx)
    member = ctx.member()
    allowed = forward_auth(member, ctx, names, "GET", ctx.gated_path)
    if allowed.status != 200:
        return Outcome("SKIP", f"the test member may not open {ctx.gated_path} "
                               f"({describe(allowed)}): see --gated-path")
    answer = forward_auth(member, ctx, names, "POST", ctx.gated_path, CROSS_SITE[:2])
    return Outcome("FAIL" if answer.status == 200 else "PASS", describe(answer))


def _token_audience(answer: Answer, header: str) -> str | None:
    """The ``aud`` of the identity token in an answer (not verified: only read)."""
    token = answer.header(header)
    if not token:
        return None
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return "unreadable"
    audience = claims.get("aud") if isinstance(claims, dict) else None
    return str(audience) if audience is not None else "none"


def _other_audience(ctx: Context) -> Outcome:
    """Item 6: ``?upstream=OTHER`` with a public path mints no token for OTHER."""
    deployment = ctx.deployment
    route = deployment.upstream_of(ctx.public_path)
    others = [name for name, _ in deployment.upstreams if name != route]
    if not deployment.upstreams:
        return Outcome("SKIP", "needs --config (the upstreams' names)")
    if not others:
        return Outcome("SKIP", "one upstream only: no other audience to ask a token for")
    names = forward_auth_names(ctx)
    if names is None:
        return _no_forward_auth(ctx)
    member = ctx.member()
    got = []
    for other in others:
        answer = forward_auth(member, ctx, names, "GET", ctx.public_path,
                              query=f"?upstream={quote(other, safe='')}")
        audience = _token_audience(answer, deployment.token_header)
        if answer.status == 200 and audience not in (None, route):
            return Outcome("FAIL", f"?upstream={other}: 200 with a token for {audience}")
        got.append(f"{other}: {answer.status}")
    return Outcome("PASS", "; ".join(got))


def kept(answer: Answer) -> bool:
    """Did the gateway keep the posted form (its replay cookie, or a sign-in leading back
    to the replay page)?"""
    location = answer.header("location") or ""
    return ("/_gateway/replay/" in location or "%2F_gateway%2Freplay%2F" in location
            or any("gw-stash" in name for name, value in answer.set_cookies() if value))


def _post_form(ctx: Context, browser: Browser, headers: list[tuple[str, str]]) -> Answer:
    return browser.post_form(ctx.gated_path, {"comment": "selftest", "amount": "1"}, headers)


def _gated(ctx: Context) -> Outcome | None:
    plain = ctx.browser().get(ctx.gated_path)
    if plain.status == 200:
        return Outcome("SKIP", f"{ctx.gated_path} is served anonymously: see --gated-path")
    return None


def _junk_cookie_form(ctx: Context) -> Outcome:
    """Item 2: a same-site form posted with a session cookie no session ever had."""
    skip = _gated(ctx)
    if skip is not None:
        return skip
    same_site = [("Origin", ctx.target.origin), ("Sec-Fetch-Site", "same-origin"),
                 ("Sec-Fetch-Mode", "navigate"), ("Accept", "text/html")]
    got = []
    for junk in ("junk", "sso-gateway-selftest." + secrets.token_urlsafe(24)):
        browser = ctx.browser()
        browser.cookies[ctx.session_cookie] = junk
        answer = _post_form(ctx, browser, same_site)
        if kept(answer) or answer.status >= 500:
            return Outcome("FAIL", f"cookie {junk[:24]!r}: {describe(answer)}"
                                   + (", form kept" if kept(answer) else ""))
        got.append(str(answer.status))
    return Outcome("PASS", f"not kept ({', '.join(got)})")


def _cross_site_form(ctx: Context) -> Outcome:
    """Item 4: a cross-site form posted with a stale (here: junk) cookie, and with the
    member's live cookie when ``--idp-key`` signs one in: refused, never kept."""
    skip = _gated(ctx)
    if skip is not None:
        return skip
    browsers = [("stale cookie", ctx.browser())]
    browsers[0][1].cookies[ctx.session_cookie] = "sso-gateway-selftest-stale"
    if ctx.idp is not None:
        browsers.append(("live session", ctx.member()))
    got = []
    for label, browser in browsers:
        answer = _post_form(ctx, browser, CROSS_SITE)
        if kept(answer) or answer.status == 200 or answer.status >= 500:
            return Outcome("FAIL", f"{label}: {describe(answer)}"
                                   + (", form kept" if kept(answer) else ""))
        got.append(f"{label}: {answer.status}")
    return Outcome("PASS", "; ".join(got) + ", not kept")


def _auth_headers_stripped(ctx: Context) -> Outcome:
    """Item 3: authentication headers of other auth proxies never reach the upstream."""
    if ctx.echo_path is None:
        return Outcome("SKIP", "not observable: needs --echo-path, a path whose answer "
                               "shows the request headers the upstream got")
    browser = ctx.member() if ctx.idp is not None else ctx.browser()
    control = "selftest-echo-" + secrets.token_hex(8)
    canaries = {name: f"selftest-{i}-{secrets.token_hex(8)}" for i, name in
                enumerate((*AUTH_HEADERS, *ctx.deployment.identity_headers, HOP))}
    headers = [("X-Selftest-Echo", control), *canaries.items(), ("Connection", HOP)]
    answer = browser.get(ctx.echo_path, headers)
    if control not in answer.text:
        return Outcome("SKIP", f"not observable: {ctx.echo_path} ({describe(answer)}) does "
                               "not show the request headers")
    passed = [name for name, value in canaries.items() if value in answer.text]
    if passed:
        return Outcome("FAIL", f"reached the upstream: {', '.join(passed)}")
    return Outcome("PASS", f"none of {len(canaries)} reached the upstream")


def _upstream_cookies(ctx: Context) -> Outcome:
    """Item 9: needs an upstream that sets the gateway's cookie names."""
    return Outcome("SKIP", "not observable from outside: needs an upstream answer that sets "
                           "the gateway's own cookies (the gateway's tests cover it)")


def _status(expected: int, head: Callable[[Context], bytes]) -> Callable[[Context], Outcome]:
    def check(ctx: Context) -> Outcome:
        status, got = ctx.target.exchange(head(ctx))
        return Outcome("PASS" if status == expected else "FAIL", got)
    return check


def _request_line(ctx: Context) -> str:
    return f"GET {ctx.public_path} HTTP/1.1\r\nHost: {ctx.target.netloc}\r\n"


def _big_header(ctx: Context) -> bytes:
    return (_request_line(ctx) + f"X-Selftest-Padding: {'a' * BIG_HEADER}\r\n"
            "Connection: close\r\n\r\n").encode("latin-1")


def _websocket(ctx: Context) -> bytes:
    key = base64.b64encode(secrets.token_bytes(16)).decode()
    return (_request_line(ctx) + "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Origin: https://sso-gateway-selftest.invalid\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


def _two_hosts(ctx: Context) -> bytes:
    return (_request_line(ctx) + "Host: sso-gateway-selftest.invalid\r\n"
            "Connection: close\r\n\r\n").encode()


def _unknown_idp_limited(ctx: Context) -> Outcome:
    """Item 2: sign-in starts naming an unknown IdP count against the client's limit."""
    limit = ctx.deployment.logins_per_minute
    if limit > MOST_STARTS:
        return Outcome("SKIP", f"[limits] logins = {limit}: too many requests to probe")
    browser = ctx.browser()
    # The window may turn over once while this runs: twice the limit always crosses it.
    for sent in range(1, 2 * limit + 3):
        answer = browser.get(f"/saml/login?idp={quote(UNKNOWN_IDP, safe='')}&next=/")
        if answer.status == 429:
            return Outcome("PASS", f"429 after {sent} (limit {limit} a minute)")
        if answer.status >= 500:
            raise CaseError(f"unknown-IdP sign-in start answered {describe(answer)}")
    hint = "" if ctx.deployment.source else " (give --config if [limits] logins is not 30)"
    return Outcome("FAIL", f"no 429 after {2 * limit + 2} unknown-IdP sign-in starts{hint}")


PROBES: list[Probe] = [
    Probe("forward-auth: client adds another URI header", "not 200", _path_forgery),
    Probe("forward-auth: cross-site POST on a member's cookie", "not 200",
          _forward_auth_cross_site, needs_idp_key=True),
    Probe("forward-auth: ?upstream=OTHER with a public path", "no token for OTHER",
          _other_audience, needs_idp_key=True),
    Probe("kept form: junk session cookie", "not kept", _junk_cookie_form),
    Probe("kept form: cross-site POST", "refused, not kept", _cross_site_form),
    Probe("upstream gets no X-Remote-User & co.", "not forwarded", _auth_headers_stripped),
    Probe("upstream Set-Cookie of the gateway's cookies", "dropped", _upstream_cookies),
    Probe("1 MB request header", "431", _status(431, _big_header)),
    Probe("cross-origin WebSocket upgrade", "403", _status(403, _websocket)),
    Probe("second Host header", "400", _status(400, _two_hosts)),
]
#: Runs after every other case: it spends the client's sign-in allowance for the minute.
RATE_LIMIT = Probe("unknown-IdP sign-in starts rate limited", "429", _unknown_idp_limited)
