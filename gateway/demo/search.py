"""Search across the pages a viewer may read.

A plain scan over the whole magazine (a few hundred pages) is fast enough for
the demo and keeps the one rule that matters obvious: pages the viewer may not
read are filtered out *before* matching, so they can never leak into results,
counts or snippets.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.demo.auth import Viewer
from gateway.demo.content import MEMBER, PUBLIC, REGISTERED, Page, all_pages

MAX_TERMS = 8
MAX_RESULTS = 50
_SNIPPET = 70  # characters either side of the first hit


def can_read(viewer: Viewer | None, access: str) -> bool:
    if access == PUBLIC:
        return True
    if viewer is None:
        return False
    if access == REGISTERED:
        return True
    return access == MEMBER and viewer.is_active_member


@dataclass(frozen=True)
class Hit:
    url: str
    title: str
    source: str  # the issue's title, or "Public pages"
    snippet: str

    def to_json(self) -> dict[str, str]:
        return {"url": self.url, "title": self.title, "source": self.source,
                "snippet": self.snippet}


def terms_of(query: str) -> list[str]:
    return [t for t in query.lower().split() if t][:MAX_TERMS]


def _snippet(body: str, term: str) -> str:
    """Some words around the first mention of ``term`` (the start of the page if none)."""
    at = max(body.lower().find(term), 0)
    start = body.rfind(" ", 0, max(at - _SNIPPET, 0)) + 1 if at > _SNIPPET else 0
    end = body.find(" ", at + len(term) + _SNIPPET)
    end = len(body) if end == -1 else end
    return ("… " if start else "") + body[start:end] + (" …" if end < len(body) else "")


def search(query: str, viewer: Viewer | None) -> tuple[list[Hit], int]:
    """Hits for pages containing every term, most mentions first; and the total count."""
    terms = terms_of(query)
    if not terms:
        return [], 0
    scored: list[tuple[int, int, Page]] = []
    for order, page in enumerate(all_pages()):
        if not can_read(viewer, page.access):
            continue
        text = page.text.lower()
        if all(t in text for t in terms):
            scored.append((-sum(text.count(t) for t in terms), order, page))
    scored.sort(key=lambda item: item[:2])
    hits = [Hit(page.path, page.title if page.issue is None else
                f"Page {page.number}: {page.title}",
                page.issue.title if page.issue else "Public pages",
                _snippet(page.body, terms[0]))
            for _, _, page in scored[:MAX_RESULTS]]
    return hits, len(scored)
