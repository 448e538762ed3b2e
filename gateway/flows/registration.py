"""Registration for the free issue: an e-mail address and consent give a visitor a
registered-reader session (the ``registered`` access level).

Registrations are kept (address, time, consent wording) so an admin can export them.
Each registration is its own identity: the subject is random, never derived from the
address, so one reader's address cannot be used to reach another reader's session.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.audit import audit
from gateway.principal import EMAIL, STATUS, Principal
from gateway.sessions import RecordStore, Registration, SessionManager, SessionRecord

log = logging.getLogger("gateway.register")

CONSENT = ("I agree that the publisher stores my e-mail address to give me access to the "
           "free issue and may write to me about the magazine. I can withdraw this at any "
           "time.")
#: Registered readers' subjects start with this, followed by 96 random bits: no member
#: number can be one (it never contains "!"), and an IdP-scoped subject could only be one
#: by guessing the random part.
READER_PREFIX = "reader!"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL = re.compile(rf"[A-Za-z0-9.!#$%&'*+/=?^_`{{|}}~-]{{1,64}}@{_LABEL}(?:\.{_LABEL})+")


def valid_email(value: str) -> str | None:
    """The address with its domain lower-cased, or ``None`` if it is not a plausible one."""
    value = value.strip()
    if len(value) > 254 or not _EMAIL.fullmatch(value):
        return None
    local, _, domain = value.rpartition("@")
    return f"{local}@{domain.lower()}"


@dataclass(frozen=True, slots=True)
class Registered:
    """The outcome: ``errors`` by form field, or the new session and its cookie value."""

    errors: dict[str, str] = field(default_factory=dict)
    record: SessionRecord | None = None
    cookie: str = ""


class RegistrationFlow:
    """Checks a registration, keeps it, and starts the reader's session."""

    def __init__(self, records: RecordStore, sessions: SessionManager,
                 clock: Callable[[], float]) -> None:
        self._records = records
        self._sessions = sessions
        self._clock = clock

    async def register(self, typed_email: str, consent: bool, *, user_agent: str = "",
                       client_ip: str = "") -> Registered:
        """Register a visitor; returns the errors to show, or the session."""
        email = valid_email(typed_email)
        errors: dict[str, str] = {}
        if email is None:
            errors["email"] = "Please enter a valid e-mail address, like name@example.org."
        if not consent:
            errors["consent"] = "Please tick the box to agree, or go back."
        if email is None or errors:
            return Registered(errors)
        now = self._clock()
        await self._records.add_registration(Registration(email=email, registered_at=now,
                                                          consent=CONSENT))
        principal = Principal(
            subject=READER_PREFIX + secrets.token_hex(12), idp="", kind="registered",
            authn_instant=now, attributes={EMAIL: (email,), STATUS: ("registered",)})
        record, cookie = await self._sessions.create(principal, user_agent=user_agent,
                                                     client_ip=client_ip)
        log.info("registered reader=%s", principal.subject)
        audit("registration", subject=principal.subject)
        return Registered(record=record, cookie=cookie)
