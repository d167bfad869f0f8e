"""`RateLimiter.take` (the chat turn's limit) and `StreamSlots.acquire`: conditional `update_one`s,
exact at the limit under concurrency (the database decides, never a read then a write)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from innova_server.chatlaya.store import StreamSlots
from innova_server.db import Database
from innova_server.errors import AppError, ErrorCode
from innova_server.ratelimit import RateLimiter
from innova_server.settings import RateLimit


async def test_take_admits_exactly_the_limit_under_concurrency(mongo_uri, db_name, db):
    database = Database(mongo_uri, db_name)
    await database.ensure_indexes()
    limiter = RateLimiter(database)
    try:
        outcomes = await asyncio.gather(
            *(limiter.take("chat", "chat:racer", RateLimit(5, 3600)) for _ in range(30)), return_exceptions=True
        )
        refused = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(outcomes) - len(refused) == 5
        assert all(isinstance(o, AppError) and o.code == ErrorCode.RATE_LIMITED for o in refused)
        assert all(int(o.headers["Retry-After"]) >= 1 for o in refused if isinstance(o, AppError))
        # The window holds the limit, not the refusals.
        assert [doc["count"] for doc in db.rate_limits.find({"key": "chat:racer"})] == [5]
        # Another key has its own window.
        await limiter.take("chat", "chat:other", RateLimit(5, 3600))
    finally:
        await database.close()


async def test_slots_are_exact_at_capacity_under_concurrency_and_come_back(mongo_uri, db_name):
    database = Database(mongo_uri, db_name)
    await database.ensure_indexes()
    slots = StreamSlots(database, lease=timedelta(seconds=30))
    try:
        held = await asyncio.gather(*(slots.acquire("chat:u", 3) for _ in range(12)))
        taken = [slot for slot in held if slot is not None]
        assert len(taken) == 3
        assert await slots.held("chat:u") == 3
        await slots.release(taken[0])
        assert await slots.held("chat:u") == 2
        assert await slots.acquire("chat:u", 3) is not None
        assert await slots.acquire("chat:u", 3) is None
    finally:
        await database.close()
