"""Lookups made in the same turn of the event loop share one database round trip.

Under load the database pays a fixed cost per command that is larger than the
cost of the document it returns (SecantusDB: about three quarters of a
session lookup's time is per-command bookkeeping; MongoDB: a network round
trip and a lock each). When fifty requests look up fifty sessions at once,
one query for the fifty costs the database a fraction of fifty queries.

Writes whose caller needs no more than "done" or a match count (a reply's
end, its stream slot given back, a day's usage counted; a turn's two messages
inserted and its conversation's branch moved) are batched the same way, across
collections, into one unordered `bulkWrite` (`WriteBatcher`).

This is not a cache: every lookup is answered by a query sent after the
lookup was asked for, so a revoked session is refused by the next request
exactly as without batching. A request alone waits for nothing: its batch is
sent on the next iteration of the loop, microseconds later.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Any, Generic, TypeVar

from pymongo import AsyncMongoClient, InsertOne, UpdateOne
from pymongo.errors import (
    BulkWriteError,
    ClientBulkWriteException,
    DuplicateKeyError,
    InvalidOperation,
    OperationFailure,
    WriteError,
)
from pymongo.results import ClientBulkWriteResult

log = logging.getLogger("innova.db")

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


class _Unsupported(Exception):
    """The server has no cross-collection `bulkWrite` (MongoDB before 8.0): nothing was written."""


class WriteBatcher(_Batcher[tuple[WriteOp, bool], int]):
    """Writes asked in one loop iteration, to any of the database's collections, go as one command.

    For writes whose caller needs to know only that the write was done (or
    why not), or how many documents it matched: a turn's two messages and
    its conversation's new branch; a reply's end, its stream slot given back
    and the day's usage. `write(op)` returns when the batch holding it was
    acknowledged, and raises that operation's own error (`DuplicateKeyError`
    for a duplicate key, `WriteError` otherwise), or the batch's if the whole
    batch failed. Unordered: one operation's failure does not stop the others.
    Every operation names its collection (`namespace=collection.full_name`).

    On MongoDB 8.0 and later (and SecantusDB) the batch is one client-level
    `bulkWrite` command, whatever collections it touches. Older servers have
    no such command: the first attempt says so without writing anything, and
    from then on each collection's operations go as one `bulk_write`, the
    collections' commands sent concurrently (the same waiting, more commands).
    """

    def __init__(self, client: AsyncMongoClient[Any], *, max_batch: int = 500) -> None:
        super().__init__(max_batch)
        self._client = client
        self.combined: bool | None = None  # None: not tried yet

    async def write(self, op: WriteOp) -> None:
        """Do `op` with the other writes of this loop iteration."""
        await self._submit((_named(op), False))

    async def matched(self, op: WriteOp) -> int:
        """Do `op` (an update) with the others; how many documents it matched (an upsert that inserted: 1)."""
        return await self._submit((_named(op), True))

    async def _run(self, items: list[tuple[WriteOp, bool]]) -> list[int | Exception]:
        ops = [op for op, _ in items]
        if self.combined is not False:
            try:
                outcomes = await self._run_combined(ops)
            except _Unsupported:
                log.warning("MongoDB before 8.0: writes are batched per collection (docs/architecture.md)")
                self.combined = False
            else:
                self.combined = True
                return outcomes
        return await self._run_per_collection(items)

    async def _run_combined(self, ops: list[WriteOp]) -> list[int | Exception]:
        results: ClientBulkWriteResult | None
        failed: dict[int, Exception] = {}
        try:
            results = await self._client.bulk_write(ops, ordered=False, verbose_results=True)
        except InvalidOperation as error:  # checked before sending: the server is older than 8.0
            raise _Unsupported from error
        except ClientBulkWriteException as error:
            top = error.error
            if isinstance(top, InvalidOperation) or (
                self.combined is None and isinstance(top, OperationFailure) and not error.details.get("anySuccessful")
            ):
                raise _Unsupported from error
            if top is not None:
                raise top if isinstance(top, Exception) else error from None
            if error.write_concern_errors:
                # Not acknowledged as asked: none of them is known to be durable.
                return [error] * len(ops)
            failed = {item["idx"]: _write_error(item) for item in error.details.get("writeErrors") or []}
            results = error.partial_result
        except OperationFailure as error:
            if self.combined is None:  # the command itself is unknown (or not enabled) there
                raise _Unsupported from error
            raise
        updates = results.update_results if results is not None else {}
        outcomes: list[int | Exception] = []
        for index, op in enumerate(ops):
            if index in failed:
                outcomes.append(failed[index])
            elif isinstance(op, UpdateOne):
                update = updates.get(index)
                outcomes.append(0 if update is None else update.matched_count or int(update.upserted_id is not None))
            else:
                outcomes.append(1)
        return outcomes

    async def _run_per_collection(self, items: list[tuple[WriteOp, bool]]) -> list[int | Exception]:
        """One `bulk_write` per collection, concurrently; an op whose match count is asked for goes alone
        (a collection's `bulk_write` reports counts for the whole batch only)."""
        groups: dict[tuple[str, int], list[int]] = {}
        for index, (op, counted) in enumerate(items):
            groups.setdefault((op._namespace or "", index if counted else -1), []).append(index)  # named: `_named`
        outcomes: list[int | Exception] = [0] * len(items)

        async def run(namespace: str, indexes: list[int]) -> None:
            database, _, collection = namespace.partition(".")
            ops = [items[index][0] for index in indexes]
            try:
                result = await self._client[database][collection].bulk_write(ops, ordered=False)
            except BulkWriteError as error:
                if error.details.get("writeConcernErrors"):
                    for index in indexes:
                        outcomes[index] = error
                    return
                for item in error.details.get("writeErrors", []):
                    outcomes[indexes[item["index"]]] = _write_error(item)
                return
            except Exception as error:
                for index in indexes:
                    outcomes[index] = error
                return
            for index in indexes:
                outcomes[index] = result.matched_count + result.upserted_count if len(indexes) == 1 else 1

        await asyncio.gather(*(run(namespace, indexes) for (namespace, _), indexes in groups.items()))
        return outcomes


def _named(op: WriteOp) -> WriteOp:
    # PyMongo keeps the namespace private; it is what a client-level bulkWrite sends.
    if not op._namespace:
        raise ValueError("a batched write names its collection: namespace=collection.full_name")
    return op


def _write_error(item: Mapping[str, Any]) -> Exception:
    kind = DuplicateKeyError if item.get("code") == 11000 else WriteError
    return kind(item.get("errmsg", "write error"), item.get("code"), dict(item))


__all__ = ["LookupBatcher", "WriteBatcher"]
