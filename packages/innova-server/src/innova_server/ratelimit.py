"""Fixed-window rate limits and concurrency slots, kept in MongoDB.

Kept in the database so that every gunicorn worker and every host sees the
same counters. Each check is one atomic upsert (`$inc` on the unique
`(key, window_start)` document): a counter is reserved first and refunded
if the event turns out not to count, so concurrent requests can never slip
past a limit between a read and a write.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pymongo.errors import DuplicateKeyError

from innova_server import metrics
from innova_server.db import Database, write_then_confirm
from innova_server.errors import AppError, ErrorCode
from innova_server.settings import RateLimit


def limit_key(kind: str, subject: str) -> str:
    """A key that does not store emails or IPs in clear."""
    digest = hashlib.sha256(subject.encode()).hexdigest()[:32]
    return f"{kind}:{digest}"


@dataclass(frozen=True)
class Hit:
    key: str
    window_start: datetime
    count: int
    retry_after: int


def _now() -> datetime:
    # MongoDB keeps milliseconds: round here so comparisons are exact.
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


class RateLimiter:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def hit(self, key: str, limit: RateLimit, *, amount: int = 1) -> Hit:
        """Add `amount` to the current window's counter and return the new count."""
        now = _now()
        start_epoch = math.floor(now.timestamp() / limit.seconds) * limit.seconds
        window_start = datetime.fromtimestamp(start_epoch, UTC)
        expires_at = window_start + timedelta(seconds=limit.seconds)
        query = {"key": key, "window_start": window_start}
        update = {"$inc": {"count": amount}, "$setOnInsert": {"expires_at": expires_at}}
        # Confirmed by the window's own key: the count read back includes this hit.
        doc = await write_then_confirm(self.db.rate_limits, query, update, confirm=query, upsert=True)
        count = int(doc["count"]) if doc else amount
        retry_after = max(1, math.ceil((expires_at - now).total_seconds()))
        return Hit(key, window_start, count, retry_after)

    async def take(self, name: str, key: str, limit: RateLimit) -> None:
        """Count one event if the window has room; else 429 `rate_limited` (with `Retry-After`).

        For hot paths (a chat turn): one conditional `update_one`, whose
        answer is "applied or not", where `consume` needs the count back (a
        `findAndModify`, which SecantusDB serves by scanning the collection).
        A refused event is not counted: the window stays at its limit.
        """
        now = _now()
        start_epoch = math.floor(now.timestamp() / limit.seconds) * limit.seconds
        window_start = datetime.fromtimestamp(start_epoch, UTC)
        expires_at = window_start + timedelta(seconds=limit.seconds)
        query = {"key": key, "window_start": window_start, "count": {"$lt": limit.count}}
        update = {"$inc": {"count": 1}, "$setOnInsert": {"expires_at": expires_at}}
        collection = self.db.rate_limits
        try:
            result = await collection.update_one(query, update, upsert=True)
            taken = result.matched_count == 1 or result.upserted_id is not None
        except DuplicateKeyError:
            # The window exists and is full (the upsert tried to create it
            # again), or two first events raced to create it: ask again
            # without creating.
            taken = (await collection.update_one(query, update)).matched_count == 1
        if not taken:
            metrics.RATE_LIMITED.labels(name).inc()
            retry_after = max(1, math.ceil((expires_at - now).total_seconds()))
            raise AppError(ErrorCode.RATE_LIMITED, headers={"Retry-After": str(retry_after)})

    async def consume(self, name: str, key: str, limit: RateLimit) -> Hit:
        """Count one event; raise 429 `rate_limited` (with `Retry-After`) past the limit."""
        hit = await self.hit(key, limit)
        if hit.count > limit.count:
            metrics.RATE_LIMITED.labels(name).inc()
            raise AppError(ErrorCode.RATE_LIMITED, headers={"Retry-After": str(hit.retry_after)})
        return hit

    async def refund(self, *hits: Hit) -> None:
        """Give back one event of each window (e.g. a login that succeeded), in one round trip."""
        windows = [{"key": hit.key, "window_start": hit.window_start} for hit in hits]
        await self.db.rate_limits.update_many(
            {"$or": windows, "count": {"$gt": 0}}, {"$inc": {"count": -1}}
        )
