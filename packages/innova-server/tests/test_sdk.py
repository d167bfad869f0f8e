"""The plugin SDK: one module, a provider in two imports, factories with or without settings,
plugin kinds from one table, and the scripted test provider."""

from __future__ import annotations

import asyncio
import textwrap
import types
from collections.abc import Callable

import pytest

from innova_server import sdk
from innova_server.chat import ChatMessage, ChatRequest, ProviderUnavailable, chunks_of
from innova_server.hookspecs import KINDS, Hookspecs
from innova_server.plugins import PluginRegistry, takes_settings
from innova_server.settings import Settings
from innova_server.testing import ProviderConformance, registered
from innova_server.testing.chat_client import chat, signed_in
from innova_server.testing.providers import ScriptedProvider

# A whole provider plugin, as its author writes it: two names from one module.
SHOUT = '''
from innova_server.sdk import Provider, hookimpl


class Shout(Provider):
    async def stream(self, request):
        for word in request.last_user_text.split(" "):
            yield word.upper() + " "


@hookimpl
def innova_register_providers(register):
    register("shout", Shout)
'''


def shout_module() -> types.ModuleType:
    module = types.ModuleType("innova_provider_shout")
    exec(compile(textwrap.dedent(SHOUT), "innova_provider_shout.py", "exec"), module.__dict__)  # noqa: S102
    return module


def request(text: str) -> ChatRequest:
    return ChatRequest([ChatMessage("system", "s"), ChatMessage("user", text)], model="m")


def test_a_provider_in_two_imports_serves_a_real_chat(start_server):
    with registered(shout_module(), name="shout"):
        server = start_server(provider="shout")
        with signed_in(server.url) as client:
            reply = chat(client, "bonjour le monde")
    assert reply.status == 200 and reply.text() == "BONJOUR LE MONDE "
    assert reply.data("start")["provider"] == "shout" and reply.data("done")["finish_reason"] == "stop"


class TestShoutConformance(ProviderConformance):
    model = "shout"

    @pytest.fixture
    def make_provider(self) -> Callable[[], sdk.ChatProvider]:
        return shout_module().Shout  # type: ignore[no-any-return]

    def expected_reply(self, request: ChatRequest) -> str | None:
        return "".join(word.upper() + " " for word in request.last_user_text.split(" "))


def test_the_sdk_exports_what_providers_and_mailers_use():
    for name in sdk.__all__:
        assert getattr(sdk, name) is not None
    needed = {"ChatRequest", "ChatMessage", "ChatChunk", "Usage", "ProviderError", "ProviderAuthError",
              "ProviderRateLimited", "ProviderTimeout", "ProviderUnavailable", "ContextTooLong",
              "iterate_in_thread", "error_for_status", "hookimpl", "PluginSettings", "Settings", "EmailMessage",
              "Mailer", "MailerError", "Provider", "RegisterProvider", "RegisterMailer", "ConfigError"}
    assert needed <= set(sdk.__all__)


def test_the_base_class_closes_without_being_told_how():
    provider = shout_module().Shout()
    asyncio.run(provider.aclose())
    asyncio.run(provider.aclose())


def settings_factory(settings):
    return settings


def default_settings_factory(settings=None):
    return settings


class NoArguments:
    pass


class OptionalArguments:
    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay


@pytest.mark.parametrize(
    ("factory", "wants"),
    [
        (settings_factory, True),
        (default_settings_factory, True),  # named `settings`: it is given them
        (lambda settings: settings, True),
        (lambda: None, False),
        (NoArguments, False),
        (OptionalArguments, False),  # its defaults stand: `delay` is not the settings
        (lambda *args: args, True),
    ],
)
def test_a_factory_gets_the_settings_only_if_it_takes_them(factory, wants):
    assert takes_settings(factory) is wants


def test_every_kind_of_plugin_is_one_row_of_the_table():
    assert [kind.hook for kind in KINDS] == ["innova_register_providers", "innova_register_mailers"]
    for kind in KINDS:
        assert getattr(Hookspecs, kind.hook).__doc__ == kind.doc
    registry = PluginRegistry.load(Settings(_env_file=None, env="test"))
    assert set(registry.entries) == {kind.name for kind in KINDS}
    assert registry.mailers["console"].plugin == "builtin"  # the class ConsoleMailer, called with no settings
    assert registry.build_mailer(Settings(_env_file=None, env="test")).__class__.__name__ == "ConsoleMailer"


def test_a_mailer_registered_with_models_is_a_broken_plugin():
    class Confused:
        @sdk.hookimpl
        def innova_register_mailers(self, register):
            register("confused", lambda: None, models=("m",))

    with registered(Confused(), name="confused"):
        registry = PluginRegistry.load(Settings(_env_file=None, env="test"))
    assert "mailers take no models" in registry.errors["confused"]
    assert "confused" not in registry.mailers


# -- the scripted provider -------------------------------------------------------------------


async def reply(provider: ScriptedProvider) -> tuple[str, str | None, BaseException | None]:
    text, reason = "", None
    try:
        async for chunk in chunks_of(provider, request("q")):
            text += chunk.text
            reason = chunk.finish_reason or reason
    except Exception as error:
        return text, reason, error
    return text, reason, None


def test_scripted_replies_are_played_in_order_then_the_default():
    provider = ScriptedProvider(["défaut"])
    provider.then(["un ", "deux"]).then(["avant "], error=ProviderUnavailable("down")).then(finish_reason="length")

    async def play() -> list[tuple[str, str | None, BaseException | None]]:
        return [await reply(provider) for _ in range(4)]

    first, failed, empty, default = asyncio.run(play())
    assert first == ("un deux", "stop", None)
    assert failed[0] == "avant " and isinstance(failed[2], ProviderUnavailable)
    assert empty == ("", "length", None)
    assert default == ("défaut", "stop", None)
    assert len(provider.requests) == 4 and provider.started.is_set() and not provider.closed_early.is_set()


def test_a_scripted_forever_reply_stops_when_its_stream_is_closed():
    provider = ScriptedProvider(forever=True, delay=0.01, pieces=())

    async def read_some() -> str:
        text = ""
        stream = chunks_of(provider, request("q"))
        async for chunk in stream:
            text += chunk.text
            if text.count(" ") >= 3:
                break
        await stream.aclose()
        return text

    assert asyncio.run(read_some()) == "w0 w1 w2 "
    assert provider.closed_early.is_set() and provider.streams_closed_early == 1
