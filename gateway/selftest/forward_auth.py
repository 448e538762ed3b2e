"""Asking ``/auth/check`` as a front proxy would, with the headers the deployment uses.

A front proxy names the original request's method, URI and host in headers
(``[forward_auth] front_proxy``: nginx's ``X-Original-*`` or Traefik's and Caddy's
``X-Forwarded-*``). With ``--config`` the self-test uses the configured names; without,
it finds them by asking for the public path with each convention in turn (the first
that answers 200 is the deployment's). ``None`` when neither does: ``/auth/check`` is
not reachable from outside, needs the front proxy's shared secret, or the public path
is not public.
"""

from __future__ import annotations

from gateway.selftest.client import Answer, Browser
from gateway.selftest.deployment import FRONT_PROXY_HEADERS
from gateway.selftest.flow import Context

CHECK_PATH = "/auth/check"
#: Every name some front proxy gives the original URI: a client may add any of them.
URI_HEADERS = ("X-Original-URI", "X-Forwarded-Uri", "X-Original-URL")


def forward_auth(browser: Browser, ctx: Context, names: tuple[str, str, str], method: str,
                 uri: str, extra: list[tuple[str, str]] | None = None,
                 query: str = "") -> Answer:
    """``/auth/check`` for ``method uri`` on the gateway's own host, named in ``names``
    (method, URI, host; no host header when the convention has none)."""
    headers = [(names[0], method), (names[1], uri)]
    if names[2]:
        headers.append((names[2], ctx.target.netloc))
    return browser.get(CHECK_PATH + query, [*headers, *(extra or [])])


def forward_auth_names(ctx: Context) -> tuple[str, str, str] | None:
    """The deployment's forward-auth header names (configured, or found once per run)."""
    if ctx.deployment.forward_auth is not None:
        return ctx.deployment.forward_auth
    if "forward_auth" not in ctx.shared:
        found = None
        for names in dict.fromkeys(FRONT_PROXY_HEADERS.values()):
            if forward_auth(ctx.browser(), ctx, names, "GET", ctx.public_path).status == 200:
                found = names
                break
        ctx.shared["forward_auth"] = found
    names = ctx.shared["forward_auth"]
    return names if isinstance(names, tuple) else None
