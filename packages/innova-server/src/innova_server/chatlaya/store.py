"""Conversations and stream slots in MongoDB (messages: `messages.py`), behind small typed interfaces.

Every state change that must be atomic is a single MongoDB operation:

- the "active conversation" get-or-create is an upsert on a unique sparse key
  (`session_key`), so concurrent calls converge on one document;
- a stream slot is a `$push` guarded by the array's length, so two workers can
  never both take the last slot.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId
from pymongo import DESCENDING, ReturnDocument, UpdateOne

from innova_server.auth.store import object_id, utcnow
from innova_server.db import Database, Document, update_if, write_then_confirm
from innova_server.settings import RateLimit

# -- records -----------------------------------------------------------------


@dataclass(frozen=True)
class ConversationRecord:
    id: str
    user_id: str
    title: str | None
    title_set_by_user: bool
    created_at: datetime
    updated_at: datetime
    archived: bool
    # The current branch, root→leaf (`chatlaya.tree`); None for a conversation
    # of the first version, whose messages have no parents yet.
    branch: list[str] | None = None

    @classmethod
    def from_doc(cls, doc: Document) -> ConversationRecord:
        branch = doc.get("branch")
        return cls(
            id=str(doc["_id"]),
            user_id=str(doc["user_id"]),
            title=doc.get("title"),
            title_set_by_user=bool(doc.get("title_set_by_user", False)),
            created_at=doc["created_at"],
            updated_at=doc["updated_at"],
            archived=bool(doc.get("archived", False)),
            branch=[str(oid) for oid in branch] if branch is not None else None,
        )


# -- keyset cursors ----------------------------------------------------------


class InvalidCursor(ValueError):
    pass


def encode_cursor(when: datetime, oid: str) -> str:
    """Opaque to clients, so the sort key can change without breaking them."""
    millis = int(when.timestamp() * 1000)
    return base64.urlsafe_b64encode(f"{millis}:{oid}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, ObjectId]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        millis_text, oid_text = raw.split(":", 1)
        millis = int(millis_text)
        when = datetime.fromtimestamp(millis / 1000, UTC)
    except (ValueError, binascii.Error, UnicodeDecodeError, OverflowError, OSError):
        raise InvalidCursor(cursor) from None
    oid = object_id(oid_text)
    if oid is None:
        raise InvalidCursor(cursor)
    return when, oid


# -- conversations -----------------------------------------------------------


class ConversationStore:
    def __init__(self, db: Database) -> None:
        self.collection = db.conversations
        self._messages = db.messages.name
        self._writes = db.writes

    @staticmethod
    def _new_doc(user_id: ObjectId, now: datetime) -> Document:
        return {
            "user_id": user_id,
            "title": None,
            "title_set_by_user": False,
            "created_at": now,
            "updated_at": now,
            "archived": False,
            "branch": [],
        }

    async def create(self, user_id: str) -> ConversationRecord:
        doc = self._new_doc(ObjectId(user_id), utcnow())
        result = await self.collection.insert_one(doc)
        doc["_id"] = result.inserted_id
        return ConversationRecord.from_doc(doc)

    async def get(self, user_id: str, conversation_id: str) -> ConversationRecord | None:
        """The conversation if it exists *and* belongs to the user; invalid ids are simply absent."""
        oid = object_id(conversation_id)
        if oid is None:
            return None
        doc = await self.collection.find_one({"_id": oid, "user_id": ObjectId(user_id)})
        return ConversationRecord.from_doc(doc) if doc else None

    async def active(self, user_id: str) -> ConversationRecord | None:
        doc = await self.collection.find_one(
            {"user_id": ObjectId(user_id), "archived": False},
            sort=[("updated_at", DESCENDING), ("_id", DESCENDING)],
        )
        return ConversationRecord.from_doc(doc) if doc else None

    async def get_or_create_active(self, user_id: str) -> ConversationRecord:
        """The most recently updated unarchived conversation, created if there is none.

        Creation upserts on `session_key` (unique, sparse): whatever the
        interleaving, concurrent callers that all saw "none" meet on one
        document. The key is removed when that conversation is archived, so
        the next call after archiving creates a fresh one.
        """
        found = await self.active(user_id)
        return found if found is not None else await self.create_active(user_id)

    async def with_recent(
        self, user_id: str, conversation_id: str | None, count: int
    ) -> tuple[ConversationRecord, list[Document]] | None:
        """The user's conversation (their active one when `conversation_id` is None) and the messages
        of the last `count` ids of its branch, in one round trip (an aggregate with a `$lookup`);
        None when there is no such conversation. What a turn needs before writing anything."""
        owner = ObjectId(user_id)
        if conversation_id is None:
            match: list[Document] = [
                {"$match": {"user_id": owner, "archived": False}},
                {"$sort": {"updated_at": DESCENDING, "_id": DESCENDING}},
                {"$limit": 1},
            ]
        else:
            oid = object_id(conversation_id)
            if oid is None:
                return None
            match = [{"$match": {"_id": oid, "user_id": owner}}]
        pipeline = [
            *match,
            {"$addFields": {"_recent": {"$slice": [{"$ifNull": ["$branch", []]}, -count]}}},
            {"$lookup": {"from": self._messages, "localField": "_recent", "foreignField": "_id", "as": "_messages"}},
        ]
        docs = await (await self.collection.aggregate(pipeline)).to_list()
        if not docs:
            return None
        return ConversationRecord.from_doc(docs[0]), docs[0]["_messages"]

    async def create_active(self, user_id: str) -> ConversationRecord:
        """The creating half of `get_or_create_active`, for a caller that already saw no active one."""
        key = {"session_key": user_id}
        doc = await write_then_confirm(
            self.collection, key, {"$setOnInsert": self._new_doc(ObjectId(user_id), utcnow())}, confirm=key, upsert=True
        )
        if doc is None:  # archived between our upsert and the read: fall back on the newest
            return await self.active(user_id) or await self.create(user_id)
        return ConversationRecord.from_doc(doc)

    async def touch(
        self, conversation: ConversationRecord, now: datetime, first_message: str | None, branch: list[str]
    ) -> bool:
        """Make `branch` current and move `updated_at`; set the automatic title if there is none yet.

        Batched with the turn's messages (`Database.writes`: one command for
        both). The title is a second update in the same batch whose filter
        re-checks `title_set_by_user`, so a rename racing with the first
        message always wins. False when the conversation is gone (deleted
        while the turn was being opened).
        """
        oid = ObjectId(conversation.id)
        namespace = self.collection.full_name
        changes: dict[str, Any] = {"updated_at": now, "branch": [ObjectId(m) for m in branch]}
        writes = [self._writes.matched(UpdateOne({"_id": oid}, {"$set": changes}, namespace=namespace))]
        if first_message is not None and conversation.title is None and not conversation.title_set_by_user:
            title = make_title(first_message)
            titled = UpdateOne(
                {"_id": oid, "title_set_by_user": {"$ne": True}},
                {"$set": {"title": title, "title_search": title.casefold()}},
                namespace=namespace,
            )
            writes.append(self._writes.matched(titled))
        matched, *_ = await asyncio.gather(*writes)
        return matched == 1

    async def restore(self, conversation: ConversationRecord, branch: list[str], *, replaced: list[str]) -> None:
        """Put back branch, `updated_at` and title as `conversation` had them, unless the branch moved
        on since `replaced` was written (another turn, a switch): then the newer state stays."""
        changes: dict[str, Any] = {
            "branch": [ObjectId(m) for m in branch],
            "updated_at": conversation.updated_at,
            "title": conversation.title,
        }
        update: dict[str, Any] = {"$set": changes}
        if conversation.title is None:
            update["$unset"] = {"title_search": ""}
        else:
            changes["title_search"] = conversation.title.casefold()
        await self.collection.update_one(
            {"_id": ObjectId(conversation.id), "branch": [ObjectId(m) for m in replaced]}, update
        )

    async def set_branch(self, user_id: str, conversation_id: str, branch: list[str]) -> ConversationRecord | None:
        """Make `branch` current (any valid path: see `chatlaya.tree`); `updated_at` stays."""
        doc = await self.collection.find_one_and_update(
            {"_id": ObjectId(conversation_id), "user_id": ObjectId(user_id)},
            {"$set": {"branch": [ObjectId(m) for m in branch]}},
            return_document=ReturnDocument.AFTER,
        )
        return ConversationRecord.from_doc(doc) if doc else None

    async def set_generated_title(self, conversation_id: str, title: str, *, replaces: str | None) -> bool:
        """A model's title, only over the automatic title it was made for (never over the user's)."""
        result = await self.collection.update_one(
            {"_id": ObjectId(conversation_id), "title_set_by_user": {"$ne": True}, "title": replaces},
            {"$set": {"title": title, "title_search": title.casefold()}},
        )
        return result.modified_count == 1

    async def update(
        self, user_id: str, conversation_id: str, *, title: str | None = None, archived: bool | None = None
    ) -> ConversationRecord | None:
        oid = object_id(conversation_id)
        if oid is None:
            return None
        # `updated_at` stays: it orders conversations by their last message,
        # and renaming or archiving is not a message.
        changes: dict[str, Any] = {}
        unset: dict[str, str] = {}
        if title is not None:
            changes["title"] = title
            changes["title_search"] = title.casefold()
            changes["title_set_by_user"] = True
        if archived is not None:
            changes["archived"] = archived
            if archived:
                unset["session_key"] = ""
        update: dict[str, Any] = {"$set": changes}
        if unset:
            update["$unset"] = unset
        doc = await self.collection.find_one_and_update(
            {"_id": oid, "user_id": ObjectId(user_id)}, update, return_document=ReturnDocument.AFTER
        )
        return ConversationRecord.from_doc(doc) if doc else None

    async def exists(self, conversation_id: str) -> bool:
        return await self.collection.find_one({"_id": ObjectId(conversation_id)}, projection={"_id": 1}) is not None

    async def delete(self, user_id: str, conversation_id: str) -> bool:
        oid = object_id(conversation_id)
        if oid is None:
            return False
        result = await self.collection.delete_one({"_id": oid, "user_id": ObjectId(user_id)})
        return result.deleted_count == 1

    async def page(
        self, user_id: str, *, archived: bool, limit: int, cursor: str | None, query: str | None = None
    ) -> tuple[list[ConversationRecord], str | None]:
        """Newest `updated_at` first; the cursor is the last item's `(updated_at, _id)`.

        `query` keeps the titles that contain it, case-insensitively, as a
        literal: it is escaped before it becomes a pattern, and matched against
        `title_search` (the title case-folded when it is written; a title from
        before that field existed is matched on `title` with the `i` flag).
        """
        filters: dict[str, Any] = {"user_id": ObjectId(user_id), "archived": archived}
        if query:
            folded = re.escape(query.casefold())
            filters["$and"] = [
                {
                    "$or": [
                        {"title_search": {"$regex": folded}},
                        {"title_search": {"$exists": False}, "title": {"$regex": re.escape(query), "$options": "i"}},
                    ]
                }
            ]
        if cursor:
            when, oid = decode_cursor(cursor)
            filters["$or"] = [{"updated_at": {"$lt": when}}, {"updated_at": when, "_id": {"$lt": oid}}]
        docs = await (
            self.collection.find(filters)
            .sort([("updated_at", DESCENDING), ("_id", DESCENDING)])
            .limit(limit + 1)
            .batch_size(limit + 1)
            .to_list()
        )
        items = [ConversationRecord.from_doc(doc) for doc in docs[:limit]]
        next_cursor = encode_cursor(items[-1].updated_at, items[-1].id) if len(docs) > limit else None
        return items, next_cursor


def make_title(text: str, limit: int = 60) -> str:
    """The first words of `text`, cut at a word boundary, on one line."""
    words = text.split()
    title = ""
    for word in words:
        candidate = f"{title} {word}" if title else word
        if len(candidate) > limit:
            break
        title = candidate
    if not title:  # a single very long word
        title = words[0][:limit] if words else ""
    return title + ("…" if len(title) < len(" ".join(words)) else "")


# -- stream slots ------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    key: str
    id: str


@dataclass(frozen=True)
class RateLimited:
    """`acquire` refused by its rate: the oldest counted event leaves the window in `retry_after` seconds."""

    retry_after: int


class StreamSlots:
    """At most `capacity` concurrent streams per key, shared by every worker; optionally a rate too.

    One document per key holds the live slots in an array, each with its own
    lease. Taking a slot is one `$push` conditioned on the array being
    shorter than the capacity; a slot left behind by a crashed worker expires
    with its lease and is pruned on the next attempt that finds the array full.

    With a `rate` (the chat's messages per minute), the same document keeps the
    times of the key's last `rate.count` events, newest first: a sliding
    window. The event is admitted when fewer than `rate.count` are kept or the
    oldest left the window, and the same conditional write takes the slot and
    records the event — one round trip for both checks, and a refusal counts
    nothing. (A fixed-window counter would need a second write at each new
    window, and lets twice the rate through across a window's edge.)

    Newest first, because then both conditions are one: `sent.<count - 1>`
    is absent (fewer events) or out of the window. Oldest first needed the
    `$or` of two paths, the same to MongoDB but not to SecantusDB (the
    embedded database), which plans no index for a filter with a top-level
    operator and scanned the whole collection at every admission: 11 % of its
    time in a burst of 1 000 streams.
    """

    def __init__(self, db: Database, *, lease: timedelta) -> None:
        self.collection = db.stream_slots
        self.lease = lease
        self._writes = db.writes  # with the reply's end and its usage: one round trip

    async def acquire(
        self, key: str, capacity: int, slot_id: str | None = None, *, rate: RateLimit | None = None
    ) -> Slot | RateLimited | None:
        """A slot of `key` (named `slot_id`, e.g. the reply's message id); None when all are held,
        `RateLimited` when `rate` is spent (checked first: a client retrying later needs to know when)."""
        slot = Slot(key, slot_id or secrets.token_hex(8))
        for attempt in range(3):
            now = utcnow()
            if await self._try_push(slot, capacity, rate, now):
                return slot
            if attempt == 2:
                break
            # Refused: why? One read, on the refusal path only.
            doc = await self.collection.find_one({"_id": key}) or {}
            if rate is not None:
                sent: list[datetime] = doc.get("sent") or []
                newest = sorted(sent, reverse=True)
                # What the rate counts: the newest `rate.count` (the log is longer just after the count was lowered).
                if len(newest) >= rate.count and newest[rate.count - 1] > now - timedelta(seconds=rate.seconds):
                    waited = (newest[rate.count - 1] + timedelta(seconds=rate.seconds) - now).total_seconds()
                    return RateLimited(max(1, math.ceil(waited)))
                if sent != newest:
                    # A log written oldest first (before this order): put it newest first, then try again.
                    await self.collection.update_one({"_id": key}, {"$push": {"sent": self._log(rate)}})
                    continue
            holders = doc.get("holders") or []
            if sum(1 for holder in holders if holder["expires_at"] > now) >= capacity:
                return None
            if len(holders) >= capacity:  # some leases ran out (a crashed worker): free them, then try again
                await self.collection.update_one({"_id": key}, {"$pull": {"holders": {"expires_at": {"$lte": now}}}})
        return None

    async def _try_push(self, slot: Slot, capacity: int, rate: RateLimit | None, now: datetime) -> bool:
        """One conditional `$push` (`update_if`: the first stream of a key creates its document); True when held."""
        expires_at = now + self.lease
        query: dict[str, Any] = {"_id": slot.key, f"holders.{capacity - 1}": {"$exists": False}}
        update: dict[str, Any] = {"$push": {"holders": {"id": slot.id, "expires_at": expires_at}}}
        if rate is not None:
            window_start = now - timedelta(seconds=rate.seconds)
            query[f"sent.{rate.count - 1}"] = {"$not": {"$gt": window_start}}  # absent, or out of the window
            update["$push"]["sent"] = self._log(rate, now)
            # The document (and its log of events) outlives the rate's window, not only the leases.
            expires_at = max(expires_at, now + timedelta(seconds=rate.seconds))
        update["$max"] = {"expires_at": expires_at}
        return await update_if(self.collection, query, update)

    @staticmethod
    def _log(rate: RateLimit, *events: datetime) -> dict[str, Any]:
        """The `$push` of `events` that keeps the key's last `rate.count` events, newest first."""
        return {"$each": list(events), "$sort": -1, "$slice": rate.count}

    async def renew_many(self, slots: list[Slot], until: datetime) -> None:
        """Extend the leases of `slots` to `until` (a reply's, so never past its message's lease), in one round trip."""
        if not slots:
            return
        await self.collection.bulk_write(
            [
                UpdateOne(
                    {"_id": slot.key, "holders.id": slot.id},
                    {"$set": {"holders.$.expires_at": until}, "$max": {"expires_at": until}},
                )
                for slot in slots
            ],
            ordered=False,
        )

    async def release(self, slot: Slot) -> None:
        await self._writes.write(
            UpdateOne(
                {"_id": slot.key}, {"$pull": {"holders": {"id": slot.id}}}, namespace=self.collection.full_name
            )
        )

    async def held(self, key: str) -> int:
        doc = await self.collection.find_one({"_id": key, "holders": {"$exists": True}})
        if not doc:
            return 0
        now = utcnow()
        return sum(1 for holder in doc["holders"] if holder["expires_at"] > now)


__all__ = [
    "ConversationRecord",
    "ConversationStore",
    "InvalidCursor",
    "RateLimited",
    "Slot",
    "StreamSlots",
    "decode_cursor",
    "encode_cursor",
    "make_title",
]
