"""``/_gateway/replay/{id}``: after a sign-in, resend the form that was kept across it.

Only a form posted from the gateway's own origin is ever sent again: a kept form whose
recorded origin is another site's (or unknown) is dropped with a 403, so the replay
page can never turn a cross-site POST into one from the member's own browser session.

And only to the member who posted it: a kept form records the subject of the session
that posted it, and a session of another subject gets a 403 and the form is dropped. The
stash cookie alone proves little (a sibling subdomain or an http deployment can plant
one, and a client other than a browser sets ``Origin`` freely), so without this a member
could have her own fields sent, as a cross-site request would, from another member's
session; and on a shared browser one member's form would be sent as the next.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from gateway.errors import N_
from gateway.routes.common import current_session
from gateway.web import error_answer, render, to_response

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("gateway")


def routes(gw: Gateway) -> list[Route]:
    async def replay(request: Request) -> Response:
        stash_id = request.path_params["stash_id"]
        session = await current_session(gw, request)
        if session is None:
            return RedirectResponse(gw.sign_in_url(f"/_gateway/replay/{stash_id}"), 302)
        # Only the browser that posted the form holds this cookie: another browser's
        # session cannot pick the form up, even knowing the ID.
        binding = gw.cookies.read(request.scope["headers"], gw.cookies.stash_name)
        if gw.csrf.unsign(binding) != stash_id:
            return to_response(error_answer(
                404, N_("Nothing to send"), N_("There is no kept form for this browser."),
                accept=request.headers.get("accept", "")))
        kept = await gw.stash.take(stash_id)
        if kept is None:
            return to_response(error_answer(
                404, N_("Nothing to send"), N_("The kept form was already sent, or it expired."),
                accept=request.headers.get("accept", "")))
        where = kept.target.partition("?")[0][:200]
        accept = request.headers.get("accept", "")
        if kept.origin != gw.settings.public_url:
            log.warning("refused to replay a kept form for %s: posted from origin %r",
                        where, kept.origin[:200])
            answer = error_answer(403, N_("Not sent"), N_("The kept form did not come from "
                                                          "this site, so it was not sent."),
                                  accept=accept)
        elif not kept.subject or kept.subject != session.principal.subject:
            log.warning("refused to replay a kept form for %s: kept for another member "
                        "(or an unknown one), not for session %s", where, session.handle)
            answer = error_answer(403, N_("Not sent"), N_("This form was kept for another "
                                                          "account, so it was not sent."),
                                  accept=accept)
        else:
            answer = render("replay.html", title="Sending your form", target=kept.target,
                            fields=kept.fields)
        # The form is gone either way (taken once): so is the cookie that pointed to it.
        response = to_response(answer)
        response.headers.append("set-cookie", gw.cookies.clear_stash())
        return response

    return [Route("/_gateway/replay/{stash_id}", replay)]
