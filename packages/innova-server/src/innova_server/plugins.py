"""The plugin system: pluggy hookspecs, entry-point loading, provider/mailer selection.

A plugin is a module (or object) with `@hookimpl` functions, published under
the `innova` entry-point group::

    [project.entry-points.innova]
    echo = "innova_provider_echo"

    @hookimpl
    def innova_register_providers(register):
        register("echo", make_echo, models=("echo",), default_model="echo")

Hooks register *factories*: nothing heavy is imported or built until the
deployment selects it (`PROVIDER`, `MAILER`). Factories take the `Settings`.
New hook arguments will only ever be added as new keywords.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import pluggy

from innova_server.chat import ChatProvider
from innova_server.mail import Mailer
from innova_server.settings import ConfigError, Settings

ENTRY_POINT_GROUP = "innova"
hookspec = pluggy.HookspecMarker("innova")
hookimpl = pluggy.HookimplMarker("innova")

log = logging.getLogger("innova.plugins")

ProviderFactory = Callable[[Settings], ChatProvider]
MailerFactory = Callable[[Settings], Mailer]


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


class Hookspecs:
    @hookspec
    def innova_register_providers(self, register: RegisterProvider) -> None:
        """Register chat providers: `register(name, factory, *, models=(), default_model=None)`."""

    @hookspec
    def innova_register_mailers(self, register: RegisterMailer) -> None:
        """Register mailers: `register(name, factory)`."""


@dataclass(frozen=True)
class ProviderEntry:
    name: str
    factory: ProviderFactory
    models: tuple[str, ...]
    default_model: str | None
    plugin: str


@dataclass(frozen=True)
class MailerEntry:
    name: str
    factory: MailerFactory
    plugin: str


@dataclass
class PluginInfo:
    name: str
    version: str | None
    providers: list[str] = field(default_factory=list)
    mailers: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "providers": self.providers,
            "mailers": self.mailers,
            "error": self.error,
        }


class _Builtin:
    """The core's own registrations: the development console mailer."""

    @hookimpl
    def innova_register_mailers(self, register: RegisterMailer) -> None:
        from innova_server.mail import ConsoleMailer

        register("console", lambda settings: ConsoleMailer())


# Plugins added in-process (tests, embedders) through `registered()`.
_extra_plugins: list[tuple[str, object]] = []


@contextlib.contextmanager
def registered(plugin: object, name: str | None = None) -> Iterator[None]:
    """Make `plugin` (an object or module with hookimpls) visible to registries built inside the block."""
    entry = (name or getattr(plugin, "__name__", None) or type(plugin).__name__, plugin)
    _extra_plugins.append(entry)
    try:
        yield
    finally:
        _extra_plugins.remove(entry)


