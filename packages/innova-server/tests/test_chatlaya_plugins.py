"""The provider plugin system: broken plugins, selection errors, `innova plugins`, `innova chat`.

Broken plugins are real installed distributions (a `.dist-info` with an
`innova` entry point on a temporary `sys.path` entry), loaded the way
production loads them.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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
    # The broken plugin leads: the missing name may well be its.
    assert message.startswith(
        "PROVIDER='nope' is not installed; it may come from broken plugin 'brokenplug': "
        "ImportError: missing dependency: libfoo. Installed providers: "
    )
    assert {"badfactory", "echo"} <= installed_providers(message)  # (other packages may be installed too)
    with pytest.raises(ConfigError) as info:
        create_app(make_settings(chat_model="gpt-4o"))
    assert info.value.lines == ["CHAT_MODEL='gpt-4o' is not a model of provider 'echo': echo."]


def test_unknown_provider_without_broken_plugins_lists_what_is_installed(make_settings):
    with pytest.raises(ConfigError) as info:
        create_app(make_settings(provider="nope"))
    message = info.value.lines[0]
    assert message.startswith("PROVIDER='nope' is not installed. Installed providers: ")
    assert "broken" not in message


def test_several_broken_plugins_are_all_named_first(plugin_dir, make_settings):
    install_fake_plugin(plugin_dir, "alsobroken", "raise RuntimeError('bad config')\n")
    importlib.invalidate_caches()
    with pytest.raises(ConfigError) as info:
        create_app(make_settings(provider="nope"))
    lead = info.value.lines[0].split(" Installed providers: ")[0]
    assert lead.startswith("PROVIDER='nope' is not installed; it may come from a broken plugin: ")
    assert "'brokenplug': ImportError: missing dependency: libfoo" in lead
    assert "'alsobroken': RuntimeError: bad config" in lead


def test_a_plugin_calling_sys_exit_on_import_does_not_stop_the_server(plugin_dir, start_server):
    install_fake_plugin(plugin_dir, "exitplug", "import sys\nsys.exit('no GPU here')\n")
    importlib.invalidate_caches()
    server = start_server()
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/health").status_code == 200
    assert server.services.plugins.errors["exitplug"] == "SystemExit: no GPU here"
    assert server.services.provider_entry.name == "echo"


def test_a_misspelt_hook_is_that_plugins_error(plugin_dir, make_settings):
    install_fake_plugin(
        plugin_dir,
        "typoplug",
        """
        from innova_server.plugins import hookimpl

        @hookimpl
        def innova_register_provider(register):  # missing "s": pluggy alone would never call it
            register("typo", lambda settings: None)
        """,
    )
    importlib.invalidate_caches()
    registry = PluginRegistry.load(make_settings())
    assert registry.errors["typoplug"] == (
        "PluginError: unknown hook 'innova_register_provider' "
        "(known hooks: innova_register_mailers, innova_register_providers)"
    )
    assert "typo" not in registry.providers
    assert "echo" in registry.providers and "badfactory" in registry.providers


class ExitingHook:
    @hookimpl
    def innova_register_providers(self, register: RegisterProvider) -> None:
        raise SystemExit(1)


def test_a_hook_calling_sys_exit_is_reported_and_skipped(start_server):
    with registered(ExitingHook(), name="exiting"):
        server = start_server()
    assert server.services.plugins.errors["exiting"] == "SystemExit: 1"
    assert server.services.provider_entry.name == "echo"


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
    expected = "innova: configuration error: PROVIDER='nope' is not installed; it may come from broken plugin"
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


class RunawayThreadProvider:
    """Generates in a thread that closing the iterator never tells to stop (until `release`)."""

    release = threading.Event()

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        threading.Thread(target=self.release.wait, args=(30,), name="runaway", daemon=True).start()
        yield ChatChunk(text="a")
        yield ChatChunk(text="b")

    async def aclose(self) -> None:
        return None


def test_conformance_suite_rejects_a_provider_whose_work_outlives_aclose():
    suite = ProviderConformance()
    suite.stop_timeout = 0.3
    try:
        with pytest.raises(AssertionError, match=r"still running .* after aclose\(\): thread 'runaway'"):
            suite.test_closing_the_iterator_stops_the_stream(RunawayThreadProvider)
    finally:
        RunawayThreadProvider.release.set()


def test_conformance_suite_calls_the_assert_stopped_hook():
    class Suite(ProviderConformance):
        def assert_stopped(self, provider: Any) -> None:
            raise AssertionError(f"hook saw {type(provider).__name__}")

    with pytest.raises(AssertionError, match="hook saw EchoLike"):
        Suite().test_streams_text_chunks(EchoLike)


class EchoLike:
    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        yield ChatChunk(text="ok")

    async def aclose(self) -> None:
        return None


class AnyioThreadProvider:
    """Does one blocking call the way the core does (anyio's worker threads, kept idle for reuse)."""

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk]:
        import anyio.to_thread

        text = await anyio.to_thread.run_sync(lambda: "ok")
        yield ChatChunk(text=text)
        yield ChatChunk(text=" done")

    async def aclose(self) -> None:
        return None


def test_conformance_suite_accepts_anyio_worker_threads():
    # AnyIO's idle pool threads outlive the call by design; they are no leak.
    suite = ProviderConformance()
    suite.stop_timeout = 0.3
    suite.test_closing_the_iterator_stops_the_stream(AnyioThreadProvider)
    suite.test_streams_text_chunks(AnyioThreadProvider)


@pytest.mark.parametrize("value", [None, "", "  "])
def test_asgi_entry_point_refuses_an_unset_env(plugin_dir, mongo_uri, value):
    env = cli_env(plugin_dir, MONGO_URI=mongo_uri)
    env.pop("ENV", None)
    if value is not None:
        env["ENV"] = value
    result = subprocess.run(
        [sys.executable, "-c", "import innova_server.asgi"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 3
    assert result.stderr.strip().startswith("innova: configuration error: ENV is not set")
    assert "Traceback" not in result.stderr
