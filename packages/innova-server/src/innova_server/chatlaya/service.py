"""Chatlaya's logic: conversations, the history sent to the model, and the requests about a reply.

Opening a turn has a *before* that the contract fixes (`ChatService.open_turn`):
rate limit, the conversation (404), a stream slot (429), the user message
and the `streaming` assistant message stored together, the provider started
and its first chunk awaited for up to `CHAT_PING_SECONDS`, then the
conversation's title and `updated_at` set. Any failure here — including a
provider that fails before its first chunk — is an ordinary JSON error and
leaves nothing behind (both messages removed, the slot released, the
conversation untouched), so the client may simply retry.

After that the reply belongs to a `Turn` (`chatlaya.turns`), which outlives
the request; `resume` and `stop` reach it from any request, on this process
(the registry) or another (the message document).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from bson import ObjectId

from innova_server import metrics
from innova_server.auth.store import utcnow
from innova_server.background import BackgroundTasks
from innova_server.chat import ChatProvider, ChatRequest, ProviderError
from innova_server.chatlaya.history import build_history, read_branch
from innova_server.chatlaya.messages import MessageRecord, MessageStore
from innova_server.chatlaya.store import (
    ConversationRecord,
    ConversationStore,
    InvalidCursor,
    StreamSlots,
    decode_cursor,
    encode_cursor,
    make_title,
)
from innova_server.chatlaya.streams import InvalidEventId, LiveStream, StoredStream, parse_event_id
from innova_server.chatlaya.titles import TitleWriter
from innova_server.chatlaya.tree import Tree, path_through
from innova_server.chatlaya.turns import Turn, TurnContext, TurnRegistry, TurnTimings
from innova_server.chatlaya.usage import DailyUsage, UsageStore, seconds_to_utc_midnight
from innova_server.errors import AppError, ErrorCode
from innova_server.ratelimit import RateLimiter, limit_key
from innova_server.settings import Settings

log = logging.getLogger("innova.chatlaya")

# Suggested wait after "too many streams": replies usually take seconds.
STREAM_RETRY_AFTER = 5
# How long a resume waits for another process's checkpoint to reach the
# position the client names (it saw text that was not checkpointed yet).
CATCH_UP_SECONDS = 5.0


@dataclass(frozen=True)
class BranchMessage:
    """A message of the current branch, with its siblings' ids (itself included, oldest first)."""

    record: MessageRecord
    sibling_ids: list[str]


def provider_app_error(error: ProviderError) -> AppError:
    """The HTTP error for a provider failure that happened before the stream opened."""
    try:
        code = ErrorCode(error.code)
    except ValueError:
        code = ErrorCode.PROVIDER_UNAVAILABLE
    headers: dict[str, str] = {}
    retry_after = getattr(error, "retry_after", None)
    if isinstance(retry_after, int | float) and retry_after > 0:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    elif error.retryable:
        headers["Retry-After"] = "5"
    return AppError(code, error.message, headers=headers)


