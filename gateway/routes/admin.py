"""``/_gateway/admin/*``: admin endpoints, guarded by the configured access rules."""

from __future__ import annotations

import csv
import datetime as dt
import io
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from gateway.sessions.store import Registration
from gateway.web import error_answer, to_response

if TYPE_CHECKING:
    from gateway.app import Gateway


def registrations_csv(registrations: list[Registration]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["email", "registered_at", "consent"])
    for reg in registrations:
        when = dt.datetime.fromtimestamp(reg.registered_at, dt.UTC).isoformat(timespec="seconds")
        # A leading = + - @ would make a spreadsheet run the cell as a formula.
        email = "'" + reg.email if reg.email[:1] in "=+-@" else reg.email
        writer.writerow([email, when, reg.consent])
    return out.getvalue()


def routes(gw: Gateway) -> list[Route]:
    async def guard(request: Request) -> Response | None:
        """None when the configured rules allow this admin path, else the answer to send."""
        record, decision = await gw.authorize(request.url.path,
                                              request.cookies.get(gw.cookie_name))
        accept = request.headers.get("accept", "")
        if decision.kind in ("login", "register"):
            return RedirectResponse(f"/saml/login?next={request.url.path}", 302)
        if decision.kind == "deny":
            assert record is not None
            return to_response(gw.denied(record, decision, request.url.path, accept))
        if decision.access == "public" or decision.rule == "/**":
            # Only an explicit admin rule opens admin pages: a missing or public rule
            # must not hand them to every member (or everyone).
            return to_response(error_answer(403, "Access denied",
                                            "Admin pages need an admin rule in the gateway's "
                                            "configuration.", accept=accept))
        return None

    async def registrations(request: Request) -> Response:
        refused = await guard(request)
        if refused is not None:
            return refused
        body = registrations_csv(await gw.store.list_registrations())
        return Response(body, media_type="text/csv; charset=utf-8", headers={
            "content-disposition": 'attachment; filename="registrations.csv"',
            "cache-control": "no-store"})

    return [Route("/_gateway/admin/registrations.csv", registrations)]
