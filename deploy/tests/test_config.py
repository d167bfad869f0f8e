"""backend.env.example and gunicorn.conf.py, checked against the code they configure."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from innova_server.settings import PluginSettings, Settings

from .conftest import DEPLOY, find_tool

ENV_EXAMPLE = DEPLOY / "backend.env.example"
# Variables read by plugins and by gunicorn.conf.py, not by the core Settings.
PLUGIN_AND_SERVER_VARS = {
    "ECHO_DELAY_MS",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "MISTRAL_API_KEY",
    "MISTRAL_BASE_URL",
    "SMOLLM_MODEL_PATH",
    "WEB_CONCURRENCY",
    "GUNICORN_TIMEOUT",
    "GUNICORN_GRACEFUL_TIMEOUT",
    "GUNICORN_KEEPALIVE",
    # innova-mailer (MAILER=smtp)
    "SMTP_TLS_MODE",
    "SMTP_CA_FILE",
    "SMTP_SEND_TIMEOUT_SECONDS",
}
_LINE = re.compile(r"^(#)?([A-Z][A-Z0-9_]*)=(.*)$")


def example_entries() -> dict[str, tuple[bool, str]]:
    """NAME -> (active, value) for every `NAME=value` or `#NAME=value` line."""
    entries: dict[str, tuple[bool, str]] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = _LINE.match(line)
        if match:
            entries[match[2]] = (match[1] is None, match[3])
    return entries


def installed_plugin_variables() -> set[str]:
    """The variables of every installed plugin: its `PluginSettings` subclasses' fields."""
    names: set[str] = set()
    for entry_point in entry_points(group="innova"):
        try:
            module = entry_point.load()
        except Exception:  # noqa: S112 - a broken plugin is the plugin tests' business
            continue
        for value in vars(module).values():
            if inspect.isclass(value) and issubclass(value, PluginSettings) and value not in (PluginSettings, Settings):
                names |= {field.upper() for field in value.model_fields}
    return names


def test_every_variable_is_in_the_env_example() -> None:
    names = set(example_entries())
    expected = {name.upper() for name in Settings.model_fields} | PLUGIN_AND_SERVER_VARS
    assert sorted(expected - names) == []
    assert "ECHO_DELAY_MS" in installed_plugin_variables()  # the discovery below works
    assert sorted(installed_plugin_variables() - names) == []


def test_every_variable_of_the_example_is_documented() -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    for index, line in enumerate(lines):
        if _LINE.match(line):
            # A comment right above, or in the group of settings it belongs to.
            above = [entry for entry in lines[max(0, index - 6) : index] if entry.startswith("# ")]
            assert above, f"no comment near {line!r}"


def test_the_example_is_a_valid_production_configuration() -> None:
    """Filled in as shipped (placeholders for secrets), production accepts it."""
    values = {name.lower(): value for name, (active, value) in example_entries().items() if active}
    assert values["env"] == "production"
    assert values["host"] == "127.0.0.1" and values["port"] == "8000"
    assert values["db_name"] == "innova_db"
    assert values["allowed_origins"] == "https://innovaplus.africa,https://www.innovaplus.africa"
    assert "authSource=innova_db" in values["mongo_uri"] and "appuser" in values["mongo_uri"]
    settings = Settings(
        _env_file=None, **{k: v for k, v in values.items() if k.upper() in {n.upper() for n in Settings.model_fields}}
    )
    assert settings.problems() == []


def test_the_install_instructions_give_owner_and_mode() -> None:
    text = ENV_EXAMPLE.read_text()
    assert "install -o root -g innova -m 640" in text
    assert "/etc/innovaplus/backend.env" in text


