"""Continuous batching: one decode loop per model, in its own thread, serving up to N sequences at once.

Why: generating a token on a CPU is bound by reading the weights; one
`llama_decode` over N sequences reads them once for all N, so N replies cost
little more than one. Requests join the running batch between two steps (a
newcomer never waits for the others to finish) and leave it when done,
stopped or cancelled, their slot free at once for the next request (which
reuses the cells of the prefix it shares, and cuts the rest).

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

Prompt-prefix reuse: a sequence id (a slot) keeps its KV cells when its
reply ends, and remembers their tokens. A newcomer takes the free slot whose
kept tokens share the longest prefix with its prompt (the system prompt;
the whole conversation so far when the same conversation goes on), cuts the
cells after that prefix and evaluates only the rest — what `Llama.generate`
does with its one cache when `SMOLLM_PARALLEL=1`. The cells of a sequence
are computed from its own tokens only, so reused cells hold what evaluating
the prefix again would: greedy output does not change.

Slots are given lowest-free first (unless another free slot saves at least a
prompt chunk) and the batch is ordered by id: llama.cpp evaluates a batch
whose per-sequence KV streams are consecutive ids in one pass.
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
        """The reader is gone: the sequence leaves the batch before the next step, its slot freed."""
        with self._engine._cond:
            self.cancelled = True
            self._engine._cond.notify()


def common_prefix(kept: list[int], tokens: list[int], limit: int) -> int:
    """How many leading tokens `kept` and `tokens` share, at most `limit`."""
    size = min(len(kept), len(tokens), limit)
    if kept[:size] == tokens[:size]:
        return size
    return next(i for i in range(size) if kept[i] != tokens[i])


@dataclass(eq=False)
class _Slot:
    """One sequence id of the context, and the tokens its KV cells hold from position 0 (engine thread only)."""

    seq_id: int
    kept: list[int] = field(default_factory=list)
    busy: bool = False


@dataclass(eq=False)
class _Sequence:
    """Engine-side state of one request (touched by the engine thread only, except `ticket`)."""

    ticket: Ticket
    prompt: Prompt
    temperature: float
    deliver: Deliver
    on_exit: Callable[[], None]
    slot: _Slot | None = None
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
    def seq_id(self) -> int:
        return self.slot.seq_id if self.slot is not None else -1

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
        self._slots = [_Slot(seq_id) for seq_id in range(sequences)]  # engine thread only
        #: Prompt tokens taken from cells kept from earlier replies instead of evaluated (a count, for tests and logs).
        self.reused_tokens = 0
        self._step_seconds = 0.02
        self._last_step_end = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="innova-smollm-batch", daemon=True)
        self._thread.start()

    # -- any thread ---------------------------------------------------------------

    def submit(self, prompt: Prompt, temperature: float, deliver: Deliver, on_exit: Callable[[], None]) -> Ticket:
        """Queue a sequence for the next step. `on_exit` runs in the engine thread once it left the batch."""
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
                while self._inbox and any(not slot.busy for slot in self._slots):
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
        tokens = sequence.prompt.tokens
        slot, reused = self._choose_slot(tokens)
        if not self._decoder.forget(slot.seq_id, reused):  # the cells after the common prefix go
            self._decoder.forget(slot.seq_id)
            reused = 0
        del slot.kept[reused:]
        slot.busy = True
        sequence.slot = slot
        sequence.fed = reused
        self.reused_tokens += reused
        sequence.sampler = Sampler(sequence.temperature, self._decoder.n_vocab)
        self._running.append(sequence)

    def _choose_slot(self, tokens: list[int]) -> tuple[_Slot, int]:
        """The free slot for a prompt, and how many of its first tokens that slot's cells already hold.

        The lowest free slot, unless another saves at least a prompt chunk
        (see the module's docstring). The last prompt token is always
        evaluated again: its logits give the reply's first token.
        """
        free = [slot for slot in self._slots if not slot.busy]
        shared = [common_prefix(slot.kept, tokens, len(tokens) - 1) for slot in free]
        best = max(range(len(free)), key=lambda i: (shared[i], -i))
        chosen = best if shared[best] - shared[0] >= self.prompt_chunk else 0
        return free[chosen], shared[chosen]

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
            assert sequence.slot is not None
            if id(sequence) in ready and sequence.next_token is not None:
                sequence.batch_index = decoder.add(sequence.next_token, sequence.position, sequence.seq_id, logits=True)
                sequence.slot.kept.append(sequence.next_token)
                batched.append(sequence)
            elif id(sequence) in chunks:
                start, end = sequence.fed, sequence.fed + chunks[id(sequence)]
                for position in range(start, end):
                    index = decoder.add(
                        sequence.prompt.tokens[position], position, sequence.seq_id, logits=position == end - 1
                    )
                sequence.slot.kept.extend(sequence.prompt.tokens[start:end])
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
                self._leave(sequence, exc, keep=False)  # what its cells hold is unknown now
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

    def _leave(self, sequence: _Sequence, last: Delivery | None, *, keep: bool = True) -> None:
        """Out of the batch, its slot free (cells kept for a later prompt's prefix, unless `keep` is False);
        the provider's slot released (`on_exit`), then the last piece or error, if any."""
        self._running.remove(sequence)
        slot = sequence.slot
        if slot is not None:
            if not keep:
                self._decoder.forget(slot.seq_id)
                slot.kept.clear()
            slot.busy = False
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
