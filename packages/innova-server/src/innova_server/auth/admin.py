"""What an operator does to accounts (`innova users …`), without touching MongoDB by hand.

Every action is the same rule the HTTP side follows, in one place:

- **disable**: `disabled_at` set and the auth epoch bumped in one update —
  every session dies at that instant (the session lookup compares epochs and
  refuses disabled accounts in its one round trip), whatever worker serves
  the next request — then the session documents and pending reset links go.
  A login with the right password answers 403 `account_disabled` (a wrong one
  stays 401 `invalid_credentials`); `/auth/forgot` sends nothing.
- **enable** lifts it; old sessions stay dead (their epoch is gone).
- **logout** bumps the epoch and deletes the sessions: "sign out everywhere".
- **delete** is the erasure of `DELETE /auth/me` (`auth.erasure`), with its
  notice mail when a mailer is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bson import ObjectId
from pymongo import DESCENDING

from innova_server.auth.erasure import AccountEraser
from innova_server.auth.store import SessionStore, UserRecord, UserStore, utcnow
from innova_server.db import Database
from innova_server.mail import Mailer
from innova_server.mails import account_deleted_mail
from innova_server.settings import Settings


@dataclass(frozen=True)
class AccountFacts:
    user: UserRecord
    live_sessions: int
    conversations: int
    messages: int

    def lines(self) -> list[tuple[str, Any]]:
        user = self.user
        return [
            ("id", user.id),
            ("email", user.email),
            ("name", user.name),
            ("created_at", user.created_at.isoformat()),
            ("email_verified", user.email_verified),
            ("disabled_at", user.disabled_at.isoformat() if user.disabled_at else None),
            ("live_sessions", self.live_sessions),
            ("conversations", self.conversations),
            ("messages", self.messages),
        ]


class UserAdmin:
    def __init__(self, db: Database, settings: Settings, mailer: Mailer | None = None) -> None:
        self.db = db
        self.settings = settings
        self.users = UserStore(db)
        self.sessions = SessionStore(db)
        self.eraser = AccountEraser(db)
        self.mailer = mailer

    async def find(self, email: str) -> UserRecord | None:
        return await self.users.by_email(email.strip().lower())

    async def list(self, limit: int) -> list[UserRecord]:
        """The newest accounts first (being deleted: left out)."""
        cursor = self.db.users.find({"deleting_at": None}).sort([("created_at", DESCENDING), ("_id", DESCENDING)])
        return [UserRecord.from_doc(doc) async for doc in cursor.limit(limit)]

    async def facts(self, user: UserRecord) -> AccountFacts:
        oid = ObjectId(user.id)
        sessions = await self.sessions.live_for(user.id, user.auth_epoch, limit=10_000)
        conversations = await self.db.conversations.count_documents({"user_id": oid})
        messages = await self.db.messages.count_documents({"user_id": oid})
        return AccountFacts(user, len(sessions), conversations, messages)

    async def disable(self, user: UserRecord) -> int:
        """Disable the account; the number of sessions ended."""
        await self._end_sessions(user, {"disabled_at": utcnow()})
        await self.db.password_reset_tokens.update_many(
            {"user_id": ObjectId(user.id), "used": False}, {"$set": {"used": True, "used_at": utcnow()}}
        )
        return await self.sessions.delete_all(user.id)

    async def enable(self, user: UserRecord) -> None:
        await self.db.users.update_one({"_id": ObjectId(user.id)}, {"$set": {"disabled_at": None}})

    async def logout(self, user: UserRecord) -> int:
        """End every session of the account; how many there were."""
        live = len(await self.sessions.live_for(user.id, user.auth_epoch, limit=10_000))
        await self._end_sessions(user, {})
        await self.sessions.delete_all(user.id)
        return live

    async def delete(self, user: UserRecord, now: datetime | None = None) -> bool:
        """Erase the account and all its data (the order of `auth.erasure`); the notice mail when possible.
        False when the mail could not be sent (the account is erased all the same)."""
        marked = await self.eraser.mark(user.id)
        if marked is not None:
            await self.eraser.finish(user.id)
        if self.mailer is None:
            return False
        notice = account_deleted_mail(self.settings, to=user.email, name=user.mail_name, now=now or utcnow())
        try:
            await self.mailer.send(notice)
        except Exception:
            return False
        return True

    async def _end_sessions(self, user: UserRecord, changes: dict[str, Any]) -> None:
        """One update: the new epoch kills every session at once, on every worker."""
        update: dict[str, Any] = {"$inc": {"auth_epoch": 1}}
        if changes:
            update["$set"] = changes
        await self.db.users.update_one({"_id": ObjectId(user.id), "deleting_at": None}, update)


__all__ = ["AccountFacts", "UserAdmin"]
