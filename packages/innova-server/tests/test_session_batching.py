"""Session lookups made together share one query (innova_server.batching), and that is not a cache.

Every request is answered from a query sent after it arrived: each user gets
their own account back, and a session revoked by one request (logout, reset,
password change, disable) is refused by the very next one, on this worker or
another.
"""

from __future__ import annotations

import asyncio
import re

import httpx

from innova_server.batching import LookupBatcher
from innova_server.testing.chat_client import PASSWORD


def aggregates(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(r'^innova_mongo_commands_total\{command="aggregate"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def register(url: str, email: str) -> str:
    response = httpx.post(f"{url}/auth/register", json={"email": email, "password": PASSWORD})
    assert response.status_code == 201, response.text
    return response.cookies["innova_session"]


def test_concurrent_lookups_share_queries_and_each_gets_its_own_user(server):
    tokens = {f"batch{i}@example.com": register(server.url, f"batch{i}@example.com") for i in range(40)}

    async def everyone() -> list[tuple[str, httpx.Response]]:
        async with httpx.AsyncClient(base_url=server.url, limits=httpx.Limits(max_connections=80)) as client:

            async def me(email: str, token: str) -> tuple[str, httpx.Response]:
                return email, await client.get("/auth/me", headers={"Cookie": f"innova_session={token}"})

            return await asyncio.gather(*(me(e, t) for _ in range(2) for e, t in tokens.items()))

    before = aggregates(server.url)
    answers = asyncio.run(everyone())
    assert len(answers) == 80
    for email, response in answers:
        assert response.status_code == 200, response.text
        assert response.json()["user"]["email"] == email  # never another request's user
    # 80 lookups, fewer queries (how many fewer depends on how the requests
    # arrived; on loopback most share one).
    assert aggregates(server.url) - before < 80


def test_a_revoked_session_is_refused_by_the_next_request_even_under_concurrent_load(server):
    victim = register(server.url, "victim@example.com")
    others = [register(server.url, f"other{i}@example.com") for i in range(20)]

    async def scenario() -> tuple[list[int], int, list[int]]:
        async with httpx.AsyncClient(base_url=server.url, limits=httpx.Limits(max_connections=50)) as client:
            load = [client.get("/auth/me", headers={"Cookie": f"innova_session={t}"}) for t in others]
            before = await asyncio.gather(*load, client.get("/auth/me", headers={"Cookie": f"innova_session={victim}"}))
            logout = await client.post("/auth/logout", headers={"Cookie": f"innova_session={victim}"})
            # The very next lookups, batched with others' again.
            load = [client.get("/auth/me", headers={"Cookie": f"innova_session={t}"}) for t in others]
            after = await asyncio.gather(client.get("/auth/me", headers={"Cookie": f"innova_session={victim}"}), *load)
            return [r.status_code for r in before], logout.status_code, [r.status_code for r in after]

    before, logout, after = asyncio.run(scenario())
    assert set(before) == {200}
    assert logout in (200, 204)
    assert after[0] == 401
    assert set(after[1:]) == {200}


def test_revocation_takes_effect_at_once_on_another_worker(server, spawn_server):
    other = spawn_server()
    token = register(server.url, "twoworkers@example.com")
    assert httpx.get(f"{other.url}/auth/me", headers={"Cookie": f"innova_session={token}"}).status_code == 200
    # A password change on worker A ends the other sessions; B refuses the old cookie at once.
    with httpx.Client(base_url=server.url, headers={"Cookie": f"innova_session={token}"}) as client:
        fresh = client.post("/auth/login", json={"email": "twoworkers@example.com", "password": PASSWORD})
        assert fresh.status_code == 200
        new_token = fresh.cookies["innova_session"]
    changed = httpx.post(
        f"{server.url}/auth/password",
        json={"current_password": PASSWORD, "new_password": "a different horse 42"},
        cookies={"innova_session": new_token},
    )
    assert changed.status_code in (200, 204), changed.text
    assert httpx.get(f"{other.url}/auth/me", headers={"Cookie": f"innova_session={token}"}).status_code == 401


async def settle() -> None:
    """Let the loop run the lookups, the batch's dispatch and its fetch's first step."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_the_batcher_shares_one_fetch_and_a_leaving_caller_cancels_nothing():
    calls: list[list[str]] = []
    release = asyncio.Event()

    async def fetch(keys: list[str]) -> dict[str, str]:
        calls.append(keys)
        await release.wait()
        return {k: k.upper() for k in keys if k != "missing"}

    batcher: LookupBatcher[str, str] = LookupBatcher(fetch)
    a = asyncio.ensure_future(batcher.load("a"))
    b = asyncio.ensure_future(batcher.load("b"))
    again = asyncio.ensure_future(batcher.load("a"))
    gone = asyncio.ensure_future(batcher.load("c"))
    missing = asyncio.ensure_future(batcher.load("missing"))
    await settle()
    assert calls == [["a", "b", "c", "missing"]]  # one fetch, each key once
    gone.cancel()
    await asyncio.sleep(0)
    release.set()
    assert await a == "A" and await b == "B" and await again == "A"
    assert await missing is None
    assert gone.cancelled()
    # A lone lookup later is its own fetch, sent after it was asked for.
    release.clear()
    late = asyncio.ensure_future(batcher.load("d"))
    await settle()
    assert calls[-1] == ["d"]
    release.set()
    assert await late == "D"


async def test_a_failed_fetch_fails_every_waiting_caller_and_the_next_batch_retries():
    attempts = 0

    async def fetch(keys: list[str]) -> dict[str, int]:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError("database down")
        return {k: len(k) for k in keys}

    batcher: LookupBatcher[str, int] = LookupBatcher(fetch, max_batch=2)
    first = await asyncio.gather(*(batcher.load(k) for k in ("x", "yy")), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in first)
    # Three keys, at most two per fetch: two fetches.
    assert await asyncio.gather(*(batcher.load(k) for k in ("x", "yy", "zzz"))) == [1, 2, 3]
    assert attempts == 3



async def test_a_batcher_whose_loop_stopped_before_its_dispatch_still_serves_the_next_loop():
    """A dispatch due on a loop that stopped (a test client's loop per request) never runs:
    the next lookup, on another loop, must not wait on it forever."""

    async def fetch(keys: list[str]) -> dict[str, str]:
        return {k: k.upper() for k in keys}

    batcher: LookupBatcher[str, str] = LookupBatcher(fetch)
    stale = asyncio.new_event_loop()
    try:
        batcher._scheduled = stale  # as `load` leaves it on a loop that stops before its dispatch
        batcher._pending = [("lost", stale.create_future())]
        assert await asyncio.wait_for(batcher.load("a"), 5) == "A"
    finally:
        stale.close()
