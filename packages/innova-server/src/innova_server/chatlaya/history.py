"""What the provider is sent: the system prompt, the newest messages of the branch that fit, the prompt.

The branch is read newest first, a batch of ids at a time, and reading stops
once the character budget (`CHAT_HISTORY_CHARS`) is spent: a long
conversation costs one round trip, not a read of everything it holds.

The first batch (`HISTORY_BATCH` ids) comes with the conversation itself. When
it does not fill the budget — a long conversation of short messages — the
next batch is sized from the lengths just read, so that one more round trip
usually completes the history rather than one per 24 messages: that round
runs beside the turn's writes and so adds no waiting before the first token.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from innova_server.chat import ChatMessage
from innova_server.chatlaya.messages import MessageRecord

# Ids read with the conversation (the first batch), newest first.
HISTORY_BATCH = 24
# The most ids one later round trip asks for (a bound on one reply's size
# whatever the messages' lengths).
HISTORY_MAX_BATCH = 200


def build_history(
    system_prompt: str, recent_newest_first: Sequence[MessageRecord], content: str, budget_chars: int
) -> list[ChatMessage]:
    """System prompt + the newest earlier messages that fit the budget + the new message.

    The new message is always sent (a message too long for the model is the
    provider's `ContextTooLong` to report); older ones are dropped whole,
    oldest first, never cut in the middle. Replies still streaming, and
    empty ones, are left out.
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


async def read_branch(
    path: Sequence[str],
    prompt: str | None,
    budget_chars: int,
    fetch: Callable[[list[str]], Awaitable[dict[str, MessageRecord]]],
) -> tuple[list[MessageRecord], str]:
    """The messages of `path` newest first, as far as the budget reaches, and the prompt.

    `prompt` None (a regeneration): the last message of `path` is the prompt,
    the user message answered again.
    """
    newest_first: list[MessageRecord] = []
    used = 0
    index = len(path)
    size = HISTORY_BATCH
    while index > 0:
        batch = list(path[max(0, index - size) : index])
        index -= len(batch)
        records = await fetch(batch)
        for message_id in reversed(batch):
            record = records.get(message_id)
            if record is None:
                continue
            if prompt is None:
                prompt = record.content
                continue
            newest_first.append(record)
            used += len(record.content)
        if prompt is not None and used + len(prompt) > budget_chars:
            break
        size = next_batch_size(budget_chars - used - len(prompt or ""), used, len(newest_first))
    return newest_first, prompt or ""


def next_batch_size(remaining_chars: int, used_chars: int, messages_read: int) -> int:
    """Ids to ask for next: enough, at the mean length read so far (and a quarter more), to spend
    `remaining_chars`; between `HISTORY_BATCH` and `HISTORY_MAX_BATCH`."""
    mean = max(1.0, used_chars / messages_read) if messages_read else None
    if mean is None:
        return HISTORY_BATCH
    wanted = int(remaining_chars * 1.25 / mean) + 1
    return max(HISTORY_BATCH, min(HISTORY_MAX_BATCH, wanted))


class Prefetched:
    """A `fetch` for `read_branch` that answers first from messages read beforehand.

    A turn reads its conversation and the messages of the branch's last
    `HISTORY_BATCH` ids together (`ConversationStore.with_recent`); the
    history is then usually complete without another round trip. Ids it
    looked up and did not find are known absent; only others are fetched.
    """

    def __init__(
        self,
        looked_up: Sequence[str],
        found: dict[str, MessageRecord],
        fetch: Callable[[list[str]], Awaitable[dict[str, MessageRecord]]],
    ) -> None:
        self._looked_up = set(looked_up)
        self._found = found
        self._fetch = fetch

    async def __call__(self, message_ids: list[str]) -> dict[str, MessageRecord]:
        records = {m: self._found[m] for m in message_ids if m in self._found}
        missing = [m for m in message_ids if m not in self._looked_up]
        if missing:
            records.update(await self._fetch(missing))
        return records


__all__ = ["HISTORY_BATCH", "HISTORY_MAX_BATCH", "Prefetched", "build_history", "next_batch_size", "read_branch"]
