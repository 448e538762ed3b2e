"""The registration gate: a visitor gives an e-mail address and consents, and gets a
registered-reader session (the ``registered`` access level).

Registrations are kept (address, time, consent wording) so an admin can export them.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from gateway.audit import audit
from gateway.paths import safe_next
from gateway.principal import Principal
from gateway.routes.common import field, rate_limit, read_form, require_same_origin
from gateway.sessions.store import Registration
from gateway.web import render, to_response

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("gateway.register")

CONSENT = ("I agree that the publisher stores my e-mail address to give me access to the "
           "free issue and may write to me about the magazine. I can withdraw this at any "
           "time.")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL = re.compile(rf"[A-Za-z0-9.!#$%&'*+/=?^_`{{|}}~-]{{1,64}}@{_LABEL}(?:\.{_LABEL})+")


def valid_email(value: str) -> str | None:
    """The address with its domain lower-cased, or ``None`` if it is not a plausible one."""
    value = value.strip()
    if len(value) > 254 or not _EMAIL.fullmatch(value):
        return None
    local, _, domain = value.rpartition("@")
    return f"{local}@{domain.lower()}"


def routes(gw: Gateway) -> list[Route]:
    async def register(request: Request) -> Response:
        if request.method == "GET":
            next_url = safe_next(request.query_params.get("next"))
            return page(next_url, email="", consent=False, errors={})
        require_same_origin(gw, request)
        await rate_limit(gw, request, "registrations", gw.settings.limits.registrations)
        form = await read_form(request)
        next_url = safe_next(field(form, "next"))
        typed = field(form, "email")[:300]
        consent = field(form, "consent") == "yes"
        email = valid_email(typed)
        errors = {}
        if email is None:
            errors["email"] = "Please enter a valid e-mail address, like name@example.org."
        if not consent:
            errors["consent"] = "Please tick the box to agree, or go back."
        if email is None or errors:
            return page(next_url, email=typed, consent=consent, errors=errors, status=400)
        now = gw.clock()
        await gw.store.add_registration(Registration(email=email, registered_at=now,
                                                     consent=CONSENT))
        reader_id = "R-" + hashlib.sha256(email.lower().encode()).hexdigest()[:16]
        principal = Principal(member_id=reader_id, idp="", name_id="", email=email,
                              status="registered", kind="registered", authn_instant=now)
        client = request.client.host if request.client else ""
        _, cookie = await gw.sessions.create(
            principal, user_agent=request.headers.get("user-agent", ""), client_ip=client)
        log.info("registered reader=%s", reader_id)
        audit("registration", reader_id=reader_id)
        response = RedirectResponse(next_url, status_code=303)
        response.headers["cache-control"] = "no-store"
        response.headers.append("set-cookie", gw.session_cookie_header(cookie))
        return response

    def page(next_url: str, *, email: str, consent: bool, errors: dict[str, str],
             status: int = 200) -> Response:
        return to_response(render("register.html", status, title="Read the free issue",
                                  next=next_url, email=email, consent=consent, errors=errors,
                                  consent_text=CONSENT))

    return [Route("/_gateway/register", register, methods=["GET", "POST"])]
