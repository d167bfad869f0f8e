"""Storage of users, sessions and verification links behind small typed interfaces.

An account being deleted (`deleting_at` set, see `auth.erasure`) is invisible
here: no lookup by address or id finds it, no session of it is valid, and no
password can be stored on it. That is what makes an interrupted deletion safe.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId
from pymongo.errors import DuplicateKeyError

from innova_server.batching import LookupBatcher
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
    # Accounts created before verification existed count as unverified.
    email_verified: bool = False
    # Set by an operator (`innova users disable`): no session, login or reset until enabled.
    disabled_at: datetime | None = None

    @property
    def mail_name(self) -> str | None:
        """The name a mail may show: none until the address is verified, since
        anyone can register any address under any name."""
        return self.name if self.email_verified else None

    @classmethod
    def from_doc(cls, doc: Document) -> UserRecord:
        return cls(
            id=str(doc["_id"]),
            email=doc["email"],
            name=doc.get("name"),
            password_hash=doc["password_hash"],
            created_at=doc["created_at"],
            auth_epoch=int(doc.get("auth_epoch") or 0),
            email_verified=bool(doc.get("email_verified")),
            disabled_at=doc.get("disabled_at"),
        )


# Matches the accounts that are not being deleted (`deleting_at` absent or null).
LIVE: Document = {"deleting_at": None}


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
            "email_verified": False,
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
        doc = await self.collection.find_one({"email": email, **LIVE})
        return UserRecord.from_doc(doc) if doc else None

    async def by_id(self, user_id: str) -> UserRecord | None:
        oid = object_id(user_id)
        doc = await self.collection.find_one({"_id": oid, **LIVE}) if oid else None
        return UserRecord.from_doc(doc) if doc else None

    async def being_deleted(self, email: str) -> str | None:
        """The id of the account holding `email` whose deletion has not finished yet."""
        doc = await self.collection.find_one({"email": email, "deleting_at": {"$ne": None}}, {"_id": True})
        return str(doc["_id"]) if doc else None

    async def set_name(self, user_id: str, name: str | None) -> UserRecord | None:
        doc = await write_then_confirm(
            self.collection,
            {"_id": ObjectId(user_id), **LIVE},
            {"$set": {"name": name, "updated_at": utcnow()}},
            confirm={"_id": ObjectId(user_id), "name": name, **LIVE},
        )
        return UserRecord.from_doc(doc) if doc else None

    async def mark_verified(self, user_id: str, email: str) -> UserRecord | None:
        """Set `email_verified`, only while the account still has the address the link was sent to."""
        query: Document = {"_id": ObjectId(user_id), "email": email, **LIVE}
        doc = await write_then_confirm(
            self.collection,
            query,
            {"$set": {"email_verified": True, "updated_at": utcnow()}},
            confirm={**query, "email_verified": True},
        )
        return UserRecord.from_doc(doc) if doc else None

    async def change_password(self, user_id: str, old_hash: str, new_hash: str) -> int | None:
        """Store `new_hash` and start a new auth epoch, only if `old_hash` is still the stored one.

        The new epoch, or None when the password changed meanwhile (another
        change or a reset won) or the account is gone or being deleted.
        """
        doc = await write_then_confirm(
            self.collection,
            {"_id": ObjectId(user_id), "password_hash": old_hash, **LIVE},
            {"$set": {"password_hash": new_hash, "updated_at": utcnow()}, "$inc": {"auth_epoch": 1}},
            # A fresh argon2 hash (salted) is this write's own mark.
            confirm={"_id": ObjectId(user_id), "password_hash": new_hash, **LIVE},
            projection={"auth_epoch": True},
        )
        return int(doc.get("auth_epoch") or 0) if doc else None

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
            {"_id": ObjectId(user_id), **LIVE},
            {"$set": {"password_hash": password_hash, "updated_at": utcnow()}, "$inc": {"auth_epoch": 1}},
            # The new hash (argon2, salted) is this write's own mark.
            confirm={"_id": ObjectId(user_id), "password_hash": password_hash, **LIVE},
            projection={"auth_epoch": True},
        )
        return int(doc.get("auth_epoch") or 0) if doc else None

    async def auth_epoch(self, user_id: str) -> int | None:
        """The user's current auth epoch, or None if the account is gone."""
        doc = await self.collection.find_one({"_id": ObjectId(user_id), **LIVE}, {"auth_epoch": True})
        return int(doc.get("auth_epoch") or 0) if doc else None


