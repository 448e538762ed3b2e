"""Reading request bodies and forms with a size limit, for the gateway's own endpoints
(the gateway's routes and every login protocol's)."""

from __future__ import annotations

from urllib.parse import parse_qs

from starlette.requests import Request

from gateway.errors import BadRequest, BodyTooLarge

MAX_FORM_BYTES = 64 * 1024


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
    """A field given exactly once, else "" (a repeated field is never guessed at)."""
    values = form.get(name, [])
    return values[0] if len(values) == 1 else ""


def client_ip(request: Request) -> str:
    """The client address the server saw ("" when unknown)."""
    return request.client.host if request.client else ""
