"""CSRF origin checks, CORS, client IP and rate limits."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from innova_server.testing.server import start_of_a_fresh_window

PASSWORD = "correct horse battery"
BODY = {"email": "ada@example.com", "password": PASSWORD}


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://localhost:3000.evil.example"},
        {"Referer": "https://evil.example/page"},
        {"Origin": "https://evil.example", "Referer": "http://localhost:3000/"},
        # An empty Origin is no Origin: the Referer decides. (Blank values
        # arrive empty: the HTTP parser strips surrounding whitespace.)
        {"Origin": "", "Referer": "https://evil.example/page"},
    ],
)
def test_foreign_origin_is_403(server, db, headers):
    response = httpx.post(f"{server.url}/auth/register", json=BODY, headers=headers)
    assert response.status_code == 403
    assert response.json()["detail"]["code"] == "csrf_origin"
    assert db.users.count_documents({}) == 0  # nothing was written


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Origin": "http://localhost:3000"},
        {"Referer": "http://localhost:3000/signup?x=1"},
        {"Origin": "HTTP://LOCALHOST:3000"},
        {"Origin": "", "Referer": "http://localhost:3000/signup"},
        {"Origin": ""},
    ],
)
def test_allowed_origin_or_no_browser_headers_pass(server, headers):
    response = httpx.post(f"{server.url}/auth/register", json=BODY, headers=headers)
    assert response.status_code == 201


def test_logout_is_csrf_protected_too(server):
    with httpx.Client(base_url=server.url) as client:
        client.post("/auth/register", json=BODY)
        refused = client.post("/auth/logout", headers={"Origin": "https://evil.example"})
        assert refused.status_code == 403
        assert client.get("/auth/me").status_code == 200


def test_cors_preflight_and_credentials(server):
    preflight = httpx.options(
        f"{server.url}/auth/login",
        headers={
            "Origin": "http://localhost:3000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert preflight.headers["access-control-allow-credentials"] == "true"
    foreign = httpx.options(
        f"{server.url}/auth/login",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in foreign.headers
    simple = httpx.get(f"{server.url}/health", headers={"Origin": "http://localhost:3000"})
    assert simple.headers["access-control-allow-origin"] == "http://localhost:3000"


def test_cors_exposes_the_headers_the_front_end_reads(start_server):
    server = start_server(rate_limit_login_email="1/15m")
    start_of_a_fresh_window(15 * 60)
    origin = {"Origin": "http://localhost:3000"}
    with httpx.Client(base_url=server.url, headers=origin) as client:
        client.post("/auth/login", json={**BODY, "password": "wrong password"})
        refused = client.post("/auth/login", json=BODY)
        assert refused.status_code == 429 and refused.headers["retry-after"]
        assert refused.headers["access-control-allow-origin"] == "http://localhost:3000"
        exposed = {name.strip().lower() for name in refused.headers["access-control-expose-headers"].split(",")}
        assert {"retry-after", "deprecation", "link"} <= exposed
        legacy = client.get("/innova/api/auth/me")
        assert "deprecation" in legacy.headers
        assert "deprecation" in legacy.headers["access-control-expose-headers"].lower()


def test_login_is_limited_per_email_with_retry_after(start_server):
    server = start_server(rate_limit_login_email="3/15m")
    start_of_a_fresh_window(15 * 60)
    with httpx.Client(base_url=server.url) as client:
        client.post("/auth/register", json=BODY)
        for _ in range(3):
            assert client.post("/auth/login", json={**BODY, "password": "wrong password"}).status_code == 401
        refused = client.post("/auth/login", json=BODY)  # even the right password
        assert refused.status_code == 429
        assert refused.json()["detail"]["code"] == "rate_limited"
        assert 0 < int(refused.headers["retry-after"]) <= 900
        # Another address is not affected.
        assert client.post("/auth/login", json={"email": "other@example.com", "password": "x" * 8}).status_code == 401
        assert 'innova_rate_limited_total{limit="login_email"}' in client.get("/metrics").text


def test_successful_logins_do_not_count_as_failures(start_server):
    server = start_server(rate_limit_login_email="3/15m")
    start_of_a_fresh_window(15 * 60)
    with httpx.Client(base_url=server.url) as client:
        client.post("/auth/register", json=BODY)
        for _ in range(6):
            assert client.post("/auth/login", json=BODY).status_code == 200


async def test_concurrent_failures_never_pass_the_limit(start_server):
    server = start_server(rate_limit_login_email="5/15m")
    start_of_a_fresh_window(15 * 60)
    async with httpx.AsyncClient(base_url=server.url) as client:
        await client.post("/auth/register", json=BODY)
        responses = await asyncio.gather(
            *[client.post("/auth/login", json={**BODY, "password": "wrong password"}) for _ in range(20)]
        )
    codes = sorted(r.status_code for r in responses)
    assert codes == [401] * 5 + [429] * 15


def test_login_is_limited_per_ip_from_a_trusted_proxy(start_server):
    server = start_server(rate_limit_login_ip="2/15m")
    start_of_a_fresh_window(15 * 60)
    with httpx.Client(base_url=server.url) as client:
        for n in range(2):
            r = client.post(
                "/auth/login",
                json={"email": f"u{n}@example.com", "password": "whatever1"},
                headers={"X-Forwarded-For": "203.0.113.7"},
            )
            assert r.status_code == 401
        blocked = client.post(
            "/auth/login",
            json={"email": "u9@example.com", "password": "whatever1"},
            headers={"X-Forwarded-For": "203.0.113.7"},
        )
        assert blocked.status_code == 429
        # The proxy (127.0.0.1) is trusted: another forwarded client is a different IP.
        other = client.post(
            "/auth/login",
            json={"email": "u9@example.com", "password": "whatever1"},
            headers={"X-Forwarded-For": "198.51.100.1"},
        )
        assert other.status_code == 401


def test_forwarded_for_is_ignored_from_an_untrusted_peer(start_server):
    server = start_server(rate_limit_register_ip="2/1h", trusted_proxies="10.0.0.1")
    with httpx.Client(base_url=server.url) as client:
        for n in range(2):
            r = client.post(
                "/auth/register",
                json={"email": f"r{n}@example.com", "password": PASSWORD},
                headers={"X-Forwarded-For": f"198.51.100.{n}"},
            )
            assert r.status_code == 201
        # Rotating X-Forwarded-For does not help: the peer address counts.
        r = client.post(
            "/auth/register",
            json={"email": "r9@example.com", "password": PASSWORD},
            headers={"X-Forwarded-For": "198.51.100.99"},
        )
        assert r.status_code == 429 and "retry-after" in r.headers


def test_register_is_limited_per_ip(start_server, db):
    server = start_server(rate_limit_register_ip="2/1h")
    with httpx.Client(base_url=server.url) as client:
        codes = [
            client.post("/auth/register", json={"email": f"n{n}@example.com", "password": PASSWORD}).status_code
            for n in range(3)
        ]
    assert codes == [201, 201, 429]
    assert db.users.count_documents({}) == 2
    limits = list(db.rate_limits.find({}))
    assert limits and all("@" not in doc["key"] and "127.0.0.1" not in doc["key"] for doc in limits)
    assert all(doc["expires_at"] > doc["window_start"] for doc in limits)
