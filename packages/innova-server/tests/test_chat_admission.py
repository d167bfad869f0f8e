"""A chat turn's admission (`StreamSlots.acquire` with a rate): the message rate and the stream
slots are checked and taken by one conditional write, exact at the limit under concurrency (the
database decides, never a read then a write), and a refusal takes nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from innova_server.auth.store import utcnow
from innova_server.chatlaya.store import RateLimited, Slot, StreamSlots
from innova_server.db import Database
from innova_server.settings import RateLimit


@pytest.fixture
async def slots(mongo_uri: str, db_name: str) -> AsyncIterator[StreamSlots]:
    database = Database(mongo_uri, db_name)
    await database.ensure_indexes()
    try:
        yield StreamSlots(database, lease=timedelta(seconds=30))
    finally:
        await database.close()


async def test_the_rate_admits_exactly_its_count_under_concurrency(slots, db):
    outcomes = await asyncio.gather(*(slots.acquire("chat:racer", 100, rate=RateLimit(5, 3600)) for _ in range(30)))
    admitted = [o for o in outcomes if isinstance(o, Slot)]
    refused = [o for o in outcomes if isinstance(o, RateLimited)]
    assert len(admitted) == 5 and len(refused) == 25
    # Retry-After: when the oldest counted message leaves the hour.
    assert all(3590 <= o.retry_after <= 3600 for o in refused)
    # The log holds the admitted messages, not the refusals; each admitted one holds a slot.
    doc = db.stream_slots.find_one({"_id": "chat:racer"})
    assert len(doc["sent"]) == 5 and len(doc["holders"]) == 5
    # Another key has its own rate.
    assert isinstance(await slots.acquire("chat:other", 100, rate=RateLimit(5, 3600)), Slot)


async def test_slots_are_exact_at_capacity_and_a_busy_refusal_counts_no_message(slots, db):
    rate = RateLimit(10, 3600)
    held = await asyncio.gather(*(slots.acquire("chat:u", 3, rate=rate) for _ in range(12)))
    taken = [slot for slot in held if isinstance(slot, Slot)]
    assert len(taken) == 3 and held.count(None) == 9
    assert len(db.stream_slots.find_one({"_id": "chat:u"})["sent"]) == 3
    assert await slots.held("chat:u") == 3
    await slots.release(taken[0])
    assert await slots.held("chat:u") == 2
    assert isinstance(await slots.acquire("chat:u", 3, rate=rate), Slot)
    assert await slots.acquire("chat:u", 3, rate=rate) is None
    assert len(db.stream_slots.find_one({"_id": "chat:u"})["sent"]) == 4


async def test_the_window_slides_a_message_is_admitted_once_the_oldest_left_it(slots, db):
    rate = RateLimit(2, 60)
    first = await slots.acquire("chat:s", 10, rate=rate)
    second = await slots.acquire("chat:s", 10, rate=rate)
    assert isinstance(first, Slot) and isinstance(second, Slot)
    refused = await slots.acquire("chat:s", 10, rate=rate)
    assert isinstance(refused, RateLimited) and 1 <= refused.retry_after <= 60
    # The oldest message (the log is newest first) was sent 61 s ago: one more fits, not two.
    now = utcnow()
    db.stream_slots.update_one({"_id": "chat:s"}, {"$set": {"sent.1": now - timedelta(seconds=61)}})
    assert isinstance(await slots.acquire("chat:s", 10, rate=rate), Slot)
    assert isinstance(await slots.acquire("chat:s", 10, rate=rate), RateLimited)
    sent = db.stream_slots.find_one({"_id": "chat:s"})["sent"]
    assert len(sent) == 2 and sent == sorted(sent, reverse=True)


async def test_a_log_written_oldest_first_is_turned_around_and_still_admits(slots, db):
    """The previous version kept the log oldest first: a full one whose oldest left the window
    admits (not a false 'all slots held'), and one whose oldest is still in it is rate-limited."""
    rate = RateLimit(2, 60)
    now = utcnow()
    db.stream_slots.insert_many([
        {"_id": "chat:old", "holders": [], "sent": [now - timedelta(seconds=90), now - timedelta(seconds=2)]},
        {"_id": "chat:busy", "holders": [], "sent": [now - timedelta(seconds=30), now - timedelta(seconds=2)]},
    ])
    assert isinstance(await slots.acquire("chat:old", 10, rate=rate), Slot)
    sent = db.stream_slots.find_one({"_id": "chat:old"})["sent"]
    assert len(sent) == 2 and sent == sorted(sent, reverse=True) and sent[1] > now - timedelta(seconds=3)
    refused = await slots.acquire("chat:busy", 10, rate=rate)
    assert isinstance(refused, RateLimited) and 29 <= refused.retry_after <= 31


async def test_a_slot_whose_lease_ran_out_is_taken_over(slots, db):
    crashed = await slots.acquire("chat:c", 1)
    assert isinstance(crashed, Slot)
    assert await slots.acquire("chat:c", 1) is None
    # Its worker died: the lease runs out and the next attempt prunes it.
    db.stream_slots.update_one({"_id": "chat:c"}, {"$set": {"holders.0.expires_at": utcnow() - timedelta(seconds=1)}})
    assert isinstance(await slots.acquire("chat:c", 1), Slot)
    assert [holder["id"] for holder in db.stream_slots.find_one({"_id": "chat:c"})["holders"]] != [crashed.id]


async def test_a_log_longer_than_the_count_is_judged_by_its_newest_events(slots, db):
    """Just after the count was lowered, the log is longer than it: the newest `count` decide, and a
    refusal says when the oldest of *those* leaves the window."""
    now = utcnow()
    sent = [now - timedelta(seconds=s) for s in (1, 10, 90, 100)]  # newest first, 2 within the minute
    db.stream_slots.insert_one({"_id": "chat:lowered", "holders": [], "sent": sent})
    refused = await slots.acquire("chat:lowered", 10, rate=RateLimit(2, 60))
    assert isinstance(refused, RateLimited) and 49 <= refused.retry_after <= 51
