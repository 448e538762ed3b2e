"""Registration for the free issue: an e-mail address and consent give a visitor a
registered-reader session (the ``registered`` access level).

The gate is open only when a rule (or the policy default) asks for ``registered``.
Each registration is its own identity: the subject is random, never derived from the
address, so one reader's address cannot be used to reach another reader's session.
A registration keeps the address, the time, the consent wording agreed to, the
subject and when the address was confirmed; it is deleted on the reader's own word,
an admin's, or when ``[registration] retention_days`` have passed — and its sessions
end with it.

The reader's session says whether the address was confirmed (``Principal.email_verified``,
sent upstream as ``X-Member-Email-Verified``): without verification it is only typed,
and anyone can type anyone's address.

With ``[registration] verify = true`` the form only mails a one-time link: the
pending registration waits in the ``KeyStore`` under a hash of the link's random
token, for ``link_lifetime`` seconds. Taking it is atomic (``KeyStore.take``), so the
link signs its reader in once, on any replica; only then is the registration kept.

Limits, so that nothing an anonymous visitor does grows the store or floods a mailbox
without bound: at most ``[limits] registrations_total`` new registrations an hour (with
verification: requests for a link) for the whole gateway, past which the form is paused;
and at most ``verification_mails`` mails an hour to one mailbox (``mailbox_key``: a
``+tag`` or another case is the same mailbox) and ``verification_mails_total`` to
everyone. Past a mail limit the visitor sees the same "Check your inbox" as when the
mail went (the answer says nothing about the address), no mail goes and nothing waits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from gateway.audit import audit
from gateway.config import Settings
from gateway.errors import N_, MailError, StoreError
from gateway.logs import session_hash
from gateway.mail import Mailer
from gateway.principal import EMAIL, STATUS, Principal
from gateway.rate_limits import over_limit
from gateway.sessions import (
    KeyStore,
    Namespace,
    RecordStore,
    Registration,
    SessionManager,
    SessionRecord,
)

log = logging.getLogger("gateway.register")

#: Registered readers' subjects start with this, followed by 96 random bits: no member
#: number can be one (it never contains "!"), and an IdP-scoped subject could only be one
#: by guessing the random part.
READER_PREFIX = "reader!"
#: The path of the confirmation link (and of the form that uses it).
CONFIRM_PATH = "/_gateway/register/confirm"
HOUR = 3600  # seconds: the window of registrations_total and of both mail limits
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL = re.compile(rf"[A-Za-z0-9.!#$%&'*+/=?^_`{{|}}~-]{{1,64}}@{_LABEL}(?:\.{_LABEL})+")
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)


def valid_email(value: str) -> str | None:
    """The address with its domain lower-cased, or ``None`` if it is not a plausible one."""
    value = value.strip()
    if len(value) > 254 or not _EMAIL.fullmatch(value):
        return None
    local, _, domain = value.rpartition("@")
    return f"{local}@{domain.lower()}"


def mailbox_key(email: str) -> str:
    """The per-mailbox rate-limit key of an address: a hash of it without a ``+tag`` in
    its local part and in lower case, so ``Name+1@x`` and ``name@X`` count as one."""
    local, _, domain = email.rpartition("@")
    mailbox = f"{local.partition('+')[0]}@{domain}".lower()
    return hashlib.sha256(mailbox.encode()).hexdigest()[:32]


def consent_version(text: str) -> str:
    """A short fingerprint of a consent wording, for the audit log: which wording a
    registration agreed to (the store keeps the wording itself)."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Registered:
    """The outcome: ``errors`` by form field; or ``paused`` (over the gateway's
    registrations an hour: try again later); or the new session and its cookie value (no
    verification); or ``mailed`` (a confirmation link is on its way, unless a mail limit
    held it back: the visitor is not told which)."""

    errors: dict[str, str] = field(default_factory=dict)
    paused: bool = False
    record: SessionRecord | None = None
    cookie: str = ""
    mailed: bool = False


@dataclass(frozen=True, slots=True)
class Confirmed:
    """A followed confirmation link: the reader's new session, its cookie, and where the
    reader was going."""

    record: SessionRecord
    cookie: str
    next_url: str


@dataclass(frozen=True, slots=True)
class Erased:
    """What a deletion removed: registrations and the sessions that ended with them."""

    registrations: int
    sessions_ended: int


