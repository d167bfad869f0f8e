"""The built-in console mailer passes the mailer conformance checks (it cannot fail)."""

from __future__ import annotations

import pytest

from innova_server.mail import ConsoleMailer
from innova_server.testing import MailerConformance
from innova_server.testing.mailer_conformance import Delivered


class TestConsoleMailer(MailerConformance):
    @pytest.fixture
    def mailer(self) -> ConsoleMailer:
        return ConsoleMailer()

    @pytest.fixture
    def delivered(self, mailer: ConsoleMailer) -> Delivered:
        return lambda: list(mailer.sent)
