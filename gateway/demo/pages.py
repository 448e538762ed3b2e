"""Reading: the issue list, issue pages, public pages and search.

The gateway already decides who may open which path; the reader checks again
against the verified token (defence in depth), so a reader reached directly
never serves a member-only page to an anonymous request.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from gateway.demo.content import (
    ISSUES,
    MEMBER,
    REGISTERED,
    Page,
    issue_page,
    public_page,
    public_pages,
)
from gateway.demo.search import can_read, search
from gateway.demo.web import error, json_answer, render, viewer

MAX_QUERY = 200


async def index(request: Request) -> Response:
    who = viewer(request)
    issues = [(issue, can_read(who, issue.access)) for issue in ISSUES.values()]
    return render(request, "index.html", title="The Member Magazine", issues=issues,
                  public=public_pages(), MEMBER=MEMBER, REGISTERED=REGISTERED)


async def issue_start(request: Request) -> Response:
    slug = request.path_params["issue"]
    if slug not in ISSUES:
        return error(request, 404, "Not found", "There is no issue at this address.")
    return RedirectResponse(f"/issues/{slug}/pages/1", status_code=303)


def refuse(request: Request, page: Page) -> Response | None:
    """The answer for a viewer who may not read ``page``, or ``None`` if they may."""
    who = viewer(request)
    if can_read(who, page.access):
        return None
    if who is None:
        what = "the free issue" if page.access == REGISTERED else "this issue"
        return error(request, 401, "Please sign in", f"Sign in to read {what}.")
    return error(request, 403, "For active members",
                 "This issue is for members with an active membership.")


def render_page(request: Request, page: Page, *, status: int = 200, note_text: str = "",
                note_error: str | None = None) -> Response:
    """An issue or public page, with its page list and the member's note form."""
    issue = page.issue
    numbers = range(1, issue.pages + 1) if issue else range(0)
    saved = request.query_params.get("note") == "saved" and note_error is None
    return render(request, "page.html", status, title=page.title, page=page, issue=issue,
                  numbers=numbers, saved=saved, note_text=note_text, note_error=note_error)


async def reading_page(request: Request) -> Response:
    page = issue_page(request.path_params["issue"], request.path_params["number"])
    if page is None:
        return error(request, 404, "Not found", "There is no such page in this issue.")
    return refuse(request, page) or render_page(request, page)


async def public(request: Request) -> Response:
    page = public_page(request.path_params["name"])
    if page is None:
        return error(request, 404, "Not found", "There is no public page at this address.")
    return render_page(request, page)


def _query(request: Request) -> str:
    return " ".join(request.query_params.get("q", "").split())[:MAX_QUERY]


async def search_page(request: Request) -> Response:
    query = _query(request)
    hits, count = search(query, viewer(request)) if query else ([], 0)
    return render(request, "search.html", title="Search", query=query, hits=hits, count=count)


async def search_json(request: Request) -> Response:
    query = _query(request)
    hits, count = search(query, viewer(request))
    return json_answer({"query": query, "count": count, "results": [h.to_json() for h in hits]})
