"""Accounts and cookie sessions over a real HTTP connection and a real database."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from http.cookies import SimpleCookie

import httpx
import pytest
from argon2 import PasswordHasher

from innova_server.auth.tokens import hash_token

PASSWORD = "correct horse battery"


def register(
    client: httpx.Client, email: str = "ada@example.com", password: str = PASSWORD, **extra: object
) -> httpx.Response:
    return client.post("/auth/register", json={"email": email, "password": password, **extra})


def set_cookie_attributes(response: httpx.Response) -> dict[str, str]:
    header = response.headers["set-cookie"]
    parts = [p.strip() for p in header.split(";")]
    attributes = {p.split("=", 1)[0].lower(): (p.split("=", 1)[1] if "=" in p else "") for p in parts[1:]}
    attributes["value"] = parts[0].split("=", 1)[1]
    return attributes


def test_register_sets_session_cookie_and_me_returns_user(server, db):
    with httpx.Client(base_url=server.url) as client:
        response = register(client, "  Ada@Example.COM ", name="Ada")
        assert response.status_code == 201
        user = response.json()["user"]
        assert user["email"] == "ada@example.com"
        assert user["name"] == "Ada"
        assert set(user) == {"id", "email", "name", "email_verified", "created_at"}
        assert user["email_verified"] is False
        assert datetime.fromisoformat(user["created_at"]).tzinfo is not None

        me = client.get("/auth/me")
        assert me.status_code == 200
        assert me.json()["user"] == user

    stored = db.users.find_one({"email": "ada@example.com"})
    assert stored["password_hash"].startswith("$argon2id$")
    assert PASSWORD not in str(stored)


def test_cookie_attributes_match_the_contract(start_server):
    server = start_server(cookie_secure=True)
    with httpx.Client(base_url=server.url) as client:
        response = register(client)
    attributes = set_cookie_attributes(response)
    assert len(attributes["value"]) == 43  # secrets.token_urlsafe(32)
    assert attributes["max-age"] == "604800"
    assert attributes["path"] == "/"
    assert attributes["samesite"].lower() == "lax"
    assert "httponly" in attributes and "secure" in attributes
    assert "domain" not in attributes


def test_only_the_token_hash_is_stored(server, db):
    with httpx.Client(base_url=server.url) as client:
        response = register(client)
    token = SimpleCookie(response.headers["set-cookie"])["innova_session"].value
    session = db.sessions.find_one({})
    assert session["token_hash"] == hash_token(token)
    assert token not in str(session)
    assert session["expires_at"] - session["created_at"] == timedelta(days=7)
    assert session["ip"] == "127.0.0.1"


def test_duplicate_email_is_409_case_insensitive(server):
    with httpx.Client(base_url=server.url) as client:
        assert register(client, "bob@example.com").status_code == 201
        response = register(client, "BOB@example.com ")
    assert response.status_code == 409
    assert response.json() == {"detail": {"code": "email_taken", "message": response.json()["detail"]["message"]}}


async def test_concurrent_registrations_of_one_address_give_exactly_one_201(server, db):
    async with httpx.AsyncClient(base_url=server.url) as client:
        responses = await asyncio.gather(
            *[
                client.post("/auth/register", json={"email": "race@example.com", "password": PASSWORD})
                for _ in range(20)
            ]
        )
    codes = sorted(r.status_code for r in responses)
    assert codes == [201] + [409] * 19
    assert db.users.count_documents({"email": "race@example.com"}) == 1


def test_login_logout_and_rotation(server, db):
    with httpx.Client(base_url=server.url) as client:
        register(client, "carol@example.com")
        first = client.cookies["innova_session"]
        response = client.post("/auth/login", json={"email": "CAROL@example.com", "password": PASSWORD})
        assert response.status_code == 200
        assert response.json()["user"]["email"] == "carol@example.com"
        second = client.cookies["innova_session"]
        assert second != first
        # The cookie sent with the login was revoked (rotation).
        assert db.sessions.count_documents({"token_hash": hash_token(first)}) == 0
        assert httpx.get(f"{server.url}/auth/me", headers={"Cookie": f"innova_session={first}"}).status_code == 401
        assert client.get("/auth/me").status_code == 200

        logout = client.post("/auth/logout")
        assert logout.status_code == 204
        cleared = set_cookie_attributes(logout)
        assert cleared["value"] in ("", '""')
        assert cleared["max-age"] == "0"
        assert cleared["path"] == "/" and "httponly" in cleared and cleared["samesite"].lower() == "lax"
        assert db.sessions.count_documents({"token_hash": hash_token(second)}) == 0
        assert httpx.get(f"{server.url}/auth/me", headers={"Cookie": f"innova_session={second}"}).status_code == 401
        # Logging out again, or without a cookie, is still 204.
        assert client.post("/auth/logout").status_code == 204


def test_wrong_password_and_unknown_email_are_the_same_401(server):
    with httpx.Client(base_url=server.url) as client:
        register(client, "dan@example.com")
        wrong = client.post("/auth/login", json={"email": "dan@example.com", "password": "not the password"})
        unknown = client.post("/auth/login", json={"email": "nobody@example.com", "password": "not the password"})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()
    assert wrong.json()["detail"]["code"] == "invalid_credentials"


def test_unknown_email_costs_an_argon2_verification(start_server):
    # Real argon2 cost: without the dummy verification an unknown email
    # would answer in a fraction of the time of a wrong password.
    server = start_server(argon2_time_cost=3, argon2_memory_cost=65536, argon2_parallelism=4)
    with httpx.Client(base_url=server.url) as client:
        register(client, "erin@example.com")

        def timed(email: str) -> float:
            started = time.perf_counter()
            client.post("/auth/login", json={"email": email, "password": "wrong password!"})
            return time.perf_counter() - started

        wrong = sorted(timed("erin@example.com") for _ in range(5))[2]
        unknown = sorted(timed("nobody@example.com") for _ in range(5))[2]
    assert unknown > 0.5 * wrong, (unknown, wrong)


def test_hash_is_upgraded_at_login_when_parameters_change(start_server, db):
    old = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    db.users.insert_one(
        {
            "email": "old@example.com",
            "name": None,
            "password_hash": old.hash(PASSWORD),
            "created_at": datetime.now(UTC),
            "updated_at": datetime.now(UTC),
        }
    )
    server = start_server(argon2_time_cost=2, argon2_memory_cost=2048, argon2_parallelism=1)
    with httpx.Client(base_url=server.url) as client:
        assert client.post("/auth/login", json={"email": "old@example.com", "password": PASSWORD}).status_code == 200
    upgraded = db.users.find_one({"email": "old@example.com"})["password_hash"]
    assert "m=2048,t=2,p=1" in upgraded
    with httpx.Client(base_url=server.url) as client:
        assert client.post("/auth/login", json={"email": "old@example.com", "password": PASSWORD}).status_code == 200


def test_expired_session_is_refused_before_the_ttl_monitor_runs(server, db):
    with httpx.Client(base_url=server.url) as client:
        register(client)
        db.sessions.update_many({}, {"$set": {"expires_at": datetime.now(UTC) - timedelta(seconds=1)}})
        response = client.get("/auth/me")
    assert response.status_code == 401
    assert response.json()["detail"]["code"] == "not_authenticated"


@pytest.mark.parametrize(
    "cookie",
    ["", "garbage", "x" * 43, "é" * 10, "A" * 4000, "../../etc/passwd", "A" * 42 + "=", '"quoted"'],
)
def test_garbage_or_oversized_cookies_are_401(server, cookie):
    with httpx.Client(base_url=server.url) as client:
        response = client.get("/auth/me", headers={"Cookie": b"innova_session=" + cookie.encode()})
    assert response.status_code == 401
    assert response.json()["detail"]["code"] == "not_authenticated"


def test_me_without_cookie_is_401(server):
    response = httpx.get(f"{server.url}/auth/me")
    assert response.status_code == 401
    assert response.json() == {"detail": {"code": "not_authenticated", "message": "Not authenticated."}}


def test_legacy_prefix_serves_the_same_handlers_with_deprecation_headers(server):
    with httpx.Client(base_url=server.url) as client:
        response = client.post("/innova/api/auth/register", json={"email": "legacy@example.com", "password": PASSWORD})
        assert response.status_code == 201
        assert response.headers["deprecation"] == "true"
        assert response.headers["link"] == '</auth/register>; rel="successor-version"'
        me = client.get("/innova/api/auth/me")
        assert me.status_code == 200 and me.headers["link"] == '</auth/me>; rel="successor-version"'
        # Errors carry the headers too.
        client.cookies.clear()
        denied = client.get("/innova/api/auth/me")
        assert denied.status_code == 401 and denied.headers["deprecation"] == "true"
        assert client.get("/auth/me").headers.get("deprecation") is None
        metrics = client.get("/metrics").text
    assert 'innova_legacy_auth_requests_total{route="/innova/api/auth/me"}' in metrics


@pytest.mark.parametrize("order", ["ours first", "theirs first", "two headers"])
def test_a_request_with_two_session_cookies_is_not_authenticated(server, order):
    """Cookie tossing: a sibling subdomain sets `innova_session` for the parent domain."""
    with httpx.Client(base_url=server.url) as client:
        response = client.post("/auth/register", json={"email": "tossed@example.com", "password": "correct horse"})
        ours = response.cookies["innova_session"]
    theirs = "A" * 43  # well-formed, someone else's session
    if order == "two headers":
        headers = [("cookie", f"innova_session={ours}"), ("cookie", f"innova_session={theirs}")]
    else:
        pair = [f"innova_session={ours}", f"innova_session={theirs}"]
        headers = [("cookie", "; ".join(pair if order == "ours first" else reversed(pair)))]
    response = httpx.get(f"{server.url}/auth/me", headers=headers)
    assert response.status_code == 401 and response.json()["detail"]["code"] == "not_authenticated"
    alone = httpx.get(f"{server.url}/auth/me", headers={"cookie": f"other=1; innova_session={ours}"})
    assert alone.status_code == 200
