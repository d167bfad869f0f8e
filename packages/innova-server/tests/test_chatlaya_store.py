"""The Chatlaya stores against a real MongoDB-wire server: races and paging edge cases."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from bson import ObjectId

from innova_server.chatlaya.store import ConversationStore, StreamSlots
from innova_server.db import Database


@pytest.fixture
async def database(mongo_uri: str, db_name: str, db) -> AsyncIterator[Database]:  # `db` drops it afterwards
    database = Database(mongo_uri, db_name)
    await database.ensure_indexes()
    yield database
    await database.close()


async def test_simultaneous_first_streams_of_a_user_all_get_a_slot(database: Database) -> None:
    """No slot document yet: the upserts race, and the loser must not read that as "full"."""
    slots = StreamSlots(database, lease=timedelta(minutes=5))
    refused = 0
    for _ in range(30):
        key = f"chat:{uuid.uuid4().hex}"
        taken = await asyncio.gather(*[slots.acquire(key, 3) for _ in range(3)])
        refused += sum(slot is None for slot in taken)
        assert await slots.held(key) == sum(slot is not None for slot in taken)
    assert refused == 0


async def test_simultaneous_first_streams_over_the_cap_get_exactly_the_cap(database: Database) -> None:
    slots = StreamSlots(database, lease=timedelta(minutes=5))
    for _ in range(20):
        key = f"chat:{uuid.uuid4().hex}"
        taken = await asyncio.gather(*[slots.acquire(key, 2) for _ in range(3)])
        assert sum(slot is not None for slot in taken) == 2
        assert await slots.held(key) == 2


async def test_conversation_pages_with_identical_updated_at_are_complete_and_duplicate_free(database, db) -> None:
    user_id = ObjectId()
    same = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    ids = [ObjectId() for _ in range(23)]
    rows = [
        {"_id": oid, "user_id": user_id, "title": None, "created_at": same, "updated_at": same, "archived": False}
        for oid in ids
    ]
    # One newer and one older row around the tie, so the cursor has to cross into and out of it.
    rows.append({**rows[0], "_id": ObjectId(), "updated_at": same + timedelta(milliseconds=1)})
    rows.append({**rows[0], "_id": ObjectId(), "updated_at": same - timedelta(milliseconds=1)})
    db.conversations.insert_many(rows)
    store = ConversationStore(database)
    seen: list[str] = []
    cursor = None
    for _ in range(50):
        items, cursor = await store.page(str(user_id), archived=False, limit=4, cursor=cursor)
        seen.extend(item.id for item in items)
        if cursor is None:
            break
    expected = [rows[-2]["_id"], *sorted(ids, reverse=True), rows[-1]["_id"]]
    assert seen == [str(oid) for oid in expected]
