"""/health, /metrics and recovery from a MongoDB outage."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from innova_server import __version__
from innova_server.app import create_app
from innova_server.embedded import EmbeddedMongo
from innova_server.testing.server import LiveServer, wait_for, wait_until_healthy

PASSWORD = "correct horse battery"


def test_health_ok(server):
    response = httpx.get(f"{server.url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "mongo": "ok", "version": __version__, "provider": "echo"}


def ping_count(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith('innova_mongo_commands_total{command="ping"}'):
            return float(line.split()[-1])
    return 0.0


def test_concurrent_health_checks_share_one_ping(server):
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, limits=httpx.Limits(max_connections=40)) as client:
            return await asyncio.gather(*(client.get("/health") for _ in range(40)))

    before = ping_count(server.url)
    answers = asyncio.run(burst())
    assert all(a.status_code == 200 and a.json()["mongo"] == "ok" for a in answers)
    pings = ping_count(server.url) - before
    # Every check was answered by a real ping, but concurrent ones shared it.
    assert 1 <= pings < 40, pings
    # And a later check pings again: no answer is served from a stale result.
    httpx.get(f"{server.url}/health")
    assert ping_count(server.url) - before == pings + 1


def test_metrics_for_loopback_and_counted_routes(server):
    with httpx.Client(base_url=server.url) as client:
        client.get("/health")
        client.post("/auth/login", json={"email": "x@example.com", "password": "wrong password"})
        client.get("/conversations/does-not-exist")
        text = client.get("/metrics").text
    assert 'innova_http_requests_total{method="GET",route="/health",status="200"}' in text
    assert 'innova_http_request_duration_seconds_bucket{le="0.005",method="GET",route="/health"}' in text
    assert 'route="<unmatched>",status="404"' in text  # raw paths never become labels
    assert "innova_login_failures_total" in text
    assert 'innova_mongo_commands_total{command="' in text


def test_metrics_refused_to_remote_clients_without_the_token(start_server):
    server = start_server(metrics_token="s3cret-metrics-token")
    remote = {"X-Forwarded-For": "203.0.113.9"}  # as nginx would forward an outside client
    refused = httpx.get(f"{server.url}/metrics", headers=remote)
    assert refused.status_code == 403
    wrong = httpx.get(f"{server.url}/metrics", headers={**remote, "Authorization": "Bearer nope"})
    assert wrong.status_code == 403
    ok = httpx.get(f"{server.url}/metrics", headers={**remote, "Authorization": "Bearer s3cret-metrics-token"})
    assert ok.status_code == 200 and "innova_http_requests_total" in ok.text


def test_metrics_without_a_token_configured_is_loopback_only(server):
    response = httpx.get(
        f"{server.url}/metrics", headers={"X-Forwarded-For": "203.0.113.9", "Authorization": "Bearer x"}
    )
    assert response.status_code == 403


@pytest.mark.slow
def test_health_reports_an_outage_quickly_and_recovers_without_restart(make_settings, tmp_path: Path):
    mongo = EmbeddedMongo(tmp_path / "db").start()
    settings = make_settings(mongo_uri=mongo.uri, mongo_timeout_ms=1000)
    with LiveServer(create_app(settings)) as live, httpx.Client(base_url=live.url, timeout=10) as client:
        try:
            assert client.get("/health").json()["mongo"] == "ok"
            client.post("/auth/register", json={"email": "ada@example.com", "password": PASSWORD})
            mongo.stop()

            started = time.monotonic()
            down = client.get("/health")
            assert time.monotonic() - started < 5  # answers within the 2 s budget, never hangs
            assert down.status_code == 503
            assert down.json()["status"] == "error" and down.json()["mongo"] == "error"

            me = client.get("/auth/me")
            assert me.status_code == 503
            assert me.json()["detail"]["code"] == "database_unavailable"

            mongo = EmbeddedMongo(tmp_path / "db", port=mongo.port).start()
            wait_until_healthy(live.url, timeout=30)
            assert client.get("/auth/me").status_code == 200  # the data and the session survived
        finally:
            mongo.stop()


@pytest.mark.slow
def test_a_stalled_mongodb_gives_503_not_a_hang_and_recovers(make_settings, tmp_path: Path):
    """MongoDB accepts connections but stops answering (here: its process is SIGSTOPped).

    PyMongo's monitor would notice at its next heartbeat (every 10 s by
    default) and interrupt the requests; with heartbeats a minute apart, as on
    a server whose monitoring connection still answers, only the operation
    timeout (`timeoutMS` = MONGO_TIMEOUT_MS) stands between a request and a hang.
    """
    mongo = EmbeddedMongo(tmp_path / "db").start()  # our own: the shared one must keep answering
    assert mongo.process is not None
    pid = mongo.process.pid
    settings = make_settings(mongo_uri=f"{mongo.uri}&heartbeatFrequencyMS=60000", mongo_timeout_ms=1000)
    try:
        with LiveServer(create_app(settings)) as live, httpx.Client(base_url=live.url, timeout=40) as client:
            assert client.post("/auth/register", json={"email": "ada@example.com", "password": PASSWORD}).is_success
            assert client.get("/auth/me").status_code == 200
            os.kill(pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                me = client.get("/auth/me")
                assert me.status_code == 503, me.text
                assert me.json()["detail"]["code"] == "database_unavailable"
                assert me.headers["retry-after"]
                down = client.get("/health")
                assert down.status_code == 503 and down.json()["mongo"] == "error"
                assert time.monotonic() - started < 30  # bounded by MONGO_TIMEOUT_MS, loosely
            finally:
                os.kill(pid, signal.SIGCONT)
            wait_until_healthy(live.url, timeout=30)
            wait_for(lambda: client.get("/auth/me").status_code == 200, timeout=30, what="/auth/me to recover")
    finally:
        os.kill(pid, signal.SIGCONT)
        mongo.stop()


@pytest.mark.parametrize(
    "forwarded", ["garbage", "garbage, 127.0.0.1", "203.0.113.9, not-an-ip, ::1", "unknown", "", ", ,"]
)
def test_an_unparsable_forwarded_hop_is_not_the_loopback_proxy(server, forwarded):
    """From the trusted loopback proxy, a hop we cannot read is an unknown client, never loopback."""
    response = httpx.get(f"{server.url}/metrics", headers={"X-Forwarded-For": forwarded})
    assert response.status_code == 403
    assert response.json()["detail"]["code"] == "forbidden"
    # What nginx would send for a loopback client still passes.
    assert httpx.get(f"{server.url}/metrics", headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 200
