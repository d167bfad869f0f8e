"""Storage of users and sessions behind two small typed interfaces."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId
from pymongo.errors import DuplicateKeyError

from innova_server.db import Database, Document


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

    @classmethod
    def from_doc(cls, doc: Document) -> UserRecord:
        return cls(
            id=str(doc["_id"]),
            email=doc["email"],
            name=doc.get("name"),
            password_hash=doc["password_hash"],
            created_at=doc["created_at"],
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

    async def set_password_hash(self, user_id: str, password_hash: str) -> None:
        await self.collection.update_one(
            {"_id": ObjectId(user_id)}, {"$set": {"password_hash": password_hash, "updated_at": utcnow()}}
        )


class SessionStore:
    def __init__(self, db: Database) -> None:
        self.collection = db.sessions

    async def create(
        self, token_hash: str, user_id: str, *, ttl: timedelta, ip: str, user_agent: str | None
    ) -> datetime:
        now = utcnow()
        expires_at = now + ttl
        await self.collection.insert_one(
            {
                "token_hash": token_hash,
                "user_id": ObjectId(user_id),
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
        """
        pipeline: list[dict[str, Any]] = [
            {"$match": {"token_hash": token_hash, "expires_at": {"$gt": utcnow()}}},
            {"$limit": 1},
            {"$lookup": {"from": "users", "localField": "user_id", "foreignField": "_id", "as": "user"}},
            {"$unwind": "$user"},
            {"$replaceRoot": {"newRoot": "$user"}},
        ]
        cursor = await self.collection.aggregate(pipeline)
        async for doc in cursor:
            return UserRecord.from_doc(doc)
        return None

    async def delete(self, token_hash: str) -> None:
        await self.collection.delete_one({"token_hash": token_hash})

    async def delete_all(self, user_id: str) -> int:
        result = await self.collection.delete_many({"user_id": ObjectId(user_id)})
        return result.deleted_count
