"""``/auth/check`` (forward-auth for nginx, Traefik, Caddy) and the identity-token JWKS.

The front proxy asks before each request it serves, and names the original request in
headers. Which headers is configuration (``[forward_auth] front_proxy``), never a
guess: the gateway reads the method, URI and host from exactly those, refuses a request
where one is missing or repeated, and refuses one that also carries another front
proxy's spelling with a different value (a client adds headers that a proxy passes on;
only the ones the proxy sets are the proxy's word). With ``shared_secret`` only the
front proxy's subrequests are answered at all.

The upstream whose claims and token audience apply is the one that serves the checked
path; ``?upstream=NAME`` may only repeat it. Unsafe methods get the proxy path's
cross-site check, on the Origin and ``Sec-Fetch-Site`` the proxy passes on.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.answers import NO_STORE, decision_answer, forward_auth_refusal
from gateway.errors import AmbiguousPath
from gateway.paths import canonical_path, check_query
from gateway.web import to_response

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.config_schema import ForwardAuthSettings

log = logging.getLogger("gateway.forward_auth")
CACHE_UNTIL = b"x-accel-expires"

# RFC 9110 safe methods; every other method gets the cross-site check (the proxy path
# checks POST, PUT, PATCH and DELETE; a front proxy may also pass WebDAV's and others).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}")


@dataclass(frozen=True)
class Original:
    """The request the front proxy asks about, as its configured headers name it."""

    method: str
    uri: str
    host: str  # "" when the front proxy is configured to send none
    conflict: str  # why another spelling of a header disagrees, or ""


class Refusal(Exception):
    """The front proxy's subrequest cannot be answered: the reason is for the 403 body."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class OriginalHeaders:
    """Reads ``Original`` from a subrequest's headers, by the ``[forward_auth]`` settings."""

    def __init__(self, settings: ForwardAuthSettings) -> None:
        self.front_proxy = settings.front_proxy
        self.names = settings.headers
        # normalised name ("_" read as "-", lower case) → (field, configured?, spelling)
        self._fields: dict[str, tuple[int, bool, str]] = {}
        for field, others in enumerate(settings.alternatives):
            if not self.names[field]:
                continue  # no host configured: nothing for another spelling to conflict with
            for name in others:
                self._fields[_key(name)] = (field, False, name)
        for field, name in enumerate(self.names):
            if name:
                self._fields[_key(name)] = (field, True, name)
        secret = settings.shared_secret
        self._secret = secret.get_secret_value().encode() if secret is not None else None
        self._secret_key = _key(settings.shared_secret_header)

    def read(self, headers: list[tuple[bytes, bytes]]) -> Original:
        """The original request, or ``Refusal``: missing or repeated configured headers, a
        wrong shared secret, a malformed method or URI. A disagreeing other spelling is
        not refused here (``Original.conflict``): a sign-in answer grants nothing."""
        own: list[list[str]] = [[], [], []]
        others: list[list[tuple[str, str]]] = [[], [], []]
        secrets: list[bytes] = []
        for raw_name, raw_value in headers:
            key = _key(raw_name.decode("latin-1"))
            if key == self._secret_key:
                secrets.append(raw_value)
                continue
            found = self._fields.get(key)
            if found is None:
                continue
            field, configured, spelling = found
            value = raw_value.decode("latin-1").strip()
            if configured:
                own[field].append(value)
            else:
                others[field].append((spelling, value))
        if self._secret is not None and not (
                len(secrets) == 1 and hmac.compare_digest(secrets[0], self._secret)):
            raise Refusal("the front proxy's shared secret is missing or wrong")
        for field, name in enumerate(self.names):
            if not name:
                continue
            if not own[field]:
                raise Refusal(f"no {name} header (the front proxy, forward_auth.front_proxy = "
                              f"{self.front_proxy!r}, sets it on every auth subrequest)")
            if len(own[field]) > 1:
                raise Refusal(f"{name} is sent {len(own[field])} times")
        method, uri = own[0][0].upper(), own[1][0]
        host = own[2][0].lower() if self.names[2] else ""
        if not _METHOD.fullmatch(method):
            raise Refusal(f"{self.names[0]} is not an HTTP method")
        if not uri.startswith("/"):
            raise Refusal(f"{self.names[1]} is not a path")
        conflict = ""
        for field, spellings in enumerate(others):
            mine = (method, uri, host)[field]
            for spelling, value in spellings:
                if (value.upper() if field == 0 else value.lower() if field == 2
                        else value) != mine:
                    name = self.names[field]
                    conflict = f"{spelling} conflicts with {name} (the front proxy sets {name})"
        return Original(method, uri, host, conflict)


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def routes(gw: Gateway) -> list[Route]:
    original_headers = OriginalHeaders(gw.settings.forward_auth)
    hosts = gw.settings.hosts
    public_origin = gw.settings.public_url

    async def jwks(request: Request) -> Response:
        return JSONResponse(gw.upstream_identity.jwks,
                            headers={"cache-control": "public, max-age=300"})

    async def check(request: Request) -> Response:
        """The proxy passes the original request's cookie, method, URI and host; the answer
        is 200 with identity headers to copy upstream, 401 with the login URL in
        ``Location`` (or a 302 there with ``?mode=redirect``, for proxies that relay the
        answer as is), or 403 with the reason.
        """
        try:
            original = original_headers.read(request.scope["headers"])
        except Refusal as exc:
            return _refused(request.headers.get(original_headers.names[1], ""), exc.reason)
        uri = original.uri
        if original.host and original.host not in hosts:
            return _refused(uri, f"host {original.host!r} is not one this gateway serves")
        raw_path, _, query = uri.partition("?")
        try:
            path, encoded = canonical_path(raw_path.encode("latin-1"))
            check_query(query.encode("latin-1"))
        except (AmbiguousPath, UnicodeEncodeError) as exc:
            return _refused(uri, f"ambiguous path: {exc}")
        route = gw.proxy.route(path)
        if route is None or not gw.upstream_identity.knows(route.name):
            return _refused(uri, f"no upstream serves {path}")
        for named in request.query_params.getlist("upstream"):
            if named != route.name:
                return _refused(uri, f"upstream {named!r} does not serve {path} "
                                     f"(its upstream is {route.name!r})")
        cookie = gw.cookies.read(request.scope["headers"], gw.cookies.session_name)
        asked = int(time.time())  # before the store is read: see CACHE_UNTIL below
        # From the store, not memory: a front proxy may keep this answer (nginx in the
        # edge mode does), and that keeping spends the whole revocation bound.
        record, decision = await gw.authorize(path, cookie, upstream=route.name, fresh=True)
        if original.conflict and decision.kind not in ("login", "register"):
            return _refused(uri, original.conflict)
        if original.conflict:
            log.warning("forward-auth sign-in answer despite uri=%r reason=%s", uri,
                        original.conflict)
        if decision.kind == "deny":
            assert record is not None
            log.info("forward-auth denied uri=%r reason=%s", uri, decision.reason)
            gw.telemetry.denied(record, decision, path)
        method = original.method
        answer = decision_answer(
            decision, record, target=encoded + ("?" + query if query else ""),
            accept="application/json", sign_in_url=gw.sign_in_url,
            navigation=request.query_params.get("mode") == "redirect"
            and method in {"GET", "HEAD"},
            forward_auth=True, origin=public_origin)
        if answer is not None:
            return to_response(answer)
        origin = request.headers.get("origin", "")
        cross_site = method not in SAFE_METHODS and (
            request.headers.get("sec-fetch-site") == "cross-site"
            or bool(origin and origin != public_origin))
        if cross_site and decision.gated:
            return _refused(uri, f"cross-site {method} refused")
        # nginx may keep an allowed answer to the end of the second the store was read in
        # (``X-Accel-Expires: @T``: fresh while its clock shows T), so at most one second.
        headers = [NO_STORE, (CACHE_UNTIL, f"@{asked}".encode())]
        if record is not None and not cross_site:  # a cross-site write on a public path
            headers += gw.upstream_identity.headers(  # passes, but as no one
                record.key, record.principal, route.name)
        return to_response((200, headers, b""))

    return [Route("/auth/check", check), Route("/.well-known/jwks.json", jwks)]


def _refused(uri: str, reason: str) -> Response:
    log.warning("forward-auth denied uri=%r reason=%s", uri, reason)
    return to_response(forward_auth_refusal(reason))
