"""End to end on loopback, as in production but on free ports.

nginx (the production site, test certificate) → gunicorn (deploy/gunicorn.conf.py,
uvicorn workers, the real `innova_server.asgi:app`) → the embedded database
(SecantusDB, or TEST_MONGO_URI). Everything is asked through nginx, as a
client on the Internet would.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from innova_server.testing.server import wait_until_healthy

from .conftest import (
    DEPLOY,
    ECHO_DELAY_MS,
    PUBLIC_NAME,
    SITE_CONF,
    WORKERS,
    TLSFiles,
    find_tool,
    free_port,
    ipv6_loopback,
    render_nginx,
    require_tool,
    start_gunicorn,
    stop_process,
    wait_for_port,
)


@dataclass
class Stack:
    https: str
    https6: str | None
    http: str
    http6: str | None
    backend: str
    webroot: Path
    ca: Path
    gunicorn_log: Path
    nginx_error_log: Path
    mongo_uri: str
    db_name: str

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("base_url", self.https)
        return httpx.Client(verify=ssl.create_default_context(cafile=str(self.ca)), timeout=30, **kwargs)

    def logs(self) -> str:
        parts = []
        for path in (self.gunicorn_log, self.nginx_error_log):
            if path.exists():
                parts.append(
                    f"--- {path.name} (tail) ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-40:])
                )
        return "\n".join(parts)


METRICS_TOKEN = "e2e-metrics-token-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def stack(mongo_uri: str, test_ca: TLSFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    nginx = require_tool("nginx", "Debian package nginx; `nox -s tests` installs it with apt-get when run as root")
    tmp = tmp_path_factory.mktemp("e2e")
    backend_port = free_port()
    db_name = f"innova_e2e_{uuid.uuid4().hex[:10]}"
    gunicorn, gunicorn_log = start_gunicorn(tmp, mongo_uri, backend_port, DB_NAME=db_name, METRICS_TOKEN=METRICS_TOKEN)
    nginx_process = None
    ipv6 = ipv6_loopback()
    layout = render_nginx(
        SITE_CONF, tmp / "nginx", cert=test_ca.cert, key=test_ca.key, upstream_port=backend_port, ipv6=ipv6
    )
    try:
        backend = f"http://127.0.0.1:{backend_port}"
        wait_until_healthy(backend, process=gunicorn, timeout=90, log=gunicorn_log)
        check = subprocess.run(layout.command(nginx, "-t"), capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        nginx_process = subprocess.Popen(layout.command(nginx), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(layout.https_port, process=nginx_process)
        wait_for_port(layout.http_port, process=nginx_process)
        yield Stack(
            https=f"https://127.0.0.1:{layout.https_port}",
            https6=f"https://[::1]:{layout.https_port}" if ipv6 else None,
            http=f"http://127.0.0.1:{layout.http_port}",
            http6=f"http://[::1]:{layout.http_port}" if ipv6 else None,
            backend=backend,
            webroot=layout.webroot,
            ca=test_ca.ca_pem,
            gunicorn_log=gunicorn_log,
            nginx_error_log=layout.prefix / "logs" / "error.log",
            mongo_uri=mongo_uri,
            db_name=db_name,
        )
    finally:
        if nginx_process is not None:
            stop_process(nginx_process, signal.SIGTERM)
        stop_process(gunicorn, signal.SIGTERM, timeout=40)


def test_gunicorn_runs_the_configured_workers(stack: Stack) -> None:
    log = stack.gunicorn_log.read_text(errors="replace")
    assert "uvicorn_worker.UvicornWorker" in log
    assert log.count("Booting worker with pid") >= WORKERS
    assert f"Listening at: {stack.backend}" in log


def test_health_through_nginx(stack: Stack) -> None:
    with stack.client() as client:
        response = client.get("/health")
    assert response.status_code == 200, stack.logs()
    body = response.json()
    assert body["status"] == "ok" and body["mongo"] == "ok" and body["provider"] == "echo"
    assert response.http_version in ("HTTP/1.1", "HTTP/2")
    assert "max-age=" in response.headers["strict-transport-security"]
    assert "nginx/" not in response.headers.get("server", "")  # server_tokens off
    if stack.https6:  # the IPv6 listener serves the same site
        with stack.client(base_url=stack.https6) as client:
            assert client.get("/health").json()["status"] == "ok"


def test_the_deploy_health_poll_succeeds_through_nginx(stack: Stack) -> None:
    """The workflow's health step, against this stack (curl trusting the test CA)."""
    if find_tool("curl") is None:
        pytest.skip("curl is not installed")
    result = subprocess.run(
        ["bash", str(DEPLOY / "scripts" / "wait-healthy.sh"), f"{stack.https}/health", "5", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CURL_CA_BUNDLE": str(stack.ca)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "healthy after 1 attempt" in result.stdout


def test_http_redirects_to_https(stack: Stack) -> None:
    urls = [stack.http] + ([stack.http6] if stack.http6 else [])
    for base in urls:
        response = httpx.get(f"{base}/health?probe=1", headers={"Host": PUBLIC_NAME}, follow_redirects=False)
        assert response.status_code == 301, base
        assert response.headers["location"] == f"https://{PUBLIC_NAME}/health?probe=1"
    # The redirect never takes the name from the client.
    response = httpx.get(f"{stack.http}/x", headers={"Host": "evil.example"}, follow_redirects=False)
    assert response.headers["location"] == f"https://{PUBLIC_NAME}/x"


def test_acme_challenge_is_served_over_http(stack: Stack) -> None:
    token = uuid.uuid4().hex
    (stack.webroot / ".well-known" / "acme-challenge" / token).write_text("proof-" + token)
    response = httpx.get(f"{stack.http}/.well-known/acme-challenge/{token}", follow_redirects=False)
    assert response.status_code == 200
    assert response.text == "proof-" + token


def test_metrics_are_refused_from_outside(stack: Stack) -> None:
    # Served on loopback, straight to gunicorn (multiprocess mode aggregates the workers)...
    direct = httpx.get(f"{stack.backend}/metrics")
    assert direct.status_code == 200
    assert "innova_http_requests_total" in direct.text
    # ...but never through nginx, whatever the spelling or the headers.
    with stack.client() as client:
        for path in ["/metrics", "/metrics/", "/metrics?format=text", "//metrics", "/%6Detrics", "/metrics/../metrics"]:
            response = client.get(path, headers={"X-Forwarded-For": "127.0.0.1", "Authorization": "Bearer guess"})
            assert response.status_code in (403, 404), path
            assert "innova_" not in response.text, path


def test_a_prometheus_elsewhere_scrapes_metrics_through_nginx_with_the_token(stack: Stack) -> None:
    with stack.client() as client:
        scraped = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert scraped.status_code == 200, scraped.text
        assert "innova_http_requests_total" in scraped.text
        # Loopback through nginx gets no free pass: a wrong token is refused even from 127.0.0.1.
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 403
        assert client.get("/metrics").status_code == 404


def test_client_max_body_size(stack: Stack) -> None:
    with stack.client() as client:
        response = client.post(
            "/auth/login", content=b"x" * (2 * 1024 * 1024), headers={"Content-Type": "application/json"}
        )
    assert response.status_code == 413


def test_the_app_sees_what_nginx_forwards(stack: Stack) -> None:
    """X-Forwarded-Proto: URLs the app builds say https. X-Forwarded-For:
    nginx replaces what the client sent with the address it saw, so a client
    cannot pick the IP that sessions record and rate limits count."""
    pymongo = pytest.importorskip("pymongo")
    agent = f"e2e-forwarded-{uuid.uuid4().hex[:8]}"
    with stack.client(headers={"User-Agent": agent}) as client:
        redirect = client.get("/health/", follow_redirects=False)  # the app's trailing-slash redirect
        assert redirect.status_code in (307, 308), redirect.text
        assert redirect.headers["location"].startswith("https://"), redirect.headers["location"]
        registered = client.post(
            "/auth/register",
            json={
                "email": f"fwd-{uuid.uuid4().hex[:8]}@example.org",
                "password": "correct horse battery",
                "name": "E2E",
            },
            headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "http"},
        )
        assert registered.status_code == 201, registered.text
    with pymongo.MongoClient(stack.mongo_uri, serverSelectionTimeoutMS=10_000) as mongo:
        session = mongo[stack.db_name].sessions.find_one({"user_agent": agent})
    assert session is not None
    assert session["ip"] == "127.0.0.1"  # nginx's view of this client, not the spoofed 203.0.113.9


def test_chat_stream_arrives_token_by_token(stack: Stack) -> None:
    """The echo provider spaces its words by ECHO_DELAY_MS: if nginx (or
    anything) buffered the stream, every token would arrive at once at the end."""
    probe = httpx.post(f"{stack.backend}/chatlaya/message", json={"content": "x"})
    if probe.status_code == 404 and "conversation" not in probe.text:
        pytest.skip("this tree has no chat API yet (POST /chatlaya/message is 404, issue 4): nothing to stream")
    assert probe.status_code == 401, probe.text  # the route exists and wants a session
    words = ["Bonjour", "Chatlaya,", "ceci", "est", "un", "flux", "progressif"]
    content = " ".join(words)
    with stack.client() as client:
        email = f"stream-{uuid.uuid4().hex[:8]}@example.org"
        registered = client.post(
            "/auth/register", json={"email": email, "password": "correct horse battery", "name": "E2E"}
        )
        assert registered.status_code == 201, registered.text
        assert "innova_session" in client.cookies
        session = client.post("/chatlaya/session")
        assert session.status_code == 200, session.text
        conversation_id = session.json()["conversation"]["id"]

        events: list[tuple[str, dict[str, object], float]] = []
        started = time.monotonic()
        with client.stream(
            "POST",
            "/chatlaya/message",
            json={"content": content, "conversation_id": conversation_id},
            headers={"Accept": "text/event-stream"},
        ) as response:
            assert response.status_code == 200, response.read()
            assert response.headers["content-type"].startswith("text/event-stream")
            event = "message"
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    events.append((event, json.loads(line[5:]), time.monotonic() - started))
                elif line == "":
                    event = "message"

    names = [name for name, _, _ in events]
    assert names[0] == "start" and names[-1] == "done", names
    tokens = [(data, at) for name, data, at in events if name == "token"]
    assert "".join(str(data["text"]) for data, _ in tokens) == content
    assert len(tokens) == len(words)
    first, last = tokens[0][1], tokens[-1][1]
    spread = (len(words) - 1) * ECHO_DELAY_MS / 1000  # 1.8 s between first and last word
    # Arrived incrementally: the last token came about `spread` after the first...
    assert last - first >= 0.6 * spread, f"tokens arrived together (first {first:.2f}s, last {last:.2f}s): buffered"
    # ...and the first one long before the end of the reply.
    assert first < last - 0.5 * spread
    gaps = [b[1] - a[1] for a, b in itertools.pairwise(tokens)]
    assert sum(1 for gap in gaps if gap >= 0.5 * ECHO_DELAY_MS / 1000) >= len(gaps) - 1, gaps


def test_gunicorn_stops_gracefully(tmp_path: Path, mongo_uri: str) -> None:
    """SIGTERM (systemctl stop/restart): gunicorn drains and exits 0, removing its temporary metrics dir."""
    port = free_port()
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    process, log = start_gunicorn(tmp_path, mongo_uri, port, TMPDIR=str(private_tmp))
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", process=process, timeout=90, log=log)
        metrics_dirs = list(private_tmp.glob("innova-metrics-*"))
        assert len(metrics_dirs) == 1 and list(metrics_dirs[0].glob("*.db"))  # the workers write there
    finally:
        stop_process(process, signal.SIGTERM, timeout=40)
    text = log.read_text(errors="replace")
    assert process.returncode == 0, text[-3000:]
    assert "Shutting down: Master" in text
    assert not list(private_tmp.glob("innova-metrics-*"))


def test_gunicorn_stops_with_status_3_on_a_configuration_error(tmp_path: Path, mongo_uri: str) -> None:
    """What the unit's RestartPreventExitStatus=3 relies on: a bad env file
    stops gunicorn (no respawn loop) with one line per problem in the journal."""
    process, log = start_gunicorn(
        tmp_path, mongo_uri, free_port(), journal=True, ENV="production", ALLOWED_ORIGINS="http://innovaplus.africa"
    )
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        stop_process(process, signal.SIGTERM)
        pytest.fail("gunicorn kept running with an unsafe production configuration")
    text = log.read_text(errors="replace")
    assert process.returncode == 3, text[-3000:]
    assert "innova: configuration error: ALLOWED_ORIGINS contains 'http://innovaplus.africa'" in text
    assert "innova: configuration error: COOKIE_SECURE" not in text  # only the real problems
    # On journald (JOURNAL_STREAM names the stream, as systemd sets it) every
    # line carries its priority: `journalctl -p err` shows why it stopped.
    lines = text.splitlines()
    assert "<3>innova: configuration error: ALLOWED_ORIGINS contains 'http://innovaplus.africa'" in text
    assert any(line.startswith("<3>") and "Worker failed to boot" in line for line in lines), text
    assert any(line.startswith("<6>") and "Booting worker" in line for line in lines), text
    assert all(re.match(r"<[0-7]>", line) for line in lines if line.strip()), text