class ChatService:
    def __init__(
        self,
        settings: Settings,
        conversations: ConversationStore,
        messages: MessageStore,
        slots: StreamSlots,
        limiter: RateLimiter,
        turns: TurnRegistry,
        usage: UsageStore,
        tasks: BackgroundTasks,
        *,
        provider_name: str,
        model: str,
        provider: ChatProvider,
    ) -> None:
        self.settings = settings
        self.conversations = conversations
        self.messages = messages
        self.slots = slots
        self.limiter = limiter
        self.turns = turns
        self.usage = usage
        self.tasks = tasks
        self.provider_name = provider_name
        self.model = model
        self.provider = provider
        self.timings = TurnTimings(
            checkpoint_seconds=settings.chat_checkpoint_ms / 1000,
            lease=settings.chat_lease,
            detached_timeout_seconds=settings.chat_detached_timeout_seconds,
        )
        self.titles = (
            TitleWriter(
                provider,
                model,
                conversations,
                timeout_seconds=settings.chat_title_timeout_seconds,
                busy=lambda: len(turns) > 0,
            )
            if settings.chat_titles == "model"
            else None
        )

    # -- conversations --------------------------------------------------------

    async def session(self, user_id: str) -> ConversationRecord:
        active = await self.conversations.active(user_id)
        if active is not None:
            return active
        await self._consume_conversation_quota(user_id)
        return await self.conversations.get_or_create_active(user_id)

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
        conversation = await self.conversations.get(user_id, conversation_id)
        if conversation is None:
            raise AppError(ErrorCode.CONVERSATION_NOT_FOUND)
        return conversation

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
        streaming in it stops at its next checkpoint, finding its message gone."""
        conversation = await self.owned(user_id, conversation_id)
        if not await self.conversations.delete(user_id, conversation.id):
            raise AppError(ErrorCode.CONVERSATION_NOT_FOUND)
        await self.messages.delete_conversation(conversation.id)
        for turn in self.turns.turns_of(conversation.id):
            turn.stop("gone")

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
        branch = await self._branch(conversation)
        path = branch
        if before:
            _, oid = decode_cursor(before)
            path = await self._path_to(conversation, branch, str(oid))
            if not path:
                raise InvalidCursor(before)
            path = path[:-1]
        page_ids = path[-limit:]
        records = await self.messages.by_ids(page_ids)
        items = [records[m] for m in page_ids if m in records]
        siblings = await self.messages.siblings(conversation.id, {item.parent_id for item in items})
        for item in items:
            if item.lapsed:
                await self._store_interrupted(item)
        next_cursor = encode_cursor(items[0].created_at, items[0].id) if items and len(path) > limit else None
        return [BranchMessage(item, siblings.get(item.parent_id, [item.id])) for item in items], next_cursor

    async def switch_branch(self, user_id: str, conversation_id: str, message_id: str) -> ConversationRecord:
        """The branch through `message_id`, continued to its newest leaf, becomes current."""
        conversation = await self.owned(user_id, conversation_id)
        await self._branch(conversation)  # a first-version conversation gets its parents first
        tree = Tree(await self.messages.skeleton(conversation.id))
        if message_id not in tree:
            raise AppError(ErrorCode.MESSAGE_NOT_FOUND)
        updated = await self.conversations.set_branch(user_id, conversation.id, tree.newest_leaf_path(message_id))
        if updated is None:
            raise AppError(ErrorCode.CONVERSATION_NOT_FOUND)
        return updated

    async def _branch(self, conversation: ConversationRecord) -> list[str]:
        """The current branch; a conversation of the first version is chained by time first."""
        if conversation.branch is not None:
            return conversation.branch
        branch = await self.messages.adopt_linear(conversation.id)
        await self.conversations.set_branch(conversation.user_id, conversation.id, branch)
        return branch

    async def _path_to(self, conversation: ConversationRecord, branch: list[str], message_id: str) -> list[str]:
        """Root→`message_id`: from the current branch when it is on it, else from the skeleton."""
        path = path_through(branch, message_id)
        if path is not None:
            return path
        return Tree(await self.messages.skeleton(conversation.id)).path_to(message_id)

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

    # -- a reply ----------------------------------------------------------------

    async def open_turn(
        self, user_id: str, content: str, conversation_id: str | None, edit_of: str | None = None
    ) -> Turn:
        """A new user message and its reply: after the current branch's leaf, or (`edit_of`) as a
        sibling of that user message. See the module docstring for what happens before the stream."""
        await self._consume_message_limit(user_id)
        if conversation_id is None:
            conversation = await self.conversations.get_or_create_active(user_id)
        else:
            conversation = await self.owned(user_id, conversation_id)
        branch = await self._branch(conversation)
        if edit_of is None:
            parent_path = branch
        else:
            edited = await self.messages.in_conversation(conversation.id, edit_of)
            if edited is None or edited.role != "user":
                raise AppError(ErrorCode.MESSAGE_NOT_FOUND)
            parent_path = (await self._path_to(conversation, branch, edited.id))[:-1]
        return await self._start_turn(user_id, conversation, parent_path, content)

    async def regenerate(self, user_id: str, message_id: str) -> Turn:
        """Another reply to the user message that `message_id` (an assistant message) answers."""
        await self._consume_message_limit(user_id)
        previous = await self.messages.assistant(user_id, message_id)
        if previous is None or previous.parent_id is None:
            raise AppError(ErrorCode.MESSAGE_NOT_FOUND)
        conversation = await self.conversations.get(user_id, previous.conversation_id)
        if conversation is None:
            raise AppError(ErrorCode.MESSAGE_NOT_FOUND)
        branch = await self._branch(conversation)
        path = await self._path_to(conversation, branch, previous.parent_id)
        if not path:
            raise AppError(ErrorCode.MESSAGE_NOT_FOUND)
        return await self._start_turn(user_id, conversation, path, None)

    async def _consume_message_limit(self, user_id: str) -> None:
        """The per-minute message limit, and the daily token quota (read together: one round trip of wait)."""
        limit = self.settings.chat_daily_tokens_user
        if limit is None:
            await self.limiter.consume("chat", limit_key("chat", user_id), self.settings.rate_limit_chat_user)
            return
        _, today = await asyncio.gather(
            self.limiter.consume("chat", limit_key("chat", user_id), self.settings.rate_limit_chat_user),
            self.usage.today(user_id),
        )
        if today.tokens >= limit:
            metrics.RATE_LIMITED.labels("daily_tokens").inc()
            raise AppError(ErrorCode.QUOTA_EXCEEDED, headers={"Retry-After": str(seconds_to_utc_midnight())})

    async def _start_turn(
        self, user_id: str, conversation: ConversationRecord, parent_path: list[str], content: str | None
    ) -> Turn:
        """Slot, history, messages, provider, then the branch: everything before the stream opens.

        `content` None is a regeneration: `parent_path` ends with the user
        message answered again, and no user message is added.
        """
        settings = self.settings
        message_id = str(ObjectId())
        slot = await self.slots.acquire(f"chat:{user_id}", settings.chat_max_concurrent_streams, message_id)
        if slot is None:
            metrics.RATE_LIMITED.labels("chat_streams").inc()
            raise AppError(ErrorCode.TOO_MANY_STREAMS, headers={"Retry-After": str(STREAM_RETRY_AFTER)})
        try:
            newest_first, prompt = await read_branch(
                parent_path, content, settings.chat_history_chars, self.messages.by_ids
            )
            request = ChatRequest(
                messages=build_history(settings.chat_system_prompt, newest_first, prompt, settings.chat_history_chars),
                model=self.model,
                max_tokens=settings.chat_max_tokens,
                temperature=settings.chat_temperature,
            )
            now = utcnow()
            reply_parent = await self.messages.open_turn(
                conversation_id=conversation.id,
                user_id=user_id,
                content=content,
                parent_id=parent_path[-1] if parent_path else None,
                assistant_id=ObjectId(message_id),
                provider=self.provider_name,
                model=self.model,
                created_at=now,
                lease=self.timings.lease,
            )
        except BaseException:
            # Shielded: a client leaving now must not leak the slot (its lease would free it, later).
            with contextlib.suppress(Exception):
                await asyncio.shield(self.slots.release(slot))
            raise
        context = TurnContext(
            user_id=user_id,
            conversation_id=conversation.id,
            user_message_id=reply_parent,
            message_id=message_id,
            provider=self.provider_name,
            model=self.model,
            slot=slot,
            new_user_message=content is not None,
        )
        turn = Turn(context, self.provider, request, self.messages, self.slots, self.timings, self.usage)
        self.turns.start(turn)
        branch = [*parent_path, *([reply_parent] if content is not None else []), message_id]
        first_message = content if content is not None and not parent_path else None
        try:
            await turn.first_item(settings.chat_ping_seconds)
            # Only now, with the stream about to open: a turn refused before it
            # leaves the conversation as it was (title, place in the list, branch).
            if not await self.conversations.touch(conversation, now, first_message, branch):
                raise AppError(ErrorCode.CONVERSATION_NOT_FOUND)
            turn.accept()
        except BaseException as error:
            await turn.abandon()
            if isinstance(error, ProviderError):
                metrics.CHAT_STREAMS.labels(self.provider_name, "refused").inc()
                raise provider_app_error(error) from error
            raise
        if self.titles is not None and first_message is not None and conversation.title is None:
            automatic = None if conversation.title_set_by_user else make_title(first_message)
            self.tasks.spawn("chat-title", self.titles.after(turn, first_message, automatic))
        return turn

    async def resume(self, user_id: str, message_id: str, last_event_id: str | None) -> LiveStream | StoredStream:
        """The reply's events after `last_event_id`: from memory if this process generates it, else from
        its document (live through the checkpoints, or a replay). `InvalidEventId` for a position it lacks."""
        turn = self.turns.get(message_id)
        if turn is not None and turn.context.user_id == user_id:
            offset = parse_event_id(last_event_id, message_id)
            if offset > turn.length:
                raise InvalidEventId(last_event_id or "")
            metrics.CHAT_RESUMES.labels("memory").inc()
            return LiveStream(turn, offset)
        record = await self.messages.assistant(user_id, message_id)
        if record is None:
            raise AppError(ErrorCode.MESSAGE_NOT_FOUND)
        offset = parse_event_id(last_event_id, record.id)
        if record.lapsed:
            await self._store_interrupted(record)
        record = await self._catch_up(record, offset)
        if offset > len(record.content):
            raise InvalidEventId(last_event_id or "")
        metrics.CHAT_RESUMES.labels("checkpoints" if record.streaming else "replay").inc()
        return StoredStream(self.messages, record, offset, self.timings.checkpoint_seconds)

    async def _catch_up(self, record: MessageRecord, offset: int) -> MessageRecord:
        """Wait (bounded) for another process's checkpoints to reach `offset`: the client may have
        read, from the generating process, text that was not checkpointed yet."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(CATCH_UP_SECONDS, 3 * self.timings.checkpoint_seconds)
        while record.streaming and offset > len(record.content) and loop.time() < deadline:
            await asyncio.sleep(self.timings.checkpoint_seconds / 2)
            latest = await self.messages.watch(record.id)
            if latest is None:
                break
            record = latest
        return record

    async def stop(self, user_id: str, message_id: str) -> MessageRecord:
        """Raise the stop flag; the generating process (this one at once, another at its next
        checkpoint) ends the reply `incomplete` / `stopped`. The message as it is at this instant."""
        record = await self.messages.request_stop(user_id, message_id)
        if record is None:
            raise AppError(ErrorCode.MESSAGE_NOT_FOUND)
        turn = self.turns.get(record.id)
        if turn is not None and record.streaming:
            turn.stop("stopped")
        return record

    async def _store_interrupted(self, record: MessageRecord) -> None:
        """Make a lapsed reply's `interrupted` permanent (its reader already sees it so)."""
        try:
            if await self.messages.interrupt(record.id):
                metrics.CHAT_TURN_ENDINGS.labels(record.provider or "unknown", "interrupted").inc()
        except Exception as error:  # the next reader tries again; this one already shows it interrupted
            log.warning("could not store reply %s as interrupted: %s", record.id, type(error).__name__)


__all__ = ["BranchMessage", "ChatService", "provider_app_error"]
