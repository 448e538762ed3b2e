"""``/auth/check`` (forward-auth for nginx, Traefik, Caddy) and the identity-token JWKS."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.answers import NO_STORE, decision_answer, forward_auth_refusal
from gateway.errors import AmbiguousPath
from gateway.paths import canonical_path
from gateway.web import to_response

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("gateway.forward_auth")


def routes(gw: Gateway) -> list[Route]:
    async def jwks(request: Request) -> Response:
        return JSONResponse(gw.upstream_identity.jwks,
                            headers={"cache-control": "public, max-age=300"})

    async def check(request: Request) -> Response:
        """The proxy passes the original request's cookie and URI; the answer is 200 with
        identity headers to copy upstream, 401 with the login URL in ``Location`` (or a
        302 there with ``?mode=redirect``, for proxies that relay the answer as is), or
        403 with the reason.
        """
        original = (request.headers.get("x-original-uri")
                    or request.headers.get("x-forwarded-uri") or "/")
        method = request.headers.get("x-forwarded-method", "GET").upper()
        raw_path, _, query = original.partition("?")
        try:
            path, encoded = canonical_path(raw_path.encode("latin-1"))
        except (AmbiguousPath, UnicodeEncodeError) as exc:
            return _refused(original, f"ambiguous path: {exc}")
        upstream = request.query_params.get("upstream")
        route = None if upstream else gw.proxy.route(path)
        name = upstream or (route.name if route else "")
        if not gw.upstream_identity.knows(name):
            return _refused(original, f"no upstream named {name!r}")
        cookie = gw.cookies.read(request.scope["headers"], gw.cookies.session_name)
        record, decision = await gw.authorize(path, cookie)
        if decision.kind == "deny":
            assert record is not None
            log.info("forward-auth denied uri=%s reason=%s", original, decision.reason)
            gw.telemetry.denied(record, decision, path)
        answer = decision_answer(
            decision, record, target=encoded + ("?" + query if query else ""),
            accept="application/json", sign_in_url=gw.sign_in_url,
            navigation=request.query_params.get("mode") == "redirect"
            and method in {"GET", "HEAD"},
            forward_auth=True, origin=gw.settings.public_url)
        if answer is None:
            headers = [NO_STORE]
            if record is not None:
                headers += gw.upstream_identity.headers(record.key, record.principal, name)
            answer = (200, headers, b"")
        return to_response(answer)

    return [Route("/auth/check", check), Route("/.well-known/jwks.json", jwks)]


def _refused(uri: str, reason: str) -> Response:
    log.info("forward-auth denied uri=%s reason=%s", uri, reason)
    return to_response(forward_auth_refusal(reason))
