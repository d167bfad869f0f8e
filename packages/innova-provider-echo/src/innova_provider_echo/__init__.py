"""PROVIDER=echo: streams the last user message back, word by word.

Useful for development, demos and tests: no model, no network, and the reply
is exactly the question (whitespace, newlines and emoji included).
`ECHO_DELAY_MS` spaces the chunks, to watch a stream arrive. Written with the
plugin SDK (`innova_server.sdk`) only: it is the example to copy.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

from pydantic import Field

from innova_server.sdk import ChatChunk, ChatRequest, PluginSettings, Provider, RegisterProvider, Usage, hookimpl

# Split before every word that follows whitespace: the pieces concatenate
# back to the exact input.
_WORD_START = re.compile(r"(?<=\s)(?=\S)")


class EchoSettings(PluginSettings):
    echo_delay_ms: int = Field(default=0, ge=0, le=60_000)


def split_words(text: str) -> list[str]:
    return [piece for piece in _WORD_START.split(text) if piece]


class EchoProvider(Provider):
    """Registered as its own factory: built with no argument, it reads `ECHO_DELAY_MS`
    (a bad value is one clear startup line)."""

    def __init__(self, delay_ms: int | None = None) -> None:
        self.delay = (EchoSettings.load().echo_delay_ms if delay_ms is None else delay_ms) / 1000

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk | str]:
        pieces = split_words(request.last_user_text)
        for index, piece in enumerate(pieces):
            if self.delay and index:
                await asyncio.sleep(self.delay)  # closing the stream stops it here
            yield piece
        prompt_tokens = sum(len(split_words(m.content)) for m in request.messages)
        yield ChatChunk(finish_reason="stop", usage=Usage(prompt_tokens, len(pieces)))


@hookimpl
def innova_register_providers(register: RegisterProvider) -> None:
    register("echo", EchoProvider, models=("echo",), default_model="echo")
