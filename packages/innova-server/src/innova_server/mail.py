"""The mailer interface, and the development-only console mailer.

The core writes every mail (French, plain text and HTML); a mailer plugin
only delivers an `email.message.EmailMessage`. A mailer signals failure with
`MailerError`; the core logs it (without the message body: it may hold a
reset link) and counts it, and never shows it to the client.
"""

from __future__ import annotations

import logging
from collections import deque
from email.message import EmailMessage
from typing import Protocol, runtime_checkable

log = logging.getLogger("innova.mail")


class MailerError(Exception):
    """Delivery failed. The text must not contain credentials or the mail body."""


@runtime_checkable
class Mailer(Protocol):
    async def send(self, message: EmailMessage) -> None: ...


class ConsoleMailer:
    """Logs each mail, links included, so a developer can follow a reset flow.

    Development only: production refuses to start with it (settings.problems).
    """

    def __init__(self) -> None:
        self.sent: deque[EmailMessage] = deque(maxlen=50)  # for tests and a debugger

    async def send(self, message: EmailMessage) -> None:
        self.sent.append(message)
        body = message.get_body(preferencelist=("plain",))
        text = body.get_content() if body is not None else ""
        log.warning(
            "console mailer (development only) — To: %s — Subject: %s\n%s",
            message["To"],
            message["Subject"],
            text,
        )


__all__ = ["ConsoleMailer", "Mailer", "MailerError"]
