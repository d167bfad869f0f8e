"""The SMTP mailer passes the core's mailer conformance checks, over each transport."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from innova_mailer import SMTPConfig, SMTPMailer, SMTPSettings
from innova_server.settings import Settings
from innova_server.testing import MailerConformance
from innova_server.testing.mailer_conformance import Delivered


def smtp_mailer(ca_file: Path, tls_mode: str = "auto", **values: Any) -> SMTPMailer:
    settings = Settings(_env_file=None, env="test", **values)
    return SMTPMailer(SMTPConfig.from_settings(settings, SMTPSettings(smtp_ca_file=ca_file, smtp_tls_mode=tls_mode)))


class SMTPConformance(MailerConformance):
    mode = "plain"

    @pytest.fixture
    def peer(self, start_peer: Callable[..., Any]) -> Any:
        return start_peer(self.mode)

    @pytest.fixture
    def mailer(self, peer: Any, ca_file: Path) -> SMTPMailer:
        return smtp_mailer(ca_file, peer.tls_mode(), **peer.settings())

    @pytest.fixture
    def delivered(self, peer: Any) -> Delivered:
        return lambda: peer.messages

    @pytest.fixture
    def failing_mailer(self, peer: Any, ca_file: Path, closed_port: int) -> SMTPMailer:
        return smtp_mailer(ca_file, peer.tls_mode(), **peer.settings(smtp_port=closed_port))

    @pytest.fixture
    def mailer_secrets(self, smtp_password: str) -> Sequence[str]:
        return (smtp_password,)

    @pytest.fixture
    def failure_deadline(self) -> float:
        return 10.0


class TestPlainWithAuth(SMTPConformance):
    mode = "plain"


class TestStartTLS(SMTPConformance):
    mode = "starttls"


class TestImplicitTLS(SMTPConformance):
    mode = "implicit"
