"""MongoDB access: one `AsyncMongoClient` per process, the collections, their indexes.

PyMongo's async client is the official successor of Motor (deprecated). Every
datetime read back is timezone-aware (`tz_aware=True`), and every round trip to
the server is counted (`innova_mongo_commands_total`), which is how the
benchmark measures database round trips per request.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pymongo
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, IndexModel, ReadPreference, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, PyMongoError
from pymongo.monitoring import CommandFailedEvent, CommandListener, CommandStartedEvent, CommandSucceededEvent

from innova_server import metrics
from innova_server.batching import WriteBatcher

Document = dict[str, Any]

INDEXES: dict[str, list[IndexModel]] = {
    "users": [IndexModel([("email", ASCENDING)], unique=True, name="email_unique")],
    "sessions": [
        IndexModel([("token_hash", ASCENDING)], unique=True, name="token_hash_unique"),
        IndexModel([("expires_at", ASCENDING)], expireAfterSeconds=0, name="expires_at_ttl"),
        IndexModel([("user_id", ASCENDING)], name="user_id"),
    ],
    "password_reset_tokens": [
        IndexModel([("token_hash", ASCENDING)], unique=True, name="token_hash_unique"),
        IndexModel([("expires_at", ASCENDING)], expireAfterSeconds=0, name="expires_at_ttl"),
        IndexModel([("user_id", ASCENDING)], name="user_id"),
    ],
    # Email verification links; same shape and rules as the reset links.
    "devices": [
        IndexModel([("token_hash", ASCENDING), ("user_id", ASCENDING)], unique=True, name="token_user_unique"),
        IndexModel([("expires_at", ASCENDING)], expireAfterSeconds=0, name="expires_at_ttl"),
        IndexModel([("user_id", ASCENDING)], name="user_id"),
    ],
    "verify_tokens": [
        IndexModel([("token_hash", ASCENDING)], unique=True, name="token_hash_unique"),
        IndexModel([("expires_at", ASCENDING)], expireAfterSeconds=0, name="expires_at_ttl"),
        IndexModel([("user_id", ASCENDING)], name="user_id"),
    ],
    "conversations": [
        IndexModel(
            [("user_id", ASCENDING), ("archived", ASCENDING), ("updated_at", DESCENDING), ("_id", DESCENDING)],
            name="user_archived_updated",
        ),
        # The conversation `POST /chatlaya/session` created, until archived: the
        # unique key that makes its get-or-create atomic.
        IndexModel([("session_key", ASCENDING)], unique=True, sparse=True, name="session_key_unique"),
    ],
    "messages": [
        IndexModel(
            [("conversation_id", ASCENDING), ("created_at", ASCENDING), ("_id", ASCENDING)],
            name="conversation_created",
        ),
        # Account deletion and export find every message of a user, in `_id` order.
        IndexModel([("user_id", ASCENDING), ("_id", ASCENDING)], name="user_id"),
        # The children of a message (sibling_ids), oldest first.
        IndexModel(
            [("conversation_id", ASCENDING), ("parent_id", ASCENDING), ("created_at", ASCENDING), ("_id", ASCENDING)],
            name="conversation_parent_created",
        ),
    ],
    "usage_daily": [
        IndexModel([("user_id", ASCENDING), ("day", ASCENDING)], name="user_day"),
        IndexModel([("expires_at", ASCENDING)], expireAfterSeconds=0, name="expires_at_ttl"),
    ],
    "stream_slots": [IndexModel([("expires_at", ASCENDING)], expireAfterSeconds=0, name="expires_at_ttl")],
    "rate_limits": [
        IndexModel([("key", ASCENDING), ("window_start", ASCENDING)], unique=True, name="key_window_unique"),
        IndexModel([("expires_at", ASCENDING)], expireAfterSeconds=0, name="expires_at_ttl"),
    ],
}


# Seconds `ensure_indexes` may take in all (see there).
INDEX_TIMEOUT = 600.0


class _CommandCounter(CommandListener):
    """Counts every command sent to the server, by name (and failures)."""

    def started(self, event: CommandStartedEvent) -> None:
        metrics.MONGO_COMMANDS.labels(event.command_name).inc()

    def succeeded(self, event: CommandSucceededEvent) -> None:
        pass

    def failed(self, event: CommandFailedEvent) -> None:
        metrics.MONGO_COMMAND_FAILURES.labels(event.command_name).inc()


class Database:
    """The process's MongoDB connection and the application's collections."""

    def __init__(self, uri: str, name: str, *, timeout_ms: int = 30_000) -> None:
        # `timeoutMS` bounds every operation, server selection, connecting and
        # waiting for the reply included: a MongoDB that accepts connections
        # but stops answering gives a timeout error (503), never a request
        # that hangs until PyMongo's monitor notices, or forever.
        self.client: AsyncMongoClient[Document] = AsyncMongoClient(
            uri,
            tz_aware=True,
            timeoutMS=timeout_ms,
            serverSelectionTimeoutMS=timeout_ms,
            connectTimeoutMS=timeout_ms,
            event_listeners=[_CommandCounter()],
            appname="innova",
        )
        self.db: AsyncDatabase[Document] = self.client[name]
        # Health pings go over their own connection: behind a burst, the
        # application's pool has hundreds of operations waiting for a
        # connection, and a ping queued behind them would report the queue,
        # not the database (benchmarks/README.md, "A burst of streams").
        # Not counted in innova_mongo_commands_total (round trips per request
        # stay the application's); innova_mongo_ping_seconds counts them.
        self.probe_client: AsyncMongoClient[Document] = AsyncMongoClient(
            uri,
            tz_aware=True,
            maxPoolSize=1,
            timeoutMS=timeout_ms,
            serverSelectionTimeoutMS=timeout_ms,
            connectTimeoutMS=timeout_ms,
            appname="innova-health",
        )
        self._shared_ping: asyncio.Task[bool] | None = None
        # Writes of one loop iteration, to any collection, share one command (`batching`).
        self.writes = WriteBatcher(self.client)

    @property
    def users(self) -> AsyncCollection[Document]:
        return self.db["users"]

    @property
    def sessions(self) -> AsyncCollection[Document]:
        return self.db["sessions"]

    @property
    def password_reset_tokens(self) -> AsyncCollection[Document]:
        return self.db["password_reset_tokens"]

    @property
    def devices(self) -> AsyncCollection[Document]:
        return self.db["devices"]

    @property
    def verify_tokens(self) -> AsyncCollection[Document]:
        return self.db["verify_tokens"]

    @property
    def conversations(self) -> AsyncCollection[Document]:
        return self.db["conversations"]

    @property
    def messages(self) -> AsyncCollection[Document]:
        return self.db["messages"]

    @property
    def usage_daily(self) -> AsyncCollection[Document]:
        return self.db["usage_daily"]

    @property
    def stream_slots(self) -> AsyncCollection[Document]:
        return self.db["stream_slots"]

    @property
    def rate_limits(self) -> AsyncCollection[Document]:
        return self.db["rate_limits"]

    async def ensure_indexes(self) -> None:
        """Create every index of `INDEXES` (docs/architecture.md, "The data"); idempotent (same names, same options).

        Building a new index over a large existing collection can outlast the
        per-operation timeout; it gets `INDEX_TIMEOUT` seconds instead. A ping
        under the normal budget first: within `pymongo.timeout` server selection
        waits as long as the block may last, so a MongoDB that is down would
        otherwise take `INDEX_TIMEOUT` to report.
        """
        await self.client.admin.command("ping")
        with pymongo.timeout(INDEX_TIMEOUT):
            for collection, models in INDEXES.items():
                await self.db[collection].create_indexes(models)

    async def ping(self, timeout: float = 2.0) -> bool:  # noqa: ASYNC109 - a budget, not a cancel scope
        """True when a member of the database answers a ping within `timeout` seconds; never raises.

        Any member, not only the primary (`primaryPreferred`): during a replica
        set's election (a few seconds without a primary) writes wait for the
        new primary (server selection, then a retryable write), so the process
        still serves. Were `/health` to fail then, every host would fail it at
        the same moment and a load balancer would empty its whole pool for
        what is a pause (deploy/README.md, "Several hosts").
        """
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                with pymongo.timeout(timeout):
                    await self.probe_client.admin.command(
                        "ping", read_preference=ReadPreference.PRIMARY_PREFERRED
                    )
        except (PyMongoError, TimeoutError):
            return False
        finally:
            metrics.MONGO_PING_SECONDS.observe(time.monotonic() - started)
        return True

    async def shared_ping(self, timeout: float = 2.0) -> bool:  # noqa: ASYNC109 - a budget, not a cancel scope
        """`ping`, with concurrent callers sharing the one in flight.

        For the health monitor (`innova_server.health`) and a worker's first
        `/health` checks, which may come at once before the monitor has an
        answer: they need not be as many round trips. Each answer is still a
        ping that started after the previous one ended, and a caller leaving
        does not cancel the ping others wait on.
        """
        task = self._shared_ping
        if task is None or task.done():
            task = asyncio.ensure_future(self.ping(timeout))
            self._shared_ping = task
        return await asyncio.shield(task)

    async def close(self) -> None:
        await self.probe_client.close()
        await self.client.close()


async def update_if(collection: AsyncCollection[Document], query: Document, update: Document) -> bool:
    """`update_one(query, update, upsert=True)` for a conditional write: True when it applied.

    An `update_one`, not a `findAndModify`, for writes whose answer is only
    "applied or not" (a free stream slot within the chat rate):
    SecantusDB serves every `findAndModify` by scanning the collection.
    When the condition misses on an existing document, the upsert tries to
    create it again and gets DuplicateKeyError; two first writers racing to
    create it get the same. So a DuplicateKeyError is no answer: the same
    update is sent again without upsert, and only a miss of *that* means the
    condition does not hold.
    """
    try:
        result = await collection.update_one(query, update, upsert=True)
        return result.matched_count == 1 or result.upserted_id is not None
    except DuplicateKeyError:
        return (await collection.update_one(query, update)).matched_count == 1


async def write_then_confirm(
    collection: AsyncCollection[Document],
    query: Document,
    update: Document,
    *,
    confirm: Document,
    upsert: bool = False,
    projection: Document | None = None,
) -> Document | None:
    """`find_one_and_update(query, update, return_document=AFTER)`, believed only when it answers.

    Two things can make that call return no document although the write it
    asked for happened, and every atomic write of ours must tell "it did not
    apply" from "it applied but I was not shown it":

    - with `upsert`, two first writers of a key race on the insert and the
      loser gets `DuplicateKeyError` (real MongoDB too): the document exists
      now, so the same update is sent again, without upsert;
    - SecantusDB (the development database) occasionally answers a
      `find_one_and_update` with no document although the update applied
      (seen under concurrent upserts, about 5 % of calls); real MongoDB never does.

    So when no document comes back, `confirm` is read once: a filter that only
    the state *this* write produced can match (a claim token it set, the hash
    it wrote, the key it upserted). None means the write really did not apply.
    """
    after = ReturnDocument.AFTER
    doc: Document | None
    try:
        doc = await collection.find_one_and_update(
            query, update, upsert=upsert, return_document=after, projection=projection
        )
    except DuplicateKeyError:
        if not upsert:
            raise
        doc = await collection.find_one_and_update(query, update, return_document=after, projection=projection)
    if doc is None:
        doc = await collection.find_one(confirm, projection=projection)
    return doc
