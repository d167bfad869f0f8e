"""PROVIDER=local: a SmolLM GGUF model run inside the server process with llama-cpp-python.

Nothing leaves the machine. The model is loaded once per process (each
gunicorn worker holds its own copy: see README_SMOLLM.md), generation runs in
a worker thread, and `SMOLLM_PARALLEL` generations run at once (decoded
together in one batch when more than one) behind a FIFO queue.

llama-cpp-python is imported only when `PROVIDER=local` builds the provider,
so merely installing this package costs the other providers nothing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from innova_provider_smollm.model import LlamaOptions, ModelFileError, choose_model, find_models
from innova_provider_smollm.provider import SmolLMProvider
from innova_provider_smollm.slots import FifoSlot, FifoSlots
from innova_server.plugins import RegisterProvider, hookimpl
from innova_server.settings import ConfigError, PluginSettings, Settings

log = logging.getLogger("innova.smollm")

DEFAULT_MODEL_PATH = Path("backend/smollm-1.7b-instruct")
# README_SMOLLM.md §6 has the measurements (2-core development machine): 4
# replies at once stream fairly, a newcomer starts at once, and one reply
# alone is as fast, and starts as soon, as with 1; 8 gives llama.cpp little
# more throughput there (batch 8: 1.61× one alone with 1 thread, 1.44× with
# 2; batch 4: 1.55×, 1.28×) for twice the KV memory and less speed per reply.
DEFAULT_PARALLEL = 4
# Prompt tokens per step beside running streams (README_SMOLLM.md says why).
DEFAULT_PROMPT_CHUNK = 32


def available_cpus() -> int:
    """CPUs this process may run on (a container or `taskset` may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class SmolLMSettings(PluginSettings):
    """`SMOLLM_*` variables. Reply length and temperature are the core's `CHAT_MAX_TOKENS`, `CHAT_TEMPERATURE`."""

    smollm_model_path: Path = DEFAULT_MODEL_PATH
    #: Context window in tokens (prompt + reply).
    smollm_n_ctx: Annotated[int, Field(ge=64)] = 2048
    #: llama.cpp threads; None: the CPUs this process may use.
    smollm_n_threads: Annotated[int | None, Field(ge=1)] = None
    #: Prompt tokens evaluated per llama.cpp batch.
    smollm_n_batch: Annotated[int, Field(ge=1)] = 512
    smollm_load: Literal["startup", "lazy"] = "startup"
    #: Requests that may wait behind the running ones; more get ProviderBusy.
    smollm_max_queue: Annotated[int, Field(ge=0)] = 4
    #: Replies decoded together in one batch (1: one at a time, `Llama.generate`).
    smollm_parallel: Annotated[int, Field(ge=1, le=64)] = DEFAULT_PARALLEL
    #: Prompt tokens of a newcomer evaluated per step while others generate.
    smollm_prompt_chunk: Annotated[int, Field(ge=1)] = DEFAULT_PROMPT_CHUNK

    def llama_options(self) -> LlamaOptions:
        return LlamaOptions(
            n_ctx=self.smollm_n_ctx,
            n_threads=self.smollm_n_threads or available_cpus(),
            n_batch=self.smollm_n_batch,
            parallel=self.smollm_parallel,
            prompt_chunk=self.smollm_prompt_chunk,
        )


def load_smollm_settings(**overrides: Any) -> SmolLMSettings:
    """Read the `SMOLLM_*` variables; a bad value is a `ConfigError`, one line per problem, naming the variable."""
    return SmolLMSettings.load(**overrides)


def make_local(settings: Settings) -> SmolLMProvider:
    """Build the provider; a missing model, a bad `CHAT_MODEL` or a model without chat template stops the start."""
    plugin_settings = load_smollm_settings()
    try:
        models = find_models(plugin_settings.smollm_model_path)
        name, path = choose_model(models, settings.chat_model)
        provider = SmolLMProvider(
            path,
            plugin_settings.llama_options(),
            name=name,
            load=plugin_settings.smollm_load,
            max_queue=plugin_settings.smollm_max_queue,
        )
    except ModelFileError as exc:
        raise ConfigError([f"PROVIDER='local': {exc}"]) from exc
    log.info(
        "local model %s (%s), n_ctx=%d per slot, n_threads=%d, parallel=%d, load=%s",
        name, path, provider.options.n_ctx, provider.options.n_threads, provider.parallel,
        plugin_settings.smollm_load,
    )  # fmt: skip
    return provider


@hookimpl
def innova_register_providers(register: RegisterProvider) -> None:
    # The models are the GGUF files found now (a directory listing, cheap), so
    # `innova plugins` shows them and the core checks CHAT_MODEL against them.
    # A missing path is reported by the factory, only if PROVIDER=local.
    # No model found is normal where another provider is used (the default path
    # does not exist there): nothing to say. A bad SMOLLM_* value or an
    # unreadable directory is someone's configuration: a warning (and, with
    # PROVIDER=local, the factory stops the start with it). Anything else is
    # a bug, left to the registry, which reports a failing plugin.
    try:
        models = tuple(find_models(load_smollm_settings().smollm_model_path))
    except ModelFileError:
        models = ()
    except ConfigError as exc:
        log.warning("local provider: %s", "; ".join(exc.lines))
        models = ()
    except OSError as exc:
        log.warning("local provider: cannot list SMOLLM_MODEL_PATH (%s)", exc)
        models = ()
    register("local", make_local, models=models, default_model=models[0] if models else None)


__all__ = [
    "FifoSlot",
    "FifoSlots",
    "SmolLMProvider",
    "SmolLMSettings",
    "innova_register_providers",
    "load_smollm_settings",
    "make_local",
]
