"""What a client reads: a reply's events, from any position, on any process.

Every event carries an SSE `id:` naming a position in the reply's text:
`<message_id>.<offset>`, where `offset` is the number of characters (Unicode
code points) of the reply the client has once it has read that event. It is
opaque to clients, at most 100 characters of `[A-Za-z0-9._:-]`. Resuming
from an id sends exactly the text after that position, so the tokens before
a cut plus the tokens after it are the reply, with no gap and no duplicate.

- `LiveStream` reads a `Turn` this process is generating, from memory.
- `StoredStream` reads the message document: live on another process's turn
  (polling its checkpoints every `CHAT_CHECKPOINT_MS`, and marking it watched
  so the generating worker knows someone still follows), or a replay of a
  finished reply.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from innova_server import metrics
from innova_server.chatlaya.messages import MessageRecord, MessageStore
from innova_server.chatlaya.sse import Event
from innova_server.chatlaya.turns import Ending, Turn

log = logging.getLogger("innova.chatlaya")

MAX_EVENT_ID = 100
_EVENT_ID = re.compile(r"([0-9a-f]{24})\.(0|[1-9][0-9]{0,9})")


class InvalidEventId(ValueError):
    """The id names no position of this message (malformed, another message's, or past its end)."""


def event_id(message_id: str, offset: int) -> str:
    return f"{message_id}.{offset}"


def parse_event_id(value: str | None, message_id: str) -> int:
    """The offset named by `value` (0 when absent); `InvalidEventId` unless it is one of this message's ids."""
    if value is None or value == "":
        return 0
    match = _EVENT_ID.fullmatch(value)  # never `$`: it would accept a trailing newline
    if match is None or match[1] != message_id:
        raise InvalidEventId(value)
    return int(match[2])


def end_events(message_id: str, offset: int, ending: Ending | MessageRecord) -> list[Event]:
    """`error` (for a failed reply) then `done`, both with the final position's id."""
    position = event_id(message_id, offset)
    done = {"message_id": message_id, "finish_reason": ending.finish_reason or "stop", "usage": ending.usage}
    events = []
    if ending.status == "error" and ending.error:
        events.append(Event("error", ending.error, position))
    events.append(Event("done", done, position))
    return events


class LiveStream:
    """A client attached to a turn of this process; leaving detaches it (generation goes on)."""

    def __init__(self, turn: Turn, offset: int = 0) -> None:
        self._turn = turn
        self._offset = offset
        self._finished = False
        self._closed = False
        turn.attach()

    @property
    def finished(self) -> bool:
        return self._finished

    def first_events(self) -> list[Event]:
        turn = self._turn
        return [Event("start", turn.context.start_payload(), event_id(turn.message_id, self._offset))]

    async def next_events(self, silence_seconds: float) -> list[Event]:
        deadline = asyncio.get_running_loop().time() + silence_seconds
        while True:
            waiter = self._turn.changed  # before reading: a change in between sets it
            events = self._available()
            if events:
                return events
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter.wait()
            except TimeoutError:
                return []

    def _available(self) -> list[Event]:
        turn = self._turn
        events = []
        for text, end in turn.read(self._offset):
            events.append(Event("token", {"text": text}, event_id(turn.message_id, end)))
            self._offset = end
        if turn.ending is not None and self._offset >= turn.length:
            events.extend(end_events(turn.message_id, self._offset, turn.ending))
            self._finished = True
        return events

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._turn.detach()


class StoredStream:
    """A reply read from its document: followed through its checkpoints while it streams, else replayed."""

    def __init__(self, messages: MessageStore, record: MessageRecord, offset: int, poll_seconds: float) -> None:
        self._messages = messages
        self._record = record
        self._offset = offset
        self._poll_seconds = poll_seconds
        self._finished = False
        self._gone = False

    @property
    def finished(self) -> bool:
        return self._finished

    def first_events(self) -> list[Event]:
        record = self._record
        start: dict[str, Any] = {
            "conversation_id": record.conversation_id,
            "user_message_id": record.parent_id,
            "message_id": record.id,
            "provider": record.provider,
            "model": record.model,
        }
        return [Event("start", start, event_id(record.id, self._offset))]

    async def next_events(self, silence_seconds: float) -> list[Event]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + silence_seconds
        while True:
            events = self._available()
            if events:
                return events
            remaining = deadline - loop.time()
            if remaining < self._poll_seconds:
                await asyncio.sleep(max(remaining, 0))
                return []
            await asyncio.sleep(self._poll_seconds)
            await self._refresh()

    def _available(self) -> list[Event]:
        record = self._record
        events = []
        if len(record.content) > self._offset:
            text = record.content[self._offset :]
            self._offset = len(record.content)
            events.append(Event("token", {"text": text}, event_id(record.id, self._offset)))
        if self._gone:  # deleted with its conversation while we followed it
            done = {"message_id": record.id, "finish_reason": "cancelled", "usage": None}
            events.append(Event("done", done, event_id(record.id, self._offset)))
            self._finished = True
        elif not record.streaming:
            events.extend(end_events(record.id, self._offset, record))
            self._finished = True
        return events

    async def _refresh(self) -> None:
        try:
            record = await self._messages.watch(self._record.id)
        except Exception as error:  # the database may come back; the client keeps its position
            log.warning("could not follow reply %s: %s", self._record.id, type(error).__name__)
            return
        if record is None:
            self._gone = True
            return
        if record.lapsed and await self._messages.interrupt(record.id):
            metrics.CHAT_TURN_ENDINGS.labels(record.provider or "unknown", "interrupted").inc()
        self._record = record

    async def close(self) -> None:
        return None


__all__ = [
    "MAX_EVENT_ID",
    "InvalidEventId",
    "LiveStream",
    "StoredStream",
    "end_events",
    "event_id",
    "parse_event_id",
]
