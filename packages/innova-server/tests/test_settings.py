"""Configuration: defaults, parsing, and production's refusal of unsafe settings."""

from __future__ import annotations

import pytest

from innova_server.settings import ConfigError, RateLimit, Settings, load_settings

SAFE_PRODUCTION = {
    "env": "production",
    "mongo_uri": "mongodb://appuser:pw@127.0.0.1:27017/innova_db?authSource=innova_db",
    "allowed_origins": "https://innovaplus.africa,https://www.innovaplus.africa",
    "smtp_host": "smtp.example.com",
}


def make(**values: object) -> Settings:
    return Settings(_env_file=None, **values)


def test_development_defaults():
    settings = make()
    assert settings.env == "development"
    assert settings.allowed_origins == ["http://localhost:3000"]
    assert settings.mailer == "console"
    assert settings.provider == "echo"
    assert settings.db_name == "innova_db"
    assert settings.session_ttl_days == 7 and settings.reset_token_ttl_minutes == 30
    assert settings.cookie_secure is True
    assert settings.problems() == []


def test_safe_production_has_no_problems():
    settings = make(**SAFE_PRODUCTION)
    assert settings.allowed_origins == ["https://innovaplus.africa", "https://www.innovaplus.africa"]
    assert settings.mailer == "smtp"
    assert settings.problems() == []


def test_unsafe_production_lists_one_line_per_problem():
    problems = make(env="production", allowed_origins="*,http://innovaplus.africa", cookie_secure=False).problems()
    text = "\n".join(problems)
    assert "MONGO_URI" in text
    assert "'*'" in text
    assert "'http://innovaplus.africa'" in text
    assert "COOKIE_SECURE" in text
    assert "mailer" in text.lower()
    assert len(problems) == 5
    assert all("\n" not in line for line in problems)


def test_production_needs_origins():
    values = {**SAFE_PRODUCTION, "allowed_origins": ""}
    assert any("ALLOWED_ORIGINS" in line for line in make(**values).problems())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10/15m", RateLimit(10, 900)),
        ("5/h", RateLimit(5, 3600)),
        ("30/1m", RateLimit(30, 60)),
        (" 3 / 2d ", RateLimit(3, 172800)),
    ],
)
def test_rate_limit_syntax(text, expected):
    assert RateLimit.parse(text) == expected


@pytest.mark.parametrize("text", ["", "10", "10/", "ten/1m", "0/1m", "5/0m", "5/1y"])
def test_bad_rate_limit_is_a_config_error(text, monkeypatch):
    monkeypatch.setenv("RATE_LIMIT_LOGIN_EMAIL", text)
    with pytest.raises(ConfigError) as error:
        load_settings(_env_file=None)
    assert "RATE_LIMIT_LOGIN_EMAIL" in str(error.value)


def test_dotenv_is_read_in_development_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("DB_NAME=from_dotenv\nENV=development\n")
    monkeypatch.delenv("DB_NAME", raising=False)
    monkeypatch.setenv("ENV", "development")
    assert load_settings().db_name == "from_dotenv"
    monkeypatch.setenv("ENV", "production")
    assert load_settings().db_name == "innova_db"


def test_environment_variables_are_read(monkeypatch):
    monkeypatch.setenv("SESSION_TTL_DAYS", "3")
    monkeypatch.setenv("TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1")
    settings = load_settings(_env_file=None)
    assert settings.session_ttl_days == 3
    assert settings.trusted_proxies == ["10.0.0.0/8", "127.0.0.1"]


def test_bad_values_are_reported_by_variable_name(monkeypatch):
    monkeypatch.setenv("PORT", "http")
    monkeypatch.setenv("TRUSTED_PROXIES", "not-an-ip")
    with pytest.raises(ConfigError) as error:
        load_settings(_env_file=None)
    assert any(line.startswith("PORT:") for line in error.value.lines)
    assert any(line.startswith("TRUSTED_PROXIES:") for line in error.value.lines)


@pytest.mark.parametrize("env", ["development", "production"])
def test_malformed_mongo_uri_is_a_problem_without_the_password(env):
    values = {**SAFE_PRODUCTION, "env": env, "mongo_uri": "mongodb://app:hunter2:x@@h:99999/"}
    problems = make(**values).problems()
    assert len(problems) == 1
    assert problems[0].startswith("MONGO_URI is not a valid MongoDB URI (")
    assert "hunter2" not in problems[0]
    assert make(**{**values, "mongo_uri": SAFE_PRODUCTION["mongo_uri"]}).problems() == []
