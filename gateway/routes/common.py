"""What the gateway's route modules share: the current session, same-origin and CSRF
checks, rate limits, and form reading (from ``gateway.web.forms``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request

from gateway.errors import CrossSite, TooManyRequests
from gateway.rate_limits import over_limit
from gateway.sessions import KeyStore, SessionRecord
from gateway.web.forms import client_ip, field, read_form

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["check_csrf", "csrf_token", "current_session", "field", "rate_limit", "read_form",
           "require_same_origin"]

RATE_WINDOW = 60  # seconds: limits are per client and minute


async def rate_limit(keys: KeyStore, request: Request, what: str, per_minute: int) -> None:
    """Refuse a client address that did ``what`` more than ``per_minute`` times this minute."""
    client = client_ip(request) or "unknown"
    if await over_limit(keys, what, per_minute, RATE_WINDOW, client=client):
        raise TooManyRequests(f"{client} exceeded {per_minute} {what} per minute")


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
    """The request's live session (the first session cookie, as on the hot path)."""
    cookie = gateway.cookies.read(request.scope["headers"], gateway.cookies.session_name)
    return await gateway.sessions.resolve(cookie)
