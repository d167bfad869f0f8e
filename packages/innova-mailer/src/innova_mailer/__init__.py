"""MAILER=smtp: deliver the core's mails over SMTP with aiosmtplib.

Configuration (environment, read at startup; restart after a change):

- `SMTP_HOST`, `SMTP_PORT`, `SMTP_USER`, `SMTP_PASS`, `SMTP_USE_TLS`,
  `SMTP_FROM_EMAIL` (envelope sender; falls back to `SMTP_USER`), and
  `SMTP_TIMEOUT_SECONDS` (connect and each SMTP command, default 10) — core settings.
- `SMTP_SEND_TIMEOUT_SECONDS`: bound on one whole delivery (default 3 × SMTP_TIMEOUT_SECONDS).
- `SMTP_CA_FILE`: a PEM bundle trusted *in addition to* the system store
  (a private relay's CA; the tests' CA).
- `SMTP_TLS_MODE`: `auto` (default) or an explicit `implicit`, `starttls`, `none`.

The TLS rule in `auto` mode (`SMTP_USE_TLS` in innova-server's README, "Configuration"):

| SMTP_USE_TLS | SMTP_PORT     | connection |
|---|---|---|
| true         | 465           | implicit TLS (SMTPS) |
| true         | other / unset | STARTTLS, required (default port 587); never falls back to plain |
| false        | any / unset   | plain SMTP, no STARTTLS (default port 25): a relay on loopback |

Certificates are always verified (system store, plus `SMTP_CA_FILE`). In
production, plain SMTP that would carry `SMTP_PASS` to another host is
refused at startup.

Failures raise `MailerError` with a short text (host, port, what failed, the
server's reply code) that never contains the password or the mail.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import re
import ssl
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import parseaddr
from pathlib import Path
from typing import Literal

import aiosmtplib
from pydantic import Field

from innova_server.mail import MailerError
from innova_server.plugins import RegisterMailer, hookimpl
from innova_server.settings import ConfigError, PluginSettings, Settings

__version__ = "0.1.0"

log = logging.getLogger("innova.mailer.smtp")

TLSMode = Literal["auto", "implicit", "starttls", "none"]
Security = Literal["implicit", "starttls", "none"]
DEFAULT_PORTS: dict[Security, int] = {"implicit": 465, "starttls": 587, "none": 25}
# Servers quote addresses in their replies ("<ada@example.com>: Recipient
# address rejected"); error texts end up in logs, so addresses are masked.
_ADDRESS = re.compile(r"[^\s<>()\[\]\"',;:]+@[^\s<>()\[\]\"',;:]+")


class SMTPSettings(PluginSettings):
    """The plugin's own variables (the SMTP_* basics are core settings)."""

    smtp_tls_mode: TLSMode = "auto"
    smtp_ca_file: Path | None = None
    smtp_send_timeout_seconds: float | None = Field(default=None, gt=0)


def resolve_security(use_tls: bool, port: int | None, mode: TLSMode = "auto") -> tuple[Security, int]:
    """The connection security and port for these settings (see the module's table)."""
    if mode == "auto":
        if use_tls:
            security: Security = "implicit" if port == 465 else "starttls"
        else:
            security = "none"
    else:
        security = mode
    return security, port or DEFAULT_PORTS[security]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class SMTPConfig:
    host: str
    port: int
    security: Security
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sender: str | None = None
    timeout: float = 10.0
    send_timeout: float = 30.0
    ca_file: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings, extra: SMTPSettings | None = None) -> SMTPConfig:
        extra = extra if extra is not None else SMTPSettings.load()
        if not settings.smtp_host:
            raise ConfigError(["MAILER=smtp needs SMTP_HOST (and SMTP_PORT, SMTP_USER, SMTP_PASS, SMTP_USE_TLS)."])
        security, port = resolve_security(settings.smtp_use_tls, settings.smtp_port, extra.smtp_tls_mode)
        password = settings.smtp_pass.get_secret_value() if settings.smtp_pass else None
        # A login that is not an address (`apikey`) is no envelope sender: then
        # aiosmtplib takes it from the message's From header.
        sender = parseaddr(settings.smtp_sender)[1] if settings.smtp_sender else ""
        problems: list[str] = []
        if settings.smtp_user and not password:
            problems.append("SMTP_USER is set but SMTP_PASS is empty.")
        if extra.smtp_ca_file is not None and not extra.smtp_ca_file.is_file():
            problems.append(f"SMTP_CA_FILE={str(extra.smtp_ca_file)!r} is not a readable file.")
        if security == "none" and port == 465:
            problems.append("SMTP_PORT=465 is the implicit-TLS port: set SMTP_USE_TLS=true.")
        if (
            settings.env == "production"
            and security == "none"
            and settings.smtp_user
            and not _is_loopback(settings.smtp_host)
        ):
            problems.append(
                f"SMTP_USE_TLS=false would send SMTP_PASS in clear to {settings.smtp_host}: set SMTP_USE_TLS=true "
                "(port 587 for STARTTLS, 465 for implicit TLS)."
            )
        if problems:
            raise ConfigError(problems)
        timeout = settings.smtp_timeout_seconds
        return cls(
            host=settings.smtp_host,
            port=port,
            security=security,
            username=settings.smtp_user,
            password=password,
            sender=sender if "@" in sender else None,
            timeout=timeout,
            send_timeout=extra.smtp_send_timeout_seconds or 3 * timeout,
            ca_file=extra.smtp_ca_file,
        )


