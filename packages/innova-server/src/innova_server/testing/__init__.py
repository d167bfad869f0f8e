"""Test helpers for Innova and its plugins.

- `registered(plugin)`: make a plugin object visible for the length of a block.
- `MailerConformance` (`innova_server.testing.mailer_conformance`): the checks
  a mailer plugin runs against itself; subclass it in your tests.
- `ProviderConformance`, `ErrorCase` (`innova_server.testing.provider_conformance`):
  the same for chat providers.
- `innova_server.testing.fixtures`: pytest fixtures (a real MongoDB-wire
  server, settings, a live server on loopback); enable them with
  `pytest_plugins = ["innova_server.testing.fixtures"]` in a conftest.py.
- `innova_server.testing.chat_client`: a signed-in HTTP client, a whole
  Chatlaya reply read with httpx-sse, and a reply resumed from an event id.
- `innova_server.testing.providers`: `ScriptedProvider` (queued replies,
  errors, delays, gates, endless replies) and `ProviderPlugin`, to drive the
  server without a model.
- `innova_server.testing.browser`: a headless Chromium driven over the
  DevTools protocol, for what only a browser enforces (CORS, cookies, SSE
  over fetch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from innova_server.plugins import registered

if TYPE_CHECKING:
    from innova_server.testing.mailer_conformance import MailerConformance
    from innova_server.testing.provider_conformance import ErrorCase, ProviderConformance


def __getattr__(name: str) -> Any:
    # Imported on first use: the conformance classes need pytest, which
    # `innova_server.testing.server` (used by the benchmarks) does not.
    if name == "MailerConformance":
        from innova_server.testing.mailer_conformance import MailerConformance

        return MailerConformance
    if name in ("ErrorCase", "ProviderConformance"):
        from innova_server.testing import provider_conformance

        return getattr(provider_conformance, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ErrorCase", "MailerConformance", "ProviderConformance", "registered"]
