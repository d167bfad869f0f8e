"""What a request can do to a reply: open one (send, edit and resend, regenerate), resume it, stop it.

Opening a turn is the *before* of a reply, and costs three rounds of
database waiting (the session lookup included), each round's independent
operations running together:

1. the rate limit and a stream slot, in one conditional write
   (`StreamSlots.acquire`), and the conversation with the newest messages of
   its branch, in one aggregate (`ConversationStore.with_recent`) — and the
   daily quota's read when there is one; refused in the order rate limit or
   quota, conversation (404), stream slot (429);
2. the two messages inserted (the reply `streaming`) and the conversation's
   branch, `updated_at` and title written: one command (`Database.writes`);
3. (no database) the provider started and its first chunk awaited for up to
   `CHAT_PING_SECONDS`.

Any failure — including a provider that fails before its first chunk — is an
ordinary JSON error and leaves nothing behind (both messages removed, the
slot released, the conversation put back as it was), so the client may
simply retry.

After that the reply belongs to a `Turn` (`chatlaya.turns`), which outlives
the request; `resume` and `stop` reach it from any request, on this process
(the registry) or another (the message document).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NamedTuple, TypeVar, cast

from bson import ObjectId

from innova_server import metrics
from innova_server.auth.store import utcnow
from innova_server.background import BackgroundTasks
from innova_server.chat import ChatProvider, ChatRequest, ProviderError
from innova_server.chatlaya.branches import Branches
from innova_server.chatlaya.history import HISTORY_BATCH, Prefetched, build_history, read_branch
from innova_server.chatlaya.messages import MessageRecord, MessageStore
from innova_server.chatlaya.openings import Openings
from innova_server.chatlaya.store import (
    ConversationRecord,
    ConversationStore,
    RateLimited,
    Slot,
    StreamSlots,
    make_title,
)
from innova_server.chatlaya.streams import InvalidEventId, LiveStream, StoredStream, parse_event_id
from innova_server.chatlaya.titles import TitleWriter
from innova_server.chatlaya.turns import Turn, TurnContext, TurnRegistry, TurnTimings
from innova_server.chatlaya.usage import UsageStore, seconds_to_utc_midnight
from innova_server.errors import AppError, ErrorCode
from innova_server.settings import Settings

log = logging.getLogger("innova.chatlaya")

T = TypeVar("T")

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


class _Opened(NamedTuple):
    """A turn whose messages are written, before its provider starts."""

    turn: Turn
    conversation: ConversationRecord
    branch_before: list[str]
    branch: list[str]
    first_message: str | None


class Replies:
    def __init__(
        self,
        settings: Settings,
        conversations: ConversationStore,
        messages: MessageStore,
        slots: StreamSlots,
        turns: TurnRegistry,
        usage: UsageStore,
        tasks: BackgroundTasks,
        openings: Openings,
        *,
        provider_name: str,
        model: str,
        provider: ChatProvider,
    ) -> None:
        self.settings = settings
        self.conversations = conversations
        self.messages = messages
        self.branches = Branches(conversations, messages)
        self.slots = slots
        self.turns = turns
        self.usage = usage
        self.tasks = tasks
        self.openings = openings
        self.provider_name = provider_name
        self.model = model
        self.provider = provider
        self.timings = TurnTimings.from_settings(settings)
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

    async def open_turn(
        self, user_id: str, content: str, conversation_id: str | None, edit_of: str | None = None
    ) -> Turn:
        """A new user message and its reply: after the current branch's leaf, or (`edit_of`) as a
        sibling of that user message. See the module docstring for what happens before the stream."""
        message_id = str(ObjectId())
        async with self.openings.turn():
            slot, (conversation, history) = await self._admit(
                user_id, message_id, self._conversation(user_id, conversation_id)
            )
            try:
                branch = await self.branches.current(conversation)
                if edit_of is None:
                    parent_path = branch
                else:
                    edited = await self.messages.in_conversation(conversation.id, edit_of)
                    if edited is None or edited.role != "user":
                        raise AppError(ErrorCode.MESSAGE_NOT_FOUND)
                    parent_path = (await self.branches.path_to(conversation, branch, edited.id))[:-1]
            except BaseException:
                await self._release(slot)
                raise
            opened = await self._write_turn(
                user_id, conversation, branch, parent_path, content, message_id, slot, history
            )
        return await self._launch(opened)

    async def _conversation(self, user_id: str, conversation_id: str | None) -> tuple[ConversationRecord, Prefetched]:
        """The conversation a message goes to (the active one, created if need be, when None), with
        the newest messages of its branch: one round trip (`ConversationStore.with_recent`)."""
        found = await self.conversations.with_recent(user_id, conversation_id, HISTORY_BATCH)
        if found is None:
            if conversation_id is not None:
                raise AppError(ErrorCode.CONVERSATION_NOT_FOUND)
            return await self.conversations.create_active(user_id), Prefetched([], {}, self.messages.by_ids)
        conversation, docs = found
        now = utcnow()
        records = {str(doc["_id"]): MessageRecord.from_doc(doc, now) for doc in docs}
        looked_up = (conversation.branch or [])[-HISTORY_BATCH:]
        return conversation, Prefetched(looked_up, records, self.messages.by_ids)

    async def regenerate(self, user_id: str, message_id: str) -> Turn:
        """Another reply to the user message that `message_id` (an assistant message) answers."""
        new_id = str(ObjectId())
        async with self.openings.turn():
            slot, previous = await self._admit(user_id, new_id, self._answered_reply(user_id, message_id))
            try:
                conversation = await self.conversations.get(user_id, previous.conversation_id)
                if conversation is None or previous.parent_id is None:
                    raise AppError(ErrorCode.MESSAGE_NOT_FOUND)
                branch = await self.branches.current(conversation)
                path = await self.branches.path_to(conversation, branch, previous.parent_id)
                if not path:
                    raise AppError(ErrorCode.MESSAGE_NOT_FOUND)
            except BaseException:
                await self._release(slot)
                raise
            opened = await self._write_turn(user_id, conversation, branch, path, None, new_id, slot)
        return await self._launch(opened)

    async def _answered_reply(self, user_id: str, message_id: str) -> MessageRecord:
        previous = await self.messages.assistant(user_id, message_id)
        if previous is None or previous.parent_id is None:
            raise AppError(ErrorCode.MESSAGE_NOT_FOUND)
        return previous

    async def _admit(self, user_id: str, message_id: str, finding: Awaitable[T]) -> tuple[Slot, T]:
        """The rate limit and a stream slot (one write: `StreamSlots.acquire`), the daily quota when
        there is one, and `finding` (what the turn is about), concurrently: one round of waiting.
        Refusals come in the order a client expects — rate limit or quota, then not found, then too
        many streams — and a slot taken meanwhile is given back."""
        slot, quota, found = await asyncio.gather(
            self.slots.acquire(
                f"chat:{user_id}",
                self.settings.chat_max_concurrent_streams,
                message_id,
                rate=self.settings.rate_limit_chat_user,
            ),
            self._check_quota(user_id),
            finding,
            return_exceptions=True,
        )
        if isinstance(slot, RateLimited):
            metrics.RATE_LIMITED.labels("chat").inc()
            failure: BaseException | None = AppError(
                ErrorCode.RATE_LIMITED, headers={"Retry-After": str(slot.retry_after)}
            )
        else:
            failure = next((o for o in (slot, quota, found) if isinstance(o, BaseException)), None)
        if failure is None and isinstance(slot, Slot):
            return slot, cast(T, found)
        if isinstance(slot, Slot):
            await self._release(slot)
        if failure is not None:
            raise failure
        metrics.RATE_LIMITED.labels("chat_streams").inc()
        raise AppError(ErrorCode.TOO_MANY_STREAMS, headers={"Retry-After": str(STREAM_RETRY_AFTER)})

    async def _release(self, slot: Slot) -> None:
        # Shielded: a client leaving now must not leak the slot (its lease would free it, later).
        with contextlib.suppress(Exception):
            await self._shielded("chat-slot-release", self.slots.release(slot))

    async def _shielded(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        """`await work` in a task the app holds (`BackgroundTasks`): a client leaving cancels
        the wait, never the work, and the task is not garbage-collected half-way."""
        await asyncio.shield(self.tasks.spawn(name, work))

    async def _check_quota(self, user_id: str) -> None:
        """The daily token quota, when `CHAT_DAILY_TOKENS_USER` sets one (one read; none otherwise)."""
        limit = self.settings.chat_daily_tokens_user
        if limit is None:
            return
        if (await self.usage.today(user_id)).tokens >= limit:
            metrics.RATE_LIMITED.labels("daily_tokens").inc()
            raise AppError(ErrorCode.QUOTA_EXCEEDED, headers={"Retry-After": str(seconds_to_utc_midnight())})

    async def _write_turn(
        self,
        user_id: str,
        conversation: ConversationRecord,
        branch_before: list[str],
        parent_path: list[str],
        content: str | None,
        message_id: str,
        slot: Slot,
        history_source: Callable[[list[str]], Awaitable[dict[str, MessageRecord]]] | None = None,
    ) -> _Opened:
        """History, messages and branch, together: the last database round before the first chunk.

        `content` None is a regeneration: `parent_path` ends with the user
        message answered again, and no user message is added. The branch and
        `updated_at` are written beside the messages, not after the
        provider's first chunk (one round trip less before the first token);
        a turn refused after that puts the conversation back as it was.
        """
        settings = self.settings
        user_message_id = str(ObjectId()) if content is not None else parent_path[-1]
        branch = [*parent_path, *([user_message_id] if content is not None else []), message_id]
        first_message = content if content is not None and not parent_path else None
        now = utcnow()
        history, inserted, touched = await asyncio.gather(
            read_branch(parent_path, content, settings.chat_history_chars, history_source or self.messages.by_ids),
            self.messages.open_turn(
                conversation_id=conversation.id,
                user_id=user_id,
                content=content,
                parent_id=parent_path[-1] if parent_path else None,
                user_message_id=user_message_id,
                assistant_id=ObjectId(message_id),
                provider=self.provider_name,
                model=self.model,
                created_at=now,
                lease=self.timings.lease,
            ),
            self.conversations.touch(conversation, now, first_message, branch),
            return_exceptions=True,
        )
        created = [message_id, *([user_message_id] if content is not None else [])]
        failure = next((o for o in (history, inserted, touched) if isinstance(o, BaseException)), None)
        if failure is not None or touched is False:
            undo = self._take_back(conversation, branch_before, branch, created, slot, touched is True)
            await self._shielded("chat-undo", undo)
            raise failure or AppError(ErrorCode.CONVERSATION_NOT_FOUND)
        assert not isinstance(history, BaseException)
        newest_first, prompt = history
        request = ChatRequest(
            messages=build_history(settings.chat_system_prompt, newest_first, prompt, settings.chat_history_chars),
            model=self.model,
            max_tokens=settings.chat_max_tokens,
            temperature=settings.chat_temperature,
        )
        context = TurnContext(
            user_id=user_id,
            conversation_id=conversation.id,
            user_message_id=user_message_id,
            message_id=message_id,
            provider=self.provider_name,
            model=self.model,
            slot=slot,
            new_user_message=content is not None,
        )
        turn = Turn(context, self.provider, request, self.messages, self.slots, self.timings, self.usage)
        return _Opened(turn, conversation, branch_before, branch, first_message)

    async def _launch(self, opened: _Opened) -> Turn:
        """Start generating, and wait (bounded) for the provider's first chunk: outside `openings`,
        so a slow provider does not hold back other turns' database rounds."""
        turn, conversation, branch_before, branch, first_message = opened
        settings = self.settings
        self.turns.start(turn)
        try:
            await turn.first_item(settings.chat_ping_seconds)
            turn.accept()
        except BaseException as error:
            await self._shielded("chat-undo", self._refused(turn, conversation, branch_before, branch))
            if isinstance(error, ProviderError):
                metrics.CHAT_STREAMS.labels(self.provider_name, "refused").inc()
                raise provider_app_error(error) from error
            raise
        if self.titles is not None and first_message is not None and conversation.title is None:
            automatic = None if conversation.title_set_by_user else make_title(first_message)
            self.tasks.spawn("chat-title", self.titles.after(turn, first_message, automatic))
        return turn

    async def _refused(
        self, turn: Turn, conversation: ConversationRecord, branch_before: list[str], branch: list[str]
    ) -> None:
        """The stream never opened: the turn removes its messages and slot; the conversation goes back."""
        await turn.abandon()
        await self._restore(conversation, branch_before, branch)

    async def _take_back(
        self,
        conversation: ConversationRecord,
        branch_before: list[str],
        branch: list[str],
        created: list[str],
        slot: Slot,
        touched: bool,
    ) -> None:
        """Undo whatever of the turn's first writes went through (they ran together; one may have failed)."""
        try:
            await self.messages.delete_turn(*created)
            if touched:
                await self._restore(conversation, branch_before, branch)
        except Exception:  # the request fails anyway; say so in the log, free the slot
            log.exception("could not undo the writes of a refused turn")
        finally:
            await self._release(slot)

    async def _restore(self, conversation: ConversationRecord, branch_before: list[str], branch: list[str]) -> None:
        try:
            await self.conversations.restore(conversation, branch_before, replaced=branch)
        except Exception as error:  # a stale branch end still reads (its reply reads as removed)
            log.warning("could not restore conversation %s: %s", conversation.id, type(error).__name__)

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
            await self.branches.store_interrupted(record)
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


__all__ = ["Replies", "provider_app_error"]
