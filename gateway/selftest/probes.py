"""Edge probes: smuggled identity headers, path-encoding bypasses, open redirects.

Identity headers are sent without a session, so whatever the gateway answers, a 200 on
a gated path means the headers were believed. Paths are sent byte for byte: each is a
spelling that two parsers could read two ways, and the gateway must refuse it (400)
rather than decide on one reading and forward another. Open redirects: the sign-in page
must carry only ``next=/`` onward, and (with ``--idp-key``) a completed login must land
on ``/``.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from gateway.devidp.response import new_id
from gateway.selftest.flow import Context, Outcome, describe, login_with

_IDP_LINK = re.compile(r'href="(/saml/login\?[^"]*idp=[^"]*)"')
SPOOFED_MEMBER = "M1001"
EVIL_PATHS = ("/a/%2e%2e/x", "/a%2fb", "//x", "/x;y=1", "/%c0%ae%c0%ae/")
EVIL_NEXTS = ("//evil.example", "/%5Cevil.example", "https:evil.example", "/%09/evil.example")


@dataclass(frozen=True)
class Probe:
    name: str
    expected: str
    check: Callable[[Context], Outcome]


def _identity(spelling: str) -> list[tuple[str, str]]:
    prefix = spelling[:-2]  # "X-Member-" or "X_Member_"
    return [(spelling, SPOOFED_MEMBER), (prefix + "Status", "active"),
            (prefix + "Entitlements", "urn:mace:example.org:entitlement:member"),
            ("X-Gateway-Identity", "spoofed")]


def _forward_auth(spelling: str) -> Callable[[Context], Outcome]:
    def check(ctx: Context) -> Outcome:
        answer = ctx.browser().get("/auth/check", [("X-Original-URI", ctx.gated_path),
                                                   ("X-Forwarded-Method", "GET"),
                                                   *_identity(spelling)])
        return Outcome("FAIL" if answer.status == 200 else "PASS", describe(answer))
    return check


def _gated_page(headers: list[tuple[str, str]]) -> Callable[[Context], Outcome]:
    def check(ctx: Context) -> Outcome:
        plain = ctx.browser().get(ctx.gated_path)
        if plain.status == 200:
            return Outcome("SKIP", f"{ctx.gated_path} is served anonymously: "
                                   "choose a gated one with --gated-path")
        answer = ctx.browser().get(ctx.gated_path, headers)
        return Outcome("FAIL" if answer.status == 200 else "PASS", describe(answer))
    return check


def _raw_path(path: str) -> Callable[[Context], Outcome]:
    def check(ctx: Context) -> Outcome:
        answer = ctx.browser().get(path)
        return Outcome("PASS" if answer.status == 400 else "FAIL", describe(answer))
    return check


def _open_redirect(raw_next: str) -> Callable[[Context], Outcome]:
    def check(ctx: Context) -> Outcome:
        page = ctx.browser().get(f"/saml/login?next={raw_next}")
        seen: list[str] = []
        if page.status == 200:
            links = [html.unescape(href) for href in _IDP_LINK.findall(page.text)]
            nexts = sorted({parse_qs(urlsplit(link).query).get("next", [""])[0]
                            for link in links})
            if nexts != ["/"]:
                return Outcome("FAIL", f"sign-in links carry next={nexts!r}")
            seen.append("sign-in links: next=/")
        elif page.status != 302:
            return Outcome("FAIL", f"sign-in page answered {describe(page)}")
        if ctx.idp is None:
            if not seen:
                return Outcome("SKIP", "no sign-in page (auto-redirect): needs --idp-key")
            return Outcome("PASS", seen[0])
        ok, where = login_with(ctx, raw_next, new_id())
        if not ok:
            return Outcome("FAIL", f"the genuine login was refused: {where}")
        seen.append(f"login lands on {where}")
        return Outcome("PASS" if where == "/" else "FAIL", "; ".join(seen))
    return check


PROBES: list[Probe] = [
    Probe("spoofed X-Member-Id at /auth/check", "not 200", _forward_auth("X-Member-Id")),
    Probe("spoofed X_Member_Id at /auth/check", "not 200", _forward_auth("X_Member_Id")),
    Probe("spoofed X-Member-Id (twice, in Connection) on a gated page", "not 200",
          _gated_page([*_identity("X-Member-Id"), ("X-Member-Id", "M1002"),
                       ("Connection", "X-Member-Id, X-Member-Status")])),
    Probe("spoofed X_Member_Id, x-member-id on a gated page", "not 200",
          _gated_page([*_identity("X_Member_Id"), ("x-member-id", SPOOFED_MEMBER)])),
    *(Probe(f"path GET {path}", "400", _raw_path(path)) for path in EVIL_PATHS),
    *(Probe(f"open redirect next={raw}", "next=/, lands on /", _open_redirect(raw))
      for raw in EVIL_NEXTS),
]
