"""The hooks a plugin implements, as one table: `KINDS`.

Each kind of plugin (chat providers, mailers) is one row: the hook is
`innova_register_<kind>(register)`, and the plugin calls `register(name,
factory, ...)` once per thing it offers. The hookspecs pluggy checks are built
from the table, and so are the registry's bookkeeping, its error messages and
`innova plugins`: adding a third kind of plugin is adding one row here (and
the code that uses what it builds), not an edit in five places.

Hooks register *factories*: nothing heavy is imported or built until the
deployment selects it. A factory takes the core `Settings`, or nothing at all
(see `innova_server.plugins.call_factory`). New hook arguments will only ever
be added as new keywords.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import pluggy

from innova_server.chat import ChatProvider, Provider
from innova_server.mail import Mailer
from innova_server.settings import Settings

PROJECT = "innova"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# What a provider factory may return: the core protocol, or the SDK's base
# class (whose `stream` may yield bare strings; the core wraps them).
AnyProvider = ChatProvider | Provider
ProviderFactory = Callable[[Settings], AnyProvider] | Callable[[], AnyProvider]
MailerFactory = Callable[[Settings], Mailer] | Callable[[], Mailer]


class RegisterProvider(Protocol):
    def __call__(
        self,
        name: str,
        factory: ProviderFactory,
        *,
        models: tuple[str, ...] | list[str] = (),
        default_model: str | None = None,
    ) -> None: ...


class RegisterMailer(Protocol):
    def __call__(self, name: str, factory: MailerFactory) -> None: ...


@dataclass(frozen=True)
class Kind:
    """One kind of plugin.

    `name` is plural (`providers`): it names the hook (`innova_register_<name>`),
    the registry's table and the `innova plugins` column. `setting` is the
    variable that selects one (`PROVIDER`). `models`: whether `register` takes
    `models=` / `default_model=` (and `CHAT_MODEL`-style checks apply).
    `missing_hint`: a word of advice when a given name is not installed.
    """

    name: str
    setting: str
    doc: str
    models: bool = False
    missing_hint: tuple[tuple[str, str], ...] = ()

    @property
    def hook(self) -> str:
        return f"innova_register_{self.name}"

    @property
    def noun(self) -> str:
        return self.name.removesuffix("s")


KINDS: tuple[Kind, ...] = (
    Kind(
        "providers",
        "PROVIDER",
        "Register chat providers: `register(name, factory, *, models=(), default_model=None)`.",
        models=True,
    ),
    Kind(
        "mailers",
        "MAILER",
        "Register mailers: `register(name, factory)`.",
        missing_hint=(("smtp", " (install innova-mailer for SMTP)"),),
    ),
)
KIND_BY_NAME = {kind.name: kind for kind in KINDS}


def _spec(kind: Kind) -> Callable[..., None]:
    def spec(self: object, register: Callable[..., None]) -> None:
        """(replaced by the kind's doc)"""

    spec.__name__ = spec.__qualname__ = kind.hook
    spec.__doc__ = kind.doc
    marked: Callable[..., None] = hookspec(spec)
    return marked


# The class pluggy reads hookspecs from, one method per row of KINDS.
Hookspecs: type[Any] = type("Hookspecs", (), {kind.hook: _spec(kind) for kind in KINDS})

__all__ = [
    "KINDS",
    "KIND_BY_NAME",
    "AnyProvider",
    "Hookspecs",
    "Kind",
    "MailerFactory",
    "ProviderFactory",
    "RegisterMailer",
    "RegisterProvider",
    "hookimpl",
    "hookspec",
]
