"""Messages in MongoDB: the history, and an assistant reply's life from `streaming` to its end.

An assistant message is a small state machine kept in its own document, so
that any worker or host can read, follow or stop a reply that another one is
generating (docs/architecture.md, "A turn"):

- inserted with the user message when the stream opens: `status: "streaming"`,
  `content: ""`, a lease (`lease_expires_at`);
- checkpointed while it grows: the text so far and a renewed lease, written
  for all the replies of a process at once, beside one read of their stop
  flags and of the last time a follower on another process looked
  (`watched_at`);
- finished once: status, finish_reason, usage, error — conditioned on
  `status: "streaming"`, so a message declared dead in the meantime (its lease
  expired) or deleted with its conversation is never resurrected.

A `streaming` message whose lease has expired belongs to a worker that died:
every read shows it `incomplete` / `interrupted` (`MessageRecord.from_doc`),
and `interrupt` makes that permanent.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from bson import ObjectId
from pymongo import ASCENDING, InsertOne, ReturnDocument, UpdateOne

from innova_server.auth.store import object_id, utcnow
from innova_server.batching import LookupBatcher
from innova_server.chatlaya.tree import Node
from innova_server.db import Database, Document

MessageStatus = Literal["streaming", "complete", "incomplete", "error"]

# Fields a reader never needs (and the stored text is not re-read by the writer).
_HIDDEN = {"user_id": 0, "watched_at": 0}


@dataclass(frozen=True)
class MessageRecord:
    id: str
    conversation_id: str
    role: str
    content: str
    created_at: datetime
    status: str
    provider: str | None
    model: str | None
    finish_reason: str | None
    usage: dict[str, int] | None
    parent_id: str | None = None
    error: dict[str, Any] | None = None
    lease_expires_at: datetime | None = None
    feedback: dict[str, Any] | None = None

    @classmethod
    def from_doc(cls, doc: Document, now: datetime | None = None) -> MessageRecord:
        """The message as a reader must see it: a lapsed lease reads `incomplete` / `interrupted`."""
        status = doc.get("status", "complete")
        finish_reason = doc.get("finish_reason")
        lease = doc.get("lease_expires_at")
        if status == "streaming" and lease is not None and lease <= (now or utcnow()):
            status, finish_reason = "incomplete", "interrupted"
        parent = doc.get("parent_id")
        return cls(
            id=str(doc["_id"]),
            conversation_id=str(doc["conversation_id"]),
            role=doc["role"],
            content=doc.get("content", ""),
            created_at=doc["created_at"],
            status=status,
            provider=doc.get("provider"),
            model=doc.get("model"),
            finish_reason=finish_reason,
            usage=doc.get("usage"),
            parent_id=str(parent) if parent is not None else None,
            error=doc.get("error"),
            lease_expires_at=lease,
            feedback=doc.get("feedback"),
        )

    @property
    def streaming(self) -> bool:
        return self.status == "streaming"

    @property
    def lapsed(self) -> bool:
        """Stored as `streaming`, but its worker is gone (the lease ran out)."""
        return self.finish_reason == "interrupted" and self.lease_expires_at is not None


@dataclass(frozen=True)
class Checkpoint:
    """What the generating worker learns from a checkpoint write."""

    stop_requested: bool
    watched_at: datetime | None


class MessageStore:
    def __init__(self, db: Database) -> None:
        self.collection = db.messages
        # Under load, turns opening and ending together share their round
        # trips (innova_server.batching); a turn alone waits for nothing.
        self._writes = db.writes
        self._by_id: LookupBatcher[str, MessageRecord] = LookupBatcher(self._fetch, max_batch=100)

    # -- a turn's two messages --------------------------------------------

    async def open_turn(
        self,
        *,
        conversation_id: str,
        user_id: str,
        content: str | None,
        parent_id: str | None,
        assistant_id: ObjectId,
        user_message_id: str | None = None,
        provider: str,
        model: str,
        created_at: datetime,
        lease: timedelta,
    ) -> str:
        """Insert the new messages of a turn in one round trip; the id of the reply's parent.

        With `content`, a user message following `parent_id`, then the
        `streaming` assistant message following it (a millisecond later, so the
        order by `created_at`, then `_id`, keeps the question before the
        answer). Without (a regeneration), only the assistant message, following
        `parent_id` (the user message it answers again).
        """
        docs: list[Document] = []
        reply_parent = object_id(parent_id) if parent_id else None
        if content is not None:
            user_doc: Document = {
                "_id": ObjectId(user_message_id) if user_message_id else ObjectId(),
                "conversation_id": ObjectId(conversation_id),
                "user_id": ObjectId(user_id),
                "parent_id": reply_parent,
                "role": "user",
                "content": content,
                "created_at": created_at,
                "status": "complete",
                "provider": None,
                "model": None,
                "finish_reason": None,
                "usage": None,
            }
            docs.append(user_doc)
            reply_parent = user_doc["_id"]
        docs.append(
            {
                "_id": assistant_id,
                "conversation_id": ObjectId(conversation_id),
                "user_id": ObjectId(user_id),
                "parent_id": reply_parent,
                "role": "assistant",
                "content": "",
                "created_at": created_at + timedelta(milliseconds=1),
                "status": "streaming",
                "provider": provider,
                "model": model,
                "finish_reason": None,
                "usage": None,
                "lease_expires_at": utcnow() + lease,
            }
        )
        # Both in the same batch; the caller deletes both when either failed.
        namespace = self.collection.full_name
        written = await asyncio.gather(
            *(self._writes.write(InsertOne(doc, namespace=namespace)) for doc in docs), return_exceptions=True
        )
        failure = next((outcome for outcome in written if isinstance(outcome, BaseException)), None)
        if failure is not None:
            raise failure
        return str(reply_parent)

    async def checkpoint_many(self, contents: dict[str, str | None], *, until: datetime) -> dict[str, Checkpoint]:
        """Renew the lease of every reply of `contents` to `until`, storing its text when given;
        what each still `streaming` one brings back (absent: no longer streaming).

        Two round trips together, whatever the number of replies: a `bulk_write`
        of the updates, and a `find` of the flags.
        """
        ids = [ObjectId(message_id) for message_id in contents]
        updates = [
            UpdateOne(
                {"_id": ObjectId(message_id), "status": "streaming"},
                {"$set": {"lease_expires_at": until, **({"content": content} if content is not None else {})}},
            )
            for message_id, content in contents.items()
        ]
        _, docs = await asyncio.gather(
            self.collection.bulk_write(updates, ordered=False),
            self.collection.find(
                {"_id": {"$in": ids}, "status": "streaming"}, projection={"stop_requested": 1, "watched_at": 1}
            ).to_list(),
        )
        return {str(doc["_id"]): Checkpoint(bool(doc.get("stop_requested")), doc.get("watched_at")) for doc in docs}

    async def finish(
        self,
        message_id: str,
        *,
        status: MessageStatus,
        content: str,
        finish_reason: str,
        usage: dict[str, int] | None,
        error: dict[str, Any] | None,
    ) -> None:
        """The reply's end, written once: only if it is still `streaming` (not deleted, nor declared dead)."""
        await self._writes.write(
            UpdateOne(
                {"_id": ObjectId(message_id), "status": "streaming"},
                {
                    "$set": {
                        "status": status,
                        "content": content,
                        "finish_reason": finish_reason,
                        "usage": usage,
                        "error": error,
                        "finished_at": utcnow(),
                    },
                    "$unset": {"lease_expires_at": "", "stop_requested": ""},
                },
                namespace=self.collection.full_name,
            )
        )

    async def delete_turn(self, *message_ids: str) -> None:
        await self.collection.delete_many({"_id": {"$in": [ObjectId(m) for m in message_ids]}})

    # -- what other processes do to a reply ----------------------------------

    async def assistant(self, user_id: str, message_id: str) -> MessageRecord | None:
        """The caller's assistant message; None for anything else (unknown, foreign, a user message)."""
        oid = object_id(message_id)
        if oid is None:
            return None
        doc = await self.collection.find_one(
            {"_id": oid, "user_id": ObjectId(user_id), "role": "assistant"}, projection=_HIDDEN
        )
        return MessageRecord.from_doc(doc) if doc else None

    async def request_stop(self, user_id: str, message_id: str) -> MessageRecord | None:
        """Raise the stop flag of the caller's reply if it is streaming; the message as it is now."""
        oid = object_id(message_id)
        if oid is None:
            return None
        doc = await self.collection.find_one_and_update(
            {
                "_id": oid,
                "user_id": ObjectId(user_id),
                "role": "assistant",
                "status": "streaming",
                "lease_expires_at": {"$gt": utcnow()},
            },
            {"$set": {"stop_requested": True}},
            projection=_HIDDEN,
            return_document=ReturnDocument.AFTER,
        )
        if doc is not None:
            return MessageRecord.from_doc(doc)
        return await self.assistant(user_id, message_id)  # finished, lapsed, or not the caller's

    async def watch(self, message_id: str) -> MessageRecord | None:
        """Read a reply for a follower on this process, marking it watched (for the detached timeout)."""
        doc = await self.collection.find_one_and_update(
            {"_id": ObjectId(message_id)},
            {"$set": {"watched_at": utcnow()}},
            projection=_HIDDEN,
            return_document=ReturnDocument.AFTER,
        )
        return MessageRecord.from_doc(doc) if doc else None

    async def interrupt(self, message_id: str) -> bool:
        """Store a lapsed reply as `incomplete` / `interrupted`; True when this call did it."""
        result = await self.collection.update_one(
            {"_id": ObjectId(message_id), "status": "streaming", "lease_expires_at": {"$lte": utcnow()}},
            {
                "$set": {"status": "incomplete", "finish_reason": "interrupted", "finished_at": utcnow()},
                "$unset": {"lease_expires_at": "", "stop_requested": ""},
            },
        )
        return result.modified_count == 1

    # -- the history and the tree ------------------------------------------------

    async def delete_conversation(self, conversation_id: str) -> int:
        result = await self.collection.delete_many({"conversation_id": ObjectId(conversation_id)})
        return result.deleted_count

    async def in_conversation(self, conversation_id: str, message_id: str) -> MessageRecord | None:
        oid = object_id(message_id)
        if oid is None:
            return None
        doc = await self.collection.find_one(
            {"_id": oid, "conversation_id": ObjectId(conversation_id)}, projection=_HIDDEN
        )
        return MessageRecord.from_doc(doc) if doc else None

    async def skeleton(self, conversation_id: str) -> list[Node]:
        """`(id, parent_id)` of every message of the conversation, oldest first, in one round trip."""
        docs = await (
            self.collection.find({"conversation_id": ObjectId(conversation_id)}, projection={"parent_id": 1})
            .sort([("created_at", ASCENDING), ("_id", ASCENDING)])
            .to_list()
        )
        return [Node(str(doc["_id"]), str(doc["parent_id"]) if doc.get("parent_id") else None) for doc in docs]

    async def adopt_linear(self, conversation_id: str) -> list[str]:
        """A conversation of the first version (no parents): chain its messages by time; its ids in order.

        Idempotent and safe to race: each message gets the parent its
        predecessor in time gives it, and only where it has none yet.
        """
        docs = await (
            self.collection.find({"conversation_id": ObjectId(conversation_id)}, projection={"parent_id": 1})
            .sort([("created_at", ASCENDING), ("_id", ASCENDING)])
            .to_list()
        )
        updates = [
            UpdateOne({"_id": doc["_id"], "parent_id": {"$exists": False}}, {"$set": {"parent_id": previous}})
            for previous, doc in zip([None, *(d["_id"] for d in docs)], docs, strict=False)
            if "parent_id" not in doc
        ]
        if updates:
            await self.collection.bulk_write(updates, ordered=False)
        return [str(doc["_id"]) for doc in docs]

    async def by_ids(self, message_ids: list[str]) -> dict[str, MessageRecord]:
        """The messages of `message_ids` that exist (history reads of turns opening together share a query)."""
        # A malformed id names no message (and must not fail the batch it shares).
        wanted = [m for m in message_ids if object_id(m) is not None]
        if not wanted:
            return {}
        found = await asyncio.gather(*(self._by_id.load(m) for m in wanted))
        return {m: record for m, record in zip(wanted, found, strict=True) if record is not None}

    async def _fetch(self, message_ids: list[str]) -> dict[str, MessageRecord]:
        docs = await self.collection.find(
            {"_id": {"$in": [ObjectId(m) for m in message_ids]}}, projection=_HIDDEN
        ).to_list()
        now = utcnow()
        return {str(doc["_id"]): MessageRecord.from_doc(doc, now) for doc in docs}

    async def siblings(self, conversation_id: str, parent_ids: set[str | None]) -> dict[str | None, list[str]]:
        """The children of each of `parent_ids` (None: the roots), oldest first, in one round trip."""
        wanted = [ObjectId(p) if p else None for p in parent_ids]
        docs = await (
            self.collection.find(
                {"conversation_id": ObjectId(conversation_id), "parent_id": {"$in": wanted}},
                projection={"parent_id": 1},
            )
            .sort([("created_at", ASCENDING), ("_id", ASCENDING)])
            .to_list()
        )
        children: dict[str | None, list[str]] = {}
        for doc in docs:
            parent = str(doc["parent_id"]) if doc.get("parent_id") else None
            children.setdefault(parent, []).append(str(doc["_id"]))
        return children

    async def set_feedback(
        self, user_id: str, message_id: str, feedback: dict[str, Any] | None
    ) -> MessageRecord | None:
        """Set (or, with None, clear) the feedback of the caller's assistant message."""
        oid = object_id(message_id)
        if oid is None:
            return None
        update = {"$set": {"feedback": feedback}} if feedback else {"$unset": {"feedback": ""}}
        doc = await self.collection.find_one_and_update(
            {"_id": oid, "user_id": ObjectId(user_id), "role": "assistant"},
            update,
            projection=_HIDDEN,
            return_document=ReturnDocument.AFTER,
        )
        return MessageRecord.from_doc(doc) if doc else None


__all__ = ["Checkpoint", "MessageRecord", "MessageStatus", "MessageStore"]
