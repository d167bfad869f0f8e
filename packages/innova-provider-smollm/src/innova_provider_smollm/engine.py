"""Continuous batching: one decode loop per model, in its own thread, serving up to N sequences at once.

Why: generating a token on a CPU is bound by reading the weights; one
`llama_decode` over N sequences reads them once for all N, so N replies cost
little more than one. Requests join the running batch between two steps (a
newcomer never waits for the others to finish) and leave it when done,
stopped or cancelled, their KV cells freed at once.

One step of the loop:

1. admit waiting sequences into free sequence ids; drop cancelled ones;
2. wait, briefly, until every generating sequence's reader has asked for its
   next token (lockstep, as `iterate_in_thread` does for one stream: the
   event loop's per-token work then never runs during llama.cpp's, which on
   2 cores costs about a quarter of the speed). A reader that is late by more
   than half a step is left out of this step, not waited for;
3. one batch: the last sampled token of each ready sequence, and up to
   `prompt_chunk` prompt tokens of newcomers (a whole `n_batch` when nobody is
   generating), so a long prompt never freezes the other streams for its
   whole length;
4. `llama_decode`, then each sequence samples from its own logits with its
   own sampler (temperature, max_tokens are per request), and the text is
   handed to its reader.

Sequence ids are given lowest-free first and the batch is ordered by id:
llama.cpp evaluates a batch whose per-sequence KV streams are consecutive ids
in one pass.
"""

from __future__ import annotations

import codecs
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from innova_provider_smollm.decoder import BatchDecoder, DecoderShape, Sampler
from innova_provider_smollm.model import LocalModel, Piece, Prompt
from innova_server.chat import FinishReason, Usage

log = logging.getLogger("innova.smollm")

#: What the engine hands a reader: the next piece, or the error that ended its reply.
Delivery = Piece | BaseException
Deliver = Callable[[Delivery], None]

# Bounds of the lockstep wait for late readers, and its share of a step.
MIN_GRACE = 0.002
MAX_GRACE = 0.05
GRACE_SHARE = 0.5


class EngineClosed(RuntimeError):
    """The engine was shut down (or died) before this sequence could run."""


class Ticket:
    """The reader's handle on one sequence: ask for the next piece, or cancel. Safe from any thread."""

    def __init__(self, engine: BatchEngine) -> None:
        self._engine = engine
        self.credits = 0  # pieces asked for and not yet produced; guarded by the engine's condition
        self.cancelled = False

    def want(self) -> None:
        """The reader asks for one more piece (lockstep: the sequence advances only when asked)."""
        with self._engine._cond:
            self.credits += 1
            self._engine._cond.notify()

    def cancel(self) -> None:
        """The reader is gone: the sequence leaves the batch before the next step, its cells freed."""
        with self._engine._cond:
            self.cancelled = True
            self._engine._cond.notify()


@dataclass(eq=False)
class _Sequence:
    """Engine-side state of one request (touched by the engine thread only, except `ticket`)."""

    ticket: Ticket
    prompt: Prompt
    temperature: float
    deliver: Deliver
    on_exit: Callable[[], None]
    seq_id: int = -1
    fed: int = 0  # prompt tokens already in the KV cache
    next_token: int | None = None  # sampled, not yet in the KV cache
    completion: int = 0
    batch_index: int = -1  # where this step's logits are, -1 if none
    sampler: Sampler | None = None
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt.tokens)

    @property
    def position(self) -> int:
        return len(self.prompt.tokens) + self.completion - 1 if not self.prefilling else self.fed


