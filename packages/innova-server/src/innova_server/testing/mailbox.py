"""Reading the mails a test server sent: its mailer's `sent` list (the console mailer keeps one).

Registration mails a verification link, so a test that waits for another
mail picks it by kind (`about`: a piece of the subject, e.g. `RESET`).
Needs the test dependencies (httpx).
"""

from __future__ import annotations

import re
from email.message import EmailMessage
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import httpx

from innova_server.testing.server import wait_for

if TYPE_CHECKING:
    from innova_server.testing.fixtures import RunningServer

# Pieces of the subjects written by `innova_server.mails`.
RESET = "Réinitialisation"
VERIFY = "Confirmez votre adresse"
PASSWORD_CHANGED = "a été modifié"  # noqa: S105 - a subject, not a secret
ACCOUNT_DELETED = "a été supprimé"


def sent(server: RunningServer, about: str | None = None) -> list[EmailMessage]:
    """The mails sent so far, oldest first; only those whose subject holds `about` if given."""
    messages: list[EmailMessage] = list(server.services.mailer.sent)
    return [m for m in messages if about is None or about in str(m["Subject"])]


def wait_for_mails(
    server: RunningServer, count: int, timeout: float = 10.0, *, about: str | None = None
) -> list[EmailMessage]:
    """`sent(server, about)` once it holds at least `count` mails."""
    wait_for(lambda: len(sent(server, about)) >= count, timeout, what=f"{count} mail(s) {about or ''}".strip())
    return sent(server, about)


def wait_idle(server: RunningServer, timeout: float = 10.0) -> None:
    """Until the server has no background task left (mails sent or failed)."""
    wait_for(lambda: len(server.services.tasks) == 0, timeout, what="background tasks to finish")


def text_of(message: EmailMessage) -> str:
    body = message.get_body(preferencelist=("plain",))
    assert body is not None
    return str(body.get_content())


def link_of(message: EmailMessage, path: str = "reset") -> str:
    """The `{FRONTEND_URL}/{path}?…` link of a mail."""
    text = text_of(message)
    match = re.search(rf"https?://\S+/{re.escape(path)}\?\S+", text)
    assert match, text
    return match.group(0)


def token_of(message: EmailMessage, path: str = "reset") -> str:
    return parse_qs(urlsplit(link_of(message, path)).query)["token"][0]


def verify_address(client: httpx.Client, server: RunningServer, email: str) -> httpx.Response:
    """Follow the newest verification link mailed to `email` (as its owner would)."""
    mails = wait_for(
        lambda: [m for m in sent(server, VERIFY) if m["To"] == email], 10.0, what=f"the verification mail to {email}"
    )
    response = client.post("/auth/verify", json={"token": token_of(mails[-1], "verify")})
    assert response.status_code == 200, response.text
    return response
