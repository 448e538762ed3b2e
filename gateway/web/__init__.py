"""Rendering the gateway's own pages (Jinja2) and error answers (HTML or JSON by ``Accept``).

Used by the Starlette endpoints and the raw-ASGI hot path alike, so it deals in
status, headers and bytes rather than framework response objects.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.responses import Response
from starlette.types import Send

from gateway.logs import current_request_id

STATIC_DIR = Path(__file__).parent / "static"

_env = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.globals["request_id"] = current_request_id  # shown on error pages

# The gateway's pages load nothing but their own stylesheet.
PAGE_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy",
     b"default-src 'none'; style-src 'self'; img-src 'self'; script-src 'self'; "
     b"form-action 'self'; "
     b"frame-ancestors 'none'; base-uri 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]

Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


def render(template: str, status: int = 200, **context: Any) -> Answer:
    body = _env.get_template(template).render(**context).encode("utf-8")
    return status, [(b"content-type", b"text/html; charset=utf-8"), *PAGE_HEADERS], body


def wants_json(accept: str) -> bool:
    """JSON for API clients: ``Accept`` names JSON and does not name HTML."""
    return "application/json" in accept and "text/html" not in accept


def error_answer(status: int, title: str, message: str, *, accept: str = "",
                 reference: str = "", template: str = "error.html",
                 **context: Any) -> Answer:
    if wants_json(accept):
        payload: dict[str, Any] = {"error": title, "message": message}
        if reference:
            payload["reference"] = reference
        payload.update({k: v for k, v in context.items() if isinstance(v, str | int)})
        body = json.dumps(payload).encode()
        headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
        return status, headers, body
    return render(template, status, title=title, message=message, reference=reference,
                  code=status, **context)


def new_reference() -> str:
    """A short code users can quote; the log line with the reason carries the same code."""
    return secrets.token_hex(4).upper()


def to_response(answer: Answer) -> Response:
    status, headers, body = answer
    response = Response(body, status_code=status)
    for key, value in headers:
        response.headers.append(key.decode(), value.decode("latin-1"))
    return response


async def send_answer(send: Send, answer: Answer,
                      extra: list[tuple[bytes, bytes]] | None = None) -> None:
    """Send a whole answer over raw ASGI (the hot path has no response objects)."""
    status, headers, body = answer
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, *(extra or []),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
