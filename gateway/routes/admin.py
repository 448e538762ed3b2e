"""``/_gateway/admin``: the admin console, guarded by the configured access rules.

Pages: overview (IdPs, configuration with secrets masked, registrations), sessions
(search by subject, revoke one or all), recent login failures with their explanation,
and the registrations CSV. Every change is a same-origin, CSRF-checked POST and is
written to the audit log with the admin's subject.

Only a member (or owner) rule written for these pages opens them: not the default rule,
not ``/**``, not a public or registered one. The console is not built (``ConfigError``,
so neither ``serve`` nor ``check`` accepts the configuration) while the rule that opens
one of its pages lets any IdP decide who is an admin
(``identities.open_to_any_idp``): it must name the IdPs trusted for it.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from gateway.answers import decision_answer, is_navigation
from gateway.audit import audit
from gateway.config import mask_url
from gateway.errors import N_, ConfigError
from gateway.explain import Failure, find_failure
from gateway.identities import open_to_any_idp
from gateway.logs import session_hash
from gateway.routes.account import describe
from gateway.routes.common import check_csrf, csrf_token, field, read_form, require_same_origin
from gateway.sessions import SessionRecord
from gateway.sessions.export import registrations_csv
from gateway.web import error_answer, render, to_response

if TYPE_CHECKING:
    from gateway.app import Gateway

ADMIN_PATH = "/_gateway/admin"
log = logging.getLogger("gateway.admin")


async def admin_guard(gw: Gateway, request: Request,
                      path: str = "") -> tuple[SessionRecord | None, Response | None]:
    """The admin's session when the configured rules allow ``path`` (default: this
    request's), else the answer to send instead."""
    target = path or request.url.path + (f"?{request.url.query}" if request.url.query else "")
    path = path or request.url.path
    cookie = gw.cookies.read(request.scope["headers"], gw.cookies.session_name)
    record, decision = await gw.authorize(path, cookie)
    accept = request.headers.get("accept", "")
    if decision.kind == "deny":
        assert record is not None
        gw.telemetry.denied(record, decision, path)
    answer = decision_answer(
        decision, record, target=target, accept=accept, sign_in_url=gw.sign_in_url,
        navigation=is_navigation(request.method, request.headers.get("sec-fetch-mode", ""),
                                 accept))
    if answer is not None:
        return None, to_response(answer)
    if decision.access not in ("member", "owner") or decision.rule == "/**" or record is None:
        # Only an explicit member rule opens admin pages: a missing, public or registered
        # rule must not hand them to every member, every registered address or everyone.
        log.info("admin page %s refused: rule %s gives access \"%s\"; admin pages need "
                 "a member or owner rule", path, decision.rule, decision.access)
        return None, to_response(error_answer(403, N_("Access denied"),
                                              N_("Admin pages need an admin rule in the "
                                                 "gateway's configuration."), accept=accept))
    return record, None


def check_rules(gw: Gateway, pages: list[str]) -> None:
    """Raise ``ConfigError`` when the rule that would open one of ``pages`` lets any IdP
    decide who is an admin (it names no IdP and no entitlement filter binds it)."""
    problems: dict[str, str] = {}
    for page in pages:
        decision = gw.policy.decide(page, None)
        if decision.access not in ("member", "owner") or decision.rule == "/**":
            continue  # admin_guard refuses these pages to everyone
        rule = next(r for r in gw.settings.rules if r.path == decision.rule)
        whom = open_to_any_idp(gw.settings, rule.require)
        if whom and rule.path not in problems:
            filtered = (", or [idp] allowed_entitlements without it and [[idps]] "
                        "allowed_entitlements with it for each trusted IdP"
                        if rule.require.entitlement else "")
            problems[rule.path] = (
                f"rule {rule.path} opens the admin console to {whom}. Name the IdPs trusted "
                f"for it: require.idp = [\"<entity ID>\", …] in the rule{filtered} "
                "(docs/access-rules.md)")
    if problems:
        raise ConfigError(list(problems.values()))


def _when(ts: float | None) -> str:
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def idp_rows(gw: Gateway) -> list[dict[str, Any]]:
    now = gw.clock()
    rows = []
    for idp in gw.registry.all():
        until = gw.telemetry.readiness.valid_until.get(idp.entity_id)
        certs = [c for c in gw.telemetry.certificates
                 if c.role == "idp" and c.entity_id == idp.entity_id]
        first = min(certs, key=lambda c: c.not_after) if certs else None
        rows.append({
            "entity_id": idp.entity_id, "name": idp.display_name, "source": str(idp.source),
            "status": "expired" if until is not None and until <= now else "loaded",
            "valid_until": _when(until) or "not set",
            "cert_expiry": _when(first.not_after) if first else "",
            "cert_days": int(first.days_left(now)) if first else None})
    return rows


def config_rows(gw: Gateway) -> list[tuple[str, str]]:
    s = gw.settings
    sp_cert = next((c for c in gw.telemetry.certificates if c.role == "sp"), None)
    rows = [("Configuration file", str(s.source)), ("Public URL", s.public_url),
            ("Listen", s.listen), ("SP entity ID", s.sp_entity_id),
            ("SP certificate expires", _when(sp_cert.not_after) if sp_cert else "unreadable"),
            ("Session store", s.store.display_url),
            ("Session secrets", f"{len(s.session_secrets())} configured (not shown)"),
            ("Session lifetime / idle", f"{s.session.lifetime} s / {s.session.idle_timeout} s"),
            ("Access rules", f"{len(s.rules)} (+ default: member)"),
            ("Trusted proxies", ", ".join(s.trusted_proxies) or "none"),
            ("Metrics", f"{s.metrics.access}"
                        + (f" from {', '.join(s.metrics.allow_from)}"
                           if s.metrics.access == "network" else "")),
            ("Logs", f"{s.logging.format or 'default'}; audit to {s.logging.audit}")]
    for up in s.upstreams:
        health = f", health {mask_url(up.health_url)}" if up.health_url else ""
        rows.append((f"Upstream {up.name}", f"{up.prefix} → {mask_url(up.url)}{health}"))
    return rows


