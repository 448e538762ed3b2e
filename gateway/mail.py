"""Sending one plain-text mail through the configured SMTP relay (``[smtp]``).

Python's ``smtplib`` in a worker thread (``asyncio.to_thread``), so a slow relay stalls
only the request that waits for it. ``security`` is ``starttls`` (required: a relay
that does not offer it is refused), ``tls`` (implicit TLS) or ``none``; certificates
are verified against the system's trust store. Any failure (unreachable, refused,
timed out, TLS) becomes ``MailError``; its reason never contains the mail's body.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

from gateway.config_schema import SmtpSettings
from gateway.errors import MailError


class Mailer:
    """Sends mails through one SMTP relay."""

    def __init__(self, smtp: SmtpSettings, base: Path) -> None:
        """``base``: the directory a relative ``password_file`` is read from (the
        configuration file's)."""
        self._smtp = smtp
        self._password_file = (None if smtp.password_file is None
                               else base / smtp.password_file.expanduser())

    async def send(self, to: str, subject: str, body: str) -> None:
        """Hand one plain-text mail to the relay; ``MailError`` if it does not take it."""
        message = EmailMessage()
        message["From"] = self._smtp.from_address
        message["To"] = to
        message["Subject"] = subject
        message["Date"] = formatdate(localtime=False, usegmt=True)
        domain = self._smtp.from_address.rpartition("@")[2].strip(" >") or None
        message["Message-ID"] = make_msgid(domain=domain)
        message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies, please
        message.set_content(body)
        try:
            await asyncio.to_thread(self._send, message)
        except (smtplib.SMTPException, OSError, ValueError) as exc:
            raise MailError(f"SMTP relay {self._smtp.host}:{self._smtp.port}: "
                            f"{type(exc).__name__}: {str(exc)[:200]}") from exc

    def _send(self, message: EmailMessage) -> None:
        s = self._smtp
        context = ssl.create_default_context()
        client: smtplib.SMTP
        if s.security == "tls":
            client = smtplib.SMTP_SSL(s.host, s.port, timeout=s.timeout, context=context)
        else:
            client = smtplib.SMTP(s.host, s.port, timeout=s.timeout)
        with client:
            if s.security == "starttls":
                client.starttls(context=context)  # SMTPNotSupportedError if not offered
            if s.username and self._password_file is not None:
                client.login(s.username, self._password_file.read_text().strip())
            client.send_message(message)
