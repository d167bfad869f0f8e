"""Chatlaya's logic: conversations, the history sent to the model, and one streamed turn.

A turn has two phases, and the split is the contract's:

1. *Before the stream opens* (`ChatService.open_turn`): rate limit, the
   conversation (404), a stream slot (429), the user message stored, the
   provider started and its first chunk awaited for up to `CHAT_PING_SECONDS`,
   then the conversation's title and `updated_at` set. Any failure here —
   including a provider that fails before its first chunk — is an ordinary
   JSON error, and leaves nothing behind (the user message is removed, the
   slot released, the conversation untouched), so the client may simply retry.
2. *The stream* (`ChatTurn`): tokens as they come; a provider failure becomes
   `error` + `done`. The assistant message is written once, at the end, with
   its status; the slot is released however the stream ends (shielded from a
   second cancellation). A database failure on that write still ends the
   stream with `error` (`database_unavailable`, retryable) + `done`. A `: ping`
   goes out only after `CHAT_PING_SECONDS` with nothing sent.

Database round trips per turn are a constant (about ten), whatever the length
of the reply: tokens are only accumulated in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from bson import ObjectId
from pymongo.errors import PyMongoError

from innova_server import metrics
from innova_server.auth.store import utcnow
from innova_server.chat import (
    ChatChunk,
    ChatMessage,
    ChatProvider,
    ChatRequest,
    ProviderError,
    ProviderUnavailable,
    Usage,
)
from innova_server.chatlaya.sse import Event
from innova_server.chatlaya.store import (
    ConversationRecord,
    ConversationStore,
    MessageRecord,
    MessageStatus,
    MessageStore,
    Slot,
    StreamSlots,
)
from innova_server.errors import AppError, ErrorCode
from innova_server.ratelimit import RateLimiter, limit_key
from innova_server.settings import Settings

log = logging.getLogger("innova.chatlaya")

T = TypeVar("T")

# How many recent messages are read to build the history (then cut to the budget).
HISTORY_MESSAGES = 100
# A stream slot's lease; a live stream renews it, a crashed worker's slot expires.
SLOT_LEASE = timedelta(minutes=5)
# Suggested wait after "too many streams": replies usually take seconds.
STREAM_RETRY_AFTER = 5
# How long a cancelled provider gets to stop before we stop waiting for it.
CANCEL_GRACE_SECONDS = 5.0

_END = object()

# Sent when the reply could not be saved at the end of the stream.
STORAGE_FAILED = {
    "code": ErrorCode.DATABASE_UNAVAILABLE.value,
    "message": "The reply could not be saved; send the message again.",
    "retryable": True,
}

_SURROGATE = re.compile("[\ud800-\udfff]")

# Work that must finish even if its caller is cancelled (see `_shielded`).
_BACKGROUND: set[asyncio.Task[Any]] = set()


async def drain_finalisers(timeout: float = CANCEL_GRACE_SECONDS + 5) -> None:  # noqa: ASYNC109 - a budget
    """Wait (bounded) for the shielded endings of streams: at shutdown, before the
    database closes, so a stream cut by the server's stop is still stored
    (`incomplete`) and its slot released, not left to the lease."""
    pending = set(_BACKGROUND)
    if pending:
        await asyncio.wait(pending, timeout=timeout)


def clean_text(text: str) -> str:
    """`text` with lone surrogates (from a broken decoder) replaced by U+FFFD.

    They cannot be encoded as UTF-8 (the socket) nor as BSON (the database).
    """
    return _SURROGATE.sub("\ufffd", text)


async def _shielded(work: Coroutine[Any, Any, T]) -> T:
    """`await work` in a task of its own that a cancellation of the caller does not stop.

    The caller still gets its CancelledError at once; the task is kept
    referenced until it ends, so it cannot be garbage-collected half-way.
    """
    task = asyncio.ensure_future(work)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    return await asyncio.shield(task)


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
        if not message.content or message.role not in ("user", "assistant"):
            continue
        if len(message.content) > remaining:
            break
        remaining -= len(message.content)
        picked.append(ChatMessage("user" if message.role == "user" else "assistant", message.content))
    history = [ChatMessage("system", system_prompt)] if system_prompt else []
    history.extend(reversed(picked))
    history.append(ChatMessage("user", content))
    return history


@dataclass(frozen=True)
class TurnContext:
    user_id: str
    conversation_id: str
    user_message_id: str
    message_id: ObjectId
    provider: str
    model: str
    slot: Slot


class ChatTurn:
    """One streamed reply: pumps the provider in a task, hands out events, records the outcome once."""

    def __init__(
        self,
        context: TurnContext,
        provider: ChatProvider,
        request: ChatRequest,
        messages: MessageStore,
        slots: StreamSlots,
        conversations: ConversationStore,
    ) -> None:
        self.context = context
        self._provider = provider
        self._request = request
        self._messages = messages
        self._slots = slots
        self._conversations = conversations
        # Bounded: a slow client slows the provider down instead of filling memory.
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize=256)
        self._pending: list[object] = []
        self._pump: asyncio.Task[None] | None = None
        self._parts: list[str] = []
        self._finish_reason: str | None = None
        self._usage: Usage | None = None
        self._finished = False
        self._closing = False
        self._slot_renewed = time.monotonic()
        self.status: MessageStatus | None = None

    # -- the provider side ------------------------------------------------

    def begin(self) -> None:
        self._pump = asyncio.create_task(self._run_provider(), name=f"chat-provider-{self.context.message_id}")
        metrics.CHAT_ACTIVE.inc()

    async def _run_provider(self) -> None:
        iterator: AsyncIterator[ChatChunk] | None = None
        try:
            iterator = self._provider.stream(self._request)
            async for chunk in iterator:
                if not isinstance(chunk, ChatChunk):
                    raise TypeError(f"stream() yielded {type(chunk).__name__}, not ChatChunk")
                await self._queue.put(chunk)
            await self._queue.put(_END)
        except ProviderError as error:
            await self._queue.put(error)
        except Exception as error:  # a provider bug: log it, show the client a clean error
            log.exception("provider %s raised an undocumented error", self.context.provider)
            await self._queue.put(ProviderUnavailable(f"The chat model failed ({type(error).__name__})."))
        finally:
            # Cancellation is closing the iterator (DESIGN §6). An async
            # generator interrupted by CancelledError is already closed, and
            # then this is a no-op; any other iterator gets told here.
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def prime(self, wait_seconds: float) -> None:
        """Wait (bounded) for the provider's first item, so an early failure is an HTTP error."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_seconds):
                self._pending.append(await self._queue.get())
        if self._pending and isinstance(self._pending[0], ProviderError):
            raise self._pending[0]

    # -- the client side (EventSource) ------------------------------------

    @property
    def finished(self) -> bool:
        return self._finished

    def first_events(self) -> list[Event]:
        return [
            Event(
                "start",
                {
                    "conversation_id": self.context.conversation_id,
                    "user_message_id": self.context.user_message_id,
                    "message_id": str(self.context.message_id),
                    "provider": self.context.provider,
                    "model": self.context.model,
                },
            )
        ]

    async def next_events(self, silence_seconds: float) -> list[Event]:
        """The next events, or `[]` once `silence_seconds` passed with nothing to send.

        A chunk without text (the final `finish_reason`/`usage` chunk, a
        provider's keep-alive) produces no event: waiting goes on until the
        same deadline, so `[]` — a ping — really means that much silence.
        """
        deadline = asyncio.get_running_loop().time() + silence_seconds
        while not self._finished:
            await self._renew_slot_if_due()
            if self._pending:
                item = self._pending.pop(0)
            elif not self._queue.empty():
                item = self._queue.get_nowait()
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        item = await self._queue.get()
                except TimeoutError:
                    return []
            events = await self._events_from(item)
            if events:
                return events
        return []

    async def _events_from(self, item: object) -> list[Event]:
        """Events for `item` and whatever else is already waiting, coalesced into one write."""
        events: list[Event] = []
        texts: list[str] = []
        while True:
            if isinstance(item, ChatChunk):
                if item.text:
                    texts.append(clean_text(item.text))
                if item.finish_reason:
                    self._finish_reason = item.finish_reason
                if item.usage:
                    self._usage = item.usage
            else:
                events.extend(self._token_events(texts))
                events.extend(await self._end(item))
                return events
            if self._queue.empty():
                break
            item = self._queue.get_nowait()
        events.extend(self._token_events(texts))
        return events

    def _token_events(self, texts: list[str]) -> list[Event]:
        if not texts:
            return []
        self._parts.extend(texts)
        metrics.CHAT_TOKENS.labels(self.context.provider).inc(len(texts))
        return [Event("token", {"text": text}) for text in texts]

    async def _end(self, item: object) -> list[Event]:
        """The closing events; the message is stored first, so `done` means "in the history"."""
        error: dict[str, Any] | None = None
        if isinstance(item, ProviderError):
            finish_reason = "error"
            error = {"code": item.code, "message": item.message, "retryable": item.retryable}
            stored = await self._finish("error", finish_reason)
        else:
            finish_reason = self._finish_reason or "stop"
            stored = await self._finish("complete", finish_reason)
        if not stored:
            # Said but not saved: the client must not believe the reply is in
            # the history. A provider failure, when there was one, stays the
            # one `error` the client is told about.
            finish_reason = "error"
            error = error or STORAGE_FAILED
        done = {"message_id": str(self.context.message_id), "finish_reason": finish_reason, "usage": self._usage_dict()}
        return [Event("error", error), Event("done", done)] if error else [Event("done", done)]

    async def close(self) -> None:
        """The client went away: stop the provider, keep what was said as `incomplete`.

        Shielded as a whole: stopping the provider may take up to
        `CANCEL_GRACE_SECONDS`, and a second cancellation in that time (the
        server stopping) must still see the message written and the slot freed.
        """
        if self._finished or self._closing:
            return
        self._closing = True
        await _shielded(self._close())

    async def _close(self) -> None:
        try:
            await self._stop_provider()
        finally:
            # Chunks already produced but not yet sent were still said by the model.
            for item in [*self._pending, *self._drain()]:
                if isinstance(item, ChatChunk) and item.text:
                    self._parts.append(clean_text(item.text))
            await self._finish("incomplete", "cancelled")

    async def abandon(self) -> None:
        """The stream never opened (the request failed first): undo the turn entirely (shielded)."""
        if self._finished:
            return
        self._finished = True
        await _shielded(self._abandon())

    async def _abandon(self) -> None:
        try:
            await self._stop_provider()
        finally:
            await self._undo()

    async def _undo(self) -> None:
        try:
            await self._messages.delete(self.context.user_message_id)
        except Exception:  # the request fails anyway; say so in the log, free the slot
            log.exception("could not delete the user message of a failed turn")
        finally:
            metrics.CHAT_ACTIVE.dec()
            await self._slots.release(self.context.slot)

    # -- internals ----------------------------------------------------------

    def _drain(self) -> list[object]:
        items = []
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        return items

    async def _stop_provider(self) -> None:
        pump = self._pump
        if pump is None or pump.done():
            return
        pump.cancel()
        done, _ = await asyncio.wait({pump}, timeout=CANCEL_GRACE_SECONDS)
        if not done:
            log.warning(
                "provider %s did not stop within %.0fs of cancellation", self.context.provider, CANCEL_GRACE_SECONDS
            )

    def _usage_dict(self) -> dict[str, int] | None:
        if self._usage is None:
            return None
        return {"prompt_tokens": self._usage.prompt_tokens, "completion_tokens": self._usage.completion_tokens}

    async def _renew_slot_if_due(self) -> None:
        if time.monotonic() - self._slot_renewed > SLOT_LEASE.total_seconds() / 2:
            self._slot_renewed = time.monotonic()
            await self._slots.renew(self.context.slot)

    async def _finish(self, status: MessageStatus, finish_reason: str) -> bool:
        """Write the assistant message (once) and give the slot back, whatever happens.

        Shielded: a disconnect (or shutdown) that cancels the stream while
        this runs must not lose the message or leak the slot. True when the
        message was stored; a database failure is logged (without the
        content) and reported as False, so the stream can still end cleanly.
        """
        if self._finished:
            return True
        self._finished = True
        self.status = status
        try:
            await _shielded(self._record(status, finish_reason))
        except Exception:
            log.exception("could not store the assistant message %s", self.context.message_id)
            return False
        return True

    async def _record(self, status: MessageStatus, finish_reason: str) -> None:
        context = self.context
        try:
            await self._messages.add(
                message_id=context.message_id,
                conversation_id=context.conversation_id,
                user_id=context.user_id,
                role="assistant",
                content="".join(self._parts),
                created_at=utcnow(),
                status=status,
                provider=context.provider,
                model=context.model,
                finish_reason=finish_reason,
                usage=self._usage_dict(),
            )
            # Deleted while it streamed? `delete_conversation` removes the
            # conversation before its messages, so either its `delete_many`
            # saw this message, or this check sees the conversation gone.
            try:
                gone = not await self._conversations.exists(context.conversation_id)
            except PyMongoError as error:
                # The reply is stored: telling the client to send again would
                # duplicate the turn. At worst an orphan stays behind.
                log.warning("orphan check failed for message %s: %s", context.message_id, type(error).__name__)
                gone = False
            if gone:
                await self._messages.delete(str(context.message_id))
        finally:
            metrics.CHAT_ACTIVE.dec()
            metrics.CHAT_STREAMS.labels(context.provider, status).inc()
            await self._slots.release(context.slot)


