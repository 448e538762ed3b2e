"""From a policy decision (or a refusal) to the answer a client gets: one place for all.

``decision_answer`` is used by the hot path, forward-auth (``/auth/check``) and the admin
guard, so a sign-in redirect, a 401 and a 403 look the same wherever they come from,
and every ``next`` is URL-quoted the same way (``paths.with_next``):

* ``allow`` → ``None`` (the caller goes on);
* ``login`` / ``register`` → a 302 to the sign-in (or registration) page for a top-level
  navigation, else a 401 that names that page (HTML or JSON by ``Accept``);
* ``deny`` → a 403 page (the "membership has lapsed" page when the status failed).

Forward-auth answers a proxy rather than a browser: its 401 is JSON with the sign-in
URL in ``Location`` (nginx turns it into a redirect), its 403 is JSON with the reason
in ``X-Auth-Reason``, and its URLs are absolute (``origin``).

Answers are ``(status, headers, body)`` triples (``gateway.web.Answer``); logging and
telemetry stay with the callers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from gateway.errors import GatewayError
from gateway.paths import with_next
from gateway.policy import Decision
from gateway.sessions import SessionRecord
from gateway.web import Answer, error_answer, wants_json

REGISTER_PATH = "/_gateway/register"
SIGN_IN_TITLE = "Sign-in required"
SIGN_IN_MESSAGE = "Sign in to reach this page."
NO_STORE = (b"cache-control", b"no-store")
_JSON = (b"content-type", b"application/json")


def decision_answer(decision: Decision, record: SessionRecord | None, *, target: str,
                    accept: str, navigation: bool, sign_in_url: Callable[[str], str],
                    forward_auth: bool = False, origin: str = "") -> Answer | None:
    """The answer for a decision on ``target`` (the canonical, encoded path + query), or
    ``None`` when it is allowed.

    ``navigation``: the request is a browser's top-level page load that may be redirected
    (``is_navigation``; forward-auth: ``?mode=redirect`` on a GET/HEAD). ``sign_in_url``
    gives the login protocol's sign-in URL for a ``next`` target. ``forward_auth`` shapes
    the answer for a proxy's auth subrequest; ``origin`` prefixes the URLs it names.
    """
    if decision.kind == "allow":
        return None
    if decision.kind in ("login", "register"):
        page = (with_next(REGISTER_PATH, target) if decision.kind == "register"
                else sign_in_url(target))
        location = origin + page
        if navigation and (forward_auth or not wants_json(accept)):
            return 302, [(b"location", location.encode()), NO_STORE], b""
        if forward_auth:
            body = {"error": SIGN_IN_TITLE, "message": SIGN_IN_MESSAGE, "login": location}
            return 401, [_JSON, NO_STORE, (b"location", location.encode())], _dumps(body)
        return error_answer(401, SIGN_IN_TITLE, SIGN_IN_MESSAGE, accept=accept,
                            retry_url=location)
    if forward_auth:
        return forward_auth_refusal(decision.reason)
    lapsed = decision.failed == "status"
    return error_answer(
        403, "Your membership has lapsed" if lapsed else "Access denied",
        decision.message or decision.reason, accept=accept,
        template="lapsed.html" if lapsed else "error.html",
        display_name=record.principal.display_name if record else "", reason=decision.reason)


def forward_auth_refusal(reason: str) -> Answer:
    """Forward-auth's 403: JSON, with the reason in ``X-Auth-Reason`` for the proxy's log."""
    return 403, [_JSON, NO_STORE, (b"x-auth-reason", _header_safe(reason))], _dumps(
        {"error": "Access denied", "reason": reason})


def exception_answer(exc: GatewayError, *, accept: str, reference: str = "",
                     **context: Any) -> Answer:
    """The error page (or JSON) for a ``GatewayError``: its status, title and public
    message, with the ``reference`` that the log line of its reason carries."""
    return error_answer(exc.status, exc.title, exc.public_message, accept=accept,
                        reference=reference, **context)


def is_navigation(method: str, fetch_mode: str, accept: str) -> bool:
    """A browser's top-level page load (GET/HEAD): the only request a sign-in redirect is
    for. An image, script or XHR that followed a redirect would create a pending sign-in
    and a cookie for nothing; an API client wants the 401."""
    return method in ("GET", "HEAD") and navigable(fetch_mode, accept)


def navigable(fetch_mode: str, accept: str) -> bool:
    """A top-level browser request of any method (``Sec-Fetch-Mode`` absent or navigate,
    and not an API client)."""
    return fetch_mode in ("", "navigate") and not wants_json(accept)


def _dumps(payload: dict[str, str]) -> bytes:
    return json.dumps(payload).encode()


def _header_safe(text: str) -> bytes:
    """``text`` as a header value: printable ASCII, anything else backslash-escaped."""
    return text.encode("unicode_escape")