class BatchEngine:
    """The decode loop of one model: `submit` from any thread; pieces come back through `deliver`."""

    def __init__(self, model: LocalModel, *, sequences: int, prompt_chunk: int) -> None:
        self.model = model
        self.sequences = sequences
        self.prompt_chunk = max(1, prompt_chunk)
        options = model.options
        self.n_batch = max(options.n_batch, self.prompt_chunk)
        shape = DecoderShape(sequences, options.n_ctx, self.n_batch + sequences, options.n_threads)
        self._decoder = BatchDecoder(model.llama.model, shape)
        self._cond = threading.Condition()
        self._inbox: deque[_Sequence] = deque()
        self._closing = False
        self._failure: BaseException | None = None
        self._running: list[_Sequence] = []  # engine thread only
        self._free_ids = list(range(sequences))
        self._step_seconds = 0.02
        self._last_step_end = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="innova-smollm-batch", daemon=True)
        self._thread.start()

    # -- any thread ---------------------------------------------------------------

    def submit(self, prompt: Prompt, temperature: float, deliver: Deliver, on_exit: Callable[[], None]) -> Ticket:
        """Queue a sequence for the next step. `on_exit` runs in the engine thread once its cells are freed."""
        ticket = Ticket(self)
        sequence = _Sequence(ticket, prompt, temperature, deliver, on_exit)
        with self._cond:
            if not self._closing and self._failure is None:
                self._inbox.append(sequence)
                self._cond.notify()
                return ticket
            error = EngineClosed("the local model has been shut down")
        deliver(error)
        on_exit()
        return ticket

    def close(self) -> None:
        """Stop every sequence (their readers get a `cancelled` end), join the thread, free the context. Blocks."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()

    @property
    def running(self) -> int:
        """Sequences admitted into the batch (a snapshot, for tests and logs)."""
        return len(self._running)

    # -- the engine thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._plan():
                self._step()
        except BaseException as exc:  # a bug or a llama.cpp failure outside a step: end every reply with it
            log.exception("local model batch loop failed")
            with self._cond:
                self._failure = exc
        finally:
            self._shutdown()

    def _grace(self) -> float:
        return min(MAX_GRACE, max(MIN_GRACE, GRACE_SHARE * self._step_seconds))

    def _plan(self) -> bool:
        """Under the lock: admit, drop the cancelled, wait for readers (briefly); False when closing."""
        deadline: float | None = None
        with self._cond:
            while True:
                if self._closing:
                    return False
                while self._inbox and self._free_ids:
                    self._admit(self._inbox.popleft())
                for sequence in [s for s in self._running if s.ticket.cancelled]:
                    self._leave(sequence, None)
                generating = [s for s in self._running if not s.prefilling]
                ready = sum(1 for s in generating if s.ticket.credits > 0)
                prefill = any(s.prefilling for s in self._running)
                if ready == len(generating) and (ready or prefill):
                    return True
                if not ready and not prefill:
                    self._cond.wait()  # nothing to do until a reader asks, arrives or leaves
                    deadline = None
                    continue
                if deadline is None:
                    deadline = self._last_step_end + self._grace()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return True
                self._cond.wait(remaining)

    def _admit(self, sequence: _Sequence) -> None:
        if sequence.ticket.cancelled:
            sequence.on_exit()
            return
        self._free_ids.sort()
        sequence.seq_id = self._free_ids.pop(0)
        sequence.sampler = Sampler(sequence.temperature)
        self._running.append(sequence)

    def _step(self) -> None:
        """Build one batch, decode it, sample and deliver."""
        with self._cond:
            ready = {id(s) for s in self._running if not s.prefilling and s.ticket.credits > 0}
        anyone_generating = any(not s.prefilling for s in self._running)
        budget = self.prompt_chunk if anyone_generating else self.n_batch
        chunks: dict[int, int] = {}
        for sequence in self._running:  # arrival order: the oldest newcomer's prompt first
            if sequence.prefilling and budget > 0:
                take = min(budget, len(sequence.prompt.tokens) - sequence.fed)
                chunks[id(sequence)] = take
                budget -= take
        decoder = self._decoder
        batched: list[_Sequence] = []
        for sequence in sorted(self._running, key=lambda s: s.seq_id):
            sequence.batch_index = -1
            if id(sequence) in ready and sequence.next_token is not None:
                sequence.batch_index = decoder.add(sequence.next_token, sequence.position, sequence.seq_id, logits=True)
                batched.append(sequence)
            elif id(sequence) in chunks:
                start, end = sequence.fed, sequence.fed + chunks[id(sequence)]
                for position in range(start, end):
                    index = decoder.add(
                        sequence.prompt.tokens[position], position, sequence.seq_id, logits=position == end - 1
                    )
                sequence.fed = end
                if not sequence.prefilling:
                    sequence.batch_index = index
                batched.append(sequence)
        if not batched:
            return
        started = time.monotonic()
        try:
            decoder.decode()
        except Exception as exc:
            log.exception("local model: llama_decode failed for %d sequences", len(batched))
            for sequence in batched:
                self._leave(sequence, exc)
            return
        finally:
            self._last_step_end = time.monotonic()
            self._step_seconds = 0.8 * self._step_seconds + 0.2 * (self._last_step_end - started)
        sampled = [s for s in batched if s.batch_index >= 0]
        with self._cond:
            for sequence in sampled:
                sequence.ticket.credits -= 1
        for sequence in sampled:
            self._advance(sequence)

    def _advance(self, sequence: _Sequence) -> None:
        """Sample this sequence's next token and hand its text over; finish it at a stop token or at max_tokens."""
        assert sequence.sampler is not None
        token = sequence.sampler.sample(self._decoder.context, sequence.batch_index)
        if self.model.is_end_of_generation(token):
            self._finish(sequence, "stop")
            return
        sequence.completion += 1
        sequence.next_token = token
        sequence.deliver(Piece(sequence.decoder.decode(self.model.token_bytes(token))))
        if sequence.completion >= sequence.prompt.max_tokens:
            self._finish(sequence, "length")

    def _finish(self, sequence: _Sequence, reason: FinishReason) -> None:
        usage = Usage(len(sequence.prompt.tokens), sequence.completion)
        self._leave(sequence, Piece(sequence.decoder.decode(b"", final=True), reason, usage))

    def _leave(self, sequence: _Sequence, last: Delivery | None) -> None:
        """Out of the batch: cells freed, slot released (`on_exit`), then the last piece or error, if any."""
        self._running.remove(sequence)
        self._decoder.forget(sequence.seq_id)
        self._free_ids.append(sequence.seq_id)
        if sequence.sampler is not None:
            sequence.sampler.close()
        try:
            sequence.on_exit()
        finally:
            if last is not None:
                sequence.deliver(last)

    def _shutdown(self) -> None:
        """End every reply (closing: `cancelled`; a failure: the error), then free the context."""
        with self._cond:
            self._closing = True
            waiting = list(self._inbox)
            self._inbox.clear()
            failure = self._failure
        try:
            for sequence in list(self._running):
                end: Delivery
                if failure is not None:
                    end = failure
                else:
                    usage = Usage(len(sequence.prompt.tokens), sequence.completion)
                    end = Piece(sequence.decoder.decode(b"", final=True), "cancelled", usage)
                self._leave(sequence, end)
            for sequence in waiting:
                sequence.on_exit()
                sequence.deliver(failure or EngineClosed("the local model has been shut down"))
        finally:
            self._decoder.close()