class SessionStore:
    def __init__(self, db: Database) -> None:
        self.collection = db.sessions
        # At most 100 per query: the reply's first batch (101 documents) holds them all.
        self._lookups: LookupBatcher[str, UserRecord] = LookupBatcher(self._users_for, max_batch=100)

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

        Expiry is checked in the query: MongoDB's TTL monitor only runs once a
        minute. So is the auth epoch: a session opened before the user's last
        password reset (a login that raced the reset) is dead even if it was
        not deleted. And an account being deleted, or disabled, has no valid
        session at all. Lookups made together share their round trip
        (`innova_server.batching`): not a cache, each is a query sent after it
        was asked for.
        """
        return await self._lookups.load(token_hash)

    async def _users_for(self, token_hashes: list[str]) -> dict[str, UserRecord]:
        # Only the stages that need the server run there: the checks on the
        # joined user are plain comparisons, and SecantusDB spent ~40 % of the
        # lookup's time running them as $unwind/$match/$replaceRoot stages
        # (benchmarks/README.md, "GET /auth/me").
        pipeline: list[dict[str, Any]] = [
            {"$match": {"token_hash": {"$in": token_hashes}, "expires_at": {"$gt": utcnow()}}},
            {"$lookup": {"from": "users", "localField": "user_id", "foreignField": "_id", "as": "user"}},
        ]
        found: dict[str, UserRecord] = {}
        cursor = await self.collection.aggregate(pipeline)
        async for session in cursor:
            users = session.get("user") or []
            if not users:
                continue
            user = users[0]
            if user.get("deleting_at") is not None or user.get("disabled_at") is not None:
                continue
            if (session.get("auth_epoch") or 0) != (user.get("auth_epoch") or 0):
                continue
            found[session["token_hash"]] = UserRecord.from_doc(user)
        return found

    async def delete(self, token_hash: str) -> None:
        await self.collection.delete_one({"token_hash": token_hash})

    async def delete_all(self, user_id: str, *, except_epoch: int | None = None) -> int:
        """Delete the user's sessions (but those opened in `except_epoch`, i.e. with the new password)."""
        query: Document = {"user_id": ObjectId(user_id)}
        if except_epoch is not None:
            query["auth_epoch"] = {"$ne": except_epoch}  # `$ne` also matches sessions without the field
        result = await self.collection.delete_many(query)
        return result.deleted_count

    async def live_for(self, user_id: str, auth_epoch: int, *, limit: int) -> list[SessionRecord]:
        """The user's valid sessions (unexpired, current epoch), newest first."""
        query: Document = {"user_id": ObjectId(user_id), "expires_at": {"$gt": utcnow()}}
        # Sessions of epoch 0 may predate the field.
        query["auth_epoch"] = {"$in": [auth_epoch, None]} if auth_epoch == 0 else auth_epoch
        cursor = self.collection.find(query).sort([("created_at", -1), ("_id", -1)]).limit(limit)
        return [SessionRecord.from_doc(doc) async for doc in cursor]

    async def delete_one_of(self, user_id: str, session_id: str) -> str | None:
        """Delete the user's session `session_id`; its token hash, or None if the user has no such session."""
        oid = object_id(session_id)
        if oid is None:
            return None
        doc = await self.collection.find_one_and_delete({"_id": oid, "user_id": ObjectId(user_id)})
        return str(doc["token_hash"]) if doc else None


@dataclass(frozen=True)
class SessionRecord:
    """A session as its owner may see it: `id` is the document's id, never the token or its hash."""

    id: str
    token_hash: str
    created_at: datetime
    expires_at: datetime
    ip: str | None
    user_agent: str | None

    @classmethod
    def from_doc(cls, doc: Document) -> SessionRecord:
        return cls(
            id=str(doc["_id"]),
            token_hash=doc["token_hash"],
            created_at=doc["created_at"],
            expires_at=doc["expires_at"],
            ip=doc.get("ip"),
            user_agent=doc.get("user_agent") or None,
        )


class VerifyTokenStore:
    """Email verification links: only the SHA-256 of the token is stored, single use, expiring."""

    def __init__(self, db: Database) -> None:
        self.collection = db.verify_tokens

    async def create(self, token_hash: str, user_id: str, email: str, ttl: timedelta) -> datetime:
        now = utcnow()
        await self.collection.insert_one(
            {
                "token_hash": token_hash,
                "user_id": ObjectId(user_id),
                "email": email,
                "created_at": now,
                "expires_at": now + ttl,
                "used": False,
            }
        )
        return now

    async def consume(self, token_hash: str) -> Document | None:
        """Mark the live, unused token used in one atomic step; its document, or None.

        Of two concurrent submissions exactly one gets the document. The expiry
        is in the query: the TTL monitor deletes expired tokens only once a minute.
        """
        now = utcnow()
        claim = secrets.token_hex(16)
        return await write_then_confirm(
            self.collection,
            {"token_hash": token_hash, "used": False, "expires_at": {"$gt": now}},
            {"$set": {"used": True, "used_at": now, "claim": claim}},
            confirm={"token_hash": token_hash, "claim": claim},  # only our own claim can match
            projection={"user_id": True, "email": True},
        )

    async def void_all(self, user_id: str) -> None:
        """Every pending link of the user dies (the address is verified now)."""
        await self.collection.update_many(
            {"user_id": ObjectId(user_id), "used": False}, {"$set": {"used": True, "used_at": utcnow()}}
        )
