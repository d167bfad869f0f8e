"""One assistant reply ("a turn"), alive independently of the HTTP response that asked for it.

A `Turn` runs in a task owned by the process's `TurnRegistry`, not by a
request: the client that started it may leave, come back (`LiveStream`),
or be joined by others; another process follows it through its checkpoints
(`StoredStream`). Its jobs, and only these:

- **generation**: the provider's chunks are appended to the text in memory;
  nothing on this per-token path touches the database;
- **fan-out**: attached streams read the text from their own position and
  wait on `changed`, so a slow or absent client never holds generation back;
- **checkpoints**: every `CHAT_CHECKPOINT_MS` the registry stores the text
  so far of all its turns (when it grew) and renews their leases in one
  `bulk_write`, beside one `find` that brings back stop flags and followers'
  visits (`TurnRegistry.checkpoint`). Round trips are a constant plus two per
  interval for the whole process, whatever the replies' lengths or number;
- **the end**, written once: `complete`, `error`, or `incomplete` with the
  reason (`stopped`, `cancelled` when nobody watched for
  `CHAT_DETACHED_TIMEOUT_SECONDS`, `interrupted` at shutdown); then the
  stream slot is released and only then do attached streams get `done` — so
  `done` means "in the history" and the slot is free for the next message.

Before the stream opens, the turn waits to be `accept`ed or `abandon`ed by
`ChatService.open_turn` (a provider that fails before its first chunk is an
ordinary JSON error, and an abandoned turn removes both its messages).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from innova_server import metrics
from innova_server.auth.store import utcnow
from innova_server.chat import ChatChunk, ChatProvider, ChatRequest, ProviderError, ProviderUnavailable, Usage
from innova_server.chatlaya.messages import Checkpoint, MessageStatus, MessageStore
from innova_server.chatlaya.store import Slot, StreamSlots
from innova_server.chatlaya.usage import UsageStore, estimate_tokens
from innova_server.errors import ErrorCode
from innova_server.settings import Settings

log = logging.getLogger("innova.chatlaya")

# How long a cancelled provider gets to stop before we stop waiting for it.
CANCEL_GRACE_SECONDS = 5.0

StopReason = Literal["stopped", "cancelled", "interrupted", "gone"]

# Sent when the reply could not be saved at its end.
STORAGE_FAILED = {
    "code": ErrorCode.DATABASE_UNAVAILABLE.value,
    "message": "The reply could not be saved; send the message again.",
    "retryable": True,
}

_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """`text` with lone surrogates (from a broken decoder) replaced by U+FFFD.

    They cannot be encoded as UTF-8 (the socket) nor as BSON (the database).
    """
    return _SURROGATE.sub("\ufffd", text)


@dataclass(frozen=True)
class TurnContext:
    user_id: str
    conversation_id: str
    user_message_id: str
    message_id: str
    provider: str
    model: str
    slot: Slot
    # False for a regeneration: the user message existed before, and a refused turn must not delete it.
    new_user_message: bool = True

    def start_payload(self) -> dict[str, str]:
        return {
            "conversation_id": self.conversation_id,
            "user_message_id": self.user_message_id,
            "message_id": self.message_id,
            "provider": self.provider,
            "model": self.model,
        }


@dataclass(frozen=True)
class TurnTimings:
    """`CHAT_CHECKPOINT_MS`, `CHAT_LEASE_SECONDS`, `CHAT_DETACHED_TIMEOUT_SECONDS`."""

    checkpoint_seconds: float
    lease: timedelta
    detached_timeout_seconds: float

    @classmethod
    def from_settings(cls, settings: Settings) -> TurnTimings:
        return cls(
            checkpoint_seconds=settings.chat_checkpoint_ms / 1000,
            lease=settings.chat_lease,
            detached_timeout_seconds=settings.chat_detached_timeout_seconds,
        )


@dataclass(frozen=True)
class Ending:
    """How the reply ended, as its `done` (and `error`) events say it."""

    status: MessageStatus
    finish_reason: str
    usage: dict[str, int] | None
    error: dict[str, Any] | None


class Turn:
    def __init__(
        self,
        context: TurnContext,
        provider: ChatProvider,
        request: ChatRequest,
        messages: MessageStore,
        slots: StreamSlots,
        timings: TurnTimings,
        usage: UsageStore | None = None,
    ) -> None:
        self.context = context
        self._usage_store = usage
        self._provider = provider
        self._request = request
        self._messages = messages
        self._slots = slots
        self._timings = timings
        # The text: the chunks as produced, and the offset where each ends.
        self._parts: list[str] = []
        self._ends: list[int] = []
        self.length = 0
        self._finish_hint: str | None = None
        self._usage: Usage | None = None
        self._error: ProviderError | None = None
        self.ending: Ending | None = None
        self._changed = asyncio.Event()
        self._accepted = asyncio.Event()
        self._abandoned = False
        self._stop_reason: StopReason | None = None
        self._stop_requested = asyncio.Event()
        self._decided = False
        self._attached = 0
        self._detached_since = time.monotonic()
        self._counted_detached = False
        self._task: asyncio.Task[None] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._written = 0  # length of the text at the last checkpoint

    @property
    def message_id(self) -> str:
        return self.context.message_id

    # -- what streams read -------------------------------------------------

    @property
    def changed(self) -> asyncio.Event:
        """Set at the next change (text, or the end). Take it *before* reading, then wait on it."""
        return self._changed

    def text(self) -> str:
        return "".join(self._parts)

    def read(self, offset: int) -> list[tuple[str, int]]:
        """The chunks after `offset`, each with the offset where it ends (the first may be a chunk's tail)."""
        if offset >= self.length:
            return []
        index = bisect.bisect_right(self._ends, offset)
        start = self._ends[index - 1] if index else 0
        pieces = [(self._parts[index][offset - start :], self._ends[index])]
        pieces.extend(zip(self._parts[index + 1 :], self._ends[index + 1 :], strict=True))
        return pieces

    def attach(self) -> None:
        self._attached += 1
        if self._counted_detached:
            self._counted_detached = False
            metrics.CHAT_DETACHED.dec()

    def detach(self) -> None:
        self._attached -= 1
        if self._attached or self.ending is not None:
            return
        self._detached_since = time.monotonic()
        if self._accepted.is_set() and not self._abandoned and not self._counted_detached:
            self._counted_detached = True
            metrics.CHAT_DETACHED.inc()
        if self._timings.detached_timeout_seconds == 0:
            self.stop("cancelled")

    # -- control -------------------------------------------------------------

    def start(self, on_exit: Callable[[Turn], object]) -> None:
        self._task = asyncio.create_task(self._main(on_exit), name=f"chat-turn-{self.message_id}")

    async def first_item(self, wait_seconds: float) -> None:
        """Wait (bounded) for the first text or the end; a provider failure before any text is raised."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        while not self.length and not self._produced():
            waiter = self._changed
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter.wait()
            except TimeoutError:
                return
        if not self.length and self._error is not None:
            raise self._error

    def accept(self) -> None:
        """The stream opens: from now on the turn ends by itself and is written to the history."""
        self._accepted.set()

    async def abandon(self) -> None:
        """The stream never opened: stop the provider, delete both messages, free the slot."""
        self._abandoned = True
        self._accepted.set()
        if self._task is not None:
            await asyncio.shield(self._task)

    def stop(self, reason: StopReason) -> None:
        """End the reply now, keeping the text so far (`incomplete` / `reason`); no-op once it is ending."""
        if self._decided or self._stop_reason is not None:
            return
        self._stop_reason = reason
        self._stop_requested.set()

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    # -- the turn's task -------------------------------------------------------

    def _produced(self) -> bool:
        return self._pump is not None and self._pump.done()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _main(self, on_exit: Callable[[Turn], object]) -> None:
        self._pump = asyncio.create_task(self._produce(), name=f"chat-provider-{self.message_id}")
        try:
            await self._accepted.wait()
            if self._abandoned:
                await self._undo()
                return
            metrics.CHAT_ACTIVE.inc()
            try:
                await self._generate()
            finally:
                metrics.CHAT_ACTIVE.dec()
                if self._counted_detached:
                    self._counted_detached = False
                    metrics.CHAT_DETACHED.dec()
        finally:
            on_exit(self)
            await self._halt_provider()

    async def _generate(self) -> None:
        stop = asyncio.create_task(self._stop_requested.wait())
        try:
            assert self._pump is not None
            await asyncio.wait({self._pump, stop}, return_when=asyncio.FIRST_COMPLETED)
            self._decided = True
            ending = self._decide()
        finally:
            stop.cancel()
            await asyncio.gather(stop, return_exceptions=True)
        # The end, the slot and the usage are written together (one command: `Database.writes`);
        # `done` is sent only after all three, so it means "in the history, and the slot is free".
        # Shielded: a task cancelled now (shutdown) still frees its slot and stores its end.
        record = self._record(ending) if self._stop_reason != "gone" else _stored()
        stored, _, _ = await asyncio.shield(asyncio.gather(record, self._release_slot(), self._count_usage()))
        if not stored:
            # Said but not saved: the client must not believe the reply is in
            # the history. A provider failure, when there was one, stays the
            # one `error` the client is told about.
            ending = Ending("error", "error", ending.usage, ending.error or STORAGE_FAILED)
        self.ending = ending
        metrics.CHAT_STREAMS.labels(self.context.provider, ending.status).inc()
        metrics.CHAT_TURN_ENDINGS.labels(self.context.provider, ending.finish_reason).inc()
        self._notify()

    async def _release_slot(self) -> None:
        try:
            await self._slots.release(self.context.slot)
        except Exception as error:  # the lease frees it in the end
            log.warning("could not release the stream slot of %s: %s", self.message_id, type(error).__name__)

    async def _count_usage(self) -> None:
        """Today's usage of the user: the provider's token counts, else characters / 4."""
        if self._usage_store is None:
            return
        if self._usage is not None:
            prompt, completion = self._usage.prompt_tokens, self._usage.completion_tokens
        else:
            prompt = estimate_tokens(sum(len(message.content) for message in self._request.messages))
            completion = estimate_tokens(self.length)
        try:
            await self._usage_store.add(self.context.user_id, prompt_tokens=prompt, completion_tokens=completion)
        except Exception as error:  # usage is bookkeeping: never the reason a reply fails
            log.warning("could not count the usage of %s: %s", self.message_id, type(error).__name__)

    def _decide(self) -> Ending:
        usage = self._usage_dict()
        if self._stop_reason is not None:
            reason = "cancelled" if self._stop_reason == "gone" else self._stop_reason
            return Ending("incomplete", reason, usage, None)
        if self._error is not None:
            error = {"code": self._error.code, "message": self._error.message, "retryable": self._error.retryable}
            return Ending("error", "error", usage, error)
        return Ending("complete", self._finish_hint or "stop", usage, None)

    async def _produce(self) -> None:
        iterator: AsyncIterator[ChatChunk] | None = None
        try:
            iterator = self._provider.stream(self._request)
            async for chunk in iterator:
                if isinstance(chunk, str):  # a bare string is a text chunk (the plugin SDK allows it)
                    chunk = ChatChunk(text=chunk)
                elif not isinstance(chunk, ChatChunk):
                    raise TypeError(f"stream() yielded {type(chunk).__name__}, not ChatChunk or str")
                self._take(chunk)
                # A provider that never awaits must not hold the event loop for its whole reply.
                await asyncio.sleep(0)
        except ProviderError as error:
            self._error = error
        except Exception as error:  # a provider bug: log it, show the client a clean error
            log.exception("provider %s raised an undocumented error", self.context.provider)
            self._error = ProviderUnavailable(f"The chat model failed ({type(error).__name__}).")
        finally:
            # Cancellation is closing the iterator. An async generator
            # interrupted by CancelledError is already closed, and then this
            # is a no-op; any other iterator gets told here.
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
            self._notify()

    def _take(self, chunk: ChatChunk) -> None:
        if self._decided:
            return  # said after the end was decided: not part of the stored reply
        if chunk.text:
            text = clean_text(chunk.text)
            self._parts.append(text)
            self.length += len(text)
            self._ends.append(self.length)
            metrics.CHAT_TOKENS.labels(self.context.provider).inc()
        if chunk.finish_reason:
            self._finish_hint = chunk.finish_reason
        if chunk.usage:
            self._usage = chunk.usage
        if chunk.text:
            self._notify()

    # -- checkpoints (written by the registry, for all its turns at once) ------------------

    @property
    def checkpointing(self) -> bool:
        """Accepted and not ending yet: its text and lease are due at every checkpoint."""
        return self._accepted.is_set() and not self._abandoned and not self._decided

    def checkpoint_content(self) -> tuple[str | None, int]:
        """The text to store (None when it did not grow since the last checkpoint), and its length."""
        length = self.length
        return (self.text() if length != self._written else None), length

    def checkpointed(self, checkpoint: Checkpoint | None, length: int) -> None:
        """What the checkpoint brought back: gone, a stop, or whether a follower still watches."""
        if checkpoint is None:
            self.stop("gone")
            return
        self._written = max(self._written, length)
        if checkpoint.stop_requested:
            self.stop("stopped")
            return
        self._check_detached(checkpoint.watched_at)

    def _check_detached(self, watched_at: datetime | None) -> None:
        if self._attached:
            return
        # A follower on another process visits every checkpoint interval.
        recent = timedelta(seconds=2 * self._timings.checkpoint_seconds + 1)
        if watched_at is not None and watched_at >= utcnow() - recent:
            self._detached_since = time.monotonic()
            return
        if time.monotonic() - self._detached_since >= self._timings.detached_timeout_seconds:
            self.stop("cancelled")

    async def _record(self, ending: Ending) -> bool:
        """Write the end; False (logged without the content) when the database failed."""
        try:
            await self._messages.finish(
                self.message_id,
                status=ending.status,
                content=self.text(),
                finish_reason=ending.finish_reason,
                usage=ending.usage,
                error=ending.error,
            )
        except Exception:
            log.exception("could not store the assistant message %s", self.message_id)
            return False
        return True

    async def _undo(self) -> None:
        context = self.context
        try:
            await self._halt_provider()
            created = [context.message_id]
            if context.new_user_message:
                created.append(context.user_message_id)
            await self._messages.delete_turn(*created)
        except Exception:  # the request fails anyway; say so in the log, free the slot
            log.exception("could not delete the messages of a refused turn")
        finally:
            with contextlib.suppress(Exception):
                await self._slots.release(context.slot)

    async def _halt_provider(self) -> None:
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


async def _stored() -> bool:
    """Deleted with its conversation, or declared dead: nothing to write."""
    return True


class TurnRegistry:
    """The turns this process is generating, by message id; owned by the app's `Services`.

    Holding the tasks here keeps them referenced until they end (a bare
    `create_task` could be garbage-collected half-way) and gives shutdown one
    place to end them.

    It also writes the checkpoints of all its turns together: every
    `CHAT_CHECKPOINT_MS`, one `bulk_write` (each reply's text if it grew, and
    its lease) beside one `find` (the stop flags and followers' visits, and
    which replies are no longer streaming) — two round trips per interval for
    the whole process, whether it generates one reply or a thousand. The
    stream slots' leases are renewed the same way, every third of the lease.
    """

    def __init__(self, messages: MessageStore, slots: StreamSlots, timings: TurnTimings) -> None:
        self._turns: dict[str, Turn] = {}
        self._messages = messages
        self._slots = slots
        self._timings = timings
        self._loop: asyncio.Task[None] | None = None
        self._slots_renewed = time.monotonic()

    def __len__(self) -> int:
        return len(self._turns)

    def get(self, message_id: str) -> Turn | None:
        return self._turns.get(message_id)

    def start(self, turn: Turn) -> None:
        self._turns[turn.message_id] = turn
        turn.start(on_exit=lambda done: self._turns.pop(done.message_id, None))
        if self._loop is None or self._loop.done():
            self._loop = asyncio.create_task(self._checkpoint_loop(), name="chat-checkpoints")

    def stop_conversation(self, conversation_id: str) -> None:
        """Its conversation was deleted: end its replies here at once (elsewhere, their checkpoints do)."""
        for turn in list(self._turns.values()):
            if turn.context.conversation_id == conversation_id:
                turn.stop("gone")

    async def _checkpoint_loop(self) -> None:
        while self._turns:
            await asyncio.sleep(self._timings.checkpoint_seconds)
            try:
                await self.checkpoint()
            except Exception as error:  # a missed checkpoint; the lease covers several
                log.warning("checkpoint of %d replies failed: %s", len(self._turns), type(error).__name__)

    async def checkpoint(self) -> None:
        """One checkpoint of every reply being generated (see the class docstring)."""
        turns = [turn for turn in self._turns.values() if turn.checkpointing]
        if not turns:
            return
        until = utcnow() + self._timings.lease
        contents = {turn.message_id: turn.checkpoint_content() for turn in turns}
        renew = time.monotonic() - self._slots_renewed >= self._timings.lease.total_seconds() / 3
        results = await self._messages.checkpoint_many(
            {message_id: content for message_id, (content, _) in contents.items()}, until=until
        )
        for turn in turns:
            turn.checkpointed(results.get(turn.message_id), contents[turn.message_id][1])
        if renew:
            # Never past the messages' lease: a dead worker's slots are free once its replies read interrupted.
            await self._slots.renew_many([turn.context.slot for turn in turns], until)
            self._slots_renewed = time.monotonic()

    async def aclose(self, timeout: float = CANCEL_GRACE_SECONDS + 5) -> None:  # noqa: ASYNC109 - a budget
        """At shutdown, before the database closes: every reply still running ends as
        `incomplete` / `interrupted` with its text so far, and its slot is freed."""
        turns = list(self._turns.values())
        for turn in turns:
            turn.stop("interrupted")
        tasks = [turn.task for turn in turns if turn.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        if self._loop is not None:
            self._loop.cancel()


__all__ = [
    "CANCEL_GRACE_SECONDS",
    "Ending",
    "Turn",
    "TurnContext",
    "TurnRegistry",
    "TurnTimings",
    "clean_text",
]
