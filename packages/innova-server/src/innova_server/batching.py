"""Lookups made in the same turn of the event loop share one database round trip.

Under load the database pays a fixed cost per command that is larger than the
cost of the document it returns (SecantusDB: about three quarters of a
session lookup's time is per-command bookkeeping; MongoDB: a network round
trip and a lock each). When fifty requests look up fifty sessions at once,
one query for the fifty costs the database a fraction of fifty queries.

Writes whose caller needs no more than "done" (a reply's end, a stream slot
given back, a day's usage counted, a turn's two messages inserted) are
batched the same way into one unordered `bulk_write` (`WriteBatcher`).

This is not a cache: every lookup is answered by a query sent after the
lookup was asked for, so a revoked session is refused by the next request
exactly as without batching. A request alone waits for nothing: its batch is
sent on the next iteration of the loop, microseconds later.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

from pymongo import InsertOne, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, DuplicateKeyError, WriteError

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LookupBatcher(Generic[K, V]):
    """`load(key)` calls made in one loop iteration become one `fetch(keys)`.

    `fetch` returns what it found by key; a key it does not return loads as
    None. Its failure is every waiting caller's failure. A caller that leaves
    (cancelled) does not cancel the fetch others wait on.
    """

    def __init__(self, fetch: Callable[[list[K]], Awaitable[dict[K, V]]], *, max_batch: int = 100) -> None:
        self._fetch = fetch
        self._max_batch = max_batch
        self._pending: dict[K, list[asyncio.Future[V | None]]] = {}
        self._scheduled: asyncio.AbstractEventLoop | None = None  # the loop a dispatch is due on
        self._running: set[asyncio.Task[None]] = set()

    async def load(self, key: K) -> V | None:
        loop = asyncio.get_running_loop()
        if self._scheduled is not loop:
            if self._scheduled is not None:
                # A loop that stopped before its dispatch ran (a test client's
                # loop per request, say): what waited there waits no more.
                self._pending = {}
            self._scheduled = loop
            loop.call_soon(self._dispatch)
        future: asyncio.Future[V | None] = loop.create_future()
        self._pending.setdefault(key, []).append(future)
        return await future

    def _dispatch(self) -> None:
        self._scheduled = None
        pending, self._pending = self._pending, {}
        keys = list(pending)
        for start in range(0, len(keys), self._max_batch):
            chunk = {key: pending[key] for key in keys[start : start + self._max_batch]}
            task = asyncio.ensure_future(self._run(chunk))
            self._running.add(task)  # held: a task nobody references may be collected mid-way
            task.add_done_callback(self._running.discard)

    async def _run(self, waiters: dict[K, list[asyncio.Future[V | None]]]) -> None:
        try:
            found = await self._fetch(list(waiters))
        except Exception as error:
            for futures in waiters.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(error)
            return
        except BaseException:  # cancelled (shutting down): so are the callers
            for futures in waiters.values():
                for future in futures:
                    future.cancel()
            raise
        for key, futures in waiters.items():
            value = found.get(key)
            for future in futures:
                if not future.done():
                    future.set_result(value)


WriteOp = InsertOne[Any] | UpdateOne


class WriteBatcher:
    """Writes to one collection asked in one loop iteration go as one unordered `bulk_write`.

    For writes whose caller needs to know only that the write was done (or
    why not): `write(op)` returns when the batch holding it was acknowledged,
    and raises that operation's own error (`DuplicateKeyError` for a
    duplicate key, `WriteError` otherwise), or the batch's if the whole batch
    failed. Unordered: one operation's failure does not stop the others.
    """

    def __init__(self, collection: AsyncCollection[Any], *, max_batch: int = 500) -> None:
        self._collection = collection
        self._max_batch = max_batch
        self._pending: list[tuple[WriteOp, asyncio.Future[None]]] = []
        self._scheduled: asyncio.AbstractEventLoop | None = None  # as in LookupBatcher
        self._running: set[asyncio.Task[None]] = set()

    async def write(self, op: WriteOp) -> None:
        loop = asyncio.get_running_loop()
        if self._scheduled is not loop:
            if self._scheduled is not None:
                self._pending = []
            self._scheduled = loop
            loop.call_soon(self._dispatch)
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((op, future))
        await future

    def _dispatch(self) -> None:
        self._scheduled = None
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), self._max_batch):
            task = asyncio.ensure_future(self._run(pending[start : start + self._max_batch]))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[tuple[WriteOp, asyncio.Future[None]]]) -> None:
        failed: dict[int, Exception] = {}
        try:
            await self._collection.bulk_write([op for op, _ in batch], ordered=False)
        except BulkWriteError as error:
            if error.details.get("writeConcernErrors"):
                # Not acknowledged as asked: none of them is known to be durable.
                failed = dict.fromkeys(range(len(batch)), error)
            for item in error.details.get("writeErrors", []):
                kind = DuplicateKeyError if item.get("code") == 11000 else WriteError
                failed[item["index"]] = kind(item.get("errmsg", "write error"), item.get("code"), item)
        except Exception as error:
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        except BaseException:
            for _, future in batch:
                future.cancel()
            raise
        for index, (_, future) in enumerate(batch):
            if future.done():
                continue
            if index in failed:
                future.set_exception(failed[index])
            else:
                future.set_result(None)


__all__ = ["LookupBatcher", "WriteBatcher"]
