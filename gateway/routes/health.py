"""``/healthz`` (the process answers) and ``/readyz`` (it can serve: the store answers)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.errors import StoreError

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("gateway.health")


def routes(gw: Gateway) -> list[Route]:
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"}, headers={"cache-control": "no-store"})

    async def readyz(request: Request) -> Response:
        try:
            await gw.store.ping()
        except StoreError as exc:
            log.error("not ready: %s", exc.reason)
            return JSONResponse({"status": "unavailable", "failed": {"store": exc.reason}}, 503,
                                headers={"cache-control": "no-store"})
        return JSONResponse({"status": "ok"}, headers={"cache-control": "no-store"})

    return [Route("/healthz", healthz), Route("/readyz", readyz)]
