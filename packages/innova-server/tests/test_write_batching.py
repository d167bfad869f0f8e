"""`Database.writes`: writes asked in one loop iteration, to any collections, go as one command
(a client-level `bulkWrite`), or — on a MongoDB older than 8.0 — one `bulk_write` per collection.
Each caller gets its own outcome: its match count, or its own error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from pymongo import InsertOne, UpdateOne
from pymongo.errors import DuplicateKeyError

from innova_server import metrics
from innova_server.db import Database


@pytest.fixture
async def database(mongo_uri: str, db_name: str) -> AsyncIterator[Database]:
    database = Database(mongo_uri, db_name)
    try:
        yield database
    finally:
        await database.close()


def _commands(name: str) -> float:
    return metrics.MONGO_COMMANDS.labels(name)._value.get()


@pytest.mark.parametrize("combined", [True, False], ids=["bulkWrite", "per-collection"])
async def test_each_write_gets_its_own_outcome(database, db, combined):
    database.writes.combined = None if combined else False
    db.a.insert_one({"_id": 1, "n": 0})
    a, b = database.db["a"].full_name, database.db["b"].full_name
    before = _commands("bulkWrite")
    outcomes = await asyncio.gather(
        database.writes.write(InsertOne({"_id": 1}, namespace=a)),  # a duplicate: its own error only
        database.writes.matched(UpdateOne({"_id": 1}, {"$inc": {"n": 1}}, namespace=a)),
        database.writes.matched(UpdateOne({"_id": 9}, {"$inc": {"n": 1}}, namespace=b)),
        database.writes.matched(UpdateOne({"_id": 5}, {"$set": {"x": 1}}, upsert=True, namespace=b)),
        database.writes.write(InsertOne({"_id": 2}, namespace=a)),
        return_exceptions=True,
    )
    assert isinstance(outcomes[0], DuplicateKeyError)
    assert outcomes[1:] == [1, 0, 1, None]
    assert db.a.find_one({"_id": 1})["n"] == 1
    assert db.a.find_one({"_id": 2}) is not None and db.b.find_one({"_id": 5}) == {"_id": 5, "x": 1}
    # One command for all five on a server that has bulkWrite; none of that command otherwise.
    assert _commands("bulkWrite") - before == (1 if combined else 0)
    assert database.writes.combined is combined


async def test_a_write_without_its_collection_is_refused(database):
    with pytest.raises(ValueError, match="namespace"):
        await database.writes.write(InsertOne({"_id": 1}))
