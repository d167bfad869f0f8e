"""Chat providers for tests, and the plugin that registers one.

`ScriptedProvider` says what it is told and then ends, or fails: enough to
drive a turn through every ending without a model. Each call of `stream()`
plays the next queued `Script` (`then(...)` queues one), or the default one
given to the constructor once the queue is empty::

    provider = ScriptedProvider(["a ", "b"])                  # every reply: "a b"
    provider.then(["un "], error=ProviderUnavailable())      # the next reply fails after "un "
    provider.then(error=ProviderUnavailable())               # the one after fails before any text
    provider.then(["lent"], first_delay=2.0)                 # silence first (pings)
    gate = threading.Event()
    provider.then(["avant "], hold=gate, after=["après"])    # waits until the test sets `gate`
    provider.then(forever=True, delay=0.05)                  # counts "w0 w1 ..." until closed

It records what it was asked (`requests`) and how its streams ended
(`started`, `closed_early`), with thread-safe events, since the server under
test runs in another thread. `ProviderPlugin` registers any provider object
under a name; use it with `registered()`::

    with registered(ProviderPlugin("scripted", ScriptedProvider(["a ", "b"]))):
        server = start_server(provider="scripted")
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from innova_server.chat import ChatChunk, ChatProvider, ChatRequest, FinishReason, Provider, Usage
from innova_server.hookspecs import RegisterProvider, hookimpl


@dataclass(frozen=True)
class Script:
    """One reply: `pieces` (each `delay` s apart, the first after `first_delay` s); then, if
    `hold` is given, a wait until it is set and the `after` pieces; then `error` is raised, or
    the reply ends with `finish_reason` and `usage`. `forever`: after the pieces, count words
    (`w0 `, `w1 `...) every `delay` s (at least 10 ms) until the stream is closed."""

    pieces: Sequence[str] = ()
    error: Exception | None = None
    delay: float = 0.0
    first_delay: float = 0.0
    hold: threading.Event | None = None
    after: Sequence[str] = ()
    forever: bool = False
    finish_reason: FinishReason = "stop"
    usage: Usage | None = None


class ScriptedProvider(Provider):
    def __init__(
        self,
        pieces: Sequence[str] = ("ok",),
        *,
        error: Exception | None = None,
        delay: float = 0.0,
        first_delay: float = 0.0,
        forever: bool = False,
        finish_reason: FinishReason = "stop",
        usage: Usage | None = None,
    ) -> None:
        self.default = Script(
            list(pieces), error, delay, first_delay, forever=forever, finish_reason=finish_reason, usage=usage
        )
        self.queue: deque[Script] = deque()
        self.requests: list[ChatRequest] = []
        self.started = threading.Event()  # set when a stream starts
        self.closed_early = threading.Event()  # set when a stream is closed before its end
        self.streams_closed_early = 0

    # The first version's attributes, read by existing tests.
    @property
    def pieces(self) -> list[str]:
        return list(self.default.pieces)

    @property
    def error(self) -> Exception | None:
        return self.default.error

    def then(self, pieces: Sequence[str] = (), **options: Any) -> ScriptedProvider:
        """Queue one reply (see `Script` for the options); returns self, to chain."""
        self.queue.append(Script(list(pieces), **options))
        return self

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk | str]:
        script = self.queue.popleft() if self.queue else self.default
        self.requests.append(request)
        self.started.set()
        finished = False
        try:
            if script.first_delay:
                await asyncio.sleep(script.first_delay)
            for index, piece in enumerate(script.pieces):
                if script.delay and index:
                    await asyncio.sleep(script.delay)
                yield piece
            if script.hold is not None:
                while not script.hold.is_set():  # noqa: ASYNC110 - set from the test's thread
                    await asyncio.sleep(0.01)
                for piece in script.after:
                    yield piece
            count = 0
            while script.forever:
                await asyncio.sleep(max(script.delay, 0.01))
                yield f"w{count} "
                count += 1
            finished = True
            if script.error is not None:
                raise script.error
            yield ChatChunk(finish_reason=script.finish_reason, usage=script.usage)
        finally:
            if not finished:
                self.streams_closed_early += 1
                self.closed_early.set()


class ProviderPlugin:
    """A plugin registering `provider` (one object, shared by every request) as `name`;
    or, given `factory`, a new provider from it each time the server starts."""

    def __init__(
        self,
        name: str,
        provider: ChatProvider | Provider | None = None,
        models: Sequence[str] = ("m1",),
        *,
        factory: Callable[[], ChatProvider | Provider] | None = None,
    ) -> None:
        if factory is None:
            if provider is None:
                raise TypeError("give a provider or a factory")
            shared = provider
            factory = lambda: shared  # noqa: E731
        self.name = name
        self.factory = factory
        self.models = tuple(models)

    @hookimpl
    def innova_register_providers(self, register: RegisterProvider) -> None:
        register(self.name, self.factory, models=self.models, default_model=self.models[0])


__all__ = ["ProviderPlugin", "Script", "ScriptedProvider"]