class ChatService:
    def __init__(
        self,
        settings: Settings,
        conversations: ConversationStore,
        messages: MessageStore,
        slots: StreamSlots,
        limiter: RateLimiter,
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
        self.provider_name = provider_name
        self.model = model
        self.provider = provider

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
        conversation = await self.owned(user_id, conversation_id)
        # Conversation first: once it is gone no new message can be added to it.
        if not await self.conversations.delete(user_id, conversation.id):
            raise AppError(ErrorCode.CONVERSATION_NOT_FOUND)
        await self.messages.delete_conversation(conversation.id)

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
        return await self.messages.page(conversation_id, limit=limit, before=before)

    # -- a turn ---------------------------------------------------------------

    async def open_turn(self, user_id: str, content: str, conversation_id: str | None) -> ChatTurn:
        """Everything that happens before the stream opens; see the module docstring."""
        settings = self.settings
        await self.limiter.consume("chat", limit_key("chat", user_id), settings.rate_limit_chat_user)
        if conversation_id is None:
            conversation = await self.conversations.get_or_create_active(user_id)
        else:
            conversation = await self.owned(user_id, conversation_id)
        slot = await self.slots.acquire(f"chat:{user_id}", settings.chat_max_concurrent_streams)
        if slot is None:
            metrics.RATE_LIMITED.labels("chat_streams").inc()
            raise AppError(ErrorCode.TOO_MANY_STREAMS, headers={"Retry-After": str(STREAM_RETRY_AFTER)})
        turn: ChatTurn | None = None
        try:
            recent = await self.messages.recent(conversation.id, limit=HISTORY_MESSAGES)
            request = ChatRequest(
                messages=build_history(settings.chat_system_prompt, recent, content, settings.chat_history_chars),
                model=self.model,
                max_tokens=settings.chat_max_tokens,
                temperature=settings.chat_temperature,
            )
            now = utcnow()
            # From here every failure goes through `turn.abandon()`, which deletes this message.
            user_message = await self.messages.add(
                conversation_id=conversation.id, user_id=user_id, role="user", content=content, created_at=now
            )
            context = TurnContext(
                user_id=user_id,
                conversation_id=conversation.id,
                user_message_id=user_message.id,
                message_id=ObjectId(),
                provider=self.provider_name,
                model=self.model,
                slot=slot,
            )
            turn = ChatTurn(context, self.provider, request, self.messages, self.slots, self.conversations)
            turn.begin()
            await turn.prime(settings.chat_ping_seconds)
            # Only now, with the stream about to open: a turn refused before it
            # leaves the conversation as it was (title, place in the list).
            await self.conversations.touch(conversation, now, content if not recent else None)
            return turn
        except BaseException as error:
            if turn is not None:
                await turn.abandon()
            else:
                await self.slots.release(slot)
            if isinstance(error, ProviderError):
                metrics.CHAT_STREAMS.labels(self.provider_name, "refused").inc()
                raise provider_app_error(error) from error
            raise


__all__ = ["ChatService", "ChatTurn", "build_history", "provider_app_error"]
