"""Finishing a sign-in: what a login protocol established becomes a session.

The protocol hands over a ``SignedIn``; the identity rules turn it into a ``Principal``
(or refuse it with ``LoginFailed``), the session manager starts the session, and the
success is logged, audited and counted.

A step-up sign-in (a rule needed a stronger or fresher authentication) names the
session it started from. It must bring back the same subject: a different person at
the IdP never silently takes over the member's session, the sign-in is refused and the
old session is left as it was. With the same subject, the new session replaces the old
one, which is ended.
"""

from __future__ import annotations

import logging

from gateway.audit import audit
from gateway.errors import LoginFailed, StoreError
from gateway.identities import IdentityRules
from gateway.logs import session_hash
from gateway.protocol import SignedIn
from gateway.sessions import SessionManager, SessionRecord, best_effort_failed
from gateway.telemetry import login_succeeded, note_idp

log = logging.getLogger("gateway.login")


class SignInFlow:
    """Turns a protocol's sign-in into a gateway session."""

    def __init__(self, rules: IdentityRules, sessions: SessionManager) -> None:
        self._rules = rules
        self._sessions = sessions

    async def complete(self, signed_in: SignedIn, user_agent: str = "",
                       client_ip: str = "", *, replaces: SessionRecord | None = None,
                       ) -> tuple[SessionRecord, str]:
        """The new session and its signed cookie value; raises ``LoginFailed`` when the
        identity rules refuse the identity, or when a step-up from ``replaces`` brought
        back another subject."""
        note_idp(signed_in.idp)  # labels this sign-in's outcome, refused or not
        principal = self._rules.principal(signed_in)
        if replaces is not None and replaces.principal.subject != principal.subject:
            raise LoginFailed(
                "step_up_subject",
                f"a step-up sign-in for {replaces.principal.subject!r} came back as "
                f"{principal.subject!r}; the session was kept and no new one started",
                {"subject": replaces.principal.subject, "asserted_subject": principal.subject})
        record, value = await self._sessions.create(principal, user_agent=user_agent,
                                                     client_ip=client_ip)
        log.info("login ok subject=%s idp=%s protocol=%s", principal.subject, principal.idp,
                 principal.protocol)
        login_succeeded(principal, record.key)  # audit, metrics, the access-log line
        if replaces is not None:
            await self._end_replaced(replaces, record, principal.authn_context)
        return record, value

    async def _end_replaced(self, old: SessionRecord, new: SessionRecord,
                            authn_context: str) -> None:
        """End the session a step-up replaced. Best effort: the browser has the new
        cookie either way, and the old session still expires on its own."""
        try:
            await self._sessions.end(old.key)
        except StoreError as exc:
            best_effort_failed("end replaced session", exc)
        audit("step_up", subject=new.principal.subject, session=session_hash(new.key),
              replaced=session_hash(old.key), authn_context=authn_context or None)
