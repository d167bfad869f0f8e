"""The provider: one model per process, one generation at a time, a bounded FIFO queue in front.

Why one slot: a `Llama` object keeps one KV cache and is not safe for
concurrent calls, and on a CPU two interleaved generations would each run at
half speed anyway. So a request holds the slot for its whole stream; the
others wait in arrival order; past `SMOLLM_MAX_QUEUE` waiting, a newcomer gets
`ProviderBusy` at once (the core answers 503 `provider_busy` with
`Retry-After`, before the stream opens). A running generation is never
interrupted by a newcomer.

The slot is released by the worker thread itself, after its last call into
llama.cpp: releasing it from the event loop when the client leaves could
start the next generation while the old thread is still inside the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Literal

from innova_provider_smollm.model import LlamaOptions, LocalModel, ModelFileError, Piece, Prompt, load_model
from innova_server.chat import (
    ChatChunk,
    ChatRequest,
    ProviderBusy,
    ProviderError,
    ProviderUnavailable,
    iterate_in_thread,
)

log = logging.getLogger("innova.smollm")

LoadWhen = Literal["startup", "lazy"]


class FifoSlot:
    """An asyncio lock that is strictly first-come first-served and tells how many are waiting.

    Release hands the slot straight to the oldest waiter, so a newcomer can
    never overtake the queue between a release and the waiter waking up.
    """

    def __init__(self) -> None:
        self._held = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def held(self) -> bool:
        return self._held

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    async def acquire(self) -> None:
        if not self._held and not self._waiters:
            self._held = True
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed to us just as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # still held: handed over
                return
        self._held = False


class SmolLMProvider:
    """`PROVIDER=local`: a GGUF chat model in this process, through llama-cpp-python."""

    def __init__(
        self,
        path: Path,
        options: LlamaOptions,
        *,
        name: str | None = None,
        load: LoadWhen = "startup",
        max_queue: int = 4,
    ) -> None:
        self.path = path
        self.name = name or path.stem
        self.options = options
        self.max_queue = max_queue
        self._slot = FifoSlot()
        self._model: LocalModel | None = None
        self._closed = False
        self._closing = threading.Event()
        # Prompts being built outside the slot (see `stream`): `aclose` waits
        # for them before freeing the model they read.
        self._preparing = 0
        self._prepared = threading.Condition()
        # Seconds a generation takes, for Retry-After; learnt as replies finish.
        self._seconds_per_reply = 5.0
        if load == "startup":
            self._model = load_model(path, options)  # raises ModelFileError: the process does not start

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def queued(self) -> int:
        """Requests waiting behind the running one."""
        return self._slot.waiting

    def _model_in_thread(self) -> LocalModel:
        """The model, loaded here on first use with `SMOLLM_LOAD=lazy` (under the slot: loaded once)."""
        if self._model is None:
            started = time.monotonic()
            try:
                self._model = load_model(self.path, self.options)
            except ModelFileError as exc:
                raise ProviderUnavailable(message=f"The local model could not be loaded: {exc}") from exc
            log.info("local model %s loaded in %.1f s", self.path.name, time.monotonic() - started)
        return self._model

    def _prepare(self, model: LocalModel, request: ChatRequest) -> Prompt:
        """The prompt, built in a thread without the slot; counted until the thread is done with the model."""
        with self._prepared:
            self._preparing += 1
        try:
            if self._closing.is_set():
                raise ProviderUnavailable(message="The local model has been shut down.")
            return model.prompt(request.messages, request.max_tokens)
        finally:
            with self._prepared:
                self._preparing -= 1
                self._prepared.notify_all()

    def _wait_for_prompts(self) -> None:
        """Block until no prompt is being built (`aclose`, in a thread: they take milliseconds)."""
        with self._prepared:
            self._prepared.wait_for(lambda: self._preparing == 0)

    def _retry_after(self) -> float:
        return float(max(1, math.ceil(self._seconds_per_reply * (self._slot.waiting + 1))))

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        if self._closed:
            raise ProviderUnavailable(message="The local model has been shut down.")
        # The prompt first, before queueing: a message too long for the window
        # is a 413 at once, not after minutes in the queue (by then the core has
        # opened the stream and could only send an `error` event). Rendering
        # and tokenizing read only the template and the vocabulary, never the
        # context a running generation uses, so they need no slot; in a thread,
        # as they take milliseconds. With SMOLLM_LOAD=lazy before the first
        # load there is no tokenizer yet: the thread builds it under the slot.
        model = self._model
        prompt: Prompt | None = None
        if model is not None:
            prompt = await asyncio.to_thread(self._prepare, model, request)
            if self._closing.is_set():  # shut down meanwhile
                raise ProviderUnavailable(message="The local model has been shut down.")
        # No await between this check and the acquire: concurrent newcomers
        # cannot all pass a check made before any of them queued.
        if self._slot.held and self._slot.waiting >= self.max_queue:
            raise ProviderBusy(
                message=f"The local model is busy ({self._slot.waiting} requests waiting); try again shortly.",
                retry_after=self._retry_after(),
            )
        await self._slot.acquire()
        loop = asyncio.get_running_loop()
        started = time.monotonic()

        def release() -> None:
            self._seconds_per_reply = 0.8 * self._seconds_per_reply + 0.2 * (time.monotonic() - started)
            self._slot.release()

        def release_from_thread() -> None:
            # Called by the worker thread after its last llama.cpp call,
            # whether the reply ended, failed or was abandoned.
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits for the slot
                loop.call_soon_threadsafe(release)

        def work() -> Iterator[Piece]:
            current = self._model_in_thread()
            ready = prompt if current is model else None
            ready = ready or current.prompt(request.messages, request.max_tokens)
            yield from current.generate(ready, temperature=request.temperature, should_stop=self._closing.is_set)

        if self._closing.is_set():  # shut down while we waited
            self._slot.release()
            raise ProviderUnavailable(message="The local model has been shut down.")
        # Lockstep (the helper's default): the thread computes a token only
        # when the stream asks, so the loop's per-token work never runs during
        # llama.cpp's (≈ 25% of tokens/s on 2 cores otherwise). From the first
        # step of `pieces` on — no await before it — the thread owns the slot
        # and releases it (`on_exit`) after its last call into the model.
        pieces = iterate_in_thread(work, on_exit=release_from_thread)
        try:
            async for piece in pieces:
                if piece.text or piece.finish_reason:
                    yield ChatChunk(text=piece.text, finish_reason=piece.finish_reason, usage=piece.usage)
        except ProviderError:
            raise
        except Exception as exc:  # llama.cpp failures: a documented error, the cause in the log
            log.exception("local model failed")
            raise ProviderUnavailable(message=f"The local model failed: {type(exc).__name__}.") from exc
        finally:
            await pieces.aclose()  # closed or cancelled: the thread stops before the next token

    async def aclose(self) -> None:
        """Stop the running generation between two tokens, wait for its thread to leave the model, free it."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        await self._slot.acquire()
        try:
            await asyncio.to_thread(self._wait_for_prompts)  # they read the model we are about to free
            model, self._model = self._model, None
            if model is not None:
                await asyncio.to_thread(model.close)
        finally:
            self._slot.release()