def _print_config(tmp_path: Path, **env: str) -> dict[str, str]:
    gunicorn = find_tool("gunicorn")
    if gunicorn is None:
        pytest.skip("gunicorn is not installed (innova-server[production])")
    result = subprocess.run(
        [gunicorn, "--print-config", "--config", str(DEPLOY / "gunicorn.conf.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        # `--print-config` imports the app, which wants ENV set (any value: the config is what is read).
        env={
            "PATH": os.environ.get("PATH", ""),
            "TMPDIR": str(tmp_path),
            "MONGO_URI": "mongodb://127.0.0.1:9",
            "ENV": "development",
            **env,
        },
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = {}
    for line in result.stdout.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            config[name.strip()] = value.strip()
    return config


def test_gunicorn_accepts_the_config_with_production_defaults(tmp_path: Path) -> None:
    config = _print_config(tmp_path)
    assert config["bind"] == "['127.0.0.1:8000']"
    assert config["worker_class"] == "uvicorn_worker.UvicornWorker"
    assert config["wsgi_app"] == "innova_server.asgi:app"
    assert int(config["workers"]) >= 2
    assert config["forwarded_allow_ips"] == "['127.0.0.1', '::1']"
    assert config["accesslog"] == "-" and config["errorlog"] == "-"
    assert int(config["timeout"]) >= 30 and int(config["graceful_timeout"]) >= 10
    assert config["preload_app"] == "False"
    assert config["child_exit"] == "<child_exit()>"
    assert not list(tmp_path.glob("innova-metrics-*"))  # checking the config leaves nothing behind


def test_gunicorn_config_follows_the_environment(tmp_path: Path) -> None:
    config = _print_config(tmp_path, WEB_CONCURRENCY="5", HOST="::1", PORT="8123", GUNICORN_TIMEOUT="90")
    assert config["workers"] == "5"
    assert config["bind"] == "['[::1]:8123']"
    assert config["timeout"] == "90"
    assert config["control_socket_disable"] == "True"
    # An app host of several binds its private address, and loopback for the local checks.
    private = _print_config(tmp_path, HOST="10.0.0.11", PORT="8000")
    assert private["bind"] == "['10.0.0.11:8000', '127.0.0.1:8000']"


def test_gunicorn_believes_forwarded_headers_from_trusted_proxies_only(tmp_path: Path) -> None:
    """forwarded_allow_ips comes from TRUSTED_PROXIES (the app's list), not a list of its own."""
    assert _print_config(tmp_path)["forwarded_allow_ips"] == "['127.0.0.1', '::1']"
    several = _print_config(tmp_path, TRUSTED_PROXIES="10.0.0.10, 10.0.1.0/24")
    assert several["forwarded_allow_ips"] == "['10.0.0.10', '10.0.1.0/24']"
    assert "127.0.0.1" not in (DEPLOY / "gunicorn.conf.py").read_text().split("forwarded_allow_ips =")[1].split("\n")[0]


def test_systemd_timeout_outlasts_the_graceful_stop() -> None:
    unit = (DEPLOY / "systemd" / "innovaplus-backend.service").read_text()
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M)[1])  # type: ignore[index]
    graceful = int(re.search(r'"GUNICORN_GRACEFUL_TIMEOUT", (\d+)', (DEPLOY / "gunicorn.conf.py").read_text())[1])  # type: ignore[index]
    assert stop > graceful


def test_the_runbook_lets_deploy_read_the_plugin_list_but_not_the_secrets() -> None:
    """remote-deploy.sh runs as `deploy`, which is not in group innova: the
    directory must let others traverse it (751), plugins.txt be world-readable
    (644), and the env file stay 640."""
    text = (DEPLOY / "README.md").read_text()
    directory = re.search(r"install -d -m (\d+) -o root -g innova /etc/innovaplus\n", text)
    assert directory is not None
    assert int(directory.group(1), 8) & 0o001, "others (deploy) cannot traverse /etc/innovaplus"
    assert int(directory.group(1), 8) & 0o004 == 0, "others could list /etc/innovaplus"
    assert "install -o root -g root -m 644 /dev/stdin /etc/innovaplus/plugins.txt" in text
    assert "install -o root -g innova -m 640" in text
