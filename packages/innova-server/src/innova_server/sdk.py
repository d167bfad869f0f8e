"""Everything a plugin author needs, from one module: `from innova_server.sdk import ...`.

The smallest provider is two names::

    from innova_server.sdk import Provider, hookimpl

    class Shout(Provider):
        async def stream(self, request):
            yield request.last_user_text.upper()      # a bare str is a text chunk

    @hookimpl
    def innova_register_providers(register):
        register("shout", Shout)                     # a class whose __init__ needs nothing is its own factory

This module only re-exports; the names live where the core uses them
(`innova_server.chat`, `.mail`, `.hookspecs`, `.settings`). Importing from
here keeps a plugin working when the core moves things between those modules:
this list is the public API for plugins, and names are only ever added to it.
The conformance suites and test helpers are in `innova_server.testing`.
"""

from __future__ import annotations

from email.message import EmailMessage

from innova_server.chat import (
    ChatChunk,
    ChatMessage,
    ChatProvider,
    ChatRequest,
    ContextTooLong,
    FinishReason,
    Provider,
    ProviderAuthError,
    ProviderBusy,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
    Role,
    Usage,
    error_for_status,
    iterate_in_thread,
    parse_retry_after,
)
from innova_server.hookspecs import (
    MailerFactory,
    ProviderFactory,
    RegisterMailer,
    RegisterProvider,
    hookimpl,
)
from innova_server.mail import Mailer, MailerError
from innova_server.settings import ConfigError, PluginSettings, Settings

__all__ = [
    "ChatChunk",
    "ChatMessage",
    "ChatProvider",
    "ChatRequest",
    "ConfigError",
    "ContextTooLong",
    "EmailMessage",
    "FinishReason",
    "Mailer",
    "MailerError",
    "MailerFactory",
    "PluginSettings",
    "Provider",
    "ProviderAuthError",
    "ProviderBusy",
    "ProviderError",
    "ProviderFactory",
    "ProviderRateLimited",
    "ProviderTimeout",
    "ProviderUnavailable",
    "RegisterMailer",
    "RegisterProvider",
    "Role",
    "Settings",
    "Usage",
    "error_for_status",
    "hookimpl",
    "iterate_in_thread",
    "parse_retry_after",
]
