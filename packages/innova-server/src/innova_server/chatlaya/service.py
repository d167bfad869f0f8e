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

from bson import ObjectId

from innova_server import metrics
from innova_server.auth.store import utcnow
from innova_server.chat import ChatMessage, ChatProvider, ChatRequest, ProviderError
from innova_server.chatlaya.messages import MessageRecord, MessageStore
from innova_server.chatlaya.store import ConversationRecord, ConversationStore, StreamSlots
from innova_server.chatlaya.streams import InvalidEventId, LiveStream, StoredStream, parse_event_id
from innova_server.chatlaya.turns import Turn, TurnContext, TurnRegistry, TurnTimings
from innova_server.errors import AppError, ErrorCode
from innova_server.ratelimit import RateLimiter, limit_key
from innova_server.settings import Settings

log = logging.getLogger("innova.chatlaya")

# How many recent messages are read to build the history (then cut to the budget).
HISTORY_MESSAGES = 100
# Suggested wait after "too many streams": replies usually take seconds.
STREAM_RETRY_AFTER = 5
# How long a resume waits for another process's checkpoint to reach the
# position the client names (it saw text that was not checkpointed yet).
CATCH_UP_SECONDS = 5.0


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


def build_history(
    system_prompt: str, recent_newest_first: list[MessageRecord], content: str, budget_chars: int
) -> list[ChatMessage]:
    """System prompt + the newest earlier messages that fit the budget + the new message.

    The new message is always sent (a message too long for the model is the
    provider's `ContextTooLong` to report); older ones are dropped whole,
    oldest first, never cut in the middle.
    """
    remaining = budget_chars - len(content)
    picked: list[ChatMessage] = []
    for message in recent_newest_first:
        if not message.content or message.role not in ("user", "assistant") or message.streaming:
            continue
        if len(message.content) > remaining:
            break
        remaining -= len(message.content)
        picked.append(ChatMessage("user" if message.role == "user" else "assistant", message.content))
    history = [ChatMessage("system", system_prompt)] if system_prompt else []
    history.extend(reversed(picked))
    history.append(ChatMessage("user", content))
    return history


class ChatService:
    def __init__(
        self,
        settings: Settings,
        conversations: ConversationStore,
        messages: MessageStore,
        slots: StreamSlots,
        limiter: RateLimiter,
        turns: TurnRegistry,
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
        self.provider_name = provider_name
        self.model = model
        self.provider = provider
        self.timings = TurnTimings(
            checkpoint_seconds=settings.chat_checkpoint_ms / 1000,
            lease=settings.chat_lease,
            detached_timeout_seconds=settings.chat_detached_timeout_seconds,
        )

    # -- conversations --------------------------------------------------------

    async def session(self, user_id: str) -> ConversationRecord:
        return await self.conversations.get_or_create_active(user_id)

    async def create_conversation(self, user_id: str) -> ConversationRecord:
        return await self.conversations.create(user_id)

    async def owned(self, user_id: str, conversation_id: str) -> ConversationRecord:
        conversation = await self.conversations.get(user_id, conversation_id)
        if conversation is None:
            raise AppError(ErrorCode.CONVERSATION_NOT_FOUND)
        return conversation

    async def list_conversations(
        self, user_id: str, *, archived: bool, limit: int, cursor: str | None
    ) -> tuple[list[ConversationRecord], str | None]:
        return await self.conversations.page(user_id, archived=archived, limit=limit, cursor=cursor)

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
    ) -> tuple[list[MessageRecord], str | None]:
        if conversation_id is None:
            active = await self.conversations.active(user_id)
            if active is None:
                return [], None
            conversation_id = active.id
        else:
            await self.owned(user_id, conversation_id)
        items, next_cursor = await self.messages.page(conversation_id, limit=limit, before=before)
        for item in items:
            if item.lapsed:
                await self._store_interrupted(item)
        return items, next_cursor

    # -- a reply ----------------------------------------------------------------

    async def open_turn(self, user_id: str, content: str, conversation_id: str | None) -> Turn:
        """Everything that happens before the stream opens; see the module docstring."""
        settings = self.settings
        await self.limiter.consume("chat", limit_key("chat", user_id), settings.rate_limit_chat_user)
        if conversation_id is None:
            conversation = await self.conversations.get_or_create_active(user_id)
        else:
            conversation = await self.owned(user_id, conversation_id)
        message_id = str(ObjectId())
        slot = await self.slots.acquire(f"chat:{user_id}", settings.chat_max_concurrent_streams, message_id)
        if slot is None:
            metrics.RATE_LIMITED.labels("chat_streams").inc()
            raise AppError(ErrorCode.TOO_MANY_STREAMS, headers={"Retry-After": str(STREAM_RETRY_AFTER)})
        try:
            recent = await self.messages.recent(conversation.id, limit=HISTORY_MESSAGES)
            request = ChatRequest(
                messages=build_history(settings.chat_system_prompt, recent, content, settings.chat_history_chars),
                model=self.model,
                max_tokens=settings.chat_max_tokens,
                temperature=settings.chat_temperature,
            )
            now = utcnow()
            user_message = await self.messages.open_turn(
                conversation_id=conversation.id,
                user_id=user_id,
                content=content,
                parent_id=recent[0].id if recent else None,
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
            user_message_id=user_message.id,
            message_id=message_id,
            provider=self.provider_name,
            model=self.model,
            slot=slot,
        )
        turn = Turn(context, self.provider, request, self.messages, self.slots, self.timings)
        self.turns.start(turn)
        try:
            await turn.first_item(settings.chat_ping_seconds)
            # Only now, with the stream about to open: a turn refused before it
            # leaves the conversation as it was (title, place in the list).
            if not await self.conversations.touch(conversation, now, content if not recent else None):
                raise AppError(ErrorCode.CONVERSATION_NOT_FOUND)
            turn.accept()
            return turn
        except BaseException as error:
            await turn.abandon()
            if isinstance(error, ProviderError):
                metrics.CHAT_STREAMS.labels(self.provider_name, "refused").inc()
                raise provider_app_error(error) from error
            raise

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


__all__ = ["ChatService", "build_history", "provider_app_error"]
