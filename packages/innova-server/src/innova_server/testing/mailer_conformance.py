"""Conformance checks for a mailer plugin: what the core expects of any `Mailer`.

Subclass `MailerConformance` in your tests and supply three fixtures::

    from innova_server.testing.mailer_conformance import MailerConformance

    class TestMyMailer(MailerConformance):
        @pytest.fixture
        def mailer(self, peer):            # your mailer, delivering to a peer you can read
            return MyMailer(host=peer.host, port=peer.port)

        @pytest.fixture
        def delivered(self, peer):         # what the peer received so far, oldest first
            return lambda: peer.messages   # EmailMessage objects or raw bytes

        @pytest.fixture
        def failing_mailer(self):          # the same mailer pointed at a dead peer (or None: skipped)
            return MyMailer(host="127.0.0.1", port=closed_port)

Optionally override `mailer_secrets` (strings that must never appear in an
error's text, e.g. your password) and `failure_deadline` (seconds a failing
send may take before it must raise).

The checks: `send` is a coroutine returning None; the core's own mails (French,
`multipart/alternative`, text + HTML) arrive intact with their headers; long
and non-ASCII content survives the transport; concurrent sends all arrive;
a failed delivery raises `MailerError` (never another exception) in bounded
time, and its text holds no secret and no part of the mail.
Async tests are marked for pytest-asyncio.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import inspect
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from email.message import EmailMessage, Message
from typing import Any

import pytest

from innova_server.auth.tokens import new_token
from innova_server.mail import Mailer, MailerError
from innova_server.mails import password_changed_mail, reset_mail
from innova_server.settings import Settings

Delivered = Callable[[], Sequence[EmailMessage | Message | bytes]]


def conformance_settings() -> Settings:
    """Settings for composing the core's mails, independent of the environment's `.env`."""
    values: dict[str, Any] = {
        "_env_file": None,
        "env": "test",
        "frontend_url": "https://innovaplus.africa",
        "smtp_from_email": "no-reply@innovaplus.africa",
    }
    return Settings(**values)


def as_message(item: EmailMessage | Message | bytes) -> EmailMessage:
    """Parse what a peer received into an `EmailMessage` (default policy)."""
    if isinstance(item, EmailMessage):
        return item
    raw = item if isinstance(item, bytes) else item.as_bytes()
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def _norm(text: str) -> str:
    return text.replace("\r\n", "\n").strip()


def assert_same_mail(sent: EmailMessage, received: EmailMessage) -> None:
    """`received` carries `sent`'s headers and the same text and HTML bodies."""
    for header in ("From", "To", "Subject", "Date", "Message-ID"):
        if sent[header] is not None:
            assert str(received[header]) == str(sent[header]), header
    assert received.get_content_type() == sent.get_content_type()
    for subtype in ("plain", "html"):
        want = sent.get_body(preferencelist=(subtype,))
        if want is None:
            continue
        got = received.get_body(preferencelist=(subtype,))
        assert got is not None, f"the text/{subtype} part was lost"
        assert _norm(got.get_content()) == _norm(want.get_content()), f"text/{subtype} differs"


