"""The sample member reader that stands behind the gateway in the demo and the tests.

It trusts only the gateway's signed identity token (``X-Gateway-Identity``,
verified against the gateway's JWKS); without a valid token a request is
anonymous. Routes:

- ``/``, ``/issues``: the issue list; ``/issues/{issue}`` → its first page;
  ``/issues/{issue}/pages/{n}``: a page (member-only, or any verified reader for
  the free issue); ``/public/{name}``: open pages.
- ``/search`` (HTML, works without JS) and ``/search.json?q=`` (used by ``search.js``).
- ``/members/{member_id}/notes[/{note_id}[/delete]]``: notes, HTML and JSON.
- ``/orders/new``, ``/orders``, ``/orders/{order_id}``: back-issue orders.
- ``/static/…``: the stylesheet and scripts.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.demo import notes_views, orders_views, pages
from gateway.demo.auth import Authenticator, Csrf, JwksCache, load_secret
from gateway.demo.db import open_database
from gateway.demo.notes import NoteStore
from gateway.demo.orders import OrderStore
from gateway.demo.web import STATIC_DIR, IdentityMiddleware, ReaderState

_NOTES = "/members/{member_id}/notes"


def routes() -> list[Route | Mount]:
    return [
        Route("/", pages.index),
        Route("/issues", pages.index),
        Route("/issues/{issue}", pages.issue_start),
        Route("/issues/{issue}/pages/{number:int}", pages.reading_page),
        Route("/public/{name}", pages.public),
        Route("/search", pages.search_page),
        Route("/search.json", pages.search_json),
        Route(_NOTES, notes_views.notes_list, methods=["GET"]),
        Route(_NOTES, notes_views.note_create, methods=["POST"]),
        Route(_NOTES + "/{note_id}", notes_views.note_show, methods=["GET"]),
        Route(_NOTES + "/{note_id}", notes_views.note_edit, methods=["PUT", "POST"]),
        Route(_NOTES + "/{note_id}", notes_views.note_delete, methods=["DELETE"]),
        Route(_NOTES + "/{note_id}/delete", notes_views.note_delete, methods=["POST"]),
        Route("/orders", orders_views.order_list),
        Route("/orders/new", orders_views.order_new, methods=["GET"]),
        Route("/orders/new", orders_views.order_post, methods=["POST"]),
        Route("/orders/{order_id}", orders_views.order_show),
        Route("/favicon.ico", _favicon),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]


def create_reader(*, gateway_url: str, jwks_verify: ssl.SSLContext | bool = True,
                  data_dir: Path | None = None) -> Starlette:
    """The reader for a gateway at ``gateway_url`` (its ``public_url``: token issuer and origin).

    ``jwks_verify`` is how the JWKS fetch checks the gateway's TLS certificate;
    ``data_dir`` holds the notes/orders database and the CSRF secret (in memory and
    per instance when ``None``).
    """
    gateway_url = gateway_url.rstrip("/")
    parts = urlsplit(gateway_url)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ValueError(f"gateway_url must be an http(s) origin, not {gateway_url!r}")
    auth = Authenticator(gateway_url, JwksCache(f"{gateway_url}/.well-known/jwks.json",
                                                verify=jwks_verify))
    db = open_database(data_dir)
    app = Starlette(routes=routes(), middleware=[Middleware(IdentityMiddleware, auth=auth)])
    app.state.reader = ReaderState(auth=auth, csrf=Csrf(load_secret(data_dir)),
                                   notes=NoteStore(db), orders=OrderStore(db),
                                   gateway_origin=f"{parts.scheme}://{parts.netloc}")
    return app


async def _favicon(request: Request) -> RedirectResponse:
    """Browsers ask every page's origin for /favicon.ico; ours is an SVG."""
    return RedirectResponse("/static/favicon.svg", 301)
