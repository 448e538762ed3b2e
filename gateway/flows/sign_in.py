"""Finishing a sign-in: what a login protocol established becomes a session.

The protocol hands over a ``SignedIn``; the identity rules turn it into a ``Principal``
(or refuse it with ``LoginFailed``), the session manager starts the session, and the
success is logged, audited and counted.
"""

from __future__ import annotations

import logging

from gateway.identities import IdentityRules
from gateway.protocol import SignedIn
from gateway.sessions import SessionManager, SessionRecord
from gateway.telemetry import login_succeeded, note_idp

log = logging.getLogger("gateway.login")


class SignInFlow:
    """Turns a protocol's sign-in into a gateway session."""

    def __init__(self, rules: IdentityRules, sessions: SessionManager) -> None:
        self._rules = rules
        self._sessions = sessions

    async def complete(self, signed_in: SignedIn, user_agent: str = "",
                       client_ip: str = "") -> tuple[SessionRecord, str]:
        """The new session and its signed cookie value; raises ``LoginFailed`` when the
        identity rules refuse the identity."""
        note_idp(signed_in.idp)  # labels this sign-in's outcome, refused or not
        principal = self._rules.principal(signed_in)
        record, value = await self._sessions.create(principal, user_agent=user_agent,
                                                     client_ip=client_ip)
        log.info("login ok subject=%s idp=%s protocol=%s", principal.subject, principal.idp,
                 principal.protocol)
        login_succeeded(principal, record.key)  # audit, metrics, the access-log line
        return record, value
