"""The magazine's content: issues, their numbered pages, and the public pages.

All text is placeholder prose written for this project. Issue pages are built
from a handful of sentence templates and word lists, seeded by issue and page
number, so every run (and every test) sees exactly the same words. Each issue
has its own vocabulary, which is what lets the search tests tell a member-only
hit from a public one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache

PUBLIC = "public"
REGISTERED = "registered"  # any verified visitor: a registered reader or a member
MEMBER = "member"  # an active member with the member entitlement


@dataclass(frozen=True)
class Issue:
    slug: str
    title: str
    pages: int
    access: str
    subjects: tuple[str, ...]  # the issue's own vocabulary
    blurb: str


@dataclass(frozen=True)
class Section:
    heading: str
    paragraphs: tuple[str, ...]


@dataclass(frozen=True)
class Page:
    path: str
    title: str
    access: str
    sections: tuple[Section, ...]
    issue: Issue | None = None
    number: int = 0

    @property
    def body(self) -> str:
        """The paragraphs alone, on one line (for search snippets)."""
        return " ".join(p for section in self.sections for p in section.paragraphs)

    @property
    def text(self) -> str:
        """Everything a reader sees on the page, as plain text (for search)."""
        parts = [self.title]
        for section in self.sections:
            parts.append(section.heading)
            parts.extend(section.paragraphs)
        return "\n".join(parts)


ISSUES: dict[str, Issue] = {issue.slug: issue for issue in (
    Issue("2023-03", "March 2023: Rivers and the towns they made", 60, MEMBER,
          ("weir", "ferry crossing", "mill race", "towpath", "flood mark", "lock keeper's cottage"),
          "Ferries, mills and flood marks: how water decided where the high street went."),
    Issue("2023-06", "June 2023: A summer of field notes", 48, MEMBER,
          ("hedgerow", "moth trap", "swift colony", "hay meadow", "dragonfly pond", "bat survey"),
          "Members' notebooks from a long, warm season of counting and watching."),
    Issue("2023-09", "September 2023: Workshops, benches and tools", 52, MEMBER,
          ("dovetail joint", "spokeshave", "workbench", "chisel roll", "pole lathe", "glue pot"),
          "Inside the sheds and workshops where members make and mend."),
    Issue("free-2024", "Free issue 2024: Walking the old roads", 12, REGISTERED,
          ("milestone", "drove road", "stile", "waymark", "packhorse bridge", "turnpike"),
          "A taster issue, free for anyone who registers: routes, markers and the people "
          "who keep them."),
)}

_PEOPLE = ("Edith Marlow", "Tomas Greave", "Nell Ashdown", "Rufus Penhale", "Agnes Whitby",
           "Owen Carrick", "Mabel Strand", "Jory Fenwick")
_PLACES = ("Oxley Reach", "Hollin Ford", "Market Brantham", "Sedge Cross", "Little Amwell",
           "Tarrow Bridge", "Kestle Green", "Wendle")
_SEASONS = ("spring", "summer", "autumn", "winter")
_HEADINGS = ("The {subject} at {place}", "{person} and the {subject}",
             "A short history of the {subject}", "What the {subject} tells us",
             "Notes from {place}", "Looking after the {subject}")
_SENTENCES = (
    "{person} has known the {subject} near {place} for {years} years and keeps a notebook "
    "of every change.",
    "The oldest record of the {subject} at {place} is a parish note from {year}, written in "
    "a hurried hand.",
    "Readers often ask why the {subject} matters; the short answer is that it shaped how "
    "people in {place} spent their days.",
    "This piece follows {person} through a single {season} morning beside the {subject}.",
    "Nobody agrees on who first drew the {subject} on a map, but {person} has a firm opinion.",
    "A photograph sent in by a member shows the {subject} at {place} in the {season} of {year}.",
    "If you visit, go early, take a flask, and ask at the post office in {place} for directions.",
    "What follows is a small history told through letters, receipts and one stubborn ledger.",
    "{person} measured the {subject} twice, once in {year} and again last {season}, and the "
    "numbers did not agree.",
    "The committee in {place} still meets on the first Tuesday of the month to talk about "
    "the {subject}.",
)


def _fill(template: str, rng: random.Random, issue: Issue) -> str:
    return template.format(
        subject=rng.choice(issue.subjects), person=rng.choice(_PEOPLE),
        place=rng.choice(_PLACES), season=rng.choice(_SEASONS),
        year=rng.randrange(1860, 1990), years=rng.randrange(3, 40))


def _paragraphs(rng: random.Random, issue: Issue, count: int) -> list[str]:
    """``count`` paragraphs of three sentences, no sentence pattern used twice on a page."""
    templates = rng.sample(_SENTENCES, 3 * count)
    return [" ".join(_fill(t, rng, issue) for t in templates[i:i + 3])
            for i in range(0, 3 * count, 3)]


def _heading(rng: random.Random, issue: Issue) -> str:
    text = _fill(rng.choice(_HEADINGS), rng, issue)
    return text[0].upper() + text[1:]


@cache
def issue_page(slug: str, number: int) -> Page | None:
    """Page ``number`` (1-based) of an issue, or ``None`` when there is no such page."""
    issue = ISSUES.get(slug)
    if issue is None or not 1 <= number <= issue.pages:
        return None
    rng = random.Random(f"{slug}/{number}")  # noqa: S311 - placeholder text, not security
    if number == 1:
        title = "From the editors"
        sections = [Section(title, (
            f"{issue.blurb} This issue has {issue.pages} pages; use the page list at the "
            "bottom of each page to move around.", *_paragraphs(rng, issue, 1)))]
    else:
        title = _heading(rng, issue)
        first, second, third = _paragraphs(rng, issue, 3)
        subheading = next((h for _ in range(5) if (h := _heading(rng, issue)) != title),
                          "More from our readers")
        sections = [Section(title, (first, second)), Section(subheading, (third,))]
    return Page(f"/issues/{slug}/pages/{number}", title, issue.access, tuple(sections),
                issue, number)


_PUBLIC_PAGES = {
    "about": ("About the magazine", (
        Section("Written by members, for members", (
            "The magazine is put together by a small editorial team from pieces that members "
            "send in: local histories, field notes, workshop diaries and the occasional map.",
            "Three issues a year go to members. One free issue is open to anyone who "
            "registers with an e-mail address.")),
        Section("How to read it", (
            "Sign in with your membership account to read every issue online, keep private "
            "notes on any page and order printed back issues.",)),
    )),
    "help": ("Help with reading online", (
        Section("Signing in", (
            "Choose Sign in at the top of any page. You are sent to your organisation's "
            "sign-in page and then straight back to the page you wanted.",)),
        Section("Your notes", (
            "On every page you can write a note for yourself. Only you can see your notes; "
            "you can edit or delete them at any time from the My notes page.",)),
    )),
    "membership": ("Becoming a member", (
        Section("What membership gives you", (
            "Members read every issue online, search the whole archive, keep notes and can "
            "order printed copies of back issues.",
            "If your membership has lapsed you can still sign in; renewing brings back full "
            "access the same day.")),
    )),
}


def public_page(name: str) -> Page | None:
    entry = _PUBLIC_PAGES.get(name)
    if entry is None:
        return None
    return Page(f"/public/{name}", entry[0], PUBLIC, entry[1])


def public_pages() -> list[Page]:
    return [p for name in _PUBLIC_PAGES if (p := public_page(name)) is not None]


def page_at(path: str) -> Page | None:
    """The page served at ``path`` (an issue page or a public page), if any."""
    parts = path.strip("/").split("/")
    if len(parts) == 2 and parts[0] == "public":
        return public_page(parts[1])
    if len(parts) == 4 and parts[0] == "issues" and parts[2] == "pages" and parts[3].isdigit():
        return issue_page(parts[1], int(parts[3]))
    return None


@cache
def all_pages() -> tuple[Page, ...]:
    """Every page of the magazine, public pages first."""
    pages = list(public_pages())
    for issue in ISSUES.values():
        pages.extend(p for n in range(1, issue.pages + 1) if (p := issue_page(issue.slug, n)))
    return tuple(pages)
