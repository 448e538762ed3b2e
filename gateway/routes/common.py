"""Helpers the route modules share: body limits, same-origin checks, CSRF tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from starlette.requests import Request

from gateway.errors import BadRequest, BodyTooLarge, CrossSite, TooManyRequests
from gateway.sessions import SessionRecord

if TYPE_CHECKING:
    from gateway.app import Gateway

MAX_FORM_BYTES = 64 * 1024


async def rate_limit(gateway: Gateway, request: Request, what: str, per_minute: int) -> None:
    """Refuse a client address that did ``what`` more than ``per_minute`` times this minute."""
    client = request.client.host if request.client else "unknown"
    if await gateway.store.count(f"rate:{what}:{client}", 60) > per_minute:
        raise TooManyRequests(f"{client} exceeded {per_minute} {what} per minute")


async def read_limited(request: Request, limit: int) -> bytes:
    """The body, refusing more than ``limit`` bytes before reading past it."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise BodyTooLarge(f"body of {length} bytes exceeds {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_form(request: Request, limit: int = MAX_FORM_BYTES) -> dict[str, list[str]]:
    """A urlencoded form, every field as a list (so duplicates are visible)."""
    body = await read_limited(request, limit)
    if not request.headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"):
        raise BadRequest("the form is not application/x-www-form-urlencoded")
    return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)


def field(form: dict[str, list[str]], name: str) -> str:
    values = form.get(name, [])
    return values[0] if len(values) == 1 else ""


def require_same_origin(gateway: Gateway, request: Request) -> None:
    """Refuse a state-changing request that a browser sent from another site.

    ``Origin`` must be the public origin; without it, ``Sec-Fetch-Site`` must say
    same-origin. A request with neither is refused too: every browser that can
    submit our forms sends at least one of them.
    """
    origin = request.headers.get("origin")
    if origin is not None:
        if origin != gateway.settings.public_url:
            raise CrossSite(f"Origin {origin!r} is not {gateway.settings.public_url!r}")
        return
    if request.headers.get("sec-fetch-site") not in {"same-origin", "none"}:
        raise CrossSite("no Origin header and no same-origin Sec-Fetch-Site")


def csrf_token(gateway: Gateway, record: SessionRecord) -> str:
    return gateway.csrf.sign(record.key)


def check_csrf(gateway: Gateway, record: SessionRecord, token: str) -> None:
    if gateway.csrf.unsign(token) != record.key:
        raise CrossSite("the form's CSRF token does not belong to this session")


async def current_session(gateway: Gateway, request: Request) -> SessionRecord | None:
    return await gateway.sessions.resolve(request.cookies.get(gateway.cookie_name))
