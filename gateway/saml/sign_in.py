"""The SAML sign-in page: which IdP, remembered choice, search, and the Discovery Service.

* ``/saml/login`` without ``idp=`` lists the IdPs by display name; ``?q=`` filters the
  list on the server (every word must appear in the name or entity ID), and a small
  script filters it live when JavaScript runs. The IdP chosen last comes first, from
  the remembered-IdP cookie (HttpOnly, SameSite=Lax, scoped to ``/saml/``): it holds an
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

from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from gateway.config import Settings
from gateway.cookies import Cookies
from gateway.errors import LoginFailed, UnknownIdP
from gateway.paths import with_next
from gateway.protocol import SignInServices
from gateway.saml.registry import IdP, IdPRegistry
from gateway.web import error_answer, render, to_response

LOGIN_PATH = "/saml/login"
SEARCH_FROM = 5  # show the search box from this many IdPs on


def remembered(cookies: Cookies, registry: IdPRegistry, request: Request) -> str:
    """The remembered entity ID, if it names a configured IdP; else ""."""
    value = cookies.remembered_idp(request.scope["headers"])
    return value if value and value in registry else ""


def matches(idp: IdP, words: list[str]) -> bool:
    name = f"{idp.display_name} {idp.entity_id}".casefold()
    return all(word in name for word in words)


def page(cookies: Cookies, registry: IdPRegistry, request: Request, next_url: str) -> Response:
    """The list of IdPs (filtered by ``q``), the remembered one first."""
    everyone = registry.all()
    q = " ".join(request.query_params.get("q", "").split())[:100]
    shown = [i for i in everyone if matches(i, q.casefold().split())]
    last = remembered(cookies, registry, request)
    shown.sort(key=lambda i: i.entity_id != last)  # stable: the rest keep their order
    return to_response(render("sign_in.html", title="Sign in", next=next_url, idps=shown,
                              total=len(everyone), q=q, last=last, login_path=LOGIN_PATH,
                              searchable=len(everyone) >= SEARCH_FROM or bool(q)))


def discovery(settings: Settings, next_url: str) -> Response:
    """Send the member to the configured discovery service."""
    back = f"{settings.public_url}{LOGIN_PATH}?{urlencode({'next': next_url, 'ds': '1'})}"
    url = settings.idp.discovery_url
    query = urlencode({"entityID": settings.sp_entity_id, "return": back,
                       "returnIDParam": "idp"})
    response = RedirectResponse(f"{url}{'&' if '?' in url else '?'}{query}", status_code=302)
    response.headers["cache-control"] = "no-store"
    return response


def unknown_idp(services: SignInServices, request: Request, chosen: str, exc: UnknownIdP,
                next_url: str) -> Response:
    """A clear 400 for an IdP that is not configured, recorded like a failed login."""
    reference = services.login_failed(
        LoginFailed("unknown_idp", exc.reason, {"entity_id": chosen[:200]}))
    return to_response(error_answer(
        exc.status, "Unknown identity provider",
        exc.public_message + " Please choose your organisation from the list.",
        accept=request.headers.get("accept", ""), reference=reference,
        retry_url=with_next(LOGIN_PATH, next_url)))
