"""One validated configuration object, read from the environment.

In development a `.env` file in the working directory is read too; in
production only the real environment counts (systemd's `EnvironmentFile`), so a
stray `.env` on a server can never change behaviour.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Environment = Literal["development", "test", "production"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_LIMIT_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([smhd])\s*$")


@dataclass(frozen=True)
class RateLimit:
    """`count` events per `seconds`-long fixed window; written `10/15m`, `5/1h`, `30/m`."""

    count: int
    seconds: int

    @classmethod
    def parse(cls, value: str | RateLimit) -> RateLimit:
        if isinstance(value, RateLimit):
            return value
        match = _LIMIT_RE.match(value)
        if not match:
            raise ValueError(f"rate limit {value!r} is not of the form COUNT/[N]UNIT, e.g. 10/15m")
        count, n, unit = int(match[1]), int(match[2] or 1), match[3]
        if count < 1 or n < 1:
            raise ValueError(f"rate limit {value!r} must be positive")
        return cls(count, n * _UNITS[unit])

    def __str__(self) -> str:
        return f"{self.count}/{self.seconds}s"


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


CommaList = Annotated[list[str], NoDecode]
# Written `10/15m` in the environment, not JSON.
Limit = Annotated[RateLimit, NoDecode]


def env_file() -> str | None:
    """The `.env` to read: none in production."""
    return None if os.environ.get("ENV", "development") == "production" else ".env"


class PluginSettings(BaseSettings):
    """Base for a plugin's own settings: same sources as the core's `Settings`.

    Plugins own their variables (e.g. `ECHO_DELAY_MS`); subclass this and
    instantiate it inside the factory so the `.env` rule stays the same.
    """

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False, env_file_encoding="utf-8")

    def __init__(self, **values: Any) -> None:
        values.setdefault("_env_file", env_file())
        super().__init__(**values)

    @classmethod
    def load(cls, **overrides: Any) -> Self:
        """Read the variables; a bad value is a `ConfigError`, one line per problem naming
        the variable (values never echoed: they may be keys)."""
        from pydantic import ValidationError
        from pydantic_settings import SettingsError

        try:
            return cls(**overrides)
        except SettingsError as exc:
            raise ConfigError([str(exc)]) from None
        except ValidationError as exc:
            lines = []
            for error in exc.errors(include_input=False):
                name = ".".join(str(part) for part in error["loc"]).upper() or cls.__name__
                lines.append(f"{name}: {error['msg']}")
            raise ConfigError(lines) from None


class Settings(PluginSettings):
    """The core configuration (the table in innova-server's README). Field names are the env variables, lower-cased."""

    env: Environment = "development"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: str = "info"

    mongo_uri: SecretStr | None = None
    db_name: str = "innova_db"
    mongo_timeout_ms: int = Field(30_000, ge=100, description="budget of each MongoDB operation (timeoutMS)")
    innova_data_dir: Path = Path(".innova")

    allowed_origins: CommaList = Field(default_factory=list)
    frontend_url: str = "https://innovaplus.africa"
    cookie_secure: bool = True
    session_ttl_days: int = Field(7, ge=1, le=365)
    reset_token_ttl_minutes: int = Field(30, ge=1, le=1440)
    verify_token_ttl_hours: int = Field(24, ge=1, le=720)
    # When true, /chatlaya/* refuses accounts whose address is not verified yet.
    require_verified_email: bool = False
    # Per-IP rate limits key an IPv6 client by this prefix (one allocation is a /64).
    rate_limit_ipv6_prefix: int = Field(64, ge=32, le=128)
    trusted_proxies: CommaList = Field(default_factory=lambda: ["127.0.0.1", "::1"])
    max_body_bytes: int = Field(512 * 1024, ge=1024)

    # argon2id parameters (argon2-cffi's RFC 9106 low-memory profile by default).
    argon2_time_cost: int = Field(3, ge=1)
    argon2_memory_cost: int = Field(65536, ge=8, description="KiB")
    argon2_parallelism: int = Field(4, ge=1)

    rate_limit_login_email: Limit = RateLimit(10, 900)
    rate_limit_login_ip: Limit = RateLimit(50, 900)
    # Failed logins from a browser holding a device cookie for that account (instead of the two above).
    rate_limit_login_device: Limit = RateLimit(10, 900)
    rate_limit_register_ip: Limit = RateLimit(10, 3600)
    rate_limit_forgot_email: Limit = RateLimit(5, 3600)
    rate_limit_forgot_ip: Limit = RateLimit(20, 3600)
    rate_limit_chat_user: Limit = RateLimit(30, 60)
    rate_limit_export_user: Limit = RateLimit(3, 3600)
    rate_limit_verify_user: Limit = RateLimit(5, 3600)
    rate_limit_conversations_user: Limit = RateLimit(100, 86400)
    chat_max_concurrent_streams: int = Field(3, ge=1)
    # Turns one worker opens at once (their database rounds before the first
    # token); the others wait their turn in order. Measured in benchmarks/README.md.
    chat_openings_per_worker: int = Field(32, ge=1, le=1000)

    smtp_host: str | None = None
    smtp_port: int | None = Field(None, ge=1, le=65535)
    smtp_user: str | None = None
    smtp_pass: SecretStr | None = None
    smtp_use_tls: bool = False
    smtp_from_email: str | None = None
    smtp_timeout_seconds: float = Field(10.0, gt=0)

    mailer: str | None = None
    provider: str = "echo"
    chat_model: str | None = None
    chat_system_prompt: str = (
        "Tu es Chatlaya, le copilote d'INNOVAPLUS. Réponds de façon claire, utile et concise, "
        "dans la langue de l'utilisateur."
    )
    chat_history_chars: int = Field(12000, ge=100, description="history budget sent to the provider")
    chat_max_tokens: int = Field(512, ge=1)
    chat_temperature: float = Field(0.7, ge=0, le=2)
    chat_ping_seconds: float = Field(15.0, gt=0)
    # A reply outlives its request: checkpoints, the dead-worker lease, and how
    # long it goes on with nobody watching (0 = stop when the client leaves).
    # The checkpoint interval bounds how soon a stop sent to another process
    # lands, hence its ceiling (a stop must land within 2 s).
    chat_checkpoint_ms: int = Field(1000, ge=50, le=1500)
    chat_lease_seconds: float = Field(30.0, ge=2, le=3600)
    chat_detached_timeout_seconds: float = Field(60.0, ge=0, le=86_400)
    # Conversation titles: the first message's words, or asked of the model in the background.
    chat_titles: Literal["first_message", "model"] = "first_message"
    chat_title_timeout_seconds: float = Field(20.0, gt=0, le=600)
    # Model tokens (prompt + completion) per user per UTC day; unset = unlimited.
    chat_daily_tokens_user: int | None = Field(None, ge=1)

    metrics_token: SecretStr | None = None
    # The browser playground at /playground: always in development, elsewhere only when asked for.
    playground: bool = False
    innova_load_plugins: CommaList | None = None

    @field_validator("allowed_origins", "trusted_proxies", "innova_load_plugins", mode="before")
    @classmethod
    def _commas(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator(
        "rate_limit_login_email",
        "rate_limit_login_ip",
        "rate_limit_login_device",
        "rate_limit_register_ip",
        "rate_limit_forgot_email",
        "rate_limit_forgot_ip",
        "rate_limit_chat_user",
        "rate_limit_export_user",
        "rate_limit_verify_user",
        "rate_limit_conversations_user",
        mode="before",
    )
    @classmethod
    def _rate_limit(cls, value: Any) -> RateLimit:
        return RateLimit.parse(value)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_network(item, strict=False)
        return value

    @field_validator("frontend_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        return [origin.rstrip("/") for origin in value]

    @field_validator("smtp_host", "smtp_user", "smtp_from_email", "mailer", "chat_model", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        if not self.allowed_origins and self.env != "production":
            self.allowed_origins = ["http://localhost:3000"]
        if self.mailer is None:
            self.mailer = "smtp" if self.smtp_host else "console"
        return self

    # -- derived values -------------------------------------------------

    @property
    def mongo_uri_value(self) -> str | None:
        return self.mongo_uri.get_secret_value() if self.mongo_uri else None

    @property
    def playground_enabled(self) -> bool:
        return self.env == "development" or self.playground

    @property
    def chat_lease(self) -> timedelta:
        return timedelta(seconds=self.chat_lease_seconds)

    @property
    def smtp_sender(self) -> str | None:
        return self.smtp_from_email or self.smtp_user

    def mongo_uri_problem(self) -> str | None:
        """Why `MONGO_URI` cannot be used, in one line without its secrets; None when it parses.

        Checked in every environment: PyMongo would otherwise raise from deep
        inside the client's constructor, a traceback instead of a reason.
        """
        uri = self.mongo_uri_value
        if not uri:
            return None
        reason = _mongo_uri_error(uri)
        if reason is None:
            return None
        return (
            f"MONGO_URI is not a valid MongoDB URI ({reason}): write it as "
            "mongodb://USER:PASSWORD@HOST:PORT/DB?authSource=DB, %-escaping special characters "
            "in USER and PASSWORD (urllib.parse.quote_plus)."
        )

    def problems(self) -> list[str]:
        """Unsafe or missing settings, one human line each; empty when all is well.

        Only production is strict: development keeps working with the embedded
        database, plain-HTTP origins and the console mailer. A malformed
        `MONGO_URI` is a problem everywhere.
        """
        uri_problem = self.mongo_uri_problem()
        lines: list[str] = [uri_problem] if uri_problem else []
        if self.chat_lease_seconds < 3 * self.chat_checkpoint_ms / 1000:
            lines.append(
                f"CHAT_LEASE_SECONDS={self.chat_lease_seconds:g} must be at least three checkpoint intervals "
                f"(CHAT_CHECKPOINT_MS={self.chat_checkpoint_ms}): a live reply would be declared dead."
            )
        if self.env != "production":
            return lines
        if not self.mongo_uri_value:
            lines.append(
                "MONGO_URI is not set: production needs a real MongoDB "
                "(e.g. mongodb://appuser:…@127.0.0.1:27017/innova_db?authSource=innova_db)."
            )
        if not self.allowed_origins:
            lines.append(
                "ALLOWED_ORIGINS is empty: list the front-end origins, "
                "e.g. https://innovaplus.africa,https://www.innovaplus.africa."
            )
        for origin in self.allowed_origins:
            if origin == "*":
                lines.append("ALLOWED_ORIGINS contains '*': credentialed CORS needs explicit https origins.")
            elif not origin.startswith("https://"):
                lines.append(f"ALLOWED_ORIGINS contains {origin!r}: production origins must be https://.")
        if not self.cookie_secure:
            lines.append("COOKIE_SECURE=false is not allowed in production: the session cookie must be Secure.")
        if self.mailer == "console":
            lines.append(
                "No mailer: set SMTP_HOST (and SMTP_PORT, SMTP_USER, SMTP_PASS, SMTP_USE_TLS) or MAILER; "
                "the console mailer is for development only."
            )
        if not self.frontend_url.startswith("https://"):
            lines.append(
                f"FRONTEND_URL={self.frontend_url!r} must be https:// in production (it is the base of reset links)."
            )
        return lines


def _mongo_uri_error(uri: str) -> str | None:
    """PyMongo's own complaint about `uri` (what `AsyncMongoClient` would raise), secrets removed.

    `_validate_uri` is the check the async client runs in its constructor; the
    public `parse_uri` would also resolve `mongodb+srv://` names in DNS, which
    a configuration check must not wait for.
    """
    from pymongo.errors import PyMongoError

    try:
        _uri_validator()(uri)
    except (PyMongoError, ValueError, TypeError) as exc:
        return _redacted(" ".join(str(exc).split()), uri)
    return None


def _uri_validator() -> Callable[[str], object]:
    try:
        from pymongo.uri_parser_shared import _validate_uri

        return _validate_uri
    except ImportError:  # pragma: no cover - older PyMongo: parse, but never resolve SRV names
        from pymongo.uri_parser import parse_uri

        return lambda uri: None if uri.startswith("mongodb+srv://") else parse_uri(uri)


def _redacted(message: str, uri: str) -> str:
    """`message` with the URI's password (what follows `user:`, up to the last `@`) masked."""
    rest = uri.split("://", 1)[-1]
    userinfo = rest.rsplit("@", 1)[0] if "@" in rest else ""
    password = userinfo.split(":", 1)[1] if ":" in userinfo else ""
    secrets = {uri, userinfo, password} - {""} if password else {uri}
    for secret in sorted(secrets, key=len, reverse=True):
        message = message.replace(secret, "****")
    return message


class ConfigError(Exception):
    """Startup refused: `lines` says what is wrong, one problem per line."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def load_settings(**overrides: Any) -> Settings:
    """Read the environment (and `.env` outside production); raise `ConfigError` on bad values."""
    return Settings.load(**overrides)
