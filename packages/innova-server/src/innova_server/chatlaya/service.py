"""Chatlaya's queries: conversations, the current branch of messages, feedback, usage.

Replies themselves — opening, resuming, stopping — are `chatlaya.replies`;
a reply's life is `chatlaya.turns`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from innova_server import metrics
from innova_server.chatlaya.branches import Branches, owned
from innova_server.chatlaya.messages import MessageRecord, MessageStore
from innova_server.chatlaya.store import (
    ConversationRecord,
    ConversationStore,
    InvalidCursor,
    decode_cursor,
    encode_cursor,
)
from innova_server.chatlaya.tree import Tree
from innova_server.chatlaya.usage import DailyUsage, UsageStore
from innova_server.errors import AppError, ErrorCode
from innova_server.ratelimit import RateLimiter, limit_key
from innova_server.settings import Settings

log = logging.getLogger("innova.chatlaya")


@dataclass(frozen=True)
class BranchMessage:
    """A message of the current branch, with its siblings' ids (itself included, oldest first)."""

    record: MessageRecord
    sibling_ids: list[str]


class ChatService:
    def __init__(
        self,
        settings: Settings,
        conversations: ConversationStore,
        messages: MessageStore,
        limiter: RateLimiter,
        usage: UsageStore,
        on_conversation_deleted: Callable[[str], None] = lambda conversation_id: None,
    ) -> None:
        self.settings = settings
        self.conversations = conversations
        self.messages = messages
        self.branches = Branches(conversations, messages)
        self.limiter = limiter
        self.usage = usage
        self._on_conversation_deleted = on_conversation_deleted

    # -- conversations --------------------------------------------------------

    async def session(self, user_id: str) -> ConversationRecord:
        active = await self.conversations.active(user_id)
        if active is not None:
            return active
        await self._consume_conversation_quota(user_id)
        return await self.conversations.create_active(user_id)

    async def create_conversation(self, user_id: str) -> ConversationRecord:
        await self._consume_conversation_quota(user_id)
        return await self.conversations.create(user_id)

    async def _consume_conversation_quota(self, user_id: str) -> None:
        """`RATE_LIMIT_CONVERSATIONS_USER`: what one account may create, as 429 `quota_exceeded`."""
        limit = self.settings.rate_limit_conversations_user
        hit = await self.limiter.hit(limit_key("conversations", user_id), limit)
        if hit.count > limit.count:
            metrics.RATE_LIMITED.labels("conversations").inc()
            raise AppError(ErrorCode.QUOTA_EXCEEDED, headers={"Retry-After": str(hit.retry_after)})

    async def owned(self, user_id: str, conversation_id: str) -> ConversationRecord:
        return await owned(self.conversations, user_id, conversation_id)

    async def list_conversations(
        self, user_id: str, *, archived: bool, limit: int, cursor: str | None, query: str | None = None
    ) -> tuple[list[ConversationRecord], str | None]:
        return await self.conversations.page(user_id, archived=archived, limit=limit, cursor=cursor, query=query)

    async def update_conversation(
        self, user_id: str, conversation_id: str, *, title: str | None, archived: bool | None
    ) -> ConversationRecord:
        if title is None and archived is None:
            return await self.owned(user_id, conversation_id)
        updated = await self.conversations.update(user_id, conversation_id, title=title, archived=archived)
        if updated is None:
            raise AppError(ErrorCode.CONVERSATION_NOT_FOUND)
        return updated

    async def delete_conversation(self, user_id: str, conversation_id: str) -> None:
        """Conversation first: once it is gone no turn can open in it. A reply still
        streaming in it stops at once on this process, at its next checkpoint elsewhere
        (finding its message gone)."""
        conversation = await self.owned(user_id, conversation_id)
        if not await self.conversations.delete(user_id, conversation.id):
            raise AppError(ErrorCode.CONVERSATION_NOT_FOUND)
        await self.messages.delete_conversation(conversation.id)
        self._on_conversation_deleted(conversation.id)

    async def list_messages(
        self, user_id: str, conversation_id: str | None, *, limit: int, before: str | None
    ) -> tuple[list[BranchMessage], str | None]:
        """A page of the current branch, root→leaf order, newest page first (`before` pages toward the root).

        The cursor names the oldest message of the previous page; the page
        before it is that message's ancestors, which never change — so paging
        stays exact even if the current branch changes between two pages.
        """
        if conversation_id is None:
            active = await self.conversations.active(user_id)
            if active is None:
                return [], None
            conversation = active
        else:
            conversation = await self.owned(user_id, conversation_id)
        branch = await self.branches.current(conversation)
        path = branch
        if before:
            _, oid = decode_cursor(before)
            path = await self.branches.path_to(conversation, branch, str(oid))
            if not path:
                raise InvalidCursor(before)
            path = path[:-1]
        page_ids = path[-limit:]
        records = await self.messages.by_ids(page_ids)
        items = [records[m] for m in page_ids if m in records]
        siblings = await self.messages.siblings(conversation.id, {item.parent_id for item in items})
        for item in items:
            if item.lapsed:
                await self.branches.store_interrupted(item)
        next_cursor = encode_cursor(items[0].created_at, items[0].id) if items and len(path) > limit else None
        return [BranchMessage(item, siblings.get(item.parent_id, [item.id])) for item in items], next_cursor

    async def switch_branch(self, user_id: str, conversation_id: str, message_id: str) -> ConversationRecord:
        """The branch through `message_id`, continued to its newest leaf, becomes current."""
        conversation = await self.owned(user_id, conversation_id)
        await self.branches.current(conversation)  # a first-version conversation gets its parents first
        tree = Tree(await self.messages.skeleton(conversation.id))
        if message_id not in tree:
            raise AppError(ErrorCode.MESSAGE_NOT_FOUND)
        updated = await self.conversations.set_branch(user_id, conversation.id, tree.newest_leaf_path(message_id))
        if updated is None:
            raise AppError(ErrorCode.CONVERSATION_NOT_FOUND)
        return updated

    # -- feedback and usage -----------------------------------------------------

    async def set_feedback(self, user_id: str, message_id: str, rating: str, comment: str | None) -> MessageRecord:
        record = await self.messages.set_feedback(user_id, message_id, {"rating": rating, "comment": comment})
        if record is None:
            raise AppError(ErrorCode.MESSAGE_NOT_FOUND)
        metrics.CHAT_FEEDBACK.labels(record.provider or "unknown", record.model or "unknown", rating).inc()
        return record

    async def clear_feedback(self, user_id: str, message_id: str) -> None:
        if await self.messages.set_feedback(user_id, message_id, None) is None:
            raise AppError(ErrorCode.MESSAGE_NOT_FOUND)

    async def usage_today(self, user_id: str) -> DailyUsage:
        return await self.usage.today(user_id)



__all__ = ["BranchMessage", "ChatService"]
