"""``/_gateway/language``: the pages' language switch.

``?lang=de&next=/the/page`` remembers the language in the ``gw_lang`` cookie and sends
the browser back to ``next``. A plain link, so it works without JavaScript; ``next`` must
be a local path of this site (``paths.safe_next``): anything else is refused with 400,
never followed, so the switch cannot become an open redirect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from gateway.errors import BadRequest
from gateway.paths import safe_next
from gateway.web import LANGUAGE_PATH

if TYPE_CHECKING:
    from gateway.app import Gateway



def routes(gw: Gateway) -> list[Route]:
    async def switch(request: Request) -> Response:
        lang = request.query_params.get("lang", "")
        wanted = request.query_params.get("next", "/")
        if lang not in gw.languages.offered:
            raise BadRequest(f"language switch: {lang[:20]!r} is not offered")
        target = safe_next(wanted)
        if target == "/" and wanted != "/":
            raise BadRequest(f"language switch: next {wanted[:200]!r} is not a local path")
        response = RedirectResponse(target, status_code=303)
        response.headers["cache-control"] = "no-store"
        response.headers.append("set-cookie", gw.cookies.language(lang))
        return response

    return [Route(LANGUAGE_PATH, switch, methods=["GET"])]
