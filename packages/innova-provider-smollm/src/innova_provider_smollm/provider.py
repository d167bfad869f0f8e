"""The provider: one model per process, `SMOLLM_PARALLEL` replies at a time, a bounded FIFO queue in front.

`SMOLLM_PARALLEL=1` is the original design: a `Llama` object keeps one KV
cache and is not safe for concurrent calls, so a request holds the one slot
for its whole stream and its tokens come from `Llama.generate` in a worker
thread, in lockstep with the stream. With N > 1, the model's batch engine
(`engine.py`) decodes up to N sequences together in one thread: generating
a token on a CPU is bound by reading the weights, and one batched step reads
them once for all N. Either way, beyond the running ones, requests wait in
arrival order; past `SMOLLM_MAX_QUEUE` waiting, a newcomer gets
`ProviderBusy` at once (the core answers 503 `provider_busy` with
`Retry-After`, before the stream opens). A running generation is never
interrupted by a newcomer.

A slot is released by the thread that used the model, after its last call
into llama.cpp for that reply (with N > 1: once the sequence has left the
batch): releasing it from the event loop when the client leaves could start
the next generation while the old one is still inside the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from pathlib import Path
from typing import Literal

from innova_provider_smollm.engine import BatchEngine, Delivery, EngineClosed
from innova_provider_smollm.model import LlamaOptions, LocalModel, ModelFileError, Piece, Prompt, load_model
from innova_provider_smollm.slots import FifoSlots
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
SHUT_DOWN = "The local model has been shut down."


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
        self._slot = FifoSlots(options.parallel)
        self._model: LocalModel | None = None
        self._engine: BatchEngine | None = None
        self._loading = threading.Lock()  # one lazy load, whichever path asks first
        self._closed = False
        self._closing = threading.Event()
        # Prompts being built outside the slot (see `stream`): `aclose` waits
        # for them before freeing the model they read.
        self._preparing = 0
        self._prepared = threading.Condition()
        # Seconds a generation takes, for Retry-After; learnt as replies finish.
        self._seconds_per_reply = 5.0
        if load == "startup":
            self._load()  # raises ModelFileError: the process does not start

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def parallel(self) -> int:
        """Replies generated at once (`SMOLLM_PARALLEL`)."""
        return self.options.parallel

    @property
    def queued(self) -> int:
        """Requests waiting behind the running ones."""
        return self._slot.waiting

    @property
    def running(self) -> int:
        """Requests holding a slot (generating, or about to)."""
        return self._slot.in_use

    @property
    def reused_tokens(self) -> int:
        """With N > 1: prompt tokens taken from cells kept from earlier replies, not evaluated again (so far)."""
        engine = self._engine
        return engine.reused_tokens if engine is not None else 0

    def _load(self) -> LocalModel:
        """Load the model (and, with N > 1, start its batch engine) once; blocks."""
        with self._loading:
            if self._model is None:
                model = load_model(self.path, self.options)
                if self.parallel > 1:
                    try:
                        self._engine = BatchEngine(
                            model, sequences=self.parallel, prompt_chunk=self.options.prompt_chunk
                        )
                    except BaseException:
                        model.close()
                        raise
                self._model = model
            return self._model

    def _model_in_thread(self) -> LocalModel:
        """The model, loaded here on first use with `SMOLLM_LOAD=lazy` (under a slot: loaded once)."""
        if self._model is not None:
            return self._model
        started = time.monotonic()
        try:
            model = self._load()
        except ModelFileError as exc:
            raise ProviderUnavailable(message=f"The local model could not be loaded: {exc}") from exc
        log.info("local model %s loaded in %.1f s", self.path.name, time.monotonic() - started)
        return model

    def _prepare(self, model: LocalModel, request: ChatRequest) -> Prompt:
        """The prompt, built in a thread without a slot; counted until the thread is done with the model."""
        with self._prepared:
            self._preparing += 1
        try:
            if self._closing.is_set():
                raise ProviderUnavailable(message=SHUT_DOWN)
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
        rounds = math.ceil((self._slot.waiting + 1) / self.parallel)
        return float(max(1, math.ceil(self._seconds_per_reply * rounds)))

    def _released(self, started: float) -> None:
        """On the loop, when a reply's thread is done with the model: learn its duration, hand the slot on."""
        self._seconds_per_reply = 0.8 * self._seconds_per_reply + 0.2 * (time.monotonic() - started)
        self._slot.release()

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        if self._closed:
            raise ProviderUnavailable(message=SHUT_DOWN)
        # The prompt first, before queueing: a message too long for the window
        # is a 413 at once, not after minutes in the queue (by then the core has
        # opened the stream and could only send an `error` event). Rendering
        # and tokenizing read only the template and the vocabulary, never the
        # context a running generation uses, so they need no slot; in a thread,
        # as they take milliseconds. With SMOLLM_LOAD=lazy before the first
        # load there is no tokenizer yet: it is built once a slot is held.
        model = self._model
        prompt: Prompt | None = None
        if model is not None:
            prompt = await asyncio.to_thread(self._prepare, model, request)
            if self._closing.is_set():  # shut down meanwhile
                raise ProviderUnavailable(message=SHUT_DOWN)
        # No await between this check and the acquire: concurrent newcomers
        # cannot all pass a check made before any of them queued.
        if self._slot.full and self._slot.waiting >= self.max_queue:
            raise ProviderBusy(
                message=f"The local model is busy ({self._slot.waiting} requests waiting); try again shortly.",
                retry_after=self._retry_after(),
            )
        await self._slot.acquire()
        if self._closing.is_set():  # shut down while we waited
            self._slot.release()
            raise ProviderUnavailable(message=SHUT_DOWN)
        try:
            if self.parallel == 1:
                replies = self._generate_alone(model, prompt, request)
            else:
                replies = self._generate_batched(model, prompt, request)
            async with contextlib.aclosing(replies) as pieces:
                async for piece in pieces:
                    if piece.text or piece.finish_reason:
                        yield ChatChunk(text=piece.text, finish_reason=piece.finish_reason, usage=piece.usage)
        except ProviderError:
            raise
        except EngineClosed as exc:
            raise ProviderUnavailable(message=SHUT_DOWN) from exc
        except Exception as exc:  # llama.cpp failures: a documented error, the cause in the log
            log.exception("local model failed")
            raise ProviderUnavailable(message=f"The local model failed: {type(exc).__name__}.") from exc

    async def _generate_alone(
        self, model: LocalModel | None, prompt: Prompt | None, request: ChatRequest
    ) -> AsyncGenerator[Piece, None]:
        """`SMOLLM_PARALLEL=1`: `Llama.generate` in a worker thread that owns the slot until its last call."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()

        def release_from_thread() -> None:
            # Called by the worker thread after its last llama.cpp call,
            # whether the reply ended, failed or was abandoned.
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits for the slot
                loop.call_soon_threadsafe(self._released, started)

        def work() -> Iterator[Piece]:
            current = self._model_in_thread()
            ready = prompt if current is model else None
            ready = ready or current.prompt(request.messages, request.max_tokens)
            yield from current.generate(ready, temperature=request.temperature, should_stop=self._closing.is_set)

        # Lockstep (the helper's default): the thread computes a token only
        # when the stream asks, so the loop's per-token work never runs during
        # llama.cpp's (≈ 25% of tokens/s on 2 cores otherwise). From the first
        # step of `pieces` on — no await before it — the thread owns the slot
        # and releases it (`on_exit`) after its last call into the model.
        pieces = iterate_in_thread(work, on_exit=release_from_thread)
        try:
            async for piece in pieces:
                yield piece
        finally:
            await pieces.aclose()  # closed or cancelled: the thread stops before the next token

    async def _generate_batched(
        self, model: LocalModel | None, prompt: Prompt | None, request: ChatRequest
    ) -> AsyncGenerator[Piece, None]:
        """`SMOLLM_PARALLEL` > 1: the sequence joins the engine's running batch; its pieces come back here."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        released = False

        def release_from_thread() -> None:
            nonlocal released
            released = True
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._released, started)

        try:
            if model is None or prompt is None:  # SMOLLM_LOAD=lazy: the first request loads (in a thread)
                async for model in iterate_in_thread(lambda: iter((self._model_in_thread(),))):
                    prompt = await asyncio.to_thread(self._prepare, model, request)
            engine = self._engine
            if engine is None or prompt is None:
                raise ProviderUnavailable(message=SHUT_DOWN)
        except BaseException:
            self._slot.release()
            raise
        queue: asyncio.Queue[Delivery] = asyncio.Queue()

        def deliver(item: Delivery) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, item)

        # From here the engine owns the slot: it calls `release_from_thread`
        # once the sequence has left the batch.
        ticket = engine.submit(prompt, request.temperature, deliver, release_from_thread)
        try:
            while True:
                ticket.want()  # lockstep: the sequence advances one token per piece read
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            if not released:
                ticket.cancel()  # closed or cancelled: it leaves the batch before the next step

    async def aclose(self) -> None:
        """Stop the running generations between two tokens, wait for their thread to leave the model, free it."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        engine = self._engine
        holding = engine is None
        if holding:  # SMOLLM_PARALLEL=1 (or not loaded yet): the running reply's thread leaves the model first
            await self._slot.acquire()
        try:
            if engine is not None:
                await asyncio.to_thread(engine.close)  # every sequence ends (`cancelled`), the thread is joined
            await asyncio.to_thread(self._wait_for_prompts)  # they read the model we are about to free
            await asyncio.to_thread(self._loading.acquire)  # a lazy load under way finishes first
            try:
                model, late_engine = self._model, self._engine
                self._model = self._engine = None
            finally:
                self._loading.release()
            if late_engine is not None and late_engine is not engine:  # started by that lazy load
                await asyncio.to_thread(late_engine.close)
            if model is not None:
                await asyncio.to_thread(model.close)
        finally:
            if holding:
                self._slot.release()