class RegistrationFlow:
    """Checks a registration, keeps it (after the mailed link, with verification),
    starts the reader's session; and deletes registrations with their sessions."""

    def __init__(self, settings: Settings, records: RecordStore, keys: KeyStore,
                 sessions: SessionManager, clock: Callable[[], float]) -> None:
        self._settings = settings
        self._config = settings.registration
        self._records = records
        self._keys = keys
        self._sessions = sessions
        self._clock = clock
        self._mailer = Mailer(settings.smtp, Path(settings.source).parent)

    @property
    def open(self) -> bool:
        """Whether visitors may register at all (a ``registered`` rule exists)."""
        return self._settings.registration_open

    @property
    def consent_text(self) -> str:
        """The wording a visitor agrees to."""
        return self._config.consent_text

    @property
    def verify(self) -> bool:
        """Whether an address is confirmed by a mailed link before it gives access."""
        return self._config.verify

    async def register(self, typed_email: str, consent: bool, *, next_url: str = "/",
                       user_agent: str = "", client_ip: str = "") -> Registered:
        """Register a visitor: the errors to show, a pause, the session, or (verification)
        a mailed link. ``MailError`` when the relay does not take the mail."""
        email = valid_email(typed_email)
        errors: dict[str, str] = {}
        if email is None:
            errors["email"] = N_("Please enter a valid e-mail address, like name@example.org.")
        if not consent:
            errors["consent"] = N_("Please tick the box to agree, or go back.")
        if email is None or errors:
            return Registered(errors)
        cap = self._settings.limits.registrations_total
        if await over_limit(self._keys, "registrations-total", cap, HOUR):
            log.warning("registration refused: over %d new registrations this hour "
                        "(registrations_total)", cap)
            return Registered(paused=True)
        subject = READER_PREFIX + secrets.token_hex(12)
        if self.verify:
            await self._mail_link(email, subject, next_url)
            return Registered(mailed=True)
        await self._records.add_registration(Registration(
            email=email, registered_at=self._clock(), consent=self.consent_text,
            subject=subject))
        record, cookie = await self._start(email, subject, user_agent, client_ip,
                                           verified=False)
        log.info("registered reader=%s", subject)
        audit("registration", subject=subject, mail_sent=False,
              consent=consent_version(self.consent_text))
        return Registered(record=record, cookie=cookie)

    async def _mail_link(self, email: str, subject: str, next_url: str) -> None:
        """Keep the pending registration under the hash of a fresh token and mail the
        token's link, within the mail limits; nothing is left behind when no mail goes."""
        limits = self._settings.limits
        if await over_limit(self._keys, "verification-mails", limits.verification_mails,
                            HOUR, client=mailbox_key(email)):
            log.warning("confirmation mail not sent: the mailbox had %d mails this hour "
                        "(verification_mails) reader=%s", limits.verification_mails, subject)
            return
        if await over_limit(self._keys, "verification-mails-total",
                            limits.verification_mails_total, HOUR):
            log.warning("confirmation mail not sent: over %d mails this hour "
                        "(verification_mails_total) reader=%s",
                        limits.verification_mails_total, subject)
            return
        token = secrets.token_urlsafe(32)
        pending = json.dumps({"email": email, "subject": subject, "next": next_url,
                              "consent": self.consent_text, "at": self._clock()})
        key = _pending_key(token)
        await self._keys.add_once(key, pending, self._config.link_lifetime)
        try:
            await self._mailer.send(email, f"Confirm your e-mail address for {self._site}",
                                    self._mail_text(token))
        except MailError:
            try:  # the link never went out: nothing may wait for it
                await self._keys.take(key)
            except StoreError as exc:
                log.warning("pending registration not removed (it expires): %s", exc.reason)
            raise
        log.info("confirmation mail sent reader=%s", subject)
        audit("registration", subject=subject, mail_sent=True,
              consent=consent_version(self.consent_text))

    @property
    def _site(self) -> str:
        return urlsplit(self._settings.public_url).hostname or self._settings.public_url

    def _mail_text(self, token: str) -> str:
        minutes = self._config.link_lifetime // 60
        link = f"{self._settings.public_url}{CONFIRM_PATH}?token={token}"
        privacy = (f"\nHow we use your address, how long we keep it and how to have it "
                   f"deleted: {self._config.privacy_url}\n" if self._config.privacy_url
                   else "")
        return (
            f"Hello,\n\n"
            f"this address was given on {self._site} to read the free issue. To confirm\n"
            f"that it is yours and start reading, open this link within {minutes} minutes:\n\n"
            f"{link}\n\n"
            f"The link works once. If it was not you, ignore this mail: without the link\n"
            f"nothing is kept, and the request is forgotten when the link expires.\n\n"
            f"You agreed to: {self.consent_text}\n"
            f"{privacy}\n"
            f"-- \n{self._site}\n")

    async def link_is_live(self, token: str) -> bool:
        """Whether a confirmation link can still be used (read only: mail scanners that
        open links do not use them up)."""
        if not _TOKEN.fullmatch(token):
            return False
        return await self._keys.get(_pending_key(token)) is not None

    async def confirm(self, token: str, *, user_agent: str = "",
                      client_ip: str = "") -> Confirmed | None:
        """Use a confirmation link: the registration is kept (confirmed) and its reader
        signed in; ``None`` when the link was used already, has expired or never was."""
        raw = await self._keys.take(_pending_key(token)) if _TOKEN.fullmatch(token) else None
        if raw is None:
            log.info("confirmation link refused: used, expired or unknown")
            return None
        pending = json.loads(raw)
        email, subject = str(pending["email"]), str(pending["subject"])
        now = self._clock()
        await self._records.add_registration(Registration(
            email=email, registered_at=float(pending["at"]), consent=str(pending["consent"]),
            subject=subject, verified_at=now))
        record, cookie = await self._start(email, subject, user_agent, client_ip,
                                           verified=True)
        log.info("address confirmed reader=%s", subject)
        audit("registration_verified", subject=subject, session=session_hash(record.key))
        return Confirmed(record, cookie, str(pending["next"]))

    async def _start(self, email: str, subject: str, user_agent: str, client_ip: str, *,
                     verified: bool) -> tuple[SessionRecord, str]:
        """Sign the reader in; ``verified``: the address was confirmed by its link (a
        typed address alone is not: anyone may type anyone's)."""
        principal = Principal(
            subject=subject, idp="", kind="registered", authn_instant=self._clock(),
            attributes={EMAIL: (email,), STATUS: ("registered",)}, email_verified=verified)
        return await self._sessions.create(principal, user_agent=user_agent,
                                           client_ip=client_ip)

    async def erase(self, typed_email: str, *, by: str) -> Erased:
        """Delete every registration of an address (any case) and end their sessions:
        an admin's action (``by``: the admin's subject, or ``cli:<user>``)."""
        email = valid_email(typed_email) or typed_email.strip()
        if not email:
            return Erased(0, 0)
        gone = await self._records.delete_registrations(email=email)
        ended = await self._end(gone, "registration_deleted", by=by)
        if any(not r.subject for r in gone):
            # Kept before subjects were recorded: their sessions carry the address.
            for record in await self._sessions.sessions():
                p = record.principal
                if p.kind == "registered" and p.email.lower() == email.lower():
                    ended += await self._sessions.end(record.key)
        log.info("registrations deleted by=%s count=%d sessions_ended=%d", by, len(gone), ended)
        return Erased(len(gone), ended)

    async def withdraw(self, record: SessionRecord) -> Erased:
        """A registered reader deletes their own registration (and every session of it)."""
        subject = record.principal.subject
        gone = await self._records.delete_registrations(subject=subject)
        ended = await self._sessions.end_subject_sessions(subject)
        audit("registration_deleted", by=subject, subject=subject, sessions_ended=ended)
        log.info("registration withdrawn reader=%s sessions_ended=%d", subject, ended)
        return Erased(len(gone), ended)

    async def purge_expired(self) -> int:
        """Delete the registrations older than ``retention_days``, ending their sessions;
        returns how many went."""
        before = self._clock() - self._config.retention_days * 86400
        gone = await self._records.delete_registrations(registered_before=before)
        await self._end(gone, "registration_purged")
        if gone:
            log.info("registrations past retention deleted count=%d", len(gone))
        return len(gone)

    async def _end(self, gone: list[Registration], event: str, **fields: str) -> int:
        """End the sessions of deleted registrations, one audit line each."""
        total = 0
        for registration in gone:
            ended = 0
            if registration.subject:
                ended = await self._sessions.end_subject_sessions(registration.subject)
            total += ended
            audit(event, subject=registration.subject, sessions_ended=ended, **fields)
        return total


def _pending_key(token: str) -> str:
    """Where a pending registration waits: under a hash of its link's token, so the
    store never holds a value that works as the link."""
    return Namespace.CONFIRM + hashlib.sha256(token.encode()).hexdigest()
