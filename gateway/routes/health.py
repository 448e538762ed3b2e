"""Operations endpoints: ``/healthz`` (the process answers), ``/readyz`` (it can serve:
store, upstream health URLs, IdP metadata) and ``/metrics`` (Prometheus text format).

``/metrics`` answers clients in ``[metrics] allow_from`` (default: loopback only), or,
with ``access = "admin"``, members the rules let into ``/_gateway/admin``.

``/healthz`` and ``/readyz`` answer on any Host (probes use addresses). ``/readyz``
names the failed checks and why (the store's error text names its host and port), and
shows the configuration served (its fingerprint, since when, the last reload and its
result: ``gateway.config_state``), only to a local client, a client in ``[metrics]
allow_from``, or an admin; everyone else gets ``{"status": "unavailable"}`` with the
same 503 (or ``{"status": "ok"}``). A loopback connection that carries
``X-Forwarded-For``, ``Forwarded`` or ``X-Real-IP`` is a proxy on this host relaying
someone else (no ``trusted_proxies`` resolved it): it is not a local client.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.errors import GatewayError
from gateway.metrics import CONTENT_TYPE
from gateway.routes.admin import ADMIN_PATH, admin_guard
from gateway.telemetry import address_matcher, draining
from gateway.version import VERSION

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("gateway.health")
NO_STORE = {"cache-control": "no-store"}


def routes(gw: Gateway) -> list[Route]:
    allowed = address_matcher(gw.settings.metrics.allow_from)
    by_admin = gw.settings.metrics.access == "admin"

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"}, headers=NO_STORE)

    async def may_see_details(request: Request) -> bool:
        client = request.client.host if request.client else ""
        local = _is_loopback(client) or (allowed is not None and allowed(client))
        if local and not _relayed(request, client):
            return True
        if gw.cookies.read(request.scope["headers"], gw.cookies.session_name) is None:
            return False
        try:
            record, refused = await admin_guard(gw, request, ADMIN_PATH)
        except GatewayError:  # the store is down: no session can be checked
            return False
        return record is not None and refused is None

    async def readyz(request: Request) -> Response:
        failed = ({"shutdown": "draining"} if draining(request.scope)
                  else await gw.telemetry.readiness.failures())
        if failed:
            log.error("not ready: %s", "; ".join(f"{k}: {v}" for k, v in failed.items()))
            body: dict[str, object] = {"status": "unavailable", "version": VERSION}
            if await may_see_details(request):
                body["failed"] = failed
                body["config"] = gw.config_state.as_json()
            return JSONResponse(body, 503, headers=NO_STORE)
        ok: dict[str, object] = {"status": "ok", "version": VERSION}
        if await may_see_details(request):
            ok["config"] = gw.config_state.as_json()
        return JSONResponse(ok, headers=NO_STORE)

    async def metrics(request: Request) -> Response:
        if by_admin:
            _, refused = await admin_guard(gw, request, ADMIN_PATH)
            if refused is not None:
                return refused
        else:
            client = request.client.host if request.client else ""
            if allowed is None or not allowed(client):
                return JSONResponse({"error": "Access denied",
                                     "message": "Metrics are not served to this address."},
                                    403, headers=NO_STORE)
        gw.telemetry.refresh_state()
        gw.telemetry.metrics.state.config = (gw.config_state.sha256, gw.config_state.loaded_at)
        body = await gw.telemetry.metrics.exposition(gw.stores)
        return Response(body, headers={**NO_STORE, "content-type": CONTENT_TYPE})

    return [Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics)]


#: Headers a proxy adds when it relays someone else's request.
_RELAY_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _relayed(request: Request, client: str) -> bool:
    """A loopback connection relaying another client's request (a proxy on this host)."""
    return _is_loopback(client) and any(h in request.headers for h in _RELAY_HEADERS)
