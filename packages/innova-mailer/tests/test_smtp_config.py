"""How the SMTP_* settings become a connection, and what is refused at startup."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from innova_mailer import SMTPConfig, SMTPMailer, SMTPSettings, make_smtp_mailer, resolve_security
from innova_server.mail import MailerError
from innova_server.mails import reset_mail
from innova_server.plugins import PluginRegistry
from innova_server.settings import ConfigError, Settings


def settings(**values) -> Settings:
    return Settings(_env_file=None, **{"env": "test", "smtp_host": "smtp.example.net", **values})


@pytest.mark.parametrize(
    ("use_tls", "port", "mode", "expected"),
    [
        (True, 465, "auto", ("implicit", 465)),
        (True, 587, "auto", ("starttls", 587)),
        (True, 2525, "auto", ("starttls", 2525)),
        (True, None, "auto", ("starttls", 587)),
        (False, None, "auto", ("none", 25)),
        (False, 2525, "auto", ("none", 2525)),
        (False, 10465, "implicit", ("implicit", 10465)),
        (False, None, "implicit", ("implicit", 465)),
        (True, 465, "starttls", ("starttls", 465)),
        (True, None, "none", ("none", 25)),
    ],
)
def test_the_tls_rule(use_tls, port, mode, expected):
    assert resolve_security(use_tls, port, mode) == expected


def test_the_plugin_is_registered_through_the_entry_point():
    registry = PluginRegistry.load(settings())
    entry = registry.mailer_entry("smtp")
    assert entry.plugin == "smtp"
    info = registry.plugins["smtp"]
    assert info.mailers == ["smtp"] and info.version == "0.1.0" and info.error is None
    mailer = registry.build_mailer(settings(mailer="smtp", smtp_use_tls=True))
    assert isinstance(mailer, SMTPMailer)
    assert (mailer.config.security, mailer.config.port) == ("starttls", 587)


def test_mailer_smtp_is_the_default_when_smtp_host_is_set():
    assert settings().mailer == "smtp"


def test_from_email_falls_back_to_the_user():
    config = SMTPConfig.from_settings(settings(smtp_user="bot@innovaplus.africa", smtp_pass="x"), SMTPSettings())
    assert config.sender == "bot@innovaplus.africa"
    config = SMTPConfig.from_settings(
        settings(smtp_user="apikey", smtp_pass="x", smtp_from_email="INNOVAPLUS <no-reply@innovaplus.africa>"),
        SMTPSettings(),
    )
    assert config.sender == "no-reply@innovaplus.africa"
    assert SMTPConfig.from_settings(settings(), SMTPSettings()).sender is None


def test_timeouts_come_from_the_settings():
    config = SMTPConfig.from_settings(settings(smtp_timeout_seconds=4), SMTPSettings())
    assert (config.timeout, config.send_timeout) == (4, 12)
    config = SMTPConfig.from_settings(settings(), SMTPSettings(smtp_send_timeout_seconds=20))
    assert config.send_timeout == 20


def test_the_send_timeout_is_told_to_the_core(monkeypatch):
    # The core's delivery deadline (RecoveryManager.mail_deadline) reads it, so
    # a long SMTP_SEND_TIMEOUT_SECONDS is never cut short by the core.
    monkeypatch.setenv("SMTP_SEND_TIMEOUT_SECONDS", "300")
    mailer = make_smtp_mailer(settings())
    assert mailer.send_timeout_seconds == 300


def test_the_password_is_not_in_the_config_repr():
    config = SMTPConfig.from_settings(settings(smtp_user="u", smtp_pass="hunter2-secret"), SMTPSettings())
    assert "hunter2-secret" not in repr(config)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"smtp_host": None, "mailer": "smtp"}, "SMTP_HOST"),
        ({"smtp_user": "u"}, "SMTP_PASS is empty"),
        ({"smtp_port": 465}, "SMTP_PORT=465"),
        (
            {"env": "production", "smtp_user": "u", "smtp_pass": "p", "smtp_use_tls": False},
            "in clear to smtp.example.net",
        ),
    ],
)
def test_unsafe_or_incomplete_settings_are_refused(values, message):
    with pytest.raises(ConfigError) as caught:
        make_smtp_mailer(settings(**values))
    assert any(message in line for line in caught.value.lines), caught.value.lines
    assert "p" not in [part for line in caught.value.lines for part in line.split()]  # no password value


def test_a_missing_ca_file_is_refused(tmp_path):
    with pytest.raises(ConfigError) as caught:
        SMTPConfig.from_settings(settings(), SMTPSettings(smtp_ca_file=tmp_path / "nope.pem"))
    assert "SMTP_CA_FILE" in str(caught.value)


def test_production_accepts_a_plain_relay_on_loopback():
    mailer = make_smtp_mailer(settings(env="production", smtp_host="127.0.0.1", smtp_user="u", smtp_pass="p"))
    assert mailer.config.security == "none"


def test_plugin_settings_come_from_the_environment(monkeypatch, ca_file):
    monkeypatch.setenv("SMTP_CA_FILE", str(ca_file))
    monkeypatch.setenv("SMTP_TLS_MODE", "implicit")
    monkeypatch.setenv("SMTP_SEND_TIMEOUT_SECONDS", "7")
    mailer = make_smtp_mailer(settings(smtp_port=10465))
    assert (mailer.config.security, mailer.config.port, mailer.config.send_timeout) == ("implicit", 10465, 7)
    assert mailer.config.ca_file == ca_file


async def test_a_server_echoing_the_password_is_scrubbed(start_peer, ca_file, smtp_password):
    peer = start_peer("starttls", refuse=f"554 5.7.1 <ada@example.com> rejected for {smtp_password}")
    mailer = SMTPMailer(
        SMTPConfig.from_settings(
            Settings(_env_file=None, env="test", **peer.settings()), SMTPSettings(smtp_ca_file=ca_file)
        )
    )
    message = reset_mail(settings(), to="ada@example.com", token="T" * 43, name=None, now=datetime.now(UTC))
    with pytest.raises(MailerError) as caught:
        await mailer.send(message)
    assert smtp_password not in str(caught.value)
    assert "554" in str(caught.value) and "***" in str(caught.value)
    assert "ada@example.com" not in str(caught.value) and "<address>" in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


async def test_a_message_without_recipients_is_a_mailer_error(start_peer, ca_file):
    peer = start_peer("plain")
    mailer = SMTPMailer(
        SMTPConfig.from_settings(Settings(_env_file=None, env="test", **peer.settings()), SMTPSettings())
    )
    message = reset_mail(settings(), to="ada@example.com", token="T" * 43, name=None, now=datetime.now(UTC))
    del message["To"]
    with pytest.raises(MailerError):
        await asyncio.wait_for(mailer.send(message), 10)
    assert peer.deliveries == []


def test_the_command_line_check_sends_one_mail(start_peer, ca_file, smtp_password, tmp_path):
    import os
    import subprocess
    import sys

    peer = start_peer("starttls")
    env = {
        **os.environ,
        "ENV": "test",
        "SMTP_HOST": peer.host,
        "SMTP_PORT": str(peer.port),
        "SMTP_USER": "mailer@innovaplus.test",
        "SMTP_PASS": smtp_password,
        "SMTP_USE_TLS": "true",
        "SMTP_CA_FILE": str(ca_file),
    }
    done = subprocess.run(
        [sys.executable, "-m", "innova_mailer", "--to", "ops@example.com"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "security=starttls" in done.stdout and "sent to ops@example.com" in done.stdout
    assert smtp_password not in done.stdout + done.stderr
    assert peer.deliveries[0].rcpt_tos == ["ops@example.com"] and peer.deliveries[0].tls

    env["SMTP_PASS"] = "wrong-one-123"
    failed = subprocess.run(
        [sys.executable, "-m", "innova_mailer", "--to", "ops@example.com"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode == 1 and "535" in failed.stderr
    assert "wrong-one-123" not in failed.stdout + failed.stderr


def test_a_login_that_is_not_an_address_is_no_envelope_sender():
    config = SMTPConfig.from_settings(settings(smtp_user="apikey", smtp_pass="x"), SMTPSettings())
    assert config.sender is None
