"""The SAML sign-in page: which IdP, remembered choice, search, and the Discovery Service.

* ``/saml/login`` without ``idp=`` shows the IdPs by display name. Up to
  ``[idp] list_all_up_to`` of them it lists them all (``?q=`` filters on the server, and
  a small script filters live when JavaScript runs). With more (a federation) it never
  ships the whole list: a search form (a GET form, no script needed), the remembered
  IdP, and at most ``search_results`` matches of ``?q=`` (``saml.discovery``: names,
  keywords, domain hints, scopes, entity IDs). The IdP chosen last comes first, from
  the remembered-IdP cookie (HttpOnly, SameSite=Lax, scoped to ``/saml/``): it holds an
  entity ID and is used only when that ID is a configured IdP.
* Logos come from ``mdui:Logo`` (https URLs only, never fetched by the gateway): the
  page's CSP allows https images only when it shows one.
* With ``[idp] discovery_url``, the member is sent to that external discovery service
  instead (Identity Provider Discovery Service Protocol and Profile): ``entityID`` is
  our SP entity ID, ``return`` our own ``/saml/login`` URL (built from ``public_url``,
  with ``ds=1``) and ``returnIDParam=idp``. The DS sends the browser back with
  ``idp=<entity ID>``, which is then checked like any other choice; coming back
  without one (``ds=1``, no ``idp``) shows our own page rather than looping.
* ``/saml/discofeed``: the IdPs as Shibboleth SP's DiscoFeed JSON, for an external
  discovery service; public, cached briefly, one document per registry generation.
* An unknown ``idp=`` is a 400 page with a reference that ``sso-gateway explain`` reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from gateway.config import Settings
from gateway.cookies import Cookies
from gateway.errors import N_, LoginFailed, UnknownIdP
from gateway.paths import with_next
from gateway.protocol import SignInServices
from gateway.saml.discovery import MAX_QUERY, Catalogue
from gateway.saml.registry import IdP, IdPRegistry, Logo
from gateway.web import error_answer, render, to_response, with_https_images

LOGIN_PATH = "/saml/login"
FEED_PATH = "/saml/discofeed"
SEARCH_FROM = 5  # a short list gets the search box from this many IdPs on
LOGO_HEIGHT = 24  # pixels: logos are shown at this height, their width in proportion
FEED_MAX_AGE = 300  # seconds a client may reuse the DiscoFeed
_REFUSED = re.compile(r"q\s*=\s*0(\.0*)?\s*$")


@dataclass(frozen=True)
class Entry:
    """One IdP button: the IdP, the text the live filter looks in, and its logo."""

    idp: IdP
    text: str = ""
    logo: Logo | None = None
    logo_width: int = 0
    logo_height: int = LOGO_HEIGHT


def remembered(cookies: Cookies, registry: IdPRegistry, request: Request) -> str:
    """The remembered entity ID, if it names a configured IdP; else ""."""
    value = cookies.remembered_idp(request.scope["headers"])
    return value if value and value in registry else ""


def pick_logo(idp: IdP) -> Logo | None:
    """The logo to show: English or unlabelled first, then the one nearest our height."""
    return min(idp.ui.logos, default=None,
               key=lambda logo: (logo.lang not in ("", "en"), abs(logo.height - LOGO_HEIGHT)))


def entry(idp: IdP, text: str, logos: bool) -> Entry:
    """The button for ``idp``, with its logo scaled to ``LOGO_HEIGHT`` (when ``logos``)."""
    logo = pick_logo(idp) if logos else None
    if logo is None:
        return Entry(idp, text)
    return Entry(idp, text, logo, max(1, round(logo.width * LOGO_HEIGHT / logo.height)))


def page(settings: Settings, cookies: Cookies, registry: IdPRegistry, catalogue: Catalogue,
         request: Request, next_url: str) -> Response:
    """The sign-in page: every IdP of a short list, else a search; the remembered IdP first."""
    options = settings.idp
    q = " ".join(request.query_params.get("q", "")[:MAX_QUERY].split())
    last = remembered(cookies, registry, request)
    full = len(catalogue) <= options.list_all_up_to
    if full:
        shown = list(catalogue.search(q, len(catalogue)).idps if q else catalogue.idps)
        shown.sort(key=lambda i: i.entity_id != last)  # stable: the rest keep their order
        more, matched = 0, len(shown)
        entries = [entry(i, catalogue.text(i), options.logos) for i in shown]
    else:
        found = catalogue.search(q, options.search_results)
        try:
            chosen = [registry.get(last)] if last else []
        except UnknownIdP:  # removed by a metadata refresh a moment ago
            chosen = []
        shown = chosen + [i for i in found.idps if i.entity_id != last]
        more, matched = found.matched - len(found.idps), found.matched
        entries = [entry(i, "", options.logos) for i in shown]
    answer = render("sign_in.html", title="Sign in", next=next_url, entries=entries,
                    total=len(catalogue), q=q, last=last, login_path=LOGIN_PATH, full=full,
                    more=more, matched=matched, max_query=MAX_QUERY,
                    ds="ds" in request.query_params,  # back from the discovery service
                    registration_open=settings.registration_open,
                    searchable=not full or len(catalogue) >= SEARCH_FROM or bool(q))
    if any(e.logo for e in entries):
        answer = with_https_images(answer)
    return to_response(answer)


def takes_gzip(accept_encoding: str) -> bool:
    """Whether ``Accept-Encoding`` accepts gzip (named, or ``*``, without ``q=0``)."""
    for part in accept_encoding.lower().split(","):
        name, _, params = part.partition(";")
        if name.strip() in ("gzip", "*"):
            return _REFUSED.search(params) is None
    return False


def feed(catalogue: Catalogue, request: Request) -> Response:
    """The DiscoFeed: 304 for a current ETag, gzip when the client takes it."""
    document = catalogue.feed()
    # Public and the same for everyone (no cookies read): any origin may read it.
    headers = {"cache-control": f"public, max-age={FEED_MAX_AGE}", "etag": document.etag,
               "vary": "Accept-Encoding", "x-content-type-options": "nosniff",
               "access-control-allow-origin": "*"}
    if document.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    body = document.body
    if takes_gzip(request.headers.get("accept-encoding", "")):
        body, headers["content-encoding"] = document.gzipped, "gzip"
    return Response(body, media_type="application/json", headers=headers)


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
        exc.status, N_("Unknown identity provider"),
        N_("The identity provider you chose is not known to this site. Please choose your "
           "organisation from the list."),
        accept=request.headers.get("accept", ""), reference=reference,
        retry_url=with_next(LOGIN_PATH, next_url)))
