"""``/_gateway/sessions``: a member sees their own sessions and ends one, or all."""

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
from gateway.sessions import SessionRecord
from gateway.sessions.manager import HANDLE_LENGTH
from gateway.web import render, to_response

if TYPE_CHECKING:
    from gateway.app import Gateway



def describe(record: SessionRecord, current: SessionRecord) -> dict[str, str | bool]:
    def when(ts: float) -> str:
        return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")

    return {"handle": record.key[:HANDLE_LENGTH], "device": _device(record.user_agent),
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
            return RedirectResponse("/saml/login?next=/_gateway/sessions", 302)
        if request.method == "POST":
            require_same_origin(gw, request)
            form = await read_form(request)
            check_csrf(gw, record, field(form, "csrf"))
            handle = field(form, "end")
            await gw.sessions.end_member_sessions(record.principal.member_id, handle)
            if handle in ("all", record.key[:HANDLE_LENGTH]):
                response = RedirectResponse("/saml/logout", 303)
                response.headers.append("set-cookie", gw.clear_session_cookie_header())
                return response
            return RedirectResponse("/_gateway/sessions?ended=1", 303)
        mine = await gw.store.list_sessions(record.principal.member_id)
        return to_response(render(
            "sessions.html", title="Your sessions", csrf=csrf_token(gw, record),
            sessions=[describe(s, record) for s in mine],
            ended=request.query_params.get("ended") == "1"))

    return [Route("/_gateway/sessions", sessions, methods=["GET", "POST"])]
