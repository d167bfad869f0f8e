"""/health, /metrics and recovery from a MongoDB outage."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from innova_server import __version__, health
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
        if line.startswith("innova_mongo_ping_seconds_count"):
            return float(line.split()[-1])
    return 0.0


def test_health_checks_answer_from_the_monitor_without_pinging_each(server):
    """Readiness is the worker's background ping (one a second), never a ping per check:
    forty concurrent checks cost no more pings than the monitor's own."""

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, limits=httpx.Limits(max_connections=40)) as client:
            return await asyncio.gather(*(client.get("/health") for _ in range(40)))

    httpx.get(f"{server.url}/health")  # the monitor has answered once
    before, started = ping_count(server.url), time.monotonic()
    answers = asyncio.run(burst())
    assert all(a.status_code == 200 and a.json()["mongo"] == "ok" for a in answers)
    assert answers[0].headers["cache-control"] == "no-store"
    elapsed = time.monotonic() - started
    assert ping_count(server.url) - before <= elapsed / health.INTERVAL + 2
    # And the monitor keeps pinging: the answer is never older than its interval plus a ping.
    wait_for(lambda: ping_count(server.url) >= before + 2, timeout=10, what="the monitor's next pings")


def test_liveness_answers_before_the_app_with_the_loop_lag(server):
    live = httpx.get(f"{server.url}/health/live")
    assert live.status_code == 200
    body = live.json()
    assert body["status"] == "ok" and body["version"] == __version__
    assert body["loop_lag_ms"] >= 0 and body["replies_generating"] == 0 and body["turns_waiting_to_open"] == 0
    assert body["requests_waiting_to_start"] == 0
    assert httpx.head(f"{server.url}/health/live").status_code == 200
    # Only GET/HEAD are the probe; anything else reaches the app, which has no such route.
    assert httpx.post(f"{server.url}/health/live").status_code in (404, 405)


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
            # The readiness answer is at most one monitor interval plus one ping old.
            while down.status_code == 200 and time.monotonic() - started < health.STALE_AFTER + 2:
                time.sleep(0.2)
                down = client.get("/health")
            assert time.monotonic() - started < health.STALE_AFTER + 3  # never hangs
            assert down.status_code == 503
            assert down.json()["status"] == "error" and down.json()["mongo"] == "error"
            # Liveness does not depend on the database: the process still serves.
            assert client.get("/health/live").status_code == 200

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
                wait_for(lambda: client.get("/health").status_code == 503, timeout=15, what="/health to say 503")
                assert client.get("/health").json()["mongo"] == "error"
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


async def test_readiness_without_the_lifespan_pings_on_demand_instead_of_going_stale(make_settings):
    """An app served without its lifespan has no monitor: each check pings, never a stale 503."""
    app = create_app(make_settings())
    transport = httpx.ASGITransport(app=app)  # runs no lifespan
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/health")).status_code == 200
        await asyncio.sleep(health.STALE_AFTER + 0.5)
        assert (await client.get("/health")).status_code == 200
    await app.state.services.db.close()
