"""The sign-in page: which IdP, remembered choice, search, and the Discovery Service.

* ``/saml/login`` without ``idp=`` lists the IdPs by display name; ``?q=`` filters the
  list on the server (every word must appear in the name or entity ID), and a small
  script filters it live when JavaScript runs. The IdP chosen last comes first, from
  the ``gw_idp`` cookie (HttpOnly, SameSite=Lax, scoped to ``/saml/``): it holds an
  entity ID and is used only when that ID is a configured IdP.
* With ``[idp] discovery_url``, the member is sent to that external discovery service
  instead (Identity Provider Discovery Service Protocol and Profile): ``entityID`` is
  our SP entity ID, ``return`` our own ``/saml/login`` URL (built from ``public_url``,
  with ``ds=1``) and ``returnIDParam=idp``. The DS sends the browser back with
  ``idp=<entity ID>``, which is then checked like any other choice; coming back
  without one (``ds=1``, no ``idp``) shows our own list rather than looping.
* An unknown ``idp=`` is a 400 page with a reference that ``sso-gateway explain`` reads.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from gateway.errors import LoginFailed, UnknownIdP
from gateway.saml import IdP
from gateway.web import error_answer, new_reference, render, to_response

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("gateway")
SEARCH_FROM = 5  # show the search box from this many IdPs on
REMEMBER_FOR = 365 * 86400


def cookie_name(gw: Gateway) -> str:
    return "__Secure-gw_idp" if gw.settings.cookie_secure else "gw_idp"


def remember(gw: Gateway, idp: IdP) -> str:
    """The Set-Cookie value that remembers ``idp`` as the last choice."""
    secure = "; Secure" if gw.settings.cookie_secure else ""
    return (f"{cookie_name(gw)}={quote(idp.entity_id, safe='')}; Path=/saml/; "
            f"Max-Age={REMEMBER_FOR}; HttpOnly; SameSite=Lax{secure}")


def remembered(gw: Gateway, request: Request) -> str:
    """The remembered entity ID, if it names a configured IdP; else ""."""
    value = unquote(request.cookies.get(cookie_name(gw), ""))[:1024]
    return value if value and value in gw.registry else ""


def matches(idp: IdP, words: list[str]) -> bool:
    name = f"{idp.display_name} {idp.entity_id}".casefold()
    return all(word in name for word in words)


def page(gw: Gateway, request: Request, next_url: str) -> Response:
    everyone = gw.registry.all()
    q = " ".join(request.query_params.get("q", "").split())[:100]
    shown = [i for i in everyone if matches(i, q.casefold().split())]
    last = remembered(gw, request)
    shown.sort(key=lambda i: i.entity_id != last)  # stable: the rest keep their order
    return to_response(render("sign_in.html", title="Sign in", next=next_url, idps=shown,
                              total=len(everyone), q=q, last=last,
                              searchable=len(everyone) >= SEARCH_FROM or bool(q)))


def discovery(gw: Gateway, next_url: str) -> Response:
    """Send the member to the configured discovery service."""
    back = f"{gw.settings.public_url}/saml/login?{urlencode({'next': next_url, 'ds': '1'})}"
    url = gw.settings.idp.discovery_url
    query = urlencode({"entityID": gw.settings.sp_entity_id, "return": back,
                       "returnIDParam": "idp"})
    response = RedirectResponse(f"{url}{'&' if '?' in url else '?'}{query}", status_code=302)
    response.headers["cache-control"] = "no-store"
    return response


def unknown_idp(gw: Gateway, request: Request, chosen: str, exc: UnknownIdP,
                next_url: str) -> Response:
    """A clear 400 for an IdP that is not configured, recorded like a failed login."""
    ref = new_reference()
    failure = LoginFailed("unknown_idp", exc.reason, {"entity_id": chosen[:200]})
    log.warning("login failed ref=%s kind=%s reason=%s", ref, failure.kind, failure.reason)
    gw.telemetry.login_failed(ref, failure)
    return to_response(error_answer(
        400, "Unknown identity provider", exc.public_message + " Please choose your "
        "organisation from the list.", accept=request.headers.get("accept", ""),
        reference=ref, retry_url=f"/saml/login?next={quote(next_url, safe='')}"))
