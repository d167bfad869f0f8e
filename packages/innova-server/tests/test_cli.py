"""The `innova` command, run as a deployer would: a real process."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from innova_server.embedded import free_port
from innova_server.testing.server import wait_until_healthy

PASSWORD = "correct horse battery"
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("MONGO", "ENV", "PROVIDER", "MAILER", "SMTP"))}


def innova(*args: str, cwd: Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "innova_server.cli", *args],
        cwd=cwd,
        env={**CLEAN_ENV, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_check_refuses_unsafe_production_with_clear_lines(tmp_path):
    result = innova("check", cwd=tmp_path, ENV="production", ALLOWED_ORIGINS="*", COOKIE_SECURE="false")
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert re.search(r"^error: MONGO_URI is not set", result.stdout, re.M)
    assert re.search(r"^error: COOKIE_SECURE=false", result.stdout, re.M)


def test_serve_refuses_unsafe_production_before_listening(tmp_path):
    result = innova("serve", cwd=tmp_path, ENV="production", timeout=30)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert any("MONGO_URI" in line for line in lines)
    assert all(line.startswith("innova: ") for line in lines)


def test_asgi_module_exits_3_on_bad_config_for_gunicorn(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "import innova_server.asgi"],
        cwd=tmp_path,
        env={**CLEAN_ENV, "ENV": "production"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 3
    assert "Traceback" not in result.stderr
    assert "innova: configuration error: MONGO_URI is not set" in result.stderr


def test_the_asgi_module_tunes_the_workers_garbage_collector_and_create_app_does_not(tmp_path, mongo_uri):
    """The production entry point freezes the startup heap and makes full collections rarer (gctuning.py);
    an app built by `create_app` alone (tests, embedding) leaves the process's collector as it was."""
    probe = (
        "import gc, sys; from innova_server.app import create_app; create_app(); "
        "print(gc.get_freeze_count(), gc.get_threshold()[2]); "
        "import innova_server.asgi; print(gc.get_freeze_count(), gc.get_threshold()[2])"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={**CLEAN_ENV, "ENV": "development", "MONGO_URI": mongo_uri, "LOG_LEVEL": "warning"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    before, after = (line.split() for line in result.stdout.strip().splitlines()[-2:])
    assert before == ["0", "10"]
    assert int(after[0]) > 10_000 and after[1] == "100"


SAFE_PRODUCTION_ENV = {"ENV": "production", "ALLOWED_ORIGINS": "https://innovaplus.africa", "SMTP_HOST": "smtp.example"}
BAD_URIS = ["http://x", "mongodb://u:p@ss@h/", "mongodb://h:99999"]


@pytest.mark.parametrize("uri", BAD_URIS)
def test_malformed_mongo_uri_is_one_clear_line_everywhere(tmp_path, uri):
    asgi = subprocess.run(
        [sys.executable, "-c", "import innova_server.asgi"],
        cwd=tmp_path,
        env={**CLEAN_ENV, **SAFE_PRODUCTION_ENV, "MONGO_URI": uri},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert asgi.returncode == 3
    assert asgi.stderr.strip().splitlines() == [
        line for line in asgi.stderr.strip().splitlines() if line.startswith("innova: configuration error: MONGO_URI")
    ]
    check = innova("check", cwd=tmp_path, MONGO_URI=uri)
    assert check.returncode == 1
    assert re.search(r"^error: MONGO_URI is not a valid MongoDB URI \(.+\): write it as mongodb://", check.stdout, re.M)
    init = innova("db", "init", cwd=tmp_path, MONGO_URI=uri)
    assert init.returncode == 2
    assert init.stderr.startswith("innova: MONGO_URI is not a valid MongoDB URI")
    serve = innova("serve", cwd=tmp_path, MONGO_URI=uri, timeout=30)
    assert serve.returncode == 2 and "MONGO_URI is not a valid MongoDB URI" in serve.stderr
    for result in (asgi, check, init, serve):
        assert "Traceback" not in result.stdout + result.stderr
        assert "p@ss" not in result.stdout + result.stderr


def test_db_init_with_mongodb_down_is_one_line_and_fails(tmp_path):
    result = innova(
        "db", "init", cwd=tmp_path, MONGO_URI=f"mongodb://app:pa55word@127.0.0.1:{free_port()}/", MONGO_TIMEOUT_MS="500"
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "pa55word" not in result.stderr
    assert result.stderr.startswith("innova: could not create the indexes in innova_db: ServerSelectionTimeoutError")
    assert result.stdout == ""


def test_check_in_development_reports_the_embedded_database(tmp_path):
    result = innova("check", cwd=tmp_path)
    assert "ok: no MONGO_URI; `innova serve` will start the embedded database" in result.stdout
    assert result.returncode == 0
    # As without `[embedded]`: `sys.modules[name] = None` is how Python
    # itself marks a module as not importable.
    hide = "import sys; sys.modules['secantus'] = None; from innova_server.cli import main; raise SystemExit(main())"
    missing = subprocess.run(
        [sys.executable, "-c", hide, "check"], cwd=tmp_path, env=CLEAN_ENV, capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 1
    assert re.search(r"^error: No MONGO_URI and the embedded database is not installed: pip", missing.stdout, re.M)
    assert "will start the embedded database" not in missing.stdout


def test_check_pings_mongo_and_masks_secrets(tmp_path, mongo_uri):
    ok = innova("check", cwd=tmp_path, MONGO_URI=mongo_uri)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok: MongoDB answers" in ok.stdout and "configuration OK" in ok.stdout

    down = innova(
        "check",
        "-v",
        cwd=tmp_path,
        MONGO_URI=f"mongodb://appuser:pa55word@127.0.0.1:{free_port()}/?authSource=innova_db",
        METRICS_TOKEN="tok-123456",
        SMTP_PASS="smtp-secret",
    )
    assert down.returncode == 1
    assert "MongoDB does not answer" in down.stdout
    for secret in ("pa55word", "tok-123456", "smtp-secret"):
        assert secret not in down.stdout + down.stderr


def test_unknown_provider_is_reported_with_what_is_installed(tmp_path, mongo_uri):
    check = innova("check", cwd=tmp_path, MONGO_URI=mongo_uri, PROVIDER="nope")
    assert check.returncode == 1
    assert "PROVIDER='nope' is not installed. Installed providers: echo" in check.stdout
    serve = innova("serve", cwd=tmp_path, MONGO_URI=mongo_uri, PROVIDER="nope", timeout=30)
    assert serve.returncode == 2
    assert "Traceback" not in serve.stderr
    assert "PROVIDER='nope' is not installed" in serve.stderr
    model = innova("check", cwd=tmp_path, MONGO_URI=mongo_uri, CHAT_MODEL="gpt-9")
    assert "CHAT_MODEL='gpt-9' is not a model of provider 'echo': echo." in model.stdout


def test_db_init_creates_the_indexes(tmp_path, mongo_uri, mongo_client, db_name):
    result = innova("db", "init", cwd=tmp_path, MONGO_URI=mongo_uri, DB_NAME=db_name)
    assert result.returncode == 0, result.stderr
    db = mongo_client[db_name]
    try:
        assert db.users.index_information()["email_unique"]["unique"] is True
        sessions = db.sessions.index_information()
        assert sessions["token_hash_unique"]["unique"] is True
        assert sessions["expires_at_ttl"]["expireAfterSeconds"] == 0
        assert db.rate_limits.index_information()["key_window_unique"]["unique"] is True
        assert "expires_at_ttl" in db.password_reset_tokens.index_information()
        # Idempotent.
        assert innova("db", "init", cwd=tmp_path, MONGO_URI=mongo_uri, DB_NAME=db_name).returncode == 0
    finally:
        mongo_client.drop_database(db_name)


def test_plugins_lists_the_echo_provider(tmp_path):
    result = innova("plugins", "--json", cwd=tmp_path)
    assert result.returncode == 0
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    assert plugins["echo"]["providers"] == ["echo"]
    assert plugins["echo"]["error"] is None
    assert plugins["echo"]["version"]
    text = innova("plugins", cwd=tmp_path).stdout
    assert "providers: echo" in text


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _start_serve(tmp_path: Path, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "innova_server.cli", "serve", "--port", str(port)],
        cwd=tmp_path,
        env={**CLEAN_ENV, "COOKIE_SECURE": "false", "INNOVA_DATA_DIR": str(tmp_path / "data")},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )


def _stop(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    return err


@pytest.mark.slow
def test_serve_runs_with_the_embedded_database_and_keeps_data(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = _start_serve(tmp_path, port)
    try:
        wait_until_healthy(url, process=first)
        assert (
            httpx.post(f"{url}/auth/register", json={"email": "ada@example.com", "password": PASSWORD}).status_code
            == 201
        )
        assert httpx.get(f"{url}/playground").status_code == 200  # development serves the playground
    finally:
        err = _stop(first)
    assert f"data in {tmp_path / 'data' / 'db'}" in err
    assert f"innova: playground at http://127.0.0.1:{port}/playground" in err
    db_port = int(re.search(r"listening on mongodb://127\.0\.0\.1:(\d+)", err)[1])
    assert "stopping the embedded database" in err
    assert not _port_open(db_port)  # the database process is gone

    second = _start_serve(tmp_path, port)
    try:
        wait_until_healthy(url, process=second)
        login = httpx.post(f"{url}/auth/login", json={"email": "ada@example.com", "password": PASSWORD})
        assert login.status_code == 200  # the account survived the restart
    finally:
        _stop(second)
