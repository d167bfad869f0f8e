"""Password recovery over real HTTP and a real database, with the console mailer.

The SMTP end-to-end runs (aiosmtpd, STARTTLS, implicit TLS, refusing peers)
are in packages/innova-mailer/tests.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage

import httpx
import pytest

from innova_server.auth.tokens import hash_token
from innova_server.mail import MailerError
from innova_server.mails import ascii_address
from innova_server.plugins import RegisterMailer, hookimpl
from innova_server.testing import registered
from innova_server.testing.mailbox import (
    PASSWORD_CHANGED,
    RESET,
    link_of,
    sent,
    token_of,
    verify_address,
    wait_for_mails,
    wait_idle,
)

PASSWORD = "correct horse battery"
NEW_PASSWORD = "tout nouveau mot de passe"


def register(client: httpx.Client, email: str, password: str = PASSWORD, **extra: object) -> httpx.Response:
    response = client.post("/auth/register", json={"email": email, "password": password, **extra})
    assert response.status_code == 201, response.text
    return response


def forgot_and_get_token(client: httpx.Client, server, email: str, already: int = 0) -> str:
    assert client.post("/auth/forgot", json={"email": email}).status_code == 202
    return token_of(wait_for_mails(server, already + 1, about=RESET)[already])


def test_forgot_is_the_same_202_for_known_and_unknown_addresses(server, db):
    with httpx.Client(base_url=server.url) as client:
        register(client, "ada@example.com")
        known = client.post("/auth/forgot", json={"email": " ADA@example.com "})
        unknown = client.post("/auth/forgot", json={"email": "nobody@example.com"})
    assert known.status_code == unknown.status_code == 202
    assert known.json() == unknown.json()
    assert set(known.json()) == {"detail"}
    assert known.headers.get("set-cookie") is None
    mails = wait_for_mails(server, 1, about=RESET)
    wait_idle(server)
    assert len(sent(server, RESET)) == 1  # none for the unknown address
    assert mails[0]["To"] == "ada@example.com"

    token = token_of(mails[0])
    stored = db.password_reset_tokens.find_one({})
    assert db.password_reset_tokens.count_documents({}) == 1
    assert stored["token_hash"] == hash_token(token)
    assert token not in str(stored)
    assert len(token) == 43  # 256 bits, token_urlsafe(32)
    assert stored["email"] == "ada@example.com"
    assert stored["user_id"] == db.users.find_one({"email": "ada@example.com"})["_id"]
    assert stored["used"] is False
    assert stored["expires_at"] - stored["created_at"] == timedelta(minutes=30)
    assert stored["created_at"] <= datetime.now(UTC)


def test_reset_ttl_follows_the_setting(start_server, db):
    server = start_server(reset_token_ttl_minutes=5)
    with httpx.Client(base_url=server.url) as client:
        register(client, "ttl@example.com")
        forgot_and_get_token(client, server, "ttl@example.com")
    stored = db.password_reset_tokens.find_one({})
    assert stored["expires_at"] - stored["created_at"] == timedelta(minutes=5)
    assert "5 minutes" in link_context(sent(server, RESET)[0])


def link_context(message: EmailMessage) -> str:
    return message.get_body(preferencelist=("plain",)).get_content()


def test_the_reset_mail(start_server):
    server = start_server(
        frontend_url="https://front.example.org/app/", smtp_from_email="Support <aide@innovaplus.africa>"
    )
    email = "ada+test@example.com"
    with httpx.Client(base_url=server.url) as client:
        register(client, email, name="Ada <b>&</b> Lovelace")
        verify_address(client, server, email)  # mails show the name only once the address is verified
        token = forgot_and_get_token(client, server, email)
    message = sent(server, RESET)[0]

    assert message.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in message.iter_parts()] == ["text/plain", "text/html"]
    assert message["From"] == "Support <aide@innovaplus.africa>"
    assert message["To"] == email
    assert "mot de passe" in message["Subject"]
    assert message["Date"].datetime.tzinfo is not None
    assert abs(message["Date"].datetime - datetime.now(UTC)) < timedelta(minutes=1)
    assert re.fullmatch(r"<[^@<>]+@innovaplus\.africa>", message["Message-ID"])
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["Content-Language"] == "fr"

    text = message.get_body(preferencelist=("plain",)).get_content()
    page = message.get_body(preferencelist=("html",)).get_content()
    expected = f"https://front.example.org/app/reset?token={token}&email=ada%2Btest%40example.com"
    assert link_of(message) == expected
    assert "Bonjour Ada <b>&</b> Lovelace," in text
    assert "30 minutes" in text
    # In HTML, the link's `&` is escaped and so is the user-chosen name.
    assert f'href="{expected.replace("&", "&amp;")}"' in page
    assert "Ada &lt;b&gt;&amp;&lt;/b&gt; Lovelace" in page
    assert "<b>" not in page
    # No tracking: no images, no other links than the reset link.
    assert "<img" not in page.lower()
    assert set(re.findall(r'href="([^"]+)"', page)) == {expected.replace("&", "&amp;")}
    assert page.lstrip().startswith("<!DOCTYPE html>") and 'lang="fr"' in page


def test_the_whole_reset_flow(server, db):
    email = "flow@example.com"
    with httpx.Client(base_url=server.url) as first, httpx.Client(base_url=server.url) as second:
        register(first, email, name="Flo")
        assert second.post("/auth/login", json={"email": email, "password": PASSWORD}).status_code == 200
        old_cookies = [first.cookies["innova_session"], second.cookies["innova_session"]]
        token = forgot_and_get_token(first, server, email)

        response = first.post("/auth/reset", json={"token": token, "email": email, "password": NEW_PASSWORD})
        assert response.status_code == 200, response.text
        assert set(response.json()) == {"detail"}
        assert "set-cookie" not in response.headers  # no automatic login

        for cookie in old_cookies:  # every session of the user is gone
            me = httpx.get(f"{server.url}/auth/me", headers={"Cookie": f"innova_session={cookie}"})
            assert me.status_code == 401
        assert db.sessions.count_documents({}) == 0

        old = first.post("/auth/login", json={"email": email, "password": PASSWORD})
        assert old.status_code == 401 and old.json()["detail"]["code"] == "invalid_credentials"
        new = first.post("/auth/login", json={"email": email, "password": NEW_PASSWORD})
        assert new.status_code == 200
        assert first.get("/auth/me").json()["user"]["email"] == email

        again = first.post("/auth/reset", json={"token": token, "email": email, "password": "yet another one!"})
        assert again.status_code == 400
        assert again.json() == {"detail": {"code": "invalid_token", "message": again.json()["detail"]["message"]}}

    stored = db.password_reset_tokens.find_one({"token_hash": hash_token(token)})
    assert stored["used"] is True and stored["used_at"] >= stored["created_at"]
    assert db.users.find_one({"email": email})["password_hash"].startswith("$argon2id$")

    notice = wait_for_mails(server, 1, about=PASSWORD_CHANGED)[0]
    assert notice["To"] == email
    assert "modifié" in notice["Subject"]
    assert notice.get_content_type() == "multipart/alternative"
    assert token not in notice.as_string()


def test_reset_voids_the_other_pending_links(server):
    email = "two@example.com"
    with httpx.Client(base_url=server.url) as client:
        register(client, email)
        first = forgot_and_get_token(client, server, email)
        second = forgot_and_get_token(client, server, email, already=1)
        assert first != second
        assert (
            client.post("/auth/reset", json={"token": second, "email": email, "password": NEW_PASSWORD}).status_code
            == 200
        )
        late = client.post("/auth/reset", json={"token": first, "email": email, "password": "an attacker's pick"})
    assert late.status_code == 400 and late.json()["detail"]["code"] == "invalid_token"


def test_legacy_prefix_serves_forgot_and_reset(server):
    email = "legacy@example.com"
    with httpx.Client(base_url=server.url) as client:
        register(client, email)
        response = client.post("/innova/api/auth/forgot", json={"email": email})
        assert response.status_code == 202
        assert response.headers["deprecation"] == "true"
        assert response.headers["link"] == '</auth/forgot>; rel="successor-version"'
        token = token_of(wait_for_mails(server, 1, about=RESET)[0])
        reset = client.post("/innova/api/auth/reset", json={"token": token, "email": email, "password": NEW_PASSWORD})
        assert reset.status_code == 200
        assert reset.headers["link"] == '</auth/reset>; rel="successor-version"'
        assert client.post("/auth/login", json={"email": email, "password": NEW_PASSWORD}).status_code == 200


def test_expired_token_is_refused(server, db):
    email = "late@example.com"
    with httpx.Client(base_url=server.url) as client:
        register(client, email)
        token = forgot_and_get_token(client, server, email)
        db.password_reset_tokens.update_many({}, {"$set": {"expires_at": datetime.now(UTC) - timedelta(seconds=1)}})
        response = client.post("/auth/reset", json={"token": token, "email": email, "password": NEW_PASSWORD})
        assert response.status_code == 400 and response.json()["detail"]["code"] == "invalid_token"
        assert client.post("/auth/login", json={"email": email, "password": PASSWORD}).status_code == 200


def test_token_with_another_email_is_refused_and_not_consumed(server):
    with httpx.Client(base_url=server.url) as client:
        register(client, "victim@example.com")
        register(client, "other@example.com")
        token = forgot_and_get_token(client, server, "victim@example.com")
        for email in ("other@example.com", "nobody@example.com"):
            response = client.post("/auth/reset", json={"token": token, "email": email, "password": NEW_PASSWORD})
            assert response.status_code == 400 and response.json()["detail"]["code"] == "invalid_token"
        # Neither account changed, and the token still works for its own address.
        assert client.post("/auth/login", json={"email": "other@example.com", "password": PASSWORD}).status_code == 200
        ok = client.post("/auth/reset", json={"token": token, "email": "VICTIM@example.com", "password": NEW_PASSWORD})
        assert ok.status_code == 200


def test_password_policy_is_422_and_keeps_the_token(server):
    email = "policy@example.com"
    with httpx.Client(base_url=server.url) as client:
        register(client, email)
        token = forgot_and_get_token(client, server, email)
        for password in ("short", "x" * 129, ""):
            response = client.post("/auth/reset", json={"token": token, "email": email, "password": password})
            assert response.status_code == 422, password
        assert (
            client.post("/auth/reset", json={"token": token, "email": email, "password": NEW_PASSWORD}).status_code
            == 200
        )


@pytest.mark.parametrize(
    "token",
    [
        "",
        "x",
        "A" * 42,
        "A" * 44,
        "A" * 42 + "=",
        "é" * 43,
        "../../etc/passwd",
        "A" * 10_000,
        "A" * 100_000,
        "\x00" * 43,
        '{"$gt": ""}',
    ],
    ids=lambda t: f"len{len(t)}",
)
def test_garbage_tokens_are_400_invalid_token_and_fast(server, token):
    with httpx.Client(base_url=server.url) as client:
        started = time.perf_counter()
        response = client.post("/auth/reset", json={"token": token, "email": "a@example.com", "password": NEW_PASSWORD})
        elapsed = time.perf_counter() - started
    assert response.status_code == 400
    assert response.json()["detail"]["code"] == "invalid_token"
    assert elapsed < 2.0


def test_well_formed_unknown_token_is_400(server):
    response = httpx.post(
        f"{server.url}/auth/reset", json={"token": "A" * 43, "email": "a@example.com", "password": NEW_PASSWORD}
    )
    assert response.status_code == 400 and response.json()["detail"]["code"] == "invalid_token"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/auth/forgot", {}),
        ("/auth/forgot", {"email": "not an address"}),
        ("/auth/forgot", {"email": None}),
        ("/auth/forgot", {"email": "a@example.com", "extra": 1}),
        ("/auth/forgot", {"email": "a" * 400 + "@example.com"}),
        ("/auth/forgot", ["a@example.com"]),
        ("/auth/reset", {}),
        ("/auth/reset", {"token": "A" * 43, "email": "a@example.com"}),
        ("/auth/reset", {"token": "A" * 43, "password": NEW_PASSWORD}),
        ("/auth/reset", {"email": "a@example.com", "password": NEW_PASSWORD}),
        ("/auth/reset", {"token": 12, "email": "a@example.com", "password": NEW_PASSWORD}),
        ("/auth/reset", {"token": "A" * 43, "email": "a@example.com", "password": NEW_PASSWORD, "user_id": "x"}),
        ("/auth/reset", {"token": "A" * 43, "email": "bad", "password": NEW_PASSWORD}),
    ],
)
def test_missing_unknown_or_bad_fields_are_422(server, path, body):
    response = httpx.post(f"{server.url}{path}", json=body)
    assert response.status_code == 422, response.text


def test_non_json_body_is_refused(server):
    response = httpx.post(
        f"{server.url}/auth/forgot",
        content=b"email=a@example.com",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code in (415, 422)


async def test_concurrent_submissions_of_one_token_give_exactly_one_200(server, db):
    email = "race@example.com"
    with httpx.Client(base_url=server.url) as client:
        register(client, email)
        token = forgot_and_get_token(client, server, email)
    async with httpx.AsyncClient(base_url=server.url) as client:
        responses = await asyncio.gather(
            *[
                client.post("/auth/reset", json={"token": token, "email": email, "password": f"{NEW_PASSWORD} {i}"})
                for i in range(12)
            ]
        )
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] + [400] * 11, codes
    winner = next(i for i, r in enumerate(responses) if r.status_code == 200)
    with httpx.Client(base_url=server.url) as client:
        ok = client.post("/auth/login", json={"email": email, "password": f"{NEW_PASSWORD} {winner}"})
        assert ok.status_code == 200
    assert db.password_reset_tokens.count_documents({"used": True}) == 1


def test_forgot_is_rate_limited_per_email(start_server):
    server = start_server(rate_limit_forgot_email="2/1h")
    with httpx.Client(base_url=server.url) as client:
        register(client, "limited@example.com")
        for email in ("limited@example.com", "ghost@example.com"):  # with or without an account
            codes = [client.post("/auth/forgot", json={"email": email}).status_code for _ in range(3)]
            assert codes == [202, 202, 429]
        limited = client.post("/auth/forgot", json={"email": "LIMITED@example.com"})
        assert limited.status_code == 429
        assert limited.json()["detail"]["code"] == "rate_limited"
        assert 1 <= int(limited.headers["retry-after"]) <= 3600
        assert client.post("/auth/forgot", json={"email": "fresh@example.com"}).status_code == 202
    wait_idle(server)
    assert len(sent(server, RESET)) == 2


def test_forgot_is_rate_limited_per_ip(start_server):
    server = start_server(rate_limit_forgot_ip="3/1h")
    with httpx.Client(base_url=server.url) as client:
        codes = [client.post("/auth/forgot", json={"email": f"u{i}@example.com"}).status_code for i in range(4)]
        assert codes == [202, 202, 202, 429]
        assert int(client.post("/auth/forgot", json={"email": "u9@example.com"}).headers["retry-after"]) >= 1
        # Behind the trusted proxy (loopback), the forwarded address is the client.
        other = client.post(
            "/auth/forgot", json={"email": "u5@example.com"}, headers={"X-Forwarded-For": "203.0.113.9"}
        )
        assert other.status_code == 202


# -- the mailer is slow, failing or broken: the client never notices ---------


class SlowMailer:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.sent: list[EmailMessage] = []

    async def send(self, message: EmailMessage) -> None:
        await asyncio.sleep(self.delay)
        self.sent.append(message)


class FailingMailer:
    """A third-party mailer that fails; `leaky` raises a non-MailerError that quotes the mail."""

    def __init__(self, leaky: bool) -> None:
        self.leaky = leaky
        self.sent: list[EmailMessage] = []

    async def send(self, message: EmailMessage) -> None:
        self.sent.append(message)
        if self.leaky:
            raise RuntimeError(f"boom while sending {message.as_string()}")
        raise MailerError("relay.example.net:587 refused the message: 554 5.7.1 policy")


class TestMailers:
    @hookimpl
    def innova_register_mailers(self, register: RegisterMailer) -> None:
        register("slow", lambda settings: SlowMailer(3.0))
        register("failing", lambda settings: FailingMailer(leaky=False))
        register("leaky", lambda settings: FailingMailer(leaky=True))


def timed_post(client: httpx.Client, path: str, body: object) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = client.post(path, json=body)
    return response, time.perf_counter() - started


def test_forgot_does_not_wait_for_the_mail_and_takes_similar_time(start_server):
    with registered(TestMailers(), "test-mailers"):
        server = start_server(mailer="slow")
    with httpx.Client(base_url=server.url) as client:
        register(client, "slow@example.com")
        known = [timed_post(client, "/auth/forgot", {"email": "slow@example.com"}) for _ in range(3)]
        unknown = [timed_post(client, "/auth/forgot", {"email": "ghost@example.com"}) for _ in range(3)]
    assert {r.status_code for r, _ in known + unknown} == {202}
    assert known[0][0].json() == unknown[0][0].json()
    # The mailer takes 3 s; neither answer waits for it.
    assert max(t for _, t in known + unknown) < 2.0
    deadline = time.monotonic() + 10
    while len(sent(server, RESET)) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("mailer", ["failing", "leaky"])
def test_mailer_failure_is_logged_without_secrets_and_counted(start_server, caplog, mailer):
    caplog.set_level(logging.DEBUG)
    with registered(TestMailers(), "test-mailers"):
        server = start_server(mailer=mailer)
    email = "fail@example.com"
    with httpx.Client(base_url=server.url) as client:
        register(client, email)
        before = mail_failures(client)
        known = client.post("/auth/forgot", json={"email": email})
        unknown = client.post("/auth/forgot", json={"email": "ghost@example.com"})
        assert known.status_code == unknown.status_code == 202
        assert known.json() == unknown.json()
        wait_idle(server)
        token = token_of(sent(server, RESET)[0])
        assert mail_failures(client) == before + 1
        # The link still works: the token was stored before the mail failed.
        reset = client.post("/auth/reset", json={"token": token, "email": email, "password": NEW_PASSWORD})
        assert reset.status_code == 200
        wait_idle(server)
        assert mail_failures(client, "password_changed") >= 1

    failures = [r for r in caplog.records if r.name.startswith("innova") and "not delivered" in r.getMessage()]
    assert failures and all(r.levelno == logging.ERROR for r in failures)
    # Everything our code logs at any level, and anything logged at INFO or above
    # (pymongo's DEBUG command log, which quotes documents, is not ours).
    logged = "\n".join(
        r.getMessage() + (r.exc_text or "")
        for r in caplog.records
        if r.name.startswith("innova") or r.levelno >= logging.INFO
    )
    for secret in (token, hash_token(token), "reset?token", NEW_PASSWORD, PASSWORD, email, "Bonjour"):
        assert secret not in logged


def mail_failures(client: httpx.Client, kind: str = "password_reset") -> float:
    text = client.get("/metrics").text
    match = re.search(rf'^innova_mail_failures_total\{{kind="{kind}"\}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_production_refuses_the_console_mailer(make_settings):
    settings = make_settings(
        env="production", mailer="console", allowed_origins=["https://innovaplus.africa"], cookie_secure=True
    )
    assert any("console mailer" in line for line in settings.problems())


def test_an_internationalised_domain_gets_its_mail_in_idna_form(server):
    email = "ana@exémple.fr"
    with httpx.Client(base_url=server.url) as client:
        already = len(sent(server, RESET))
        register(client, email)
        token = forgot_and_get_token(client, server, email, already=already)
        message = sent(server, RESET)[already]
        # An ASCII header a mail server accepts, not an RFC 2047-encoded address.
        assert message["To"] == "ana@xn--exmple-cva.fr"
        assert b"To: ana@xn--exmple-cva.fr" in message.as_bytes()
        reset = client.post("/auth/reset", json={"token": token, "email": email, "password": "a brand new one"})
        assert reset.status_code == 200


def test_a_non_ascii_local_part_is_refused_at_registration(server):
    # It would need SMTPUTF8, which many providers refuse: the reset mail could never arrive.
    with httpx.Client(base_url=server.url) as client:
        refused = client.post("/auth/register", json={"email": "josé@example.fr", "password": PASSWORD})
    assert refused.status_code == 422
    assert "ASCII" in refused.text


def test_the_idna_form_keeps_the_domain_it_was_given():
    # Python's IDNA 2003 codec would send ß to "ss": strasse.de, someone else's domain.
    assert ascii_address("ana@straße.de") == "ana@xn--strae-oqa.de"
    assert ascii_address("ana@example.com") == "ana@example.com"
