"""Edge probes: smuggled identity headers, path-encoding bypasses, open redirects.

Identity headers (the deployment's own names: ``--config``, else the defaults) are sent
without a session, so whatever the gateway answers, a 200 on a gated path means the
headers were believed. Paths are sent byte for byte: each is a
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
from gateway.selftest.deployment import FRONT_PROXY_HEADERS
from gateway.selftest.flow import Context, Outcome, describe, login_with
from gateway.selftest.forward_auth import forward_auth, forward_auth_names

_IDP_LINK = re.compile(r'href="(/saml/login\?[^"]*idp=[^"]*)"')
SPOOFED_MEMBER = "M1001"
EVIL_PATHS = ("/a/%2e%2e/x", "/a%2fb", "//x", "/x;y=1", "/%c0%ae%c0%ae/")
EVIL_NEXTS = ("//evil.example", "/%5Cevil.example", "https:evil.example", "/%09/evil.example")


@dataclass(frozen=True)
class Probe:
    name: str
    expected: str
    check: Callable[[Context], Outcome]
    needs_idp_key: bool = False


def spelled(header: str, underscores: bool) -> str:
    """``X-Member-Id`` or, as some servers read it too, ``X_Member_Id``."""
    return header.replace("-", "_") if underscores else header


def _identity(ctx: Context, underscores: bool) -> list[tuple[str, str]]:
    """The deployment's identity headers, forged: Alice's number, active, a member."""
    headers = ctx.deployment.headers
    values = {"subject": SPOOFED_MEMBER, "status": "active",
              "entitlements": "urn:mace:example.org:entitlement:member"}
    forged = [(spelled(headers[name], underscores), value) for name, value in values.items()
              if headers.get(name)]
    return [*forged, (spelled(ctx.deployment.token_header, underscores), "spoofed")]


def _subject_header(ctx: Context, underscores: bool) -> str:
    return spelled(ctx.deployment.headers.get("subject") or "X-Member-Id", underscores)


def _forward_auth(underscores: bool) -> Callable[[Context], Outcome]:
    def check(ctx: Context) -> Outcome:
        names = forward_auth_names(ctx) or FRONT_PROXY_HEADERS["nginx"]
        answer = forward_auth(ctx.browser(), ctx, names, "GET", ctx.gated_path,
                              _identity(ctx, underscores))
        return Outcome("FAIL" if answer.status == 200 else "PASS", describe(answer))
    return check


def _gated_page(extra: Callable[[Context], list[tuple[str, str]]],
                underscores: bool) -> Callable[[Context], Outcome]:
    def check(ctx: Context) -> Outcome:
        plain = ctx.browser().get(ctx.gated_path)
        if plain.status == 200:
            return Outcome("SKIP", f"{ctx.gated_path} is served anonymously: "
                                   "choose a gated one with --gated-path")
        answer = ctx.browser().get(ctx.gated_path, [*_identity(ctx, underscores), *extra(ctx)])
        return Outcome("FAIL" if answer.status == 200 else "PASS", describe(answer))
    return check


def _twice_and_in_connection(ctx: Context) -> list[tuple[str, str]]:
    subject = _subject_header(ctx, False)
    status = ctx.deployment.headers.get("status") or "X-Member-Status"
    return [(subject, "M1002"), ("Connection", f"{subject}, {status}")]


def _lower_case(ctx: Context) -> list[tuple[str, str]]:
    return [(_subject_header(ctx, False).lower(), SPOOFED_MEMBER)]


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


def identity_probes(ctx: Context) -> list[Probe]:
    """The spoofed-identity probes, named with the deployment's header names."""
    dashes, underscores = _subject_header(ctx, False), _subject_header(ctx, True)
    return [
        Probe(f"spoofed {dashes} at /auth/check", "not 200", _forward_auth(False)),
        Probe(f"spoofed {underscores} at /auth/check", "not 200", _forward_auth(True)),
        Probe(f"spoofed {dashes} (twice, in Connection) on a gated page", "not 200",
              _gated_page(_twice_and_in_connection, False)),
        Probe(f"spoofed {underscores}, {dashes.lower()} on a gated page", "not 200",
              _gated_page(_lower_case, True)),
    ]


def probes(ctx: Context) -> list[Probe]:
    """Every edge probe, for the deployment in ``ctx``."""
    return [
        *identity_probes(ctx),
        *(Probe(f"path GET {path}", "400", _raw_path(path)) for path in EVIL_PATHS),
        *(Probe(f"open redirect next={raw}", "next=/, lands on /", _open_redirect(raw))
          for raw in EVIL_NEXTS),
    ]
