"""Cloud chat providers for Innova: PROVIDER=openai and PROVIDER=mistral, through the official SDKs.

`openai` also serves any OpenAI-compatible server (llama.cpp's server, vLLM,
Ollama, LM Studio) through OPENAI_BASE_URL. Neither declares a fixed list of
models: CHAT_MODEL is whatever the API or server accepts; without it,
`gpt-4o-mini` and `mistral-small-latest`.

The SDKs are imported only when a provider is selected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from innova_provider_cloud.settings import (
    DEFAULT_MISTRAL_MODEL,
    DEFAULT_OPENAI_MODEL,
    CloudSettings,
    load_cloud_settings,
)
from innova_server.plugins import RegisterProvider, hookimpl
from innova_server.settings import ConfigError, Settings

if TYPE_CHECKING:
    from innova_provider_cloud.mistral_provider import MistralProvider
    from innova_provider_cloud.openai_provider import OpenAIProvider


def make_openai(settings: Settings | None = None, **overrides: object) -> OpenAIProvider:
    """The factory of PROVIDER=openai; `overrides` are CloudSettings values (tests, benchmarks)."""
    from innova_provider_cloud.base import RetryPolicy, Timeouts, warn_if_past_the_core_wait
    from innova_provider_cloud.openai_provider import OpenAIProvider

    cloud = load_cloud_settings(**overrides)
    if cloud.openai_api_key is None:
        raise ConfigError(
            [
                "PROVIDER='openai' needs OPENAI_API_KEY (for an OpenAI-compatible server without keys, "
                "such as llama.cpp's, set any value, e.g. OPENAI_API_KEY=none)."
            ]
        )
    timeouts = Timeouts.from_settings(cloud)
    warn_if_past_the_core_wait(timeouts, settings, "openai")
    return OpenAIProvider(
        api_key=cloud.openai_api_key.get_secret_value(),
        base_url=cloud.openai_base_url,
        timeouts=timeouts,
        retry=RetryPolicy(max_retries=cloud.cloud_max_retries, max_wait=cloud.cloud_retry_max_wait_seconds),
    )


def make_mistral(settings: Settings | None = None, **overrides: object) -> MistralProvider:
    """The factory of PROVIDER=mistral; `overrides` are CloudSettings values (tests, benchmarks)."""
    from innova_provider_cloud.base import RetryPolicy, Timeouts, warn_if_past_the_core_wait
    from innova_provider_cloud.mistral_provider import MistralProvider

    cloud = load_cloud_settings(**overrides)
    if cloud.mistral_api_key is None:
        raise ConfigError(["PROVIDER='mistral' needs MISTRAL_API_KEY (your key from console.mistral.ai)."])
    timeouts = Timeouts.from_settings(cloud)
    warn_if_past_the_core_wait(timeouts, settings, "mistral")
    return MistralProvider(
        api_key=cloud.mistral_api_key.get_secret_value(),
        server_url=cloud.mistral_base_url,
        timeouts=timeouts,
        retry=RetryPolicy(max_retries=cloud.cloud_max_retries, max_wait=cloud.cloud_retry_max_wait_seconds),
    )


@hookimpl
def innova_register_providers(register: RegisterProvider) -> None:
    # No fixed model list: any model name the API (or an OpenAI-compatible server) knows.
    register("openai", make_openai, default_model=DEFAULT_OPENAI_MODEL)
    register("mistral", make_mistral, default_model=DEFAULT_MISTRAL_MODEL)


__all__ = ["CloudSettings", "innova_register_providers", "make_mistral", "make_openai"]