class SMTPMailer:
    """One SMTP connection per mail (transactional volume), with verified TLS."""

    def __init__(self, config: SMTPConfig) -> None:
        self.config = config
        self._tls_context: ssl.SSLContext | None = None
        if config.security != "none":
            context = ssl.create_default_context()
            if config.ca_file is not None:
                context.load_verify_locations(cafile=str(config.ca_file))
            self._tls_context = context

    @property
    def send_timeout_seconds(self) -> float:
        """Tells the core how long one send may take, so its own deadline never cuts it short."""
        return self.config.send_timeout

    @property
    def where(self) -> str:
        return f"SMTP {self.config.host}:{self.config.port} ({self.config.security})"

    def _scrub(self, text: str) -> str:
        """Mask every form of the password a server might echo, and addresses; bound the length."""
        password = self.config.password
        if password:
            user = self.config.username or ""
            forms = {
                password,
                base64.b64encode(password.encode()).decode(),
                base64.b64encode(f"\0{user}\0{password}".encode()).decode(),
            }
            for form in forms:
                text = text.replace(form, "***")
        text = _ADDRESS.sub("<address>", text)
        return " ".join(text.split())[:300]

    async def send(self, message: EmailMessage) -> None:
        config = self.config
        try:
            async with asyncio.timeout(config.send_timeout):
                await aiosmtplib.send(
                    message,
                    sender=config.sender,
                    hostname=config.host,
                    port=config.port,
                    username=config.username,
                    password=config.password,
                    use_tls=config.security == "implicit",
                    start_tls=config.security == "starttls",
                    tls_context=self._tls_context,
                    timeout=config.timeout,
                )
        except aiosmtplib.SMTPResponseException as exc:
            # The server answered with a refusal: its code and text (no credentials in it).
            raise MailerError(f"{self.where}: {type(exc).__name__} {exc.code} {self._scrub(exc.message)}") from None
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = ", ".join(str(error.code) for error in exc.recipients)
            raise MailerError(f"{self.where}: every recipient was refused ({codes})") from None
        except (aiosmtplib.SMTPTimeoutError, TimeoutError):
            raise MailerError(f"{self.where}: no answer in time") from None
        except aiosmtplib.SMTPConnectError as exc:
            raise MailerError(f"{self.where}: connection failed: {self._scrub(str(exc))}") from None
        except aiosmtplib.SMTPException as exc:
            raise MailerError(f"{self.where}: {type(exc).__name__}: {self._scrub(str(exc))}") from None
        except ssl.SSLError as exc:
            raise MailerError(f"{self.where}: TLS failed: {exc.reason or type(exc).__name__}") from None
        except OSError as exc:
            raise MailerError(f"{self.where}: connection failed: {exc.strerror or type(exc).__name__}") from None
        except ValueError as exc:  # e.g. no sender or no recipient in the message
            raise MailerError(f"{self.where}: message not sendable: {self._scrub(str(exc))}") from None


def make_smtp_mailer(settings: Settings) -> SMTPMailer:
    config = SMTPConfig.from_settings(settings)
    if config.security == "none" and not _is_loopback(config.host):
        log.warning("SMTP to %s:%d without TLS: use it only on a trusted network", config.host, config.port)
    return SMTPMailer(config)


@hookimpl
def innova_register_mailers(register: RegisterMailer) -> None:
    register("smtp", make_smtp_mailer)


__all__ = ["SMTPConfig", "SMTPMailer", "SMTPSettings", "make_smtp_mailer", "resolve_security"]
