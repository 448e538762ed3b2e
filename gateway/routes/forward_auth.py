"""``/auth/check`` (forward-auth for nginx, Traefik, Caddy) and the identity-token JWKS."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from gateway.errors import AmbiguousPath
from gateway.paths import canonical_path

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("gateway.forward_auth")


def routes(gw: Gateway) -> list[Route]:
    async def jwks(request: Request) -> Response:
        return JSONResponse(gw.tokens.jwks, headers={"cache-control": "public, max-age=300"})

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
            return _denied(request, f"ambiguous path: {exc}")
        upstream = request.query_params.get("upstream")
        route = None if upstream else gw.proxy.route(path)
        name = upstream or (route.name if route else "")
        if name not in gw.identity_for:
            return _denied(request, f"no upstream named {name!r}")
        record, decision = await gw.authorize(path, request.cookies.get(gw.cookie_name))
        target = encoded + ("?" + query if query else "")
        headers = {"cache-control": "no-store"}
        if decision.kind in ("login", "register"):
            page = "/_gateway/register" if decision.kind == "register" else "/saml/login"
            login = f"{gw.settings.public_url}{page}?next={quote(target, safe='')}"
            if request.query_params.get("mode") == "redirect" and method in {"GET", "HEAD"}:
                return RedirectResponse(login, 302, headers=headers)
            return JSONResponse({"error": "Sign-in required", "login": login}, 401,
                                headers={**headers, "location": login})
        if decision.kind == "deny":
            return _denied(request, decision.reason)
        response = Response(status_code=200, headers=headers)
        if record is not None:
            for key, value in gw.identity_headers(record, name):
                response.headers.append(key.decode(), value.decode("ascii"))
        return response

    return [Route("/auth/check", check), Route("/.well-known/jwks.json", jwks)]


def _denied(request: Request, reason: str) -> Response:
    log.info("forward-auth denied uri=%s reason=%s",
             request.headers.get("x-original-uri") or request.headers.get("x-forwarded-uri"),
             reason)
    return JSONResponse({"error": "Access denied", "reason": reason}, 403,
                        headers={"cache-control": "no-store", "x-auth-reason": reason})
