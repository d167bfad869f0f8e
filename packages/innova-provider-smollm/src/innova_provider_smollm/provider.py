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
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Generic, Literal, TypeVar, cast

from innova_provider_smollm.model import LlamaOptions, LocalModel, ModelFileError, Piece, load_model
from innova_server.chat import (
    ChatChunk,
    ChatRequest,
    ProviderBusy,
    ProviderError,
    ProviderUnavailable,
)

log = logging.getLogger("innova.smollm")

LoadWhen = Literal["startup", "lazy"]
T = TypeVar("T")


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


_DONE = object()


class LockstepThread(Generic[T]):
    """A blocking iterator in its own thread, advanced one item at a time, when asked (pull, not push).

    Why not `innova_server.chat.iterate_in_thread`, which lets the thread run
    ahead to the next item while the event loop handles the previous one: when
    llama.cpp uses every core, the event loop's per-token work (the SSE write,
    the client's socket) then runs *during* the next token's computation and
    steals a core from llama.cpp's synchronised threads — about 25% of the
    tokens/s on a 2-core machine. In lockstep the model waits while the loop
    works (tens of microseconds per token) and the loop waits while the model
    works. Closing (`stop`) takes effect before the next item: the thread
    finishes the current one, closes the iterator, and calls `on_exit`.
    """

    def __init__(self, make_iterator: Callable[[], Iterator[T]], *, on_exit: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._make_iterator = make_iterator
        self._on_exit = on_exit
        self._requests: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._waiter: asyncio.Future[tuple[object, BaseException | None]] | None = None
        threading.Thread(target=self._run, name="innova-smollm", daemon=True).start()

    def _run(self) -> None:
        iterator: Iterator[T] | None = None
        final: tuple[object, BaseException | None] | None = None
        try:
            while self._requests.get():
                try:
                    if iterator is None:
                        iterator = self._make_iterator()
                    item: object = next(iterator)
                except StopIteration:
                    final = (_DONE, None)
                    return
                except BaseException as error:
                    final = (_DONE, error)
                    return
                self._reply(item, None)
        finally:
            try:
                close = getattr(iterator, "close", None)
                if close is not None:
                    with contextlib.suppress(Exception):
                        close()
            finally:
                # `on_exit` first: whoever reads the end finds the slot already released.
                self._on_exit()
                if final is not None:
                    self._reply(*final)

    def _reply(self, item: object, error: BaseException | None) -> None:
        waiter = self._waiter

        def settle() -> None:
            if waiter is not None and not waiter.done():  # a cancelled reader no longer waits
                waiter.set_result((item, error))

        with contextlib.suppress(RuntimeError):  # the loop is gone
            self._loop.call_soon_threadsafe(settle)

    async def next(self) -> T | None:
        """The next item; None at the end; the iterator's exception, unchanged."""
        self._waiter = self._loop.create_future()
        self._requests.put(True)
        item, error = await self._waiter
        if error is not None:
            raise error
        return None if item is _DONE else cast(T, item)

    def stop(self) -> None:
        self._requests.put(False)


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

    def _retry_after(self) -> float:
        return float(max(1, math.ceil(self._seconds_per_reply * (self._slot.waiting + 1))))

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        if self._closed:
            raise ProviderUnavailable(message="The local model has been shut down.")
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
            model = self._model_in_thread()
            prompt = model.prompt(request.messages, request.max_tokens)
            yield from model.generate(prompt, temperature=request.temperature, should_stop=self._closing.is_set)

        try:
            if self._closed:
                raise ProviderUnavailable(message="The local model has been shut down.")
            runner = LockstepThread(work, on_exit=release_from_thread)  # from here the thread owns the slot
        except BaseException:
            self._slot.release()
            raise
        try:
            while (piece := await runner.next()) is not None:
                if piece.text or piece.finish_reason:
                    yield ChatChunk(text=piece.text, finish_reason=piece.finish_reason, usage=piece.usage)
        except ProviderError:
            raise
        except Exception as exc:  # llama.cpp failures: a documented error, the cause in the log
            log.exception("local model failed")
            raise ProviderUnavailable(message=f"The local model failed: {type(exc).__name__}.") from exc
        finally:
            runner.stop()  # closed or cancelled: the thread stops before the next token

    async def aclose(self) -> None:
        """Stop the running generation between two tokens, wait for its thread to leave the model, free it."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        await self._slot.acquire()
        try:
            model, self._model = self._model, None
            if model is not None:
                await asyncio.to_thread(model.close)
        finally:
            self._slot.release()
