"""The echo provider: exact echo, chunking, delay, registration, and the conformance suite."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from innova_provider_echo import EchoProvider, split_words
from innova_server.chat import chunks_of
from innova_server.plugins import PluginRegistry
from innova_server.sdk import ChatMessage, ChatProvider, ChatRequest, ConfigError, Settings
from innova_server.testing import ProviderConformance

TRICKY = [
    "Bonjour",
    "  deux  espaces  au début et à la fin  ",
    "lignes\n\nvides\r\net\ttabulations",
    "émojis 🌍🙂 et 👨‍👩‍👧 famille",
    "日本語のテキスト と English",
    "\n",
    "",
]


def reply(provider: EchoProvider, request: ChatRequest) -> list[str]:
    async def collect() -> list[str]:
        return [chunk.text async for chunk in chunks_of(provider, request)]

    return asyncio.run(collect())


def request_for(text: str, history: list[ChatMessage] | None = None) -> ChatRequest:
    return ChatRequest(messages=[*(history or []), ChatMessage("user", text)], model="echo")


@pytest.mark.parametrize("text", TRICKY)
def test_echoes_the_last_user_message_exactly(text):
    chunks = reply(EchoProvider(), request_for(text))
    assert "".join(chunks) == text


def test_streams_several_chunks_word_by_word():
    chunks = [c for c in reply(EchoProvider(), request_for("un deux  trois\nquatre")) if c]
    assert chunks == ["un ", "deux  ", "trois\n", "quatre"]
    assert split_words(" a b") == [" ", "a ", "b"]


def test_echoes_the_last_user_message_not_the_history():
    history = [ChatMessage("system", "sys"), ChatMessage("user", "avant"), ChatMessage("assistant", "avant")]
    assert "".join(reply(EchoProvider(), request_for("maintenant", history))) == "maintenant"


def test_reports_finish_reason_and_usage():
    async def last() -> object:
        chunks = [c async for c in chunks_of(EchoProvider(), request_for("a b c"))]
        return chunks[-1]

    final = asyncio.run(last())
    assert final.finish_reason == "stop"
    assert final.usage.completion_tokens == 3


def test_echo_delay_spaces_the_chunks(monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_MS", "40")
    provider = EchoProvider()
    started = time.monotonic()
    reply(provider, request_for("un deux trois quatre"))
    assert time.monotonic() - started >= 0.12  # three pauses between four words


def test_registered_through_the_entry_point():
    registry = PluginRegistry.load(Settings(_env_file=None, env="test"))
    entry = registry.provider_entry("echo")
    assert entry.plugin == "echo" and entry.models == ("echo",) and entry.default_model == "echo"
    # The class is its own factory: built without the settings.
    _, model, provider = registry.build_provider(Settings(_env_file=None, env="test"))
    assert isinstance(provider, EchoProvider) and model == "echo"
    info = next(info for info in registry.infos() if info.name == "echo")
    assert info.providers == ["echo"] and info.error is None and info.version


class TestEchoConformance(ProviderConformance):
    model = "echo"

    @pytest.fixture
    def make_provider(self) -> Callable[[], ChatProvider]:
        return lambda: EchoProvider(delay_ms=5)

    def expected_reply(self, request: ChatRequest) -> str | None:
        return request.messages[-1].content


@pytest.mark.parametrize("value", ["soon", "-5"])
def test_a_bad_echo_delay_is_one_clear_startup_line(monkeypatch, value):
    monkeypatch.setenv("ECHO_DELAY_MS", value)
    with pytest.raises(ConfigError) as refused:
        EchoProvider()
    assert len(refused.value.lines) == 1
    assert refused.value.lines[0].startswith("ECHO_DELAY_MS: ")
    assert value not in refused.value.lines[0]
