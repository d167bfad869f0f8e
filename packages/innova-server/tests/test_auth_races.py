"""Logins against resets, argon2 under load, and the rate-limit and legacy-prefix edges.

Real server, real database, real argon2: the races are run, not simulated.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import anyio
import anyio.lowlevel
import httpx
from argon2 import PasswordHasher
from argon2.exceptions import VerificationError
from prometheus_client import REGISTRY

from innova_server.auth.passwords import Passwords
from innova_server.testing.accounts import plant_reset_token
from innova_server.testing.server import start_of_a_fresh_window, wait_for

PASSWORD = "correct horse battery"
NEW_PASSWORD = "tout nouveau mot de passe"


def argon2_runs(op: str) -> float:
    return REGISTRY.get_sample_value("innova_argon2_operations_total", {"op": op}) or 0.0


def me_status(server, cookie: str) -> int:
    return httpx.get(f"{server.url}/auth/me", headers={"Cookie": f"innova_session={cookie}"}).status_code


# -- item: a login that verified the old password must not outlive a reset ----


async def test_logins_racing_a_reset_never_keep_a_session(start_server, db):
    # Costlier than the test default, so many logins are mid-verification when the reset lands.
    server = start_server(argon2_time_cost=2, argon2_memory_cost=8192, argon2_parallelism=1)
    email = "racer@example.com"
    async with httpx.AsyncClient(base_url=server.url) as client:
        assert (await client.post("/auth/register", json={"email": email, "password": PASSWORD})).status_code == 201
    token = plant_reset_token(db, email)

    cookies: list[str] = []
    answers: list[int] = []
    reset_done = asyncio.Event()
    in_full_swing = asyncio.Event()
    after_reset = 0

    async def worker() -> None:
        nonlocal after_reset
        async with httpx.AsyncClient(base_url=server.url) as client:
            while after_reset < 24:
                client.cookies.clear()  # no rotation: every login opens a fresh session
                response = await client.post("/auth/login", json={"email": email, "password": PASSWORD})
                answers.append(response.status_code)
                if len(answers) >= 8:
                    in_full_swing.set()
                if response.status_code == 200:
                    cookies.append(response.cookies["innova_session"])
                if reset_done.is_set():
                    after_reset += 1

    async def resetter() -> None:
        await in_full_swing.wait()
        async with httpx.AsyncClient(base_url=server.url) as client:
            response = await client.post("/auth/reset", json={"token": token, "email": email, "password": NEW_PASSWORD})
        assert response.status_code == 200, response.text
        reset_done.set()

    await asyncio.wait_for(asyncio.gather(resetter(), *[worker() for _ in range(8)]), 120)

    assert set(answers) <= {200, 401}, answers
    assert cookies, "no login succeeded before the reset"
    survivors = [cookie for cookie in cookies if await asyncio.to_thread(me_status, server, cookie) != 401]
    assert survivors == [], f"{len(survivors)} of {len(cookies)} old-password sessions outlived the reset"
    assert db.sessions.count_documents({}) == 0
    async with httpx.AsyncClient(base_url=server.url) as client:
        assert (await client.post("/auth/login", json={"email": email, "password": PASSWORD})).status_code == 401
        assert (await client.post("/auth/login", json={"email": email, "password": NEW_PASSWORD})).status_code == 200


async def test_a_rehash_at_login_never_undoes_a_reset(start_server, db):
    # Stored with weaker parameters than the server's: every login re-hashes it.
    weak = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    server = start_server(argon2_time_cost=2, argon2_memory_cost=16384, argon2_parallelism=1)
    email = "legacy-hash@example.com"
    db.users.insert_one(
        {
            "email": email,
            "name": None,
            "password_hash": weak.hash(PASSWORD),
            "created_at": datetime.now(UTC),
            "updated_at": datetime.now(UTC),
        }
    )
    checker = PasswordHasher()
    async with httpx.AsyncClient(base_url=server.url) as client:
        for round_ in range(4):
            db.users.update_one({"email": email}, {"$set": {"password_hash": weak.hash(PASSWORD)}})
            token = plant_reset_token(db, email)
            chosen = f"{NEW_PASSWORD} {round_}"

            async def login() -> int:
                async with httpx.AsyncClient(base_url=server.url) as own:
                    response = await own.post("/auth/login", json={"email": email, "password": PASSWORD})
                    return response.status_code

            async def reset(token: str, chosen: str) -> int:
                response = await client.post("/auth/reset", json={"token": token, "email": email, "password": chosen})
                return response.status_code

            codes = await asyncio.wait_for(asyncio.gather(reset(token, chosen), *[login() for _ in range(6)]), 120)
            assert codes[0] == 200 and set(codes[1:]) <= {200, 401}, codes
            stored = db.users.find_one({"email": email})["password_hash"]
            try:
                checker.verify(stored, chosen)
            except VerificationError:
                raise AssertionError(
                    f"round {round_}: a login's re-hash of the old password overwrote the reset"
                ) from None
            assert db.sessions.count_documents({}) == 0


def test_a_session_of_an_older_auth_epoch_is_refused(server, db):
    with httpx.Client(base_url=server.url) as client:
        registered = client.post("/auth/register", json={"email": "epoch@example.com", "password": PASSWORD})
        assert registered.status_code == 201
        assert client.get("/auth/me").status_code == 200
        # A reset bumped the epoch but (crash, race) this session was not deleted.
        db.users.update_one({"email": "epoch@example.com"}, {"$inc": {"auth_epoch": 1}})
        assert client.get("/auth/me").status_code == 401


# -- item: argon2 has its own bounded threads; the rest keeps answering -------


async def test_hashes_run_in_threads_bounded_by_their_own_limiter():
    passwords = Passwords(time_cost=1, memory_cost=4096, parallelism=1, max_concurrency=2)
    most = 0
    waited = 0
    done = anyio.Event()

    async def watch() -> None:
        nonlocal most, waited
        while not done.is_set():
            most = max(most, int(passwords.limiter.borrowed_tokens))
            waited = max(waited, passwords.limiter.statistics().tasks_waiting)
            await anyio.lowlevel.checkpoint()

    async def burst() -> None:
        async with anyio.create_task_group() as group:
            for i in range(12):
                group.start_soon(passwords.hash, f"password number {i}")
        done.set()

    async with anyio.create_task_group() as group:
        group.start_soon(watch)
        group.start_soon(burst)
    assert most == 2  # never more hashes at once than the limiter allows
    assert waited > 0  # and the rest queued for it instead of taking more threads
    assert Passwords(time_cost=1, memory_cost=1024, parallelism=1).max_concurrency >= 1


async def test_me_and_health_answer_while_a_login_burst_hashes(start_server):
    server = start_server(argon2_time_cost=2, argon2_memory_cost=32768, argon2_parallelism=1)
    email = "busy@example.com"
    async with httpx.AsyncClient(base_url=server.url) as client:
        assert (await client.post("/auth/register", json={"email": email, "password": PASSWORD})).status_code == 201
        cookie = client.cookies["innova_session"]

    total = 48  # more than anyio's 40 default worker threads
    finished = 0
    limits = httpx.Limits(max_connections=total + 4)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=120) as client:

        async def login() -> None:
            nonlocal finished
            response = await client.post("/auth/login", json={"email": email, "password": "wrong password!"})
            assert response.status_code == 401
            finished += 1

        before = argon2_runs("verify")
        burst = [asyncio.create_task(login()) for _ in range(total)]
        # Until the burst is hashing (counted as each verification is queued).
        await asyncio.to_thread(wait_for, lambda: argon2_runs("verify") >= before + total // 2, 60, what="the burst")
        me = await client.get("/auth/me", headers={"Cookie": f"innova_session={cookie}"})
        health = await client.get("/health")
        answered_after = finished
        await asyncio.gather(*burst)
    assert me.status_code == 200 and health.status_code == 200
    # Neither waited for the burst to drain (with argon2 in the shared pool and
    # sync dependencies, /auth/me queued behind ~40 hashes).
    assert answered_after < total // 2, (answered_after, total)


# -- item: a login refused by the IP window gives the address's slot back ----


def test_a_per_ip_429_does_not_count_against_the_address(start_server):
    server = start_server(rate_limit_login_ip="2/15m", rate_limit_login_email="3/15m")
    start_of_a_fresh_window(15 * 60)
    victim = {"email": "victim@example.com", "password": "not the password"}
    with httpx.Client(base_url=server.url) as client:
        noisy = {"X-Forwarded-For": "203.0.113.7"}
        codes = [client.post("/auth/login", json=victim, headers=noisy).status_code for _ in range(5)]
        assert codes == [401, 401, 429, 429, 429]
        # From elsewhere the address has used 2 of its 3 attempts, not 5.
        other = client.post("/auth/login", json=victim, headers={"X-Forwarded-For": "198.51.100.4"})
    assert other.status_code == 401, other.text


# -- item: the legacy prefix names the right successor, even before routing ----


def test_legacy_link_names_the_route_for_requests_refused_before_routing(start_server):
    server = start_server(max_body_bytes=1024)
    with httpx.Client(base_url=server.url) as client:
        csrf = client.post(
            "/innova/api/auth/login",
            json={"email": "a@example.com", "password": PASSWORD},
            headers={"Origin": "https://evil.example"},
        )
        assert csrf.status_code == 403
        assert csrf.headers["link"] == '</auth/login>; rel="successor-version"'
        big = client.post(
            "/innova/api/auth/register",
            json={"email": "a@example.com", "password": "x" * 4096},
        )
        assert big.status_code == 413
        assert big.headers["link"] == '</auth/register>; rel="successor-version"'
        unknown = client.post(
            "/innova/api/auth/nope%0d%0aX-Evil:1", json={}, headers={"Origin": "https://evil.example"}
        )
        assert unknown.headers["link"] == '</auth>; rel="successor-version"'
        assert "x-evil" not in unknown.headers
        metrics = client.get("/metrics").text
    assert 'innova_legacy_auth_requests_total{route="/innova/api/auth/login"}' in metrics
    assert 'route="/innova/api/auth/register"' in metrics


# -- item: the logout cookie keeps the Secure attribute -----------------------


def test_logout_cookie_is_secure_when_cookie_secure_is_set(start_server):
    server = start_server(cookie_secure=True)
    with httpx.Client(base_url=server.url) as client:
        register = client.post("/auth/register", json={"email": "secure@example.com", "password": PASSWORD})
        token = register.headers["set-cookie"].split(";")[0].split("=", 1)[1]
        # httpx will not send a Secure cookie over http: send it by hand.
        logout = client.post("/auth/logout", headers={"Cookie": f"innova_session={token}"})
    assert logout.status_code == 204
    attributes = [part.strip().lower() for part in logout.headers["set-cookie"].split(";")]
    assert attributes[0] in ('innova_session=""', "innova_session=")
    assert "secure" in attributes and "httponly" in attributes and "max-age=0" in attributes
    assert me_status(server, token) == 401
