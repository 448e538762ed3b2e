"""``/_gateway/sessions``: a member sees their own sessions and ends one, or all; a
registered reader can also delete their registration (``/_gateway/sessions/registration``)."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from gateway.routes.common import (
    check_csrf,
    csrf_token,
    current_session,
    field,
    read_form,
    require_same_origin,
)
from gateway.routes.sign_out import sign_out_path
from gateway.sessions import SessionRecord
from gateway.web import render, to_response

if TYPE_CHECKING:
    from gateway.app import Gateway

PATH = "/_gateway/sessions"
WITHDRAW_PATH = f"{PATH}/registration"


def describe(record: SessionRecord, current: SessionRecord) -> dict[str, str | bool]:
    """One row of a sessions table (the member's own, or the admin console's)."""
    def when(ts: float) -> str:
        return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")

    return {"handle": record.handle, "device": _device(record.user_agent),
            "ip": record.client_ip or "unknown", "started": when(record.created),
            "last_seen": when(record.last_seen), "current": record.key == current.key}


def _device(user_agent: str) -> str:
    """A short, human description; the full User-Agent says more than members want."""
    ua = user_agent.lower()
    browser = next((name for key, name in (("firefox", "Firefox"), ("edg/", "Edge"),
                                           ("chrom", "Chrome"), ("safari", "Safari"))
                    if key in ua), "A browser" if ua else "Unknown device")
    system = next((name for key, name in (("android", "Android"), ("iphone", "iPhone"),
                                          ("ipad", "iPad"), ("windows", "Windows"),
                                          ("mac os", "macOS"), ("linux", "Linux"))
                   if key in ua), "")
    return f"{browser} on {system}" if system else browser


def routes(gw: Gateway) -> list[Route]:
    async def sessions(request: Request) -> Response:
        record = await current_session(gw, request)
        if record is None:
            return RedirectResponse(gw.sign_in_url(PATH), 302)
        subject = record.principal.subject
        if request.method == "POST":
            require_same_origin(gw, request)
            form = await read_form(request)
            check_csrf(gw, record, field(form, "csrf"))
            handle = field(form, "end")
            await gw.sessions.end_subject_sessions(subject, handle)
            if handle in ("all", record.handle):
                response = RedirectResponse(sign_out_path(gw), 303)
                response.headers.append("set-cookie", gw.cookies.clear_session())
                return response
            return RedirectResponse(f"{PATH}?ended=1", 303)
        mine = await gw.sessions.sessions(subject)
        return to_response(render(
            "sessions.html", title="Your sessions", csrf=csrf_token(gw, record),
            sessions=[describe(s, record) for s in mine],
            ended=request.query_params.get("ended") == "1",
            registered=record.principal.kind == "registered", withdraw_path=WITHDRAW_PATH))

    async def withdraw(request: Request) -> Response:
        """A registered reader deletes their own registration: what the consent promises."""
        record = await current_session(gw, request)
        if record is None or record.principal.kind != "registered":
            return RedirectResponse(PATH, 303)
        require_same_origin(gw, request)
        form = await read_form(request)
        check_csrf(gw, record, field(form, "csrf"))
        await gw.flows.registration.withdraw(record)
        response = to_response(render("registration_deleted.html",
                                      title="Registration deleted"))
        response.headers.append("set-cookie", gw.cookies.clear_session())
        return response

    return [Route(PATH, sessions, methods=["GET", "POST"]),
            Route(WITHDRAW_PATH, withdraw, methods=["POST"])]
