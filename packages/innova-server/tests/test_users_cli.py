"""Disabled accounts, and `innova users …` run as an operator would: a real process on the real database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from innova_server.testing.chat_client import PASSWORD, chat, signed_in

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("MONGO", "ENV", "PROVIDER", "MAILER", "SMTP"))}


def users(*args: str, cwd: Path, mongo_uri: str, db_name: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "innova_server.cli", "users", *args],
        cwd=cwd,
        env={**CLEAN_ENV, "ENV": "test", "MONGO_URI": mongo_uri, "DB_NAME": db_name, "MAILER": "console"},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def run(tmp_path, mongo_uri, db_name):
    return lambda *args, stdin="": users(*args, cwd=tmp_path, mongo_uri=mongo_uri, db_name=db_name, stdin=stdin)


def test_disable_ends_sessions_refuses_login_and_forgot_then_enable(server, run, db):
    with signed_in(server.url, "ada@example.com") as ada, signed_in(server.url, "bob@example.com") as bob:
        chat(ada, "bonjour")
        other_device = httpx.Client(base_url=server.url)
        assert other_device.post("/auth/login", json={"email": "ada@example.com", "password": PASSWORD}).is_success

        result = run("disable", "ADA@example.com ")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "disabled ada@example.com; 2 session(s) ended"
        # Every session is dead at once (both devices), Bob's is not.
        assert ada.get("/auth/me").status_code == 401 and other_device.get("/auth/me").status_code == 401
        assert bob.get("/auth/me").status_code == 200
        # The right password: 403 account_disabled; a wrong one reveals nothing.
        right = httpx.post(f"{server.url}/auth/login", json={"email": "ada@example.com", "password": PASSWORD})
        assert right.status_code == 403 and right.json()["detail"]["code"] == "account_disabled"
        wrong = httpx.post(f"{server.url}/auth/login", json={"email": "ada@example.com", "password": "x" * 12})
        assert wrong.status_code == 401 and wrong.json()["detail"]["code"] == "invalid_credentials"
        # Forgot: still 202, and nothing is issued.
        assert httpx.post(f"{server.url}/auth/forgot", json={"email": "ada@example.com"}).status_code == 202
        assert db.password_reset_tokens.count_documents({}) == 0

        shown = run("show", "ada@example.com")
        assert shown.returncode == 0
        facts = dict(line.split(": ", 1) for line in shown.stdout.strip().splitlines())
        assert facts["email"] == "ada@example.com" and facts["disabled_at"] and facts["live_sessions"] == "0"
        assert facts["conversations"] == "1" and facts["messages"] == "2"
        assert "password" not in shown.stdout and "hash" not in shown.stdout

        assert run("enable", "ada@example.com").stdout.strip() == "enabled ada@example.com"
        again = httpx.post(f"{server.url}/auth/login", json={"email": "ada@example.com", "password": PASSWORD})
        assert again.status_code == 200
        assert ada.get("/auth/me").status_code == 401  # old sessions stay dead after enabling
        other_device.close()


def test_list_logout_and_delete(server, run, db):
    with signed_in(server.url, "ada@example.com") as ada, signed_in(server.url, "bob@example.com") as bob:
        chat(ada, "à effacer")
        listed = run("list")
        assert listed.returncode == 0
        assert [line.split("\t")[0] for line in listed.stdout.strip().splitlines()] == [
            "bob@example.com",
            "ada@example.com",
        ]
        rows = json.loads(run("list", "--json", "--limit", "1").stdout)
        assert [row["email"] for row in rows] == ["bob@example.com"] and set(rows[0]) >= {"id", "created_at"}

        assert run("logout", "bob@example.com").stdout.strip() == "1 session(s) ended for bob@example.com"
        assert bob.get("/auth/me").status_code == 401

        refused = run("delete", "ada@example.com", stdin="someone@else\n")
        assert refused.returncode == 1 and ada.get("/auth/me").status_code == 200
        deleted = run("delete", "ada@example.com", stdin="ada@example.com\n")
        assert deleted.returncode == 0, deleted.stderr
        assert deleted.stdout.strip().startswith("deleted ada@example.com and all its data")
        assert ada.get("/auth/me").status_code == 401
        assert db.users.count_documents({"email": "ada@example.com"}) == 0
        assert db.messages.count_documents({}) == 0 and db.conversations.count_documents({}) == 0
        assert db.users.count_documents({"email": "bob@example.com"}) == 1
        with signed_in(server.url, "ada@example.com") as again:  # the address is free
            assert again.get("/auth/me").status_code == 200


@pytest.mark.parametrize("action", ["show", "disable", "enable", "logout", "delete"])
def test_a_missing_account_is_exit_1_with_one_line(server, run, action):
    result = run(action, "nobody@example.com", *(["--yes"] if action == "delete" else []))
    assert result.returncode == 1
    assert result.stderr.strip() == "innova: no account for nobody@example.com" and result.stdout == ""


@pytest.mark.parametrize("action", [("list",), ("show", "ada@example.com"), ("disable", "ada@example.com")])
def test_a_database_that_is_down_is_one_line_and_exit_1(tmp_path, action):
    result = users(*action, cwd=tmp_path, mongo_uri="mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=300", db_name="x")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("innova: the database is unavailable")
    assert "Traceback" not in result.stderr and "127.0.0.1:9" not in result.stderr
