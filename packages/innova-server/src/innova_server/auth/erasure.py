"""Erasing an account and everything it owns, in an order that survives an interruption.

The order is the point. MongoDB has no transaction across these collections
here (SecantusDB, or a standalone `mongod`), so a deletion can stop between
any two steps: the database fails, the process is killed. Whatever step
fails, the account must already be unusable, and running the deletion again
must finish the job. So:

1. **Mark** the user document `deleting_at` and bump its auth epoch, in one
   atomic update. From then on the account is gone for every reader: its
   sessions are refused (`SessionStore.user_for` checks both), no lookup by
   address or id finds it (login, password reset, verification), and no
   password can be written on it. If this step fails, nothing was deleted
   and the account still works: the client may simply try again.
2. **Delete the dependent data**, each step one `delete_many` keyed by the
   user, so each is idempotent: sessions, reset and verification links,
   devices, the chat stream slot `chat:{user_id}`, the rate-limit counters
   keyed by the user, conversations, messages (feedback lives in them), daily usage.
   A reply being generated at that moment stops by itself when its message
   document disappears; whatever such in-flight work still writes as it
   stops is removed by a second pass `LATE_SWEEP_SECONDS` later
   (`auth.account`).
3. **Delete the user document last**, and only while it is still marked. It
   is the record that a deletion is pending: as long as it exists, a retry
   knows what to finish.

A retry is `AccountEraser.finish(user_id)` (any number of times, from any
worker), or `finish_pending()` for every marked account. The server runs it
in the background when a step fails during `DELETE /auth/me`, at startup for
deletions an earlier process left unfinished, and before a registration of
the address a pending deletion still holds (so the address can register
again at once). The same methods serve the operator CLI.

A collection that a later feature adds with a `user_id` of the account must be
added to `USER_COLLECTIONS`; deleting from a collection that does not exist
yet is a no-op.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bson import ObjectId
from pymongo import ReturnDocument

from innova_server import metrics
from innova_server.auth.store import UserRecord, utcnow
from innova_server.db import Database, Document
from innova_server.ratelimit import limit_key

log = logging.getLogger("innova.auth.erasure")

# Collections whose documents belong to one user through `user_id` (an
# ObjectId), in deletion order: credentials first, so nothing can be
# revived, then the content.
USER_COLLECTIONS = (
    "sessions",
    "password_reset_tokens",
    "verify_tokens",
    "devices",
    "conversations",
    "messages",
    "usage_daily",
)

# Rate-limit counters keyed by the user's id (`limit_key(kind, user_id)`).
USER_LIMIT_KINDS = ("chat", "conversations", "export:user", "verify:user")


# The order of steps 2 and 3 (see the module's docstring).
STEP_ORDER = (*USER_COLLECTIONS[:4], "stream_slots", "rate_limits", *USER_COLLECTIONS[4:], "users")


def stream_slot_id(user_id: str) -> str:
    """The chat service's per-user stream slot document."""
    return f"chat:{user_id}"


@dataclass(frozen=True)
class Marked:
    user: UserRecord
    # True for the one call that marked the account; False when it was marked
    # already (a second DELETE racing the first, or a retry).
    first: bool


Step = tuple[str, Callable[[ObjectId], Awaitable[object]]]


class AccountEraser:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def mark(self, user_id: str) -> Marked | None:
        """Step 1: make the account unusable at once; None when there is no such account.

        A claim token tells our own write apart when the server reports no
        document for an update that applied (a SecantusDB quirk).
        """
        oid = ObjectId(user_id)
        claim = secrets.token_hex(16)
        doc = await self.db.users.find_one_and_update(
            {"_id": oid, "deleting_at": None},
            {"$set": {"deleting_at": utcnow(), "deletion_claim": claim}, "$inc": {"auth_epoch": 1}},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            doc = await self.db.users.find_one({"_id": oid, "deleting_at": {"$ne": None}})
            if doc is None:
                return None
        return Marked(UserRecord.from_doc(doc), first=doc.get("deletion_claim") == claim)

    def steps(self, user_id: str) -> list[Step]:
        """Steps 2 and 3, in the order of `STEP_ORDER`; each can run again safely."""
        limit_keys = [limit_key(kind, user_id) for kind in USER_LIMIT_KINDS]
        db = self.db.db
        special: dict[str, Callable[[ObjectId], Awaitable[object]]] = {
            "stream_slots": lambda oid: db["stream_slots"].delete_many({"_id": stream_slot_id(user_id)}),
            "rate_limits": lambda oid: db["rate_limits"].delete_many({"key": {"$in": limit_keys}}),
            # Last, and only if still marked: an unmarked account is never deleted here.
            "users": lambda oid: db["users"].delete_one({"_id": oid, "deleting_at": {"$ne": None}}),
        }

        def owned_by(collection: str) -> Callable[[ObjectId], Awaitable[object]]:
            return lambda oid: db[collection].delete_many({"user_id": oid})

        return [(name, special.get(name) or owned_by(name)) for name in STEP_ORDER]

    async def finish(self, user_id: str) -> bool:
        """Run steps 2 and 3 for a marked account; False (and nothing deleted) if it is not marked.

        An account that is not marked is left alone: `finish` can never erase
        an account whose owner did not confirm the deletion.
        """
        oid = ObjectId(user_id)
        marked = await self.db.users.find_one({"_id": oid}, {"deleting_at": True})
        if marked is not None and marked.get("deleting_at") is None:
            return False
        for _name, run in self.steps(user_id):
            await run(oid)
        metrics.ACCOUNT_EVENTS.labels("account_erased").inc()
        log.info("account erased user_id=%s", user_id)
        return True

    async def pending(self) -> list[str]:
        """Ids of the accounts marked for deletion and not yet erased."""
        query: Document = {"deleting_at": {"$ne": None}}
        return [str(doc["_id"]) async for doc in self.db.users.find(query, {"_id": True})]

    async def finish_pending(self) -> int:
        """Finish every deletion an interruption left behind; how many were finished."""
        done = 0
        for user_id in await self.pending():
            if await self.finish(user_id):
                done += 1
        if done:
            log.warning("finished %d account deletion(s) left pending", done)
        return done