class PluginError(Exception):
    """A plugin breaks the plugin contract (e.g. implements a hook that does not exist)."""


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class PluginRegistry:
    """What the installed plugins offer; built once per app (or CLI command)."""

    def __init__(self, allow: list[str] | None = None) -> None:
        self.pm = pluggy.PluginManager("innova")
        self.pm.add_hookspecs(Hookspecs)
        self.allow = allow
        self.plugins: dict[str, PluginInfo] = {}
        self.providers: dict[str, ProviderEntry] = {}
        self.mailers: dict[str, MailerEntry] = {}

    # -- loading ---------------------------------------------------------

    @classmethod
    def load(cls, settings: Settings) -> PluginRegistry:
        registry = cls(settings.innova_load_plugins)
        registry._add("builtin", _Builtin(), version=None)
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if registry.allow is not None and entry_point.name not in registry.allow:
                continue
            version = entry_point.dist.version if entry_point.dist else None
            try:
                plugin = entry_point.load()
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # a broken plugin must not take the server down, even by sys.exit()
                registry._failed(entry_point.name, version, exc)
                continue
            registry._add(entry_point.name, plugin, version=version)
        for name, plugin in list(_extra_plugins):
            registry._add(name, plugin, version=None)
        return registry

    def _failed(self, name: str, version: str | None, exc: BaseException) -> None:
        log.error("plugin %s failed to load: %s", name, _error_text(exc))
        self.plugins[name] = PluginInfo(name, version, error=_error_text(exc))

    def _add(self, name: str, plugin: object, *, version: str | None) -> None:
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:  # e.g. a hookimpl with a wrong signature
            self._failed(name, version, exc)
            return
        unknown = self._unknown_hooks(plugin)
        if unknown:
            # pluggy accepts any `@hookimpl` name and silently never calls it:
            # a misspelt hook would leave the plugin registering nothing.
            self.pm.unregister(plugin)
            known = ", ".join(sorted(hook for hook in dir(Hookspecs) if hook.startswith("innova_")))
            self._failed(name, version, PluginError(f"unknown hook {', '.join(unknown)} (known hooks: {known})"))
            return
        info = PluginInfo(name, version)
        self.plugins[name] = info

        def register_provider(
            provider_name: str,
            factory: ProviderFactory,
            *,
            models: tuple[str, ...] | list[str] = (),
            default_model: str | None = None,
        ) -> None:
            models = tuple(models)
            if default_model is not None and models and default_model not in models:
                raise ValueError(f"default_model {default_model!r} is not one of {models}")
            self.providers[provider_name] = ProviderEntry(provider_name, factory, models, default_model, name)
            info.providers.append(provider_name)

        def register_mailer(mailer_name: str, factory: MailerFactory) -> None:
            self.mailers[mailer_name] = MailerEntry(mailer_name, factory, name)
            info.mailers.append(mailer_name)

        # Call this plugin's implementations one by one, so one that raises
        # is reported and skipped without hiding the others.
        calls: list[tuple[str, Callable[..., Any]]] = [
            ("innova_register_providers", register_provider),
            ("innova_register_mailers", register_mailer),
        ]
        for hook_name, register in calls:
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                try:
                    impl.function(**{arg: register for arg in impl.argnames if arg == "register"})
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:
                    self.pm.unregister(plugin)
                    self._drop(name)
                    self._failed(name, version, exc)
                    return

    def _unknown_hooks(self, plugin: object) -> list[str]:
        """This plugin's hookimpls that match no hookspec (what `pm.check_pending()` finds, per plugin)."""
        unknown = []
        for caller in self.pm.get_hookcallers(plugin) or []:
            if caller.has_spec():
                continue
            if any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls()):
                unknown.append(repr(caller.name))
        return sorted(unknown)

    def _drop(self, plugin_name: str) -> None:
        self.providers = {k: v for k, v in self.providers.items() if v.plugin != plugin_name}
        self.mailers = {k: v for k, v in self.mailers.items() if v.plugin != plugin_name}

    # -- selection -------------------------------------------------------

    @property
    def errors(self) -> dict[str, str]:
        return {name: info.error for name, info in self.plugins.items() if info.error}

    def _broken_hint(self) -> str:
        """Leads the "not installed" error: a name that is missing may well be a broken plugin's."""
        errors = self.errors
        if not errors:
            return "."
        if len(errors) == 1:
            ((name, error),) = errors.items()
            return f"; it may come from broken plugin {name!r}: {error}."
        return "; it may come from a broken plugin: " + "; ".join(f"{n!r}: {e}" for n, e in errors.items()) + "."

    def provider_entry(self, name: str) -> ProviderEntry:
        entry = self.providers.get(name)
        if entry is None and name in self.errors:
            # The selected plugin is the broken one: its own error is the answer.
            raise ConfigError([f"PROVIDER={name!r}: plugin {name!r} failed to load: {self.errors[name]}"])
        if entry is None:
            installed = ", ".join(sorted(self.providers)) or "none"
            raise ConfigError(
                [f"PROVIDER={name!r} is not installed{self._broken_hint()} Installed providers: {installed}."]
            )
        return entry

    def resolve_model(self, entry: ProviderEntry, chat_model: str | None) -> str:
        """The model to use: `CHAT_MODEL` if set (checked), else the provider's default."""
        if chat_model:
            if entry.models and chat_model not in entry.models:
                raise ConfigError(
                    [f"CHAT_MODEL={chat_model!r} is not a model of provider {entry.name!r}: {', '.join(entry.models)}."]
                )
            return chat_model
        return entry.default_model or (entry.models[0] if entry.models else entry.name)

    def mailer_entry(self, name: str) -> MailerEntry:
        entry = self.mailers.get(name)
        if entry is None and name in self.errors:
            raise ConfigError([f"MAILER={name!r}: plugin {name!r} failed to load: {self.errors[name]}"])
        if entry is None:
            installed = ", ".join(sorted(self.mailers)) or "none"
            hint = " (install innova-mailer for SMTP)" if name == "smtp" else ""
            raise ConfigError(
                [f"MAILER={name!r} is not installed{hint}{self._broken_hint()} Installed mailers: {installed}."]
            )
        return entry

    def build_provider(self, settings: Settings) -> tuple[ProviderEntry, str, ChatProvider]:
        entry = self.provider_entry(settings.provider)
        model = self.resolve_model(entry, settings.chat_model)
        try:
            provider = entry.factory(settings)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError([f"PROVIDER={entry.name!r} could not start: {_error_text(exc)}"]) from exc
        return entry, model, provider

    def build_mailer(self, settings: Settings) -> Mailer:
        assert settings.mailer is not None
        entry = self.mailer_entry(settings.mailer)
        try:
            return entry.factory(settings)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError([f"MAILER={entry.name!r} could not start: {_error_text(exc)}"]) from exc

    def infos(self) -> list[PluginInfo]:
        return [info for name, info in sorted(self.plugins.items()) if name != "builtin"]


__all__ = [
    "ENTRY_POINT_GROUP",
    "MailerEntry",
    "MailerFactory",
    "PluginError",
    "PluginInfo",
    "PluginRegistry",
    "ProviderEntry",
    "ProviderFactory",
    "RegisterMailer",
    "RegisterProvider",
    "hookimpl",
    "hookspec",
    "registered",
]
