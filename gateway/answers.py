"""From a policy decision (or a refusal) to the answer a client gets: one place for all.

``decision_answer`` is used by the hot path, forward-auth (``/auth/check``) and the admin
guard, so a sign-in redirect, a 401 and a 403 look the same wherever they come from,
and every ``next`` is URL-quoted the same way (``paths.with_next``):

* ``allow`` → ``None`` (the caller goes on);
* ``login`` / ``register`` → a 302 to the sign-in (or registration) page for a top-level
  navigation, else a 401 that names that page (HTML or JSON by ``Accept``);
* ``step_up`` → the same, to a sign-in that asks the IdP for what the rule needs (the
  authentication context classes, a fresh authentication: ``protocol.SignInOptions``);
* ``deny`` → a 403 page (the "membership has lapsed" page when the status failed).

Forward-auth answers a proxy rather than a browser: its 401 is JSON with the sign-in
URL in ``Location`` (nginx turns it into a redirect), its 403 is JSON with the reason
in ``X-Auth-Reason``, and its URLs are absolute (``origin``).

Answers are ``(status, headers, body)`` triples (``gateway.web.Answer``); logging and
telemetry stay with the callers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from gateway.errors import N_, GatewayError
from gateway.paths import with_next
from gateway.policy import Decision
from gateway.protocol import SignInOptions
from gateway.sessions import SessionRecord
from gateway.web import Answer, error_answer, wants_json

REGISTER_PATH = "/_gateway/register"
SIGN_IN_TITLE = N_("Sign-in required")
SIGN_IN_MESSAGE = N_("Sign in to reach this page.")
STEP_UP_TITLE = N_("Sign in again")
STEP_UP_MESSAGE = {
    "authn_context": N_("This page needs a stronger sign-in (for example with a second "
                        "factor). Sign in again to reach it."),
    "max_auth_age": N_("This page needs a recent sign-in. Sign in again to reach it."),
}
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
    if decision.kind in ("login", "register", "step_up"):
        location = origin + sign_in_location(decision, target, sign_in_url)
        if navigation and (forward_auth or not wants_json(accept)):
            return 302, [(b"location", location.encode()), NO_STORE], b""
        title, message = SIGN_IN_TITLE, SIGN_IN_MESSAGE
        if decision.kind == "step_up":
            title, message = STEP_UP_TITLE, STEP_UP_MESSAGE[decision.failed]
        if forward_auth:
            body = {"error": title, "message": message, "login": location}
            return 401, [_JSON, NO_STORE, (b"location", location.encode())], _dumps(body)
        return error_answer(401, title, message, accept=accept, retry_url=location)
    if forward_auth:
        return forward_auth_refusal(decision.reason)
    lapsed = decision.failed == "status"
    return error_answer(
        403, N_("Your membership has lapsed") if lapsed else N_("Access denied"),
        decision.message or decision.reason, accept=accept,
        template="lapsed.html" if lapsed else "error.html",
        display_name=record.principal.display_name if record else "", reason=decision.reason)


def sign_in_location(decision: Decision, target: str,
                     sign_in_url: Callable[[str], str]) -> str:
    """Where a ``login``, ``register`` or ``step_up`` decision sends the client to reach
    ``target``: the registration page, or the sign-in with what a step-up must ask for."""
    if decision.kind == "register":
        return with_next(REGISTER_PATH, target)
    if decision.kind == "step_up":
        options = SignInOptions(decision.authn_context, force=decision.force)
        return sign_in_url(target) + options.query()
    return sign_in_url(target)


def step_up_refusal(authn_context: Sequence[str], *, fresh: bool, accept: str,
                    reference: str = "") -> Answer:
    """The 403 when a step-up sign-in could not give what the page needs (the IdP
    refused, or signed the member in without it): it names what was missing."""
    if authn_context:
        needed = " or ".join(authn_context)
        message = (f"This page needs a sign-in with {needed}, and your identity provider "
                   "could not sign you in that way. Ask your organisation's IT support "
                   "about setting up a second factor, then try again.")
    else:
        message = N_("This page needs a fresh sign-in, and your identity provider did not "
                     "ask you to sign in again. Sign out, then try again.")
    needs = [f"authentication context {' or '.join(authn_context)}"] if authn_context else []
    if fresh:
        needs.append("a fresh authentication")
    reason = "needs " + " and ".join(needs)
    return error_answer(403, N_("A stronger sign-in is needed"), message, accept=accept,
                        reference=reference, reason=reason)


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


def passive_sign_in(target: str, sign_in_url: Callable[[str], str]) -> str:
    """The passive sign-in URL for an anonymous visitor of ``target``."""
    return sign_in_url(target) + SignInOptions(passive=True).query()


# User agents that say they are robots: a passive sign-in is for people's browsers.
_ROBOT = re.compile(r"bot\b|crawl|spider|slurp|facebookexternalhit|preview", re.IGNORECASE)


def passive_candidate(method: str, fetch_mode: str, accept: str, user_agent: str,
                      purpose: str, dest: str = "document") -> bool:
    """Whether a request may be sent on a passive sign-in: a browser's own top-level GET
    (``Sec-Fetch-Mode: navigate``, which browsers send and robots rarely do; not into a
    frame: ``Sec-Fetch-Dest``), not a prefetch (``Sec-Purpose``/``Purpose``), not an API
    client, not a self-declared robot. Everyone else just gets the public page."""
    return (method == "GET" and fetch_mode == "navigate" and dest in ("", "document")
            and not wants_json(accept) and "prefetch" not in purpose.lower()
            and _ROBOT.search(user_agent) is None)


def _dumps(payload: dict[str, str]) -> bytes:
    return json.dumps(payload).encode()


def _header_safe(text: str) -> bytes:
    """``text`` as a header value: printable ASCII, anything else backslash-escaped."""
    return text.encode("unicode_escape")
