"""PROVIDER=echo: streams the last user message back, word by word.

Useful for development, demos and tests: no model, no network, and the reply
is exactly the question (whitespace, newlines and emoji included).
`ECHO_DELAY_MS` spaces the chunks, to watch a stream arrive.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

from pydantic import Field

from innova_server.chat import ChatChunk, ChatRequest, Usage
from innova_server.plugins import RegisterProvider, hookimpl
from innova_server.settings import PluginSettings, Settings

# Split before every word that follows whitespace: the pieces concatenate
# back to the exact input.
_WORD_START = re.compile(r"(?<=\s)(?=\S)")


class EchoSettings(PluginSettings):
    echo_delay_ms: int = Field(default=0, ge=0, le=60_000)


def split_words(text: str) -> list[str]:
    return [piece for piece in _WORD_START.split(text) if piece]


class EchoProvider:
    def __init__(self, delay_ms: int = 0) -> None:
        self.delay = delay_ms / 1000

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        last_user = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
        pieces = split_words(last_user)
        for index, piece in enumerate(pieces):
            if self.delay and index:
                await asyncio.sleep(self.delay)
            yield ChatChunk(text=piece)
        prompt_tokens = sum(len(split_words(m.content)) for m in request.messages)
        yield ChatChunk(finish_reason="stop", usage=Usage(prompt_tokens, len(pieces)))

    async def aclose(self) -> None:
        return None


def make_echo(settings: Settings) -> EchoProvider:
    return EchoProvider(EchoSettings.load().echo_delay_ms)


@hookimpl
def innova_register_providers(register: RegisterProvider) -> None:
    register("echo", make_echo, models=("echo",), default_model="echo")
