"""Storage of users and sessions behind two small typed interfaces."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId
from pymongo.errors import DuplicateKeyError

from innova_server.db import Database, Document, write_then_confirm


def utcnow() -> datetime:
    """Now, to the millisecond (what MongoDB keeps), timezone-aware."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


@dataclass(frozen=True)
class UserRecord:
    id: str
    email: str
    name: str | None
    password_hash: str
    created_at: datetime
    # Bumped by every password reset; a session is only valid for the epoch it
    # was opened in (accounts created before the field existed are epoch 0).
    auth_epoch: int = 0

    @classmethod
    def from_doc(cls, doc: Document) -> UserRecord:
        return cls(
            id=str(doc["_id"]),
            email=doc["email"],
            name=doc.get("name"),
            password_hash=doc["password_hash"],
            created_at=doc["created_at"],
            auth_epoch=int(doc.get("auth_epoch") or 0),
        )


class EmailTaken(Exception):
    pass


def object_id(value: str) -> ObjectId | None:
    return ObjectId(value) if ObjectId.is_valid(value) else None


class UserStore:
    def __init__(self, db: Database) -> None:
        self.collection = db.users

    async def create(self, email: str, name: str | None, password_hash: str) -> UserRecord:
        now = utcnow()
        doc: Document = {
            "email": email,
            "name": name,
            "password_hash": password_hash,
            "created_at": now,
            "updated_at": now,
        }
        try:
            result = await self.collection.insert_one(doc)
        except DuplicateKeyError:
            raise EmailTaken(email) from None
        doc["_id"] = result.inserted_id
        return UserRecord.from_doc(doc)

    async def by_email(self, email: str) -> UserRecord | None:
        doc = await self.collection.find_one({"email": email})
        return UserRecord.from_doc(doc) if doc else None

    async def by_id(self, user_id: str) -> UserRecord | None:
        oid = object_id(user_id)
        doc = await self.collection.find_one({"_id": oid}) if oid else None
        return UserRecord.from_doc(doc) if doc else None

    async def upgrade_password_hash(self, user_id: str, old_hash: str, new_hash: str) -> bool:
        """Replace `old_hash` by a re-hash of the same password, only if it is still stored.

        Conditional, so that a login that verified the old password can never
        write it back over a reset that landed meanwhile.
        """
        result = await self.collection.update_one(
            {"_id": ObjectId(user_id), "password_hash": old_hash},
            {"$set": {"password_hash": new_hash, "updated_at": utcnow()}},
        )
        return result.modified_count == 1

    async def replace_password(self, user_id: str, password_hash: str) -> int | None:
        """Store a new password and start a new auth epoch; the new epoch, or None if the user is gone."""
        doc = await write_then_confirm(
            self.collection,
            {"_id": ObjectId(user_id)},
            {"$set": {"password_hash": password_hash, "updated_at": utcnow()}, "$inc": {"auth_epoch": 1}},
            # The new hash (argon2, salted) is this write's own mark.
            confirm={"_id": ObjectId(user_id), "password_hash": password_hash},
            projection={"auth_epoch": True},
        )
        return int(doc.get("auth_epoch") or 0) if doc else None

    async def auth_epoch(self, user_id: str) -> int | None:
        """The user's current auth epoch, or None if the account is gone."""
        doc = await self.collection.find_one({"_id": ObjectId(user_id)}, {"auth_epoch": True})
        return int(doc.get("auth_epoch") or 0) if doc else None


class SessionStore:
    def __init__(self, db: Database) -> None:
        self.collection = db.sessions

    async def create(
        self, token_hash: str, user_id: str, *, auth_epoch: int, ttl: timedelta, ip: str, user_agent: str | None
    ) -> datetime:
        now = utcnow()
        expires_at = now + ttl
        await self.collection.insert_one(
            {
                "token_hash": token_hash,
                "user_id": ObjectId(user_id),
                "auth_epoch": auth_epoch,
                "created_at": now,
                "expires_at": expires_at,
                "ip": ip,
                "user_agent": (user_agent or "")[:512],
            }
        )
        return expires_at

    async def user_for(self, token_hash: str) -> UserRecord | None:
        """The live session's user, in one round trip (`$lookup`), or None.

        Expiry is checked here too: MongoDB's TTL monitor only runs once a minute.
        So is the auth epoch: a session opened before the user's last password
        reset (a login that raced the reset) is dead even if it was not deleted.
        """
        pipeline: list[dict[str, Any]] = [
            {"$match": {"token_hash": token_hash, "expires_at": {"$gt": utcnow()}}},
            {"$limit": 1},
            {"$lookup": {"from": "users", "localField": "user_id", "foreignField": "_id", "as": "user"}},
            {"$unwind": "$user"},
            {"$match": {"$expr": {"$eq": [{"$ifNull": ["$auth_epoch", 0]}, {"$ifNull": ["$user.auth_epoch", 0]}]}}},
            {"$replaceRoot": {"newRoot": "$user"}},
        ]
        cursor = await self.collection.aggregate(pipeline)
        async for doc in cursor:
            return UserRecord.from_doc(doc)
        return None

    async def delete(self, token_hash: str) -> None:
        await self.collection.delete_one({"token_hash": token_hash})

    async def delete_all(self, user_id: str, *, except_epoch: int | None = None) -> int:
        """Delete the user's sessions (but those opened in `except_epoch`, i.e. with the new password)."""
        query: Document = {"user_id": ObjectId(user_id)}
        if except_epoch is not None:
            query["auth_epoch"] = {"$ne": except_epoch}  # `$ne` also matches sessions without the field
        result = await self.collection.delete_many(query)
        return result.deleted_count
