"""Several gunicorn workers: state and metrics are shared, whichever worker answers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from innova_server.embedded import free_port
from innova_server.testing.server import start_of_a_fresh_window, wait_until_healthy

pytest.importorskip("gunicorn", reason="gunicorn comes with innova-server[production]")
pytest.importorskip("uvicorn_worker", reason="uvicorn-worker comes with innova-server[production]")

CONFIG = """
from prometheus_client import multiprocess

def child_exit(server, worker):
    multiprocess.mark_process_dead(worker.pid)
"""


@pytest.mark.slow
def test_two_workers_share_sessions_rate_limits_and_metrics(tmp_path: Path, mongo_uri: str, mongo_client, db_name):
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    (tmp_path / "gunicorn_test.conf.py").write_text(CONFIG)
    port = free_port()
    env = {
        **os.environ,
        "ENV": "test",
        "MONGO_URI": mongo_uri,
        "DB_NAME": db_name,
        "COOKIE_SECURE": "false",
        "ARGON2_MEMORY_COST": "1024",
        "ARGON2_TIME_COST": "1",
        "ARGON2_PARALLELISM": "1",
        "RATE_LIMIT_LOGIN_EMAIL": "3/15m",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "innova_server.asgi:app",
        "-c",
        str(tmp_path / "gunicorn_test.conf.py"),
        "--worker-class",
        "uvicorn_worker.UvicornWorker",
        "--workers",
        "2",
        "--bind",
        f"127.0.0.1:{port}",
    ]
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process=process)

        body = {"email": "ada@example.com", "password": "correct horse battery"}
        # A new connection per request, so both workers answer.
        register = httpx.post(f"{url}/auth/register", json=body)
        cookie = {"Cookie": f"innova_session={register.cookies['innova_session']}"}
        assert all(httpx.get(f"{url}/auth/me", headers=cookie).status_code == 200 for _ in range(10))
        start_of_a_fresh_window(15 * 60)
        failures = [
            httpx.post(f"{url}/auth/login", json={**body, "password": "wrong password"}).status_code for _ in range(5)
        ]
        assert failures == [401, 401, 401, 429, 429]

        for _ in range(20):
            httpx.get(f"{url}/health")
        pids = {p.name.split("_")[-1] for p in metrics_dir.glob("*.db")}
        assert len(pids) >= 2, "both workers should have written metrics"
        text = httpx.get(f"{url}/metrics").text
        health = re.search(
            r'^innova_http_requests_total\{method="GET",route="/health",status="200"\} (\S+)$', text, re.M
        )
        assert health is not None and float(health[1]) >= 21  # the readiness probe(s) + 20, across workers
        me = re.search(r'^innova_http_requests_total\{method="GET",route="/auth/me",status="200"\} (\S+)$', text, re.M)
        assert me is not None and float(me[1]) == 10
    finally:
        process.terminate()
        process.wait(30)
        mongo_client.drop_database(db_name)


@pytest.mark.slow
def test_gunicorn_refuses_to_boot_the_app_without_env(tmp_path: Path, mongo_uri: str):
    """ENV unset would mean development (the console mailer logs reset links): the workers refuse to boot."""
    env = {key: value for key, value in os.environ.items() if key != "ENV"}
    env.update({"MONGO_URI": mongo_uri, "COOKIE_SECURE": "false"})
    command = [
        sys.executable, "-m", "gunicorn", "innova_server.asgi:app",
        "--worker-class", "uvicorn_worker.UvicornWorker", "--workers", "1", "--bind", f"127.0.0.1:{free_port()}",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3  # gunicorn: "Worker failed to boot", and the master stops
    assert "innova: configuration error: ENV is not set" in result.stderr
