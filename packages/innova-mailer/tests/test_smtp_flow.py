"""The whole recovery flow over HTTP with real SMTP peers, and what happens when SMTP fails."""

from __future__ import annotations

import logging
import re
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from innova_server.auth.tokens import hash_token
from innova_server.testing.mailbox import PASSWORD_CHANGED, RESET
from innova_server.testing.server import wait_for

PASSWORD = "correct horse battery"
NEW_PASSWORD = "un mot de passe tout neuf"
LINK = re.compile(r"https?://\S+/reset\?\S+")


@pytest.fixture
def smtp_env(monkeypatch, ca_file):
    """The plugin's own variables, as a deployer sets them: trust the test CA."""

    def apply(peer) -> None:
        monkeypatch.setenv("SMTP_CA_FILE", str(ca_file))
        monkeypatch.setenv("SMTP_TLS_MODE", peer.tls_mode())

    return apply


def wait_idle(server) -> None:
    wait_for(lambda: len(server.services.tasks) == 0, what="background tasks")


def mail_metric(client: httpx.Client, name: str, kind: str) -> float:
    text = client.get("/metrics").text
    match = re.search(rf'^innova_mail_{name}_total\{{kind="{kind}"\}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def deliveries(peer, about: str) -> list:
    """What the peer received of one kind (registration also mails a verification link)."""
    return [d for d in peer.deliveries if about in str(d.message["Subject"])]


def token_from(message) -> str:
    text = message.get_body(preferencelist=("plain",)).get_content()
    link = LINK.search(text).group(0)
    query = parse_qs(urlsplit(link).query)
    return query["token"][0]


@pytest.mark.parametrize("mode", ["plain", "starttls", "implicit"])
def test_the_whole_flow_over_smtp(mode, start_peer, start_server, smtp_env, smtp_user, db):
    peer = start_peer(mode)
    smtp_env(peer)
    server = start_server(**peer.settings(smtp_from_email="INNOVAPLUS <no-reply@innovaplus.test>"))
    email = "ada+smtp@example.com"
    with httpx.Client(base_url=server.url) as first, httpx.Client(base_url=server.url) as second:
        assert (
            first.post("/auth/register", json={"email": email, "password": PASSWORD, "name": "Ada"}).status_code == 201
        )
        assert second.post("/auth/login", json={"email": email, "password": PASSWORD}).status_code == 200
        old_cookies = [first.cookies["innova_session"], second.cookies["innova_session"]]

        assert first.post("/auth/forgot", json={"email": email}).status_code == 202
        delivery = wait_for(lambda: deliveries(peer, RESET), what="the reset mail")[0]
        message = delivery.message
        # What the SMTP server saw: authenticated, encrypted when asked, right envelope.
        assert delivery.login == smtp_user
        assert delivery.tls is (mode != "plain")
        assert delivery.mail_from == "no-reply@innovaplus.test"
        assert delivery.rcpt_tos == [email]
        assert message["To"] == email
        assert message["From"] == "INNOVAPLUS <no-reply@innovaplus.test>"
        assert message.get_content_type() == "multipart/alternative"
        text = message.get_body(preferencelist=("plain",)).get_content()
        assert "email=ada%2Bsmtp%40example.com" in text

        token = token_from(message)
        assert db.password_reset_tokens.find_one({"token_hash": hash_token(token)})["used"] is False
        reset = first.post("/auth/reset", json={"token": token, "email": email, "password": NEW_PASSWORD})
        assert reset.status_code == 200
        assert "set-cookie" not in reset.headers

        for cookie in old_cookies:
            assert httpx.get(f"{server.url}/auth/me", headers={"Cookie": f"innova_session={cookie}"}).status_code == 401
        assert first.post("/auth/login", json={"email": email, "password": PASSWORD}).status_code == 401
        assert first.post("/auth/login", json={"email": email, "password": NEW_PASSWORD}).status_code == 200
        again = first.post("/auth/reset", json={"token": token, "email": email, "password": "encore un autre !"})
        assert again.status_code == 400 and again.json()["detail"]["code"] == "invalid_token"

        notice = wait_for(lambda: deliveries(peer, PASSWORD_CHANGED), what="the notice")[0].message
        assert notice["To"] == email and "modifié" in str(notice["Subject"])
        assert token not in notice.as_string()
        assert mail_metric(first, "sent", "password_reset") >= 1
        assert mail_metric(first, "sent", "password_changed") >= 1


def no_secret_logged(caplog, secrets) -> None:
    # Everything the server process logs: ours at any level, libraries' at INFO
    # and above. "mail.log" is aiosmtpd, the test's peer, not the server.
    logged = "\n".join(
        r.getMessage() + (r.exc_text or "")
        for r in caplog.records
        if r.name != "mail.log" and (r.name.startswith("innova") or r.levelno >= logging.INFO)
    )
    for secret in secrets:
        assert secret not in logged, secret


def check_failure(server, email: str, caplog, extra_secrets=()) -> None:
    with httpx.Client(base_url=server.url) as client:
        assert client.post("/auth/register", json={"email": email, "password": PASSWORD}).status_code == 201
        before = mail_metric(client, "failures", "password_reset")
        started = time.perf_counter()
        known = client.post("/auth/forgot", json={"email": email})
        known_time = time.perf_counter() - started
        unknown = client.post("/auth/forgot", json={"email": "ghost@example.com"})
        assert known.status_code == unknown.status_code == 202
        assert known.json() == unknown.json()
        assert known_time < 2.0  # the failing SMTP is never waited for
        wait_idle(server)
        assert mail_metric(client, "failures", "password_reset") == before + 1
    errors = [r for r in caplog.records if r.name.startswith("innova") and "not delivered" in r.getMessage()]
    resets = [r for r in errors if "password_reset" in r.getMessage()]
    assert len(resets) == 1 and all(r.levelno == logging.ERROR for r in errors)
    assert "SMTP 127.0.0.1:" in resets[0].getMessage()
    no_secret_logged(caplog, [PASSWORD, "reset?token", "verify?token", email, *extra_secrets])


def test_smtp_unreachable(start_peer, start_server, smtp_env, closed_port, smtp_password, caplog):
    caplog.set_level(logging.DEBUG)
    peer = start_peer("starttls")
    smtp_env(peer)
    server = start_server(**peer.settings(smtp_port=closed_port))
    check_failure(server, "down@example.com", caplog, [smtp_password])
    assert "connection failed" in caplog.text


def test_smtp_silent_times_out(start_peer, start_server, smtp_env, silent_port, smtp_password, caplog):
    caplog.set_level(logging.DEBUG)
    peer = start_peer("plain")
    smtp_env(peer)
    server = start_server(**peer.settings(smtp_port=silent_port, smtp_timeout_seconds=0.5))
    started = time.monotonic()
    check_failure(server, "silent@example.com", caplog, [smtp_password])
    assert time.monotonic() - started < 10
    assert "no answer in time" in caplog.text


def test_smtp_refusing_the_message(start_peer, start_server, smtp_env, smtp_password, caplog):
    caplog.set_level(logging.DEBUG)
    peer = start_peer("starttls", refuse="554 5.7.1 Message rejected by policy")
    smtp_env(peer)
    server = start_server(**peer.settings())
    check_failure(server, "refused@example.com", caplog, [smtp_password])
    # The peer read the mail before refusing it: its token never reaches the log.
    token = token_from(deliveries(peer, RESET)[0].message)
    no_secret_logged(caplog, [token, hash_token(token)])
    assert "554" in caplog.text


def test_smtp_refusing_the_recipient(start_peer, start_server, smtp_env, smtp_password, caplog):
    caplog.set_level(logging.DEBUG)
    peer = start_peer("starttls", refuse_rcpt=True)
    smtp_env(peer)
    server = start_server(**peer.settings())
    # check_failure also asserts the (quoted by the server) address is not logged.
    check_failure(server, "unknown-mailbox@example.com", caplog, [smtp_password])
    assert "every recipient was refused (550)" in caplog.text
    assert peer.deliveries == []


def test_smtp_refusing_the_credentials(start_peer, start_server, smtp_env, caplog):
    caplog.set_level(logging.DEBUG)
    peer = start_peer("starttls")
    smtp_env(peer)
    wrong = "wrong-password-9f8e7d"
    server = start_server(**peer.settings(smtp_pass=wrong))
    check_failure(server, "badauth@example.com", caplog, [wrong])
    assert "SMTPAuthenticationError 535" in caplog.text
    assert peer.recorder.logins and not peer.recorder.logins[0][1]
    assert peer.deliveries == []


def test_untrusted_certificate_is_refused(start_peer, start_server, monkeypatch, caplog):
    # Without SMTP_CA_FILE the test CA is unknown: the mailer must not send.
    caplog.set_level(logging.DEBUG)
    peer = start_peer("starttls")
    monkeypatch.delenv("SMTP_CA_FILE", raising=False)
    monkeypatch.setenv("SMTP_TLS_MODE", "auto")
    server = start_server(**peer.settings())
    check_failure(server, "mitm@example.com", caplog)
    assert peer.deliveries == [] and peer.recorder.logins == []
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text or "TLS" in caplog.text


def test_starttls_required_but_not_offered(start_peer, start_server, smtp_env, caplog):
    # SMTP_USE_TLS=true on a server without STARTTLS: never falls back to plain.
    caplog.set_level(logging.DEBUG)
    peer = start_peer("plain")
    smtp_env(peer)
    server = start_server(**peer.settings(smtp_use_tls=True))
    check_failure(server, "downgrade@example.com", caplog)
    assert peer.deliveries == [] and peer.recorder.logins == []
