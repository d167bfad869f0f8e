"""Reset order (hash before consuming), the mail deadline, shutdown, and the console mailer.

The database outage is real: a SecantusDB of the test's own, stopped while
the reset hashes and started again on the same port and storage.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage

import httpx
import pytest
from argon2 import PasswordHasher
from prometheus_client import REGISTRY

from innova_server.auth.passwords import Passwords
from innova_server.auth.recovery import MAIL_DEADLINE_SECONDS, RecoveryManager
from innova_server.auth.store import SessionStore, UserStore
from innova_server.auth.tokens import hash_token, new_token
from innova_server.background import BackgroundTasks
from innova_server.db import Database
from innova_server.embedded import EmbeddedMongo
from innova_server.mails import reset_mail
from innova_server.ratelimit import RateLimiter
from innova_server.testing.mailbox import RESET, text_of, wait_for_mails
from innova_server.testing.server import wait_for

PASSWORD = "correct horse battery"
NEW_PASSWORD = "tout nouveau mot de passe"


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def seed_user_and_token(db, email: str) -> str:
    now = datetime.now(UTC)
    user_id = db.users.insert_one(
        {
            "email": email,
            "name": None,
            "password_hash": PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PASSWORD),
            "created_at": now,
            "updated_at": now,
        }
    ).inserted_id
    token = new_token()
    db.password_reset_tokens.insert_one(
        {
            "token_hash": hash_token(token),
            "user_id": user_id,
            "email": email,
            "created_at": now,
            "expires_at": now + timedelta(minutes=30),
            "used": False,
        }
    )
    return token


def test_a_database_outage_while_hashing_leaves_the_link_usable(start_server, tmp_path, db_name):
    from pymongo import MongoClient

    mongo = EmbeddedMongo(tmp_path / "db").start()
    try:
        # Slow hashes, so the outage surely starts while the reset's hash runs.
        server = start_server(
            mongo_uri=mongo.uri,
            mongo_timeout_ms=1000,
            argon2_time_cost=12,
            argon2_memory_cost=65536,
            argon2_parallelism=1,
        )
        email = "outage@example.com"
        with MongoClient(mongo.uri, tz_aware=True) as client:
            token = seed_user_and_token(client[db_name], email)
        body = {"token": token, "email": email, "password": NEW_PASSWORD}

        answers: list[int] = []
        hashes = sample("innova_argon2_operations_total", {"op": "hash"})
        submit = threading.Thread(
            target=lambda: answers.append(httpx.post(f"{server.url}/auth/reset", json=body, timeout=120).status_code)
        )
        submit.start()
        wait_for(lambda: sample("innova_argon2_operations_total", {"op": "hash"}) > hashes, 30, what="the hash")
        mongo.stop()
        submit.join(120)
        assert answers and answers[0] >= 500, answers  # the reset could not finish

        mongo.start()
        wait_for(lambda: httpx.get(f"{server.url}/health").status_code == 200, 30, what="the database back")
        again = httpx.post(f"{server.url}/auth/reset", json=body, timeout=120)
        assert again.status_code == 200, again.text  # the link was not burnt by the failed attempt
        login = httpx.post(f"{server.url}/auth/login", json={"email": email, "password": NEW_PASSWORD}, timeout=120)
        assert login.status_code == 200
    finally:
        mongo.stop()


def test_a_wrong_token_costs_no_argon2_hash(server, db):
    email = "cheap@example.com"
    token = seed_user_and_token(db, email)
    hashes = sample("innova_argon2_operations_total", {"op": "hash"})
    for wrong in (new_token(), token):
        response = httpx.post(
            f"{server.url}/auth/reset", json={"token": wrong, "email": "other@example.com", "password": NEW_PASSWORD}
        )
        assert response.status_code == 400 and response.json()["detail"]["code"] == "invalid_token"
    assert sample("innova_argon2_operations_total", {"op": "hash"}) == hashes
    assert db.password_reset_tokens.find_one({"token_hash": hash_token(token)})["used"] is False


# -- the mail deadline and shutdown ------------------------------------------


class HangingMailer:
    """A mailer that never answers (a stuck relay), optionally declaring its own timeout."""

    def __init__(self, send_timeout_seconds: float | None = None) -> None:
        if send_timeout_seconds is not None:
            self.send_timeout_seconds = send_timeout_seconds
        self.started = asyncio.Event()

    async def send(self, message: EmailMessage) -> None:
        self.started.set()
        await asyncio.sleep(3600)


def recovery_with(settings, mailer: object, tasks: BackgroundTasks | None = None) -> RecoveryManager:
    db = Database(settings.mongo_uri.get_secret_value(), settings.db_name, timeout_ms=settings.mongo_timeout_ms)
    passwords = Passwords(time_cost=1, memory_cost=1024, parallelism=1)
    return RecoveryManager(
        settings,
        db,
        UserStore(db),
        SessionStore(db),
        passwords,
        RateLimiter(db),
        mailer,  # type: ignore[arg-type]
        tasks or BackgroundTasks(),
    )


@pytest.mark.parametrize(
    ("declared", "smtp_timeout", "expected"),
    [
        (None, 10.0, MAIL_DEADLINE_SECONDS),  # a third-party mailer: the core's own bound
        (None, 30.0, 120.0),  # never shorter than the SMTP timeouts allow
        (200.0, 10.0, 205.0),  # a mailer's own send timeout always has room to run out first
    ],
)
async def test_mail_deadline_leaves_room_for_the_mailers_own_timeout(make_settings, declared, smtp_timeout, expected):
    settings = make_settings(smtp_timeout_seconds=smtp_timeout)
    assert recovery_with(settings, HangingMailer(declared)).mail_deadline == expected


async def test_a_delivery_cancelled_at_shutdown_is_logged_and_counted(make_settings, caplog):
    caplog.set_level(logging.DEBUG, logger="innova")
    settings = make_settings()
    mailer = HangingMailer()
    tasks = BackgroundTasks()
    recovery = recovery_with(settings, mailer, tasks)
    token = new_token()
    message = reset_mail(settings, to="ada@example.com", token=token, name=None, now=datetime.now(UTC))
    before = sample("innova_mail_failures_total", {"kind": "password_reset"})

    tasks.spawn("password_reset_mail", recovery.deliver("password_reset", message, user_id="u-42"))
    await asyncio.wait_for(mailer.started.wait(), 5)
    await tasks.drain(grace_seconds=0.1)

    assert sample("innova_mail_failures_total", {"kind": "password_reset"}) == before + 1
    lost = [r for r in caplog.records if "not delivered" in r.getMessage()]
    assert len(lost) == 1 and lost[0].levelno == logging.ERROR
    assert "password_reset" in lost[0].getMessage() and "u-42" in lost[0].getMessage()
    assert "password_reset_mail cancelled" in caplog.text
    for secret in (token, "reset?token", "ada@example.com"):
        assert secret not in caplog.text


# -- the console mailer: its whole point is the link in the log ---------------


def test_the_console_mailer_logs_the_reset_link(server, caplog):
    caplog.set_level(logging.INFO, logger="innova.mail")
    email = "dev@example.com"
    with httpx.Client(base_url=server.url) as client:
        assert client.post("/auth/register", json={"email": email, "password": PASSWORD}).status_code == 201
        assert client.post("/auth/forgot", json={"email": email}).status_code == 202
    body = text_of(wait_for_mails(server, 1, about=RESET)[0])
    link = re.search(r"https?://\S+/reset\?\S+", body).group(0)
    logged = [r for r in caplog.records if r.name == "innova.mail" and RESET in r.getMessage()]
    assert logged and logged[0].levelno == logging.WARNING
    assert link in logged[0].getMessage() and "development only" in logged[0].getMessage()
