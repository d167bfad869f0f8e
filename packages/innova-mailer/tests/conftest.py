"""Real SMTP peers on loopback (aiosmtpd): plain with AUTH, STARTTLS, implicit TLS.

Certificates come from a throw-away CA made by trustme; the mailer trusts it
through `SMTP_CA_FILE` (added to the system store, never replacing it).
"""

from __future__ import annotations

import email
import email.policy
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from innova_server.embedded import free_port

USER = "mailer@innovaplus.test"
PASSWORD = "s3cret-SMTP-pass!"  # must never appear in a log or an error

Mode = Literal["plain", "starttls", "implicit"]


def pytest_configure(config: pytest.Config) -> None:
    # The plain peer requires AUTH without TLS on purpose (a relay on loopback).
    config.addinivalue_line("filterwarnings", "ignore:Requiring AUTH while not requiring TLS:UserWarning")


@dataclass
class Delivery:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    tls: bool
    login: str | None

    @property
    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class Recorder:
    """aiosmtpd handler: records every delivery; may refuse it after reading it."""

    refuse: str | None = None
    refuse_rcpt: bool = False
    deliveries: list[Delivery] = field(default_factory=list)
    logins: list[tuple[str, bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if self.refuse_rcpt:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        transport = server.transport
        tls = transport is not None and transport.get_extra_info("ssl_object") is not None
        auth = session.auth_data
        delivery = Delivery(
            mail_from=str(envelope.mail_from),
            rcpt_tos=list(envelope.rcpt_tos),
            content=bytes(envelope.original_content or envelope.content or b""),  # type: ignore[arg-type]
            tls=tls,
            login=auth.login.decode() if isinstance(auth, LoginPassword) else None,
        )
        with self.lock:
            self.deliveries.append(delivery)
        return self.refuse or "250 Message accepted for delivery"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode() == USER
            and auth_data.password.decode() == PASSWORD
        )
        login = auth_data.login.decode() if isinstance(auth_data, LoginPassword) else "?"
        with self.lock:
            self.logins.append((login, ok))
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    @property
    def messages(self) -> list[EmailMessage]:
        with self.lock:
            return [d.message for d in self.deliveries]


@dataclass
class Peer:
    mode: Mode
    host: str
    port: int
    recorder: Recorder
    controller: Controller

    @property
    def messages(self) -> list[EmailMessage]:
        return self.recorder.messages

    @property
    def deliveries(self) -> list[Delivery]:
        return list(self.recorder.deliveries)

    def settings(self, **extra: Any) -> dict[str, Any]:
        """Core settings (start_server/make_settings overrides) that point the smtp mailer here."""
        values: dict[str, Any] = {
            "mailer": "smtp",
            "smtp_host": self.host,
            "smtp_port": self.port,
            "smtp_user": USER,
            "smtp_pass": PASSWORD,
            "smtp_use_tls": self.mode != "plain",
            "smtp_timeout_seconds": 3,
        }
        values.update(extra)
        return values

    def tls_mode(self) -> str:
        """SMTP_TLS_MODE for this peer: implicit TLS is on a test port, not 465."""
        return {"plain": "auto", "starttls": "auto", "implicit": "implicit"}[self.mode]


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("smtp-ca") / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def server_tls_context(tls_ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture
def start_peer(server_tls_context: ssl.SSLContext) -> Iterator[Callable[..., Peer]]:
    """`start_peer(mode, *, auth=True, refuse=None, tls_context=None)`: a running aiosmtpd."""
    running: list[Controller] = []

    def start(
        mode: Mode = "plain",
        *,
        auth: bool = True,
        refuse: str | None = None,
        refuse_rcpt: bool = False,
        tls_context: ssl.SSLContext | None = None,
    ) -> Peer:
        context = tls_context or server_tls_context
        recorder = Recorder(refuse=refuse, refuse_rcpt=refuse_rcpt)
        kwargs: dict[str, Any] = {"hostname": "127.0.0.1", "port": free_port(), "ready_timeout": 10}
        if auth:
            kwargs.update(authenticator=recorder.authenticate, auth_required=True)
        if mode == "plain":
            kwargs["auth_require_tls"] = False
        elif mode == "starttls":
            kwargs.update(tls_context=context, require_starttls=True, auth_require_tls=True)
        else:  # implicit TLS: the whole connection is TLS (aiosmtpd only counts STARTTLS as TLS for AUTH)
            kwargs.update(ssl_context=context, auth_require_tls=False)
        controller = Controller(recorder, **kwargs)
        controller.start()
        running.append(controller)
        return Peer(mode, "127.0.0.1", kwargs["port"], recorder, controller)

    yield start
    for controller in running:
        controller.stop()


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on: connections are refused."""
    return free_port()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts TCP connections and never says a word."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def smtp_password() -> str:
    return PASSWORD


@pytest.fixture
def smtp_user() -> str:
    return USER
