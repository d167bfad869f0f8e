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


@dataclass(frozen=True)
class _Window:
    """The fixed window `limit` is counting in now."""

    start: datetime
    expires_at: datetime
    retry_after: int  # seconds until it ends, at least 1

    @classmethod
    def now(cls, limit: RateLimit) -> _Window:
        now = _now()
        start = datetime.fromtimestamp(math.floor(now.timestamp() / limit.seconds) * limit.seconds, UTC)
        expires_at = start + timedelta(seconds=limit.seconds)
        return cls(start, expires_at, max(1, math.ceil((expires_at - now).total_seconds())))


class RateLimiter:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def hit(self, key: str, limit: RateLimit, *, amount: int = 1) -> Hit:
        """Add `amount` to the current window's counter and return the new count."""
        window = _Window.now(limit)
        query = {"key": key, "window_start": window.start}
        update = {"$inc": {"count": amount}, "$setOnInsert": {"expires_at": window.expires_at}}
        # Confirmed by the window's own key: the count read back includes this hit.
        doc = await write_then_confirm(self.db.rate_limits, query, update, confirm=query, upsert=True)
        count = int(doc["count"]) if doc else amount
        return Hit(key, window.start, count, window.retry_after)

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
