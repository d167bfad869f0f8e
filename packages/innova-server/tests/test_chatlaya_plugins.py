"""The provider plugin system: broken plugins, selection errors, `innova plugins`, `innova chat`.

Broken plugins are real installed distributions (a `.dist-info` with an
`innova` entry point on a temporary `sys.path` entry), loaded the way
production loads them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from innova_server.app import create_app
from innova_server.chat import ChatChunk, ChatRequest, ProviderUnavailable
from innova_server.plugins import PluginRegistry, RegisterProvider, hookimpl
from innova_server.settings import ConfigError
from innova_server.testing import ErrorCase, ProviderConformance, registered


def install_fake_plugin(root: Path, name: str, module_source: str) -> None:
    """A minimal installed distribution named `name` whose entry point is module `name`."""
    (root / f"{name}.py").write_text(textwrap.dedent(module_source))
    dist = root / f"{name}-0.0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
    (dist / "entry_points.txt").write_text(f"[innova]\n{name} = {name}\n")


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    install_fake_plugin(root, "brokenplug", "raise ImportError('missing dependency: libfoo')\n")
    install_fake_plugin(
        root,
        "badfactory",
        """
        from innova_server.plugins import hookimpl

        def make(settings):
            raise RuntimeError("no API key configured")

        @hookimpl
        def innova_register_providers(register):
            register("badfactory", make, models=("m",), default_model="m")
        """,
    )
    monkeypatch.syspath_prepend(str(root))
    return root


def cli_env(plugin_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROVIDER", "CHAT_", "INNOVA_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(plugin_dir), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def test_a_broken_plugin_does_not_stop_the_server(plugin_dir, start_server):
    server = start_server()
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/health").status_code == 200
    errors = server.services.plugins.errors
    assert "ImportError: missing dependency: libfoo" in errors["brokenplug"]
    assert server.services.provider_entry.name == "echo"


def test_selecting_the_broken_plugin_fails_startup_with_its_error(plugin_dir, make_settings):
    with pytest.raises(ConfigError) as info:
        create_app(make_settings(provider="brokenplug"))
    assert info.value.lines == [
        "PROVIDER='brokenplug': plugin 'brokenplug' failed to load: ImportError: missing dependency: libfoo"
    ]


def test_a_factory_that_raises_fails_startup_only_when_selected(plugin_dir, make_settings):
    create_app(make_settings())  # not selected: never built
    with pytest.raises(ConfigError) as info:
        create_app(make_settings(provider="badfactory"))
    assert info.value.lines == ["PROVIDER='badfactory' could not start: RuntimeError: no API key configured"]


def installed_providers(message: str) -> set[str]:
    match = re.search(r"Installed providers: ([^.]*)\.", message)
    assert match is not None, message
    return set(match[1].split(", "))


def test_unknown_provider_and_model_fail_listing_what_is_installed(plugin_dir, make_settings):
    with pytest.raises(ConfigError) as info:
        create_app(make_settings(provider="nope"))
    message = info.value.lines[0]
    assert message.startswith("PROVIDER='nope' is not installed. Installed providers: ")
    assert {"badfactory", "echo"} <= installed_providers(message)  # (other packages may be installed too)
    assert "brokenplug (ImportError: missing dependency: libfoo)" in message
    with pytest.raises(ConfigError) as info:
        create_app(make_settings(chat_model="gpt-4o"))
    assert info.value.lines == ["CHAT_MODEL='gpt-4o' is not a model of provider 'echo': echo."]


def test_allow_list_skips_other_plugins(plugin_dir, make_settings):
    registry = PluginRegistry.load(make_settings(innova_load_plugins=["echo"]))
    assert set(registry.plugins) == {"builtin", "echo"}
    assert registry.errors == {}


class RaisingHook:
    @hookimpl
    def innova_register_providers(self, register: RegisterProvider) -> None:
        raise ValueError("bad registration")


def test_a_hook_that_raises_is_reported_and_skipped(start_server):
    with registered(RaisingHook(), name="raising"):
        server = start_server()
    assert server.services.plugins.errors["raising"] == "ValueError: bad registration"
    assert server.services.provider_entry.name == "echo"


def test_asgi_entry_point_prints_one_line_and_exits_3_on_unknown_provider(plugin_dir, mongo_uri):
    env = cli_env(plugin_dir, PROVIDER="nope", MONGO_URI=mongo_uri, ENV="test")
    result = subprocess.run(
        [sys.executable, "-c", "import innova_server.asgi"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 3
    expected = "innova: configuration error: PROVIDER='nope' is not installed. Installed providers: "
    assert expected in result.stderr
    assert {"badfactory", "echo"} <= installed_providers(result.stderr)
    assert "Traceback" not in result.stderr


def test_innova_plugins_lists_errors(plugin_dir):
    result = subprocess.run(
        [sys.executable, "-m", "innova_server.cli", "plugins", "--json"],
        env=cli_env(plugin_dir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    assert plugins["echo"]["providers"] == ["echo"] and plugins["echo"]["error"] is None
    assert plugins["brokenplug"]["error"] == "ImportError: missing dependency: libfoo"
    assert plugins["badfactory"]["providers"] == ["badfactory"]


def test_innova_chat_streams_an_echo_reply(plugin_dir):
    question = "Bonjour  Chatlaya\nça marche ? 🌍"
    result = subprocess.run(
        [sys.executable, "-m", "innova_server.cli", "chat", question],
        env=cli_env(plugin_dir, ECHO_DELAY_MS="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == question + "\n"
    assert "[echo/echo]" in result.stderr and "finish_reason=stop" in result.stderr


def test_innova_chat_reports_startup_errors(plugin_dir):
    result = subprocess.run(
        [sys.executable, "-m", "innova_server.cli", "chat", "x", "--provider", "badfactory"],
        env=cli_env(plugin_dir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "innova: PROVIDER='badfactory' could not start: RuntimeError: no API key configured"
    )


# -- the conformance suite itself catches misbehaving providers -----------------


class LeakyErrorProvider:
    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        yield ChatChunk(text="a")
        raise ConnectionError("raw transport error")

    async def aclose(self) -> None:
        return None


class BlockingProvider:
    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        import time

        time.sleep(0.5)  # noqa: ASYNC251 - blocking the event loop is what this provider does wrong
        yield ChatChunk(text="late")

    async def aclose(self) -> None:
        return None


def test_conformance_suite_rejects_undocumented_errors():
    suite = ProviderConformance()
    with pytest.raises(AssertionError, match="undocumented error ConnectionError"):
        suite.test_raises_only_documented_errors(ErrorCase(LeakyErrorProvider, ProviderUnavailable))


def test_conformance_suite_rejects_a_provider_blocking_the_loop():
    suite = ProviderConformance()
    with pytest.raises(AssertionError, match="event loop was blocked"):
        suite.test_never_blocks_the_event_loop(BlockingProvider)
