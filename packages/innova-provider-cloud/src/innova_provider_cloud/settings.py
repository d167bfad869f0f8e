"""The cloud plugin's own variables (read like the core's: environment, and `.env` outside production)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, SecretStr, field_validator

from innova_server.settings import PluginSettings

DEFAULT_OPENAI_MODEL = "gpt-4o-mini"
DEFAULT_MISTRAL_MODEL = "mistral-small-latest"
DEFAULT_MISTRAL_BASE_URL = "https://api.mistral.ai"


class CloudSettings(PluginSettings):
    """`OPENAI_*`, `MISTRAL_*` and the `CLOUD_*` timeouts and retries shared by both providers.

    Every timeout is a finite number of seconds: none can be turned off.
    """

    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    mistral_api_key: SecretStr | None = None
    mistral_base_url: str = DEFAULT_MISTRAL_BASE_URL

    cloud_connect_timeout_seconds: float = Field(5.0, gt=0, le=600)
    #: Retries included; below the core's CHAT_PING_SECONDS (15 s) so that any
    #: failure before the first token is an HTTP error (README, "Errors").
    cloud_first_token_timeout_seconds: float = Field(12.0, gt=0, le=3600)
    cloud_idle_timeout_seconds: float = Field(30.0, gt=0, le=3600)
    cloud_total_timeout_seconds: float = Field(300.0, gt=0, le=86400)
    cloud_max_retries: int = Field(2, ge=0, le=10)
    cloud_retry_max_wait_seconds: float = Field(10.0, ge=0, le=600)

    @field_validator("openai_api_key", "mistral_api_key", "openai_base_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("mistral_base_url", mode="before")
    @classmethod
    def _mistral_default(cls, value: Any) -> Any:
        return DEFAULT_MISTRAL_BASE_URL if isinstance(value, str) and not value.strip() else value

    @field_validator("openai_base_url", "mistral_base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value


def load_cloud_settings(**overrides: Any) -> CloudSettings:
    """Read the variables; a bad value is a `ConfigError`, one line per problem (values never echoed)."""
    return CloudSettings.load(**overrides)
