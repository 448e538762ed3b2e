"""Ending sessions on a member's or an IdP's word.

* A member signs out: the session ends here first (whatever happens next, this site is
  signed out), then the protocol that made the sign-in is asked for the IdP's leg (a
  URL to send the browser to, or nothing).
* An IdP says a user signed out (e.g. a SAML LogoutRequest): the sessions with the
  protocol's logout handle that the message covers end.

Every session ends through ``SessionManager``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from gateway.audit import audit
from gateway.logs import session_hash
from gateway.principal import Principal
from gateway.protocol import LoginProtocol
from gateway.sessions import SessionManager, SessionRecord

log = logging.getLogger("gateway")


class SignOutFlow:
    """Sign-out at the gateway, and logout at an IdP's request."""

    def __init__(self, sessions: SessionManager, protocols: Sequence[LoginProtocol]) -> None:
        self._sessions = sessions
        self._protocols = tuple(protocols)

    def protocol_of(self, principal: Principal) -> LoginProtocol | None:
        """The protocol that signed ``principal`` in (``None`` for a registered reader)."""
        return next((p for p in self._protocols if p.owns(principal)), None)

    def logout_origin(self, principal: Principal) -> str | None:
        """The origin a sign-out of ``principal`` may redirect to (the IdP's logout)."""
        protocol = self.protocol_of(principal)
        return protocol.logout_origin(principal) if protocol is not None else None

    async def sign_out(self, record: SessionRecord) -> str | None:
        """End the session; returns the URL that ends the IdP's session too, if any."""
        principal = record.principal
        await self._sessions.end(record.key)
        audit("logout", subject=principal.subject, member_id=principal.member_id or None,
              session=session_hash(record.key), idp=principal.idp or None)
        protocol = self.protocol_of(principal)
        if protocol is None:
            return None
        url = await protocol.start_logout(principal)
        if url is not None:
            audit("slo_out", idp=principal.idp, subject=principal.subject,
                  member_id=principal.member_id or None, result="sent")
            log.info("logout subject=%s sent to IdP %s", principal.subject, principal.idp)
        return url

    async def idp_logout(self, logout_handle: str, ends: Callable[[Principal], bool],
                         idp: str) -> int:
        """End the sessions an IdP's logout names; returns how many ended."""
        ended = await self._sessions.end_for_logout(logout_handle, ends)
        log.info("IdP %s ended %d session(s) by its logout", idp, ended)
        audit("slo_in", idp=idp, sessions_ended=ended, result="logout_request")
        return ended
