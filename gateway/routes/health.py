"""Operations endpoints: ``/healthz`` (the process answers), ``/readyz`` (it can serve:
store, upstream health URLs, IdP metadata) and ``/metrics`` (Prometheus text format).

``/metrics`` answers clients in ``[metrics] allow_from`` (default: loopback only), or,
with ``access = "admin"``, members the rules let into ``/_gateway/admin``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.metrics import CONTENT_TYPE
from gateway.routes.admin import ADMIN_PATH, admin_guard
from gateway.telemetry import address_matcher

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("gateway.health")
NO_STORE = {"cache-control": "no-store"}


def routes(gw: Gateway) -> list[Route]:
    allowed = address_matcher(gw.settings.metrics.allow_from)
    by_admin = gw.settings.metrics.access == "admin"

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"}, headers=NO_STORE)

    async def readyz(request: Request) -> Response:
        failed = await gw.telemetry.readiness.failures()
        if failed:
            log.error("not ready: %s", "; ".join(f"{k}: {v}" for k, v in failed.items()))
            return JSONResponse({"status": "unavailable", "failed": failed}, 503,
                                headers=NO_STORE)
        return JSONResponse({"status": "ok"}, headers=NO_STORE)

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
        body = await gw.telemetry.metrics.exposition(gw.stores)
        return Response(body, headers={**NO_STORE, "content-type": CONTENT_TYPE})

    return [Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics)]
