"""Per-user usage of the model, per UTC day: what `GET /chatlaya/usage` shows and a daily quota reads.

One document per user and day (`usage_daily`, `_id` = `user_id:YYYY-MM-DD`),
incremented once at the end of each reply: reading today's figures is one
lookup by `_id`, never a scan of messages. Tokens are the provider's own
count when it reports one, else an estimate (characters / 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from bson import ObjectId
from pymongo import UpdateOne
from pymongo.errors import DuplicateKeyError

from innova_server.auth.store import utcnow
from innova_server.db import Database

# Kept a while beyond the day, for an operator's look back (TTL on `expires_at`).
RETENTION = timedelta(days=40)


def utc_day(now: datetime) -> str:
    return now.strftime("%Y-%m-%d")


def seconds_to_utc_midnight(now: datetime | None = None) -> int:
    """When today's quota resets (the `Retry-After` of a 429 `quota_exceeded`)."""
    now = now or utcnow()
    tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, int((tomorrow - now).total_seconds()))


def estimate_tokens(characters: int) -> int:
    return (characters + 3) // 4


@dataclass(frozen=True)
class DailyUsage:
    messages: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class UsageStore:
    def __init__(self, db: Database) -> None:
        self.collection = db.usage_daily
        self._writes = db.writes  # with the reply's end and its slot: one round trip

    async def add(
        self, user_id: str, *, prompt_tokens: int, completion_tokens: int, now: datetime | None = None
    ) -> None:
        now = now or utcnow()
        day = utc_day(now)
        key = {"_id": f"{user_id}:{day}"}
        update = {
            "$inc": {"messages": 1, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
            "$setOnInsert": {"user_id": ObjectId(user_id), "day": day, "expires_at": now + RETENTION},
        }
        try:
            await self._writes.write(UpdateOne(key, update, upsert=True, namespace=self.collection.full_name))
        except DuplicateKeyError:  # two first replies of the day at once: the document exists now
            await self.collection.update_one(key, {"$inc": update["$inc"]})

    async def today(self, user_id: str, now: datetime | None = None) -> DailyUsage:
        doc = await self.collection.find_one({"_id": f"{user_id}:{utc_day(now or utcnow())}"})
        if doc is None:
            return DailyUsage()
        return DailyUsage(doc.get("messages", 0), doc.get("prompt_tokens", 0), doc.get("completion_tokens", 0))


__all__ = ["DailyUsage", "UsageStore", "estimate_tokens", "seconds_to_utc_midnight", "utc_day"]
