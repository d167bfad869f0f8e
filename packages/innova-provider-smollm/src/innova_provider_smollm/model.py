"""Model files and the llama.cpp model: finding GGUF files, loading, building the prompt, the token loop.

Everything in `LocalModel` blocks (llama.cpp computes in C with the GIL
released, but each call still takes milliseconds to seconds), so the provider
calls it only from its worker thread, and only while it holds its one slot:
a `Llama` object is not safe for concurrent calls.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from innova_server.chat import ChatMessage, ContextTooLong, FinishReason, ProviderError, Usage

log = logging.getLogger("innova.smollm")

GGUF_SUFFIX = ".gguf"
DOWNLOAD_HINT = (
    "see README_SMOLLM.md in the innova-provider-smollm package for how to download SmolLM2-1.7B-Instruct in GGUF"
)
# Sampling beyond temperature: llama.cpp's usual values, written out so the
# benchmark's direct call and the provider sample exactly alike.
TOP_K = 40
TOP_P = 0.95
MIN_P = 0.05
REPEAT_PENALTY = 1.0


class ModelFileError(Exception):
    """The configured model cannot be used; the message says where we looked and what to do."""


def find_models(path: Path) -> dict[str, Path]:
    """The usable GGUF files at `path` (a file, or a directory holding some), by file stem, sorted.

    Raises `ModelFileError` naming the path as given and as resolved, so an
    operator sees at once whether the working directory was the surprise.
    """
    where = f"SMOLLM_MODEL_PATH={path} (looked in {path.expanduser().resolve()})"
    path = path.expanduser()
    if path.is_file():
        if path.suffix.lower() != GGUF_SUFFIX:
            raise ModelFileError(f"{where} is not a {GGUF_SUFFIX} file; {DOWNLOAD_HINT}.")
        return {path.stem: path}
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
        if not files:
            raise ModelFileError(f"{where}: the directory holds no {GGUF_SUFFIX} file; {DOWNLOAD_HINT}.")
        return {p.stem: p for p in files}
    raise ModelFileError(f"{where}: no such file or directory; {DOWNLOAD_HINT}.")


def choose_model(models: dict[str, Path], chat_model: str | None) -> tuple[str, Path]:
    """`CHAT_MODEL` by file stem, or the first file in name order when it is unset."""
    if chat_model:
        if chat_model not in models:
            raise ModelFileError(f"CHAT_MODEL={chat_model!r} is not one of the GGUF files found: {', '.join(models)}.")
        return chat_model, models[chat_model]
    stem = next(iter(models))
    return stem, models[stem]


# With SMOLLM_PARALLEL > 1 the `Llama` object only tokenizes and holds the
# weights; the batch engine decodes in a context of its own. Its own context
# is then kept as small as llama.cpp allows, not a second KV cache.
UNUSED_CONTEXT = {"n_ctx": 256, "n_batch": 8, "n_ubatch": 8}


@dataclass(frozen=True)
class LlamaOptions:
    """The llama.cpp settings, all explicit (nothing left to llama-cpp-python's defaults that matters).

    `n_ctx` is the window of one conversation (one slot); `parallel` the
    sequences decoded together (1: `Llama.generate`, one at a time).
    """

    n_ctx: int
    n_threads: int
    n_batch: int = 512
    parallel: int = 1
    prompt_chunk: int = 32

    def llama_kwargs(self) -> dict[str, Any]:
        if self.parallel > 1:
            context: dict[str, Any] = dict(UNUSED_CONTEXT)
        else:
            context = {"n_ctx": self.n_ctx, "n_batch": min(self.n_batch, self.n_ctx)}
        return {**context, "n_threads": self.n_threads, "n_threads_batch": self.n_threads, "verbose": False}


@dataclass(frozen=True)
class Piece:
    """One step of the token loop: text decoded so far (may be empty), and on the last one the outcome."""

    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class Prompt:
    tokens: list[int]
    max_tokens: int
    dropped_messages: int


class LocalModel:
    """One loaded GGUF model: its chat template, its tokenizer, and a token loop that can stop between tokens."""

    def __init__(self, path: Path, options: LlamaOptions) -> None:
        from llama_cpp import Llama

        self.path = path
        self.options = options
        self.llama: Any = Llama(model_path=str(path), **options.llama_kwargs())
        try:
            self._formatter = self._chat_formatter()
            self._eog = self._end_of_generation_tokens()
            # Render and tokenize a small conversation now: a broken template
            # fails the start, not the first user's request.
            self.prompt([ChatMessage("system", "Test."), ChatMessage("user", "Bonjour")], max_tokens=1)
        except BaseException:
            self.close()
            raise

    @property
    def n_ctx(self) -> int:
        return self.options.n_ctx

    def _chat_formatter(self) -> Any:
        """The chat template from the GGUF metadata, or an error: a guessed template gives wrong replies silently."""
        metadata: dict[str, str] = self.llama.metadata
        template = metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelFileError(
                f"{self.path}: the GGUF file has no chat template (metadata tokenizer.chat_template); "
                f"use an instruct model converted with its template; {DOWNLOAD_HINT}."
            )
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        eos, bos = self.llama.token_eos(), self.llama.token_bos()
        return Jinja2ChatFormatter(
            template=template,
            eos_token=self._token_text(eos) if eos >= 0 else "",
            bos_token=self._token_text(bos) if bos >= 0 else "",
            add_generation_prompt=True,
            stop_token_ids=[eos] if eos >= 0 else None,
        )

    def is_end_of_generation(self, token: int) -> bool:
        return token in self._eog

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one generated token (special tokens render as nothing, as in `generate`)."""
        piece: bytes = self.llama.detokenize([token])
        return piece

    def _token_text(self, token: int) -> str:
        return bytes(self.llama.detokenize([token], special=True)).decode("utf-8", errors="replace")

    def _end_of_generation_tokens(self) -> frozenset[int]:
        """Every token llama.cpp calls end-of-generation (`<|im_end|>`, EOS, …), asked once at load."""
        import llama_cpp

        vocab: Any = llama_cpp.llama_model_get_vocab(self.llama.model)
        n_vocab: int = llama_cpp.llama_vocab_n_tokens(vocab)
        return frozenset(t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t))

    # -- the prompt ---------------------------------------------------------------

    def count(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The prompt tokens of `messages` rendered by the model's own template, as llama.cpp will see them."""
        result = self._formatter(messages=[{"role": m.role, "content": m.content} for m in messages])
        prompt: str = result.prompt
        tokens: list[int] = self.llama.tokenize(prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
        return tokens

    def prompt(self, messages: Sequence[ChatMessage], max_tokens: int) -> Prompt:
        """The prompt that fits the context window: the newest messages kept, the oldest dropped first.

        Room is kept for the reply (`max_tokens`, at most half the window). The
        system messages stay while they can; the history is only cut before a
        user message, so templates that check alternation still accept it. If
        the last message alone does not fit, `ContextTooLong` — never a
        llama.cpp failure in the middle of a reply.
        """
        system = [m for m in messages if m.role == "system"]
        rest = [m for m in messages if m.role != "system"]
        reserve = max(1, min(max_tokens, self.n_ctx // 2))
        budget = self.n_ctx - reserve
        starts = [i for i, m in enumerate(rest) if m.role == "user" or i == len(rest) - 1] or [0]

        def attempt(start: int, with_system: bool = True) -> list[int]:
            return self.count([*(system if with_system else []), *rest[start:]])

        # Dropping more messages never makes the prompt longer: binary search
        # for the fewest dropped, so a long history costs O(log n) renders.
        low, high = 0, len(starts) - 1
        best: tuple[int, list[int]] | None = None
        while low <= high:
            middle = (low + high) // 2
            tokens = attempt(starts[middle])
            if len(tokens) <= budget:
                best, high = (starts[middle], tokens), middle - 1
            else:
                low = middle + 1
        if best is None:
            tokens = attempt(starts[-1], with_system=False)
            if len(tokens) > budget:
                raise ContextTooLong(
                    message=(
                        f"The message is too long for the model: {len(tokens)} tokens, and the context "
                        f"window holds {self.n_ctx} with {reserve} kept for the reply."
                    )
                )
            best = (starts[-1], tokens)
            dropped = len(messages) - 1
        else:
            dropped = best[0]
        tokens = best[1]
        if dropped:
            log.info("history trimmed to fit the context: %d of %d messages dropped", dropped, len(messages))
        # Never ask llama.cpp for more tokens than the window has left.
        return Prompt(tokens, max(1, min(max_tokens, self.n_ctx - len(tokens))), dropped)

    # -- the token loop ---------------------------------------------------------------

    def generate(
        self, prompt: Prompt, *, temperature: float, should_stop: Callable[[], bool] = lambda: False
    ) -> Iterator[Piece]:
        """Sample one token at a time; each yield is a point where the caller may stop (close) the loop.

        Text is decoded incrementally, so a character split across tokens
        (accents, emoji) is never cut in half. The last piece carries the
        finish reason (`stop` at an end-of-generation token, `length` at
        `max_tokens`) and the usage.
        """
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        completion = 0
        finish: FinishReason = "length"
        tokens = self.llama.generate(
            prompt.tokens,
            top_k=TOP_K,
            top_p=TOP_P,
            min_p=MIN_P,
            temp=temperature,
            repeat_penalty=REPEAT_PENALTY,
            reset=True,
        )
        try:
            for token in tokens:
                if token in self._eog:
                    finish = "stop"
                    break
                completion += 1
                yield Piece(decoder.decode(self.llama.detokenize([token])))
                if completion >= prompt.max_tokens:
                    break
                if should_stop():
                    finish = "cancelled"
                    break
        finally:
            tokens.close()
        yield Piece(decoder.decode(b"", final=True), finish, Usage(len(prompt.tokens), completion))

    def close(self) -> None:
        """Free the model's memory now (llama-cpp-python would otherwise wait for the garbage collector)."""
        close = getattr(self.llama, "close", None)
        if close is not None:
            close()


def load_model(path: Path, options: LlamaOptions) -> LocalModel:
    """Load the model, turning llama.cpp's failures into a `ModelFileError` that names the file."""
    try:
        return LocalModel(path, options)
    except (ModelFileError, ProviderError):
        raise
    except Exception as exc:
        raise ModelFileError(f"{path}: llama.cpp could not load the model ({type(exc).__name__}: {exc}).") from exc