def routes(gw: Gateway) -> list[Route]:
    async def guard(request: Request) -> Response | None:
        """None when the configured rules allow this admin path, else the answer to send."""
        return (await admin_guard(gw, request))[1]

    async def console(request: Request) -> Response:
        record, refused = await admin_guard(gw, request)
        if refused is not None:
            return refused
        assert record is not None
        query = request.query_params
        return to_response(render(
            "admin.html", title="Admin console", section="overview", idps=idp_rows(gw),
            config=config_rows(gw),
            registrations=len(await gw.stores.records.list_registrations()),
            registration_open=gw.flows.registration.open, csrf=csrf_token(gw, record),
            deleted=query.get("deleted"), sessions_ended=query.get("ended", "0")))

    async def sessions(request: Request) -> Response:
        record, refused = await admin_guard(gw, request)
        if refused is not None:
            return refused
        assert record is not None
        if request.method == "POST":
            require_same_origin(gw, request)
            form = await read_form(request)
            check_csrf(gw, record, field(form, "csrf"))
            # ``member`` is the field's old name (bookmarks, scripts): read as ``subject``.
            subject = field(form, "subject") or field(form, "member")
            # ``end``: "all", or the session tag the page shows (the logs' and CLI's
            # reference); a 16-character handle from a page served before still works.
            reference = field(form, "end").strip().lower()
            tag: str | None = None
            ended = 0
            if subject and reference == "all":
                ended = await gw.sessions.end_subject_sessions(subject, "all")
            elif subject:
                for s in await gw.sessions.sessions(subject):
                    if reference in (session_hash(s.key), s.handle):
                        tag = session_hash(s.key)
                        ended += await gw.sessions.end(s.key)
            audit("session_revoked", by=record.principal.subject, subject=subject,
                  sessions_ended=ended, scope="all" if reference == "all" else "one",
                  session=tag)
            return RedirectResponse(f"{ADMIN_PATH}/sessions?subject={quote(subject, safe='')}"
                                    f"&ended={ended}", 303)
        query = request.query_params
        subject = (query.get("subject") or query.get("member", "")).strip()[:1200]
        found = await gw.sessions.sessions(subject) if subject else []
        # One reference for a session everywhere: its tag (logs, audit log, CLI); the
        # revoke form posts it too.
        rows = [{**describe(s, record), "subject": s.principal.subject,
                 "member_id": s.principal.member_id, "name": s.principal.display_name,
                 "idp": s.principal.idp, "tag": session_hash(s.key),
                 "handle": session_hash(s.key)} for s in found]
        return to_response(render(
            "admin_sessions.html", title="Sessions", section="sessions", subject=subject,
            sessions=rows, csrf=csrf_token(gw, record),
            ended=query.get("ended")))

    async def failures(request: Request) -> Response:
        refused = await guard(request)
        if refused is not None:
            return refused
        wanted = request.query_params.get("reference", "").strip().upper()[:32]
        found: list[Failure] = list(gw.telemetry.failures)  # this process's latest
        if wanted:  # any replica's, from the store (kept 30 days)
            kept = await find_failure(gw.stores.records, wanted)
            found = [kept] if kept is not None else []
        rows = [{"when": _when(f.time), "reference": f.reference, "kind": f.kind,
                 "explanation": f"{f.summary} {f.advice}",
                 "reason": f.reason, "idp": f.idp or "not known yet", "details": f.details,
                 "request_id": f.request_id, "client_ip": f.client_ip} for f in found]
        return to_response(render("admin_failures.html", title="Login failures",
                                  section="failures", failures=rows, reference=wanted))

    async def delete_registration(request: Request) -> Response:
        """Erase every registration of one address and end its sessions (a reader's
        withdrawal that reached the admin)."""
        record, refused = await admin_guard(gw, request)
        if refused is not None:
            return refused
        assert record is not None
        require_same_origin(gw, request)
        form = await read_form(request)
        check_csrf(gw, record, field(form, "csrf"))
        erased = await gw.flows.registration.erase(field(form, "email")[:300],
                                                   by=record.principal.subject)
        return RedirectResponse(f"{ADMIN_PATH}?deleted={erased.registrations}"
                                f"&ended={erased.sessions_ended}#registrations-heading", 303)

    async def registrations(request: Request) -> Response:
        record, refused = await admin_guard(gw, request)
        if refused is not None:
            return refused
        assert record is not None
        found = await gw.stores.records.list_registrations()
        body = registrations_csv(found)
        audit("registrations_exported", by=record.principal.subject, count=len(found))
        return Response(body, media_type="text/csv; charset=utf-8", headers={
            "content-disposition": 'attachment; filename="registrations.csv"',
            "cache-control": "no-store"})

    pages = [Route(ADMIN_PATH, console),
             Route(f"{ADMIN_PATH}/sessions", sessions, methods=["GET", "POST"]),
             Route(f"{ADMIN_PATH}/failures", failures),
             Route(f"{ADMIN_PATH}/registrations.csv", registrations),
             Route(f"{ADMIN_PATH}/registrations/delete", delete_registration, methods=["POST"])]
    check_rules(gw, [page.path for page in pages])
    return pages
