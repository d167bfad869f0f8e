"""Chat providers for tests, and the plugin that registers one.

`ScriptedProvider` says what it is told (text pieces, optionally spaced by
`delay` seconds) and then ends, or fails with `error`: enough to drive a turn
through every ending without a model. `ProviderPlugin` registers any
provider object under a name; use it with `registered()`:

    with registered(ProviderPlugin("scripted", ScriptedProvider(["a ", "b"]))):
        server = start_server(provider="scripted")
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from innova_server.chat import ChatChunk, ChatProvider, ChatRequest, Usage
from innova_server.plugins import RegisterProvider, hookimpl


class ScriptedProvider:
    def __init__(
        self,
        pieces: Sequence[str],
        *,
        error: Exception | None = None,
        delay: float = 0.0,
        usage: Usage | None = None,
    ) -> None:
        self.pieces = list(pieces)
        self.error = error
        self.delay = delay
        self.usage = usage
        self.requests: list[ChatRequest] = []

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        self.requests.append(request)
        for index, piece in enumerate(self.pieces):
            if self.delay and index:
                await asyncio.sleep(self.delay)
            yield ChatChunk(text=piece)
        if self.error is not None:
            raise self.error
        yield ChatChunk(finish_reason="stop", usage=self.usage)

    async def aclose(self) -> None:
        return None


class ProviderPlugin:
    """A plugin registering `provider` (one object, shared by every request) as `name`."""

    def __init__(self, name: str, provider: ChatProvider, models: Sequence[str] = ("m1",)) -> None:
        self.name = name
        self.provider = provider
        self.models = tuple(models)

    @hookimpl
    def innova_register_providers(self, register: RegisterProvider) -> None:
        register(self.name, lambda settings: self.provider, models=self.models, default_model=self.models[0])


__all__ = ["ProviderPlugin", "ScriptedProvider"]
