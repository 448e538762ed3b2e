"""A small sample reader: an issue list and numbered issue pages.

It stands behind the gateway in the demo; the gateway decides who may see
what. Content is placeholder text written for this project.
"""

from __future__ import annotations

from html import escape
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

ISSUES = {
    "2023-03": ("March 2023: Rivers and the towns they made", 60),
    "2023-06": ("June 2023: A summer of field notes", 48),
    "2023-09": ("September 2023: Workshops, benches and tools", 52),
}

_TOPICS = ("ferry crossings", "mill races", "tide tables", "bridge tolls", "flood marks",
           "lock keepers", "river charts", "weir repairs")


def page_text(issue: str, number: int) -> str:
    """Deterministic placeholder prose for one page."""
    topic = _TOPICS[(number + len(issue)) % len(_TOPICS)]
    return (f"Page {number} of the {issue} issue looks at {topic}. Members wrote in with "
            f"their own records of {topic}, and this page gathers the most careful of them, "
            f"with a short commentary from the editors.")


def _layout(title: str, body: str, request: Request) -> HTMLResponse:
    who = request.headers.get("x-member-name")
    member = f"<p class=who>Signed in as {escape(unquote(who))}</p>" if who else ""
    return HTMLResponse(
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}"
        f"</title></head><body><header><a href=/>The Member Magazine</a>{member}</header>"
        f"<main><h1>{escape(title)}</h1>{body}</main></body></html>"
    )


async def index(request: Request) -> HTMLResponse:
    items = "".join(f"<li><a href=/issues/{i}/pages/1>{escape(t)}</a></li>"
                    for i, (t, _) in ISSUES.items())
    return _layout("The Member Magazine", f"<ul>{items}</ul>", request)


async def issue_list(request: Request) -> HTMLResponse:
    return await index(request)


async def issue_page(request: Request) -> HTMLResponse:
    issue = request.path_params["issue"]
    number = request.path_params["number"]
    if issue not in ISSUES or not 1 <= number <= ISSUES[issue][1]:
        return _layout("Page not found", "<p>There is no such page.</p>", request)
    title, pages = ISSUES[issue]
    nav = " | ".join(
        f"<a href=/issues/{issue}/pages/{n}>Page {n}</a>" for n in range(1, pages + 1)
    )
    body = f"<article><p>{escape(page_text(issue, number))}</p></article><nav>{nav}</nav>"
    return _layout(f"{title} — page {number}", body, request)


async def public_page(request: Request) -> HTMLResponse:
    return _layout("About the magazine", "<p>The magazine is written by and for members.</p>",
                   request)


def create_reader() -> Starlette:
    return Starlette(routes=[
        Route("/", index),
        Route("/issues", issue_list),
        Route("/issues/{issue}/pages/{number:int}", issue_page),
        Route("/public/{rest:path}", public_page),
    ])