class MailerConformance:
    """Base class of a mailer's conformance tests (not collected on its own: no `Test` prefix)."""

    @pytest.fixture
    def mailer(self) -> Mailer:
        raise NotImplementedError("supply a `mailer` fixture: the mailer under test")

    @pytest.fixture
    def delivered(self) -> Delivered:
        raise NotImplementedError("supply a `delivered` fixture: () -> the messages the peer received")

    @pytest.fixture
    def failing_mailer(self) -> Mailer | None:
        return None

    @pytest.fixture
    def mailer_secrets(self) -> Sequence[str]:
        return ()

    @pytest.fixture
    def failure_deadline(self) -> float:
        return 30.0

    # -- helpers ---------------------------------------------------------

    @staticmethod
    async def _wait_for(delivered: Delivered, count: int, within: float = 10.0) -> list[EmailMessage]:
        deadline = time.monotonic() + within
        while True:
            items = [as_message(item) for item in delivered()]
            if len(items) >= count:
                return items
            if time.monotonic() > deadline:
                raise AssertionError(f"the peer received {len(items)} message(s), expected {count}")
            await asyncio.sleep(0.02)

    # -- the checks ------------------------------------------------------

    def test_is_a_mailer(self, mailer: Mailer) -> None:
        assert isinstance(mailer, Mailer)
        assert inspect.iscoroutinefunction(mailer.send)

    @pytest.mark.asyncio
    async def test_delivers_the_core_reset_mail_intact(self, mailer: Mailer, delivered: Delivered) -> None:
        before = len(delivered())
        token = new_token()
        message = reset_mail(
            conformance_settings(),
            to="ada+conformance@example.com",
            token=token,
            name="Adélaïde Lovelace",
            now=datetime.now(UTC),
        )
        result: object = await mailer.send(message)  # type: ignore[func-returns-value]
        assert result is None
        received = (await self._wait_for(delivered, before + 1))[before]
        assert_same_mail(message, received)
        assert received.get_content_type() == "multipart/alternative"
        text = received.get_body(preferencelist=("plain",))
        assert text is not None and token in text.get_content()

    @pytest.mark.asyncio
    async def test_delivers_long_and_non_ascii_content(self, mailer: Mailer, delivered: Delivered) -> None:
        before = len(delivered())
        message = password_changed_mail(
            conformance_settings(), to="zoe@example.com", name="Zoé 🌍", now=datetime.now(UTC)
        )
        # A line far beyond SMTP's 998-character limit, and characters outside Latin-1.
        long_message = EmailMessage()
        for header in ("From", "To", "Date", "Message-ID"):
            long_message[header] = message[header]
        long_message["Subject"] = "Réinitialisation — « test » ✓ 日本語"
        long_text = "é" * 3000 + "\n" + "x" * 2500 + "\nfin ✓\n"
        long_message.set_content(long_text)
        long_message.add_alternative(f"<p>{long_text}</p>", subtype="html")
        await mailer.send(message)
        await mailer.send(long_message)
        received = await self._wait_for(delivered, before + 2)
        assert_same_mail(message, received[before])
        assert_same_mail(long_message, received[before + 1])
        assert str(received[before + 1]["Subject"]) == "Réinitialisation — « test » ✓ 日本語"

    @pytest.mark.asyncio
    async def test_concurrent_sends_all_arrive(self, mailer: Mailer, delivered: Delivered) -> None:
        before = len(delivered())
        settings = conformance_settings()
        messages = [
            reset_mail(settings, to=f"user{i}@example.com", token=new_token(), name=None, now=datetime.now(UTC))
            for i in range(5)
        ]
        await asyncio.gather(*(mailer.send(m) for m in messages))
        received = (await self._wait_for(delivered, before + 5))[before:]
        assert {str(m["Message-ID"]) for m in received} == {str(m["Message-ID"]) for m in messages}

    @pytest.mark.asyncio
    async def test_failure_raises_mailer_error_without_secrets(
        self, failing_mailer: Mailer | None, mailer_secrets: Sequence[str], failure_deadline: float
    ) -> None:
        if failing_mailer is None:
            pytest.skip("this mailer cannot fail (no `failing_mailer` fixture)")
        token = new_token()
        message = reset_mail(
            conformance_settings(), to="ada@example.com", token=token, name="Ada", now=datetime.now(UTC)
        )
        started = time.monotonic()
        with pytest.raises(MailerError) as caught:
            await asyncio.wait_for(failing_mailer.send(message), timeout=failure_deadline + 5)
        assert time.monotonic() - started <= failure_deadline + 1
        text = str(caught.value)
        assert text, "a MailerError should say what failed"
        for secret in (*mailer_secrets, token, "reset?token", "Bonjour"):
            assert secret not in text


__all__ = ["Delivered", "MailerConformance", "as_message", "assert_same_mail", "conformance_settings"]
