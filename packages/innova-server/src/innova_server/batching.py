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
T = TypeVar("T")  # what a caller submits
R = TypeVar("R")  # what it gets back


class _Batcher(Generic[T, R]):
    """What both batchers share: items submitted in one loop iteration are run together.

    `_run(items)` answers each item, in order, with its result or its own
    error. Its failure is every waiting caller's failure. A caller that
    leaves (cancelled) does not cancel the batch others wait on.
    """

    def __init__(self, max_batch: int) -> None:
        self._max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._scheduled: asyncio.AbstractEventLoop | None = None  # the loop a dispatch is due on
        self._running: set[asyncio.Task[None]] = set()

    async def _submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        if self._scheduled is not loop:
            if self._scheduled is not None:
                # A loop that stopped before its dispatch ran (a test client's
                # loop per request, say): what waited there waits no more.
                self._pending = []
            self._scheduled = loop
            loop.call_soon(self._dispatch)
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, future))
        return await future

    def _dispatch(self) -> None:
        self._scheduled = None
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), self._max_batch):
            task = asyncio.ensure_future(self._settle(pending[start : start + self._max_batch]))
            self._running.add(task)  # held: a task nobody references may be collected mid-way
            task.add_done_callback(self._running.discard)

    async def _settle(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            outcomes = await self._run([item for item, _ in batch])
        except Exception as error:
            outcomes = [error] * len(batch)
        except BaseException:  # cancelled (shutting down): so are the callers
            for _, future in batch:
                future.cancel()
            raise
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    async def _run(self, items: list[T]) -> list[R | Exception]:
        raise NotImplementedError


class LookupBatcher(_Batcher[K, V | None]):
    """`load(key)` calls made in one loop iteration become one `fetch(keys)` (each key once).

    `fetch` returns what it found by key; a key it does not return loads as None.
    """

    def __init__(self, fetch: Callable[[list[K]], Awaitable[dict[K, V]]], *, max_batch: int = 100) -> None:
        super().__init__(max_batch)
        self._fetch = fetch

    async def load(self, key: K) -> V | None:
        return await self._submit(key)

    async def _run(self, keys: list[K]) -> list[V | Exception | None]:
        found = await self._fetch(list(dict.fromkeys(keys)))
        return [found.get(key) for key in keys]


WriteOp = InsertOne[Any] | UpdateOne


class WriteBatcher(_Batcher[WriteOp, None]):
    """Writes to one collection asked in one loop iteration go as one unordered `bulk_write`.

    For writes whose caller needs to know only that the write was done (or
    why not): `write(op)` returns when the batch holding it was acknowledged,
    and raises that operation's own error (`DuplicateKeyError` for a
    duplicate key, `WriteError` otherwise), or the batch's if the whole batch
    failed. Unordered: one operation's failure does not stop the others.
    """

    def __init__(self, collection: AsyncCollection[Any], *, max_batch: int = 500) -> None:
        super().__init__(max_batch)
        self._collection = collection

    async def write(self, op: WriteOp) -> None:
        await self._submit(op)

    async def _run(self, ops: list[WriteOp]) -> list[Exception | None]:
        failed: dict[int, Exception] = {}
        try:
            await self._collection.bulk_write(ops, ordered=False)
        except BulkWriteError as error:
            if error.details.get("writeConcernErrors"):
                # Not acknowledged as asked: none of them is known to be durable.
                failed = dict.fromkeys(range(len(ops)), error)
            for item in error.details.get("writeErrors", []):
                kind = DuplicateKeyError if item.get("code") == 11000 else WriteError
                failed[item["index"]] = kind(item.get("errmsg", "write error"), item.get("code"), item)
        return [failed.get(index) for index in range(len(ops))]


__all__ = ["LookupBatcher", "WriteBatcher"]
