"""llama.cpp's low-level batched decoding, typed and in one place: a context holding N sequences.

`Llama` (the high-level class) owns one sequence and one KV cache, so the
batch engine builds its own `llama_context` on the same loaded model, with
`n_seq_max` = the number of slots and a KV cache *per sequence*
(`kv_unified = False`): each slot has its own window of `SMOLLM_N_CTX` cells,
a sequence's attention reads only its own cells, and so a sequence's logits
are computed exactly as when it runs alone — what makes greedy output
identical alone and beside others. Flash attention stays off, as `Llama` has
it, so the batched path computes what the `SMOLLM_PARALLEL=1` path does.

Every method here blocks or touches the context: only the engine's thread
calls them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from innova_provider_smollm.model import MIN_P, TOP_K, TOP_P


class DecodeError(RuntimeError):
    """`llama_decode` refused or failed a batch (its return code in the message)."""


@dataclass(frozen=True)
class DecoderShape:
    """How large the context is: `sequences` windows of `n_ctx` tokens, `n_batch` tokens per decode call."""

    sequences: int
    n_ctx: int
    n_batch: int
    n_threads: int


class Sampler:
    """One request's sampling: greedy at temperature 0, else llama.cpp's chain (top-k/top-p/min-p/temperature/random).

    Greedy is the index of the largest logit, read straight from the
    context's logits (numpy's argmax, first of equals — what llama.cpp's
    greedy sampler picks): ≈ 10 µs a token, where `llama_sampler_sample`
    copies the whole vocabulary (49k candidates for SmolLM2) into its
    candidate array first, ≈ 0.1 ms — time the decode loop spends between two
    steps for every sequence, while llama.cpp's threads wait.
    """

    def __init__(self, temperature: float, n_vocab: int) -> None:
        import llama_cpp
        import numpy

        self._lib: Any = llama_cpp
        self._numpy: Any = numpy
        self._n_vocab = n_vocab
        self._chain: Any = None
        if temperature <= 0.0:
            return
        chain: Any = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        # The same chain as `Llama.generate` builds (its no-op penalties
        # and typical-p left out), with the same constants.
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(TOP_K))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(TOP_P, 1))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_min_p(MIN_P, 1))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(temperature))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(llama_cpp.LLAMA_DEFAULT_SEED))
        self._chain = chain

    def sample(self, context: Any, index: int) -> int:
        """The next token from the logits of the batch's `index`-th token (accepted into the chain, if any)."""
        if self._chain is None:
            logits = self._lib.llama_get_logits_ith(context, index)
            return int(self._numpy.ctypeslib.as_array(logits, shape=(self._n_vocab,)).argmax())
        token: int = self._lib.llama_sampler_sample(self._chain, context, index)
        return token

    def close(self) -> None:
        if self._chain is not None:
            self._lib.llama_sampler_free(self._chain)
            self._chain = None


class BatchDecoder:
    """A llama.cpp context with one KV stream per sequence, and the batch buffer fed to `llama_decode`."""

    def __init__(self, llama_model: Any, shape: DecoderShape) -> None:
        import llama_cpp

        self._lib: Any = llama_cpp
        self.shape = shape
        params: Any = llama_cpp.llama_context_default_params()
        params.n_ctx = shape.n_ctx * shape.sequences
        params.n_batch = shape.n_batch
        params.n_ubatch = shape.n_batch
        params.n_seq_max = shape.sequences
        params.n_threads = shape.n_threads
        params.n_threads_batch = shape.n_threads
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.kv_unified = False
        params.no_perf = True
        context: Any = llama_cpp.llama_init_from_model(llama_model, params)
        if not context:
            raise DecodeError("llama.cpp could not create the batch context")
        self.context: Any = context
        if llama_cpp.llama_n_ctx_seq(context) < shape.n_ctx:  # llama.cpp pads up to 256, never down
            self.close()
            raise DecodeError(f"llama.cpp gave each sequence fewer than {shape.n_ctx} cells")
        self._memory: Any = llama_cpp.llama_get_memory(context)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llama_model))
        self._batch: Any = llama_cpp.llama_batch_init(shape.n_batch, 0, 1)
        self._size = 0

    @property
    def size(self) -> int:
        """Tokens in the batch being built."""
        return self._size

    def add(self, token: int, position: int, sequence: int, *, logits: bool) -> int:
        """Append a token to the batch; its index there (where its logits are read) is returned."""
        index = self._size
        if index >= self.shape.n_batch:
            raise DecodeError(f"batch full ({self.shape.n_batch} tokens)")
        batch = self._batch
        batch.token[index] = token
        batch.pos[index] = position
        batch.n_seq_id[index] = 1
        batch.seq_id[index][0] = sequence
        batch.logits[index] = 1 if logits else 0
        self._size = index + 1
        return index

    def decode(self) -> None:
        """Evaluate the batch (blocks; llama.cpp runs with the GIL released) and empty it for the next step."""
        self._batch.n_tokens = self._size
        try:
            code: int = self._lib.llama_decode(self.context, self._batch)
        finally:
            self._size = 0
        if code != 0:
            raise DecodeError(f"llama_decode returned {code}")

    def forget(self, sequence: int, start: int = 0) -> bool:
        """Free a sequence's KV cells from position `start` on (all of them by default).

        False if llama.cpp could not cut the sequence there (it then holds
        what it held): the caller clears it whole instead.
        """
        done: bool = self._lib.llama_memory_seq_rm(self._memory, sequence, start if start > 0 else -1, -1)
        return done

    def close(self) -> None:
        """Free the batch and the context (the model itself belongs to `LocalModel`). Safe twice."""
        batch, self._batch = getattr(self, "_batch", None), None
        if batch is not None:
            self._lib.llama_batch_free(batch)
        context, self.context = self.context, None
        if context is not None:
            self._lib.llama_free(context)
