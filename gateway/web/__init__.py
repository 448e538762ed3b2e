"""Rendering the gateway's own pages (Jinja2) and error answers (HTML or JSON by ``Accept``).

Used by the Starlette endpoints and the raw-ASGI hot path alike, so it deals in
status, headers and bytes rather than framework response objects.

Pages are rendered in the current request's language (``gateway.i18n``): the templates'
texts through Jinja2's i18n extension (``{% trans %}``, ``_()``), and texts that come
from the code (error titles and messages, page titles) through the ``translate`` filter,
by their English text. JSON answers stay English.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.responses import Response
from starlette.types import Send

from gateway import i18n
from gateway.logs import current_request_id

STATIC_DIR = Path(__file__).parent / "static"

_env = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
    extensions=["jinja2.ext.i18n"],
)
_env.globals["request_id"] = current_request_id  # shown on error pages
_env.policies["ext.i18n.trimmed"] = True  # {% trans %} texts with their line breaks folded
_env.install_gettext_callables(  # type: ignore[attr-defined]
    i18n.gettext, i18n.ngettext, newstyle=True)
# A text from the code, translated by its English text (``{{ title|translate }}``).
_env.filters["translate"] = i18n.gettext
LANGUAGE_PATH = "/_gateway/language"  # the language switch (``routes.language``)

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


def with_https_images(answer: Answer) -> Answer:
    """The answer with a CSP that allows images from any https origin as well (the
    sign-in page's IdP logos, which the browser loads and the gateway never fetches)."""
    status, headers, body = answer
    return status, [(key, value.replace(b"img-src 'self'", b"img-src 'self' https:")
                     if key == b"content-security-policy" else value)
                    for key, value in headers], body


def render(template: str, status: int = 200, **context: Any) -> Answer:
    """A page, in the current request's language, with a switch to the other offered ones."""
    lang = i18n.current()
    offered = i18n.offered()
    switch = [(code, i18n.native_name(code), _switch_url(code))
              for code in offered] if len(offered) > 1 else []
    body = _env.get_template(template).render(
        page_lang=lang, language_switch=switch, **context).encode("utf-8")
    headers = [(b"content-type", b"text/html; charset=utf-8"), *PAGE_HEADERS,
               (b"content-language", lang.encode("ascii"))]
    if switch:  # the page depends on the browser's languages and the switch's cookie
        headers.append((b"vary", b"Accept-Language, Cookie"))
    return status, headers, body


def _switch_url(lang: str) -> str:
    return LANGUAGE_PATH + "?" + urlencode({"lang": lang, "next": i18n.current_target()})


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
