"""What every reader endpoint shares: templates, security headers, the viewer, guards.

``IdentityMiddleware`` verifies the identity token once per request and leaves the
``Viewer`` (or ``None``) in the scope; handlers read it with ``viewer(request)``.
Guards return either the value the handler wants or the ``Response`` to send, so
a handler's first lines read as its access rules.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.demo.auth import TOKEN_HEADER, Authenticator, Csrf, Viewer
from gateway.demo.notes import NoteStore
from gateway.demo.orders import OrderStore, money

STATIC_DIR = Path(__file__).parent / "static"
_VIEWER = "gateway.demo.viewer"

_env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                   autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)
_env.filters["money"] = money
_env.filters["when"] = lambda ts: time.strftime("%d %B %Y, %H:%M UTC", time.gmtime(ts))

# Scripts, styles and fetches from the reader's own origin (the gateway's, seen from the
# browser) and nothing else; no inline code anywhere.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; connect-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


@dataclass(frozen=True)
class ReaderState:
    auth: Authenticator
    csrf: Csrf
    notes: NoteStore
    orders: OrderStore
    gateway_origin: str


class IdentityMiddleware:
    """Verifies the gateway's identity token (if any) before the router runs."""

    def __init__(self, app: ASGIApp, auth: Authenticator) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith("/static/"):
            token = next((v.decode("latin-1") for k, v in scope["headers"]
                          if k == TOKEN_HEADER.encode()), None)
            scope[_VIEWER] = await self.auth.viewer(token)
        await self.app(scope, receive, send)


def state(request: Request) -> ReaderState:
    reader: ReaderState = request.app.state.reader
    return reader


def viewer(request: Request) -> Viewer | None:
    found: Viewer | None = request.scope.get(_VIEWER)
    return found


def wants_json(request: Request) -> bool:
    if request.url.path.endswith(".json"):
        return True
    if request.headers.get("content-type", "").startswith("application/json"):
        return True
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


def sign_in_url(request: Request) -> str:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return "/saml/login?" + urlencode({"next": target})


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    who = viewer(request)
    body = _env.get_template(template).render(
        viewer=who, csrf=state(request).csrf.token(who) if who else "",
        path=request.url.path, sign_in_url=sign_in_url(request), **context)
    return HTMLResponse(body, status_code=status, headers=SECURITY_HEADERS)


def json_answer(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers={"cache-control": "no-store"})


def error(request: Request, status: int, title: str, message: str) -> Response:
    """An error as JSON (API clients) or as a small page with a way on."""
    if wants_json(request):
        return json_answer({"error": title, "message": message}, status)
    return render(request, "error.html", status, title=title, message=message, code=status)


def need_viewer(request: Request) -> Viewer | Response:
    who = viewer(request)
    if who is None:
        return error(request, 401, "Please sign in",
                     "This page is for signed-in readers. Sign in to continue.")
    return who


def need_member(request: Request, member_id: str | None = None) -> Viewer | Response:
    """A signed-in member; with ``member_id``, only that member (whatever the gateway said)."""
    who = need_viewer(request)
    if isinstance(who, Response):
        return who
    if not who.is_member:
        return error(request, 403, "For members only",
                     "Notes and orders are for members. Registered readers can read the "
                     "free issue.")
    if member_id is not None and member_id != who.member_id:
        return error(request, 403, "Not your notes", "You can only see and change your own notes.")
    return who


async def read_body(request: Request, who: Viewer) -> tuple[dict[str, Any], bool] | Response:
    """A state-changing request's body and whether it came as JSON, or the refusal.

    Forms must carry the CSRF token bound to the viewer's session; JSON needs
    ``Content-Type: application/json``, which a cross-site form cannot send and a
    cross-site script cannot send without a CORS preflight the reader never grants.
    Either way, a browser-sent ``Origin`` must be the gateway's.
    """
    refused = check_origin(request)
    if refused is not None:
        return refused
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            data = await request.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return error(request, 400, "Bad request", "Send a JSON object.")
        return data, True
    if kind in {"application/x-www-form-urlencoded", "multipart/form-data"}:
        form = await request.form()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        if not state(request).csrf.valid(who, fields.get("csrf")):
            return error(request, 403, "Form expired",
                         "This form has expired or did not come from this site. Go back, "
                         "reload the page and try again.")
        return fields, False
    return error(request, 415, "Unsupported content type",
                 "Send a form or JSON (Content-Type: application/json).")


def check_origin(request: Request) -> Response | None:
    """For bodiless state changes (DELETE): refuse a foreign ``Origin``."""
    origin = request.headers.get("origin")
    if origin is not None and origin != state(request).gateway_origin:
        return error(request, 403, "Request refused", "This request came from another site.")
    return None
