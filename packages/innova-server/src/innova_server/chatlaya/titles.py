"""`CHAT_TITLES=model`: a conversation's title written by the model, in the background.

After the first reply of a conversation completes, the provider is asked for
a short title. It never delays that reply's `done` (it starts after it), is
bounded by `CHAT_TITLE_TIMEOUT_SECONDS`, and on any failure the first-message
title simply stays. It replaces only the automatic title it was made for, in
one conditional update: a title the user set in the meantime always wins.

A title must not make a person wait. A local model serves few generations at
once (one with `SMOLLM_PARALLEL=1`): a title asked while replies are being
generated in this process would queue before the next person's reply. So the
title waits until this process generates no reply, and is skipped if that
does not happen within the timeout (the first-message title stays). With a
cloud provider the wait is usually nil.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable

from innova_server import metrics
from innova_server.chat import ChatChunk, ChatMessage, ChatProvider, ChatRequest
from innova_server.chatlaya.store import ConversationStore, make_title
from innova_server.chatlaya.turns import Turn, clean_text

log = logging.getLogger("innova.chatlaya")

TITLE_MAX_CHARS = 60
TITLE_PROMPT = (
    "Donne un titre très court (six mots au plus) à cette conversation, dans sa langue. "
    "Réponds uniquement par le titre, sans guillemets ni ponctuation finale."
)
# How much of the exchange the model is shown.
EXCERPT_CHARS = 2000
IDLE_POLL_SECONDS = 0.25


def clean_title(raw: str) -> str:
    """The model's answer as a title: its first line, unquoted, at most 60 characters."""
    line = next((part for part in raw.strip().splitlines() if part.strip()), "")
    line = re.sub(r"^\s*(titre|title)\s*:\s*", "", line, flags=re.IGNORECASE)
    line = line.strip().strip("\"'«»“”*#").strip()
    return make_title(line, TITLE_MAX_CHARS) if line else ""


class TitleWriter:
    def __init__(
        self,
        provider: ChatProvider,
        model: str,
        conversations: ConversationStore,
        *,
        timeout_seconds: float,
        busy: Callable[[], bool],
    ) -> None:
        self._provider = provider
        self._model = model
        self._conversations = conversations
        self._timeout = timeout_seconds
        self._busy = busy

    async def after(self, turn: Turn, question: str, first_title: str | None) -> None:
        """Once `turn` has completed, title its conversation (in a background task; never raises)."""
        task = turn.task
        if task is not None:
            await asyncio.shield(task)
        if turn.ending is None or turn.ending.status != "complete":
            return
        outcome = "failed"
        try:
            async with asyncio.timeout(self._timeout):
                while self._busy():  # noqa: ASYNC110 - the registry has no event to wait on, by design
                    await asyncio.sleep(IDLE_POLL_SECONDS)
                title = clean_title(await self._ask(question, turn.text()))
            if title and await self._conversations.set_generated_title(
                turn.context.conversation_id, title, replaces=first_title
            ):
                outcome = "set"
            else:
                outcome = "kept"
        except TimeoutError:
            outcome = "timeout"
        except Exception as error:  # a provider failure: the first-message title stays
            log.info("no model title for %s: %s", turn.context.conversation_id, type(error).__name__)
        finally:
            metrics.CHAT_TITLES.labels(outcome).inc()

    async def _ask(self, question: str, answer: str) -> str:
        request = ChatRequest(
            messages=[
                ChatMessage("system", TITLE_PROMPT),
                ChatMessage("user", f"{question[:EXCERPT_CHARS]}\n\n---\n\n{answer[:EXCERPT_CHARS]}"),
            ],
            model=self._model,
            max_tokens=24,
            temperature=0.2,
        )
        parts: list[str] = []
        stream = self._provider.stream(request)
        try:
            async for chunk in stream:
                text = chunk if isinstance(chunk, str) else chunk.text if isinstance(chunk, ChatChunk) else ""
                parts.append(clean_text(text))
                if sum(map(len, parts)) > 4 * TITLE_MAX_CHARS:
                    break
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        return "".join(parts)


__all__ = ["TitleWriter", "clean_title"]
