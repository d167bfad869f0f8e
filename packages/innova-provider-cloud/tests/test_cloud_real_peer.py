"""Both providers against a real OpenAI-compatible server on loopback: llama-cpp-python's, serving SmolLM2-135M.

The conformance suite, the whole HTTP/SSE path, and `innova chat` in a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace

import pytest

from innova_provider_cloud import make_mistral, make_openai
from innova_provider_cloud.mistral_provider import MistralProvider
from innova_provider_cloud.openai_provider import OpenAIProvider
from innova_server.chat import ChatProvider, ContextTooLong, ProviderAuthError, ProviderRateLimited, ProviderUnavailable
from innova_server.plugins import PluginRegistry
from innova_server.settings import Settings
from innova_server.testing import ErrorCase, ProviderConformance
from innova_server.testing.chat_client import chat, signed_in

SECRET_KEY = "sk-test-SECRET-0123456789abcdef"
FAST = {"cloud_first_token_timeout_seconds": 2, "cloud_idle_timeout_seconds": 2, "cloud_max_retries": 0}


def openai_at(base_url: str, **overrides: object) -> OpenAIProvider:
    return make_openai(None, openai_api_key=SECRET_KEY, openai_base_url=f"{base_url}/v1", **overrides)


def mistral_at(base_url: str, **overrides: object) -> MistralProvider:
    return make_mistral(None, mistral_api_key=SECRET_KEY, mistral_base_url=base_url, **overrides)


def test_registered_through_the_entry_point():
    registry = PluginRegistry.load(Settings(_env_file=None, env="test"))
    for name, default in (("openai", "gpt-4o-mini"), ("mistral", "mistral-small-latest")):
        entry = registry.provider_entry(name)
        assert entry.plugin == "cloud" and entry.models == () and entry.default_model == default
        # No fixed list: any model name an OpenAI-compatible server knows.
        assert registry.resolve_model(entry, "llama3.1:8b") == "llama3.1:8b"
    info = next(info for info in registry.infos() if info.name == "cloud")
    assert sorted(info.providers) == ["mistral", "openai"] and info.error is None


class TestOpenAIConformance(ProviderConformance):
    model = "smollm2-135m"

    @pytest.fixture
    def make_provider(self, llama_server: str) -> Callable[[], ChatProvider]:
        return lambda: openai_at(llama_server)

    @pytest.fixture(params=["401", "429", "ctx", "refused"])
    def error_case(self, request: pytest.FixtureRequest, fake_api, refused_url) -> ErrorCase:
        url, _ = fake_api
        if request.param == "refused":
            return ErrorCase(lambda: openai_at(refused_url, **FAST), ProviderUnavailable)
        expected = {"401": ProviderAuthError, "429": ProviderRateLimited, "ctx": ContextTooLong}[request.param]
        return ErrorCase(lambda: openai_at(url, **FAST), expected, replace(self.make_request(), model=request.param))


class TestMistralConformance(ProviderConformance):
    model = "smollm2-135m"

    @pytest.fixture
    def make_provider(self, llama_server: str) -> Callable[[], ChatProvider]:
        return lambda: mistral_at(llama_server)

    # "ctx-openai": the OpenAI-shaped context-length reply of a server behind
    # MISTRAL_BASE_URL (vLLM, llama.cpp). Mistral's own (code 3051) is not
    # ContextTooLong: see test_cloud_errors.test_each_apis_own_context_length_reply.
    @pytest.fixture(params=["401", "429", "ctx-openai", "refused"])
    def error_case(self, request: pytest.FixtureRequest, fake_api, refused_url) -> ErrorCase:
        url, _ = fake_api
        if request.param == "refused":
            return ErrorCase(lambda: mistral_at(refused_url, **FAST), ProviderUnavailable)
        expected = {"401": ProviderAuthError, "429": ProviderRateLimited, "ctx-openai": ContextTooLong}[request.param]
        return ErrorCase(lambda: mistral_at(url, **FAST), expected, replace(self.make_request(), model=request.param))


@pytest.mark.parametrize("provider", ["openai", "mistral"])
def test_chat_over_sse_with_the_real_server(provider, llama_server, point_at, start_server, db):
    point_at(provider, llama_server)
    server = start_server(provider=provider, chat_model="smollm2-135m", chat_max_tokens=24)
    with signed_in(server.url) as client:
        reply = chat(client, "Bonjour ! Présente-toi en une phrase.")
    assert reply.status == 200
    names = reply.names()
    assert names[0] == "start" and names[-1] == "done" and names.count("token") >= 2
    assert set(names[1:-1]) == {"token"}
    assert reply.data("start")["provider"] == provider and reply.data("start")["model"] == "smollm2-135m"
    assert reply.text().strip()
    assert reply.data("done")["finish_reason"] in ("stop", "length")
    stored = db.messages.find_one({"role": "assistant"})
    assert stored["content"] == reply.text() and stored["status"] == "complete"


@pytest.mark.parametrize("provider", ["openai", "mistral"])
def test_innova_chat_with_the_real_server(provider, llama_server, clean_env, tmp_path):
    env = {**clean_env, "PROVIDER": provider, "CHAT_MAX_TOKENS": "16", "ENV": "development"}
    if provider == "openai":
        env |= {"OPENAI_API_KEY": SECRET_KEY, "OPENAI_BASE_URL": f"{llama_server}/v1"}
    else:
        env |= {"MISTRAL_API_KEY": SECRET_KEY, "MISTRAL_BASE_URL": llama_server}
    command = [sys.executable, "-m", "innova_server.cli", "chat", "Bonjour !", "--model", "smollm2-135m"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert f"[{provider}/smollm2-135m]" in done.stderr and "first token" in done.stderr
    assert SECRET_KEY not in done.stdout + done.stderr


@pytest.mark.parametrize(("provider", "variable"), [("openai", "OPENAI_API_KEY"), ("mistral", "MISTRAL_API_KEY")])
def test_innova_chat_without_a_key_says_so_in_one_line(provider, variable, clean_env, tmp_path):
    env = {**clean_env, "PROVIDER": provider}
    command = [sys.executable, "-m", "innova_server.cli", "chat", "Bonjour"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0], done.stderr


def test_innova_chat_auth_error_does_not_show_the_key(fake_api, clean_env, tmp_path):
    url, _ = fake_api
    env = {**clean_env, "PROVIDER": "openai", "OPENAI_API_KEY": SECRET_KEY, "OPENAI_BASE_URL": f"{url}/v1"}
    command = [sys.executable, "-m", "innova_server.cli", "chat", "Bonjour", "--model", "401"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "provider_auth" in done.stderr
    assert SECRET_KEY not in done.stdout + done.stderr


def test_innova_check_never_shows_the_keys(clean_env, tmp_path):
    env = {**clean_env, "PROVIDER": "openai", "OPENAI_API_KEY": SECRET_KEY, "MISTRAL_API_KEY": SECRET_KEY}
    done = subprocess.run(
        [sys.executable, "-m", "innova_server.cli", "check", "-v"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "ok: provider openai (model gpt-4o-mini, plugin cloud)" in done.stdout
    assert SECRET_KEY not in done.stdout + done.stderr


@pytest.mark.parametrize(("provider", "variable"), [("openai", "OPENAI_API_KEY"), ("mistral", "MISTRAL_API_KEY")])
def test_innova_check_reports_a_missing_key(clean_env, tmp_path, provider, variable):
    env = {k: v for k, v in clean_env.items() if k != variable}
    done = subprocess.run(
        [sys.executable, "-m", "innova_server.cli", "check"],
        env={**env, "PROVIDER": provider},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    assert any(line.startswith("error: ") and variable in line for line in done.stdout.splitlines()), done.stdout
