"""The plugin system: entry-point loading, and choosing the provider and mailer.

A plugin is a module (or object) with `@hookimpl` functions, published under
the `innova` entry-point group::

    [project.entry-points.innova]
    echo = "innova_provider_echo"

    @hookimpl
    def innova_register_providers(register):
        register("echo", EchoProvider, models=("echo",), default_model="echo")

The hooks themselves, and the table of plugin kinds everything here is
driven by, are in `innova_server.hookspecs`; plugin authors import from
`innova_server.sdk`. Hooks register *factories*: nothing heavy is imported or
built until the deployment selects it (`PROVIDER`, `MAILER`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pluggy

from innova_server.chat import ChatProvider
from innova_server.hookspecs import (
    KIND_BY_NAME,
    KINDS,
    Hookspecs,
    Kind,
    MailerFactory,
    ProviderFactory,
    RegisterMailer,
    RegisterProvider,
    hookimpl,
    hookspec,
)
from innova_server.mail import Mailer
from innova_server.settings import ConfigError, Settings

ENTRY_POINT_GROUP = "innova"

log = logging.getLogger("innova.plugins")


@dataclass(frozen=True)
class Entry:
    """One thing a plugin registered: a provider or a mailer (`kind`), by name."""

    name: str
    factory: Callable[..., Any]
    models: tuple[str, ...]
    default_model: str | None
    plugin: str
    kind: str = "providers"


# The names the first version exported; one class serves every kind now.
ProviderEntry = Entry
MailerEntry = Entry


@dataclass
class PluginInfo:
    name: str
    version: str | None
    offers: dict[str, list[str]] = field(default_factory=lambda: {kind.name: [] for kind in KINDS})
    error: str | None = None

    @property
    def providers(self) -> list[str]:
        return self.offers["providers"]

    @property
    def mailers(self) -> list[str]:
        return self.offers["mailers"]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, **self.offers, "error": self.error}


def takes_settings(factory: Callable[..., Any]) -> bool:
    """Whether `factory` wants the `Settings`: it has a positional parameter without a default
    (or one named `settings`, or `*args`). A factory that needs nothing — a provider class whose
    `__init__` takes no argument, or whose arguments all have defaults — is called with none."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins and C types: keep the first version's call
        return True
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            return True
        required = parameter.default is inspect.Parameter.empty
        if parameter.kind in positional and (required or parameter.name == "settings"):
            return True
    return False


def call_factory(factory: Callable[..., Any], settings: Settings) -> Any:
    """Build a registered thing: `factory(settings)`, or `factory()` when it takes no settings."""
    return factory(settings) if takes_settings(factory) else factory()


class _Builtin:
    """The core's own registrations: the development console mailer."""

    @hookimpl
    def innova_register_mailers(self, register: RegisterMailer) -> None:
        from innova_server.mail import ConsoleMailer

        register("console", ConsoleMailer)


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
        self.entries: dict[str, dict[str, Entry]] = {kind.name: {} for kind in KINDS}

    @property
    def providers(self) -> dict[str, Entry]:
        return self.entries["providers"]

    @property
    def mailers(self) -> dict[str, Entry]:
        return self.entries["mailers"]

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

    def _register_callback(self, kind: Kind, plugin_name: str, info: PluginInfo) -> Callable[..., None]:
        """The `register` a plugin's `innova_register_<kind>` hook is called with."""

        def register(
            name: str,
            factory: Callable[..., Any],
            *,
            models: tuple[str, ...] | list[str] = (),
            default_model: str | None = None,
        ) -> None:
            if not kind.models and (models or default_model is not None):
                raise TypeError(f"{kind.noun}s take no models")
            models = tuple(models)
            if default_model is not None and models and default_model not in models:
                raise ValueError(f"default_model {default_model!r} is not one of {models}")
            self.entries[kind.name][name] = Entry(name, factory, models, default_model, plugin_name, kind.name)
            info.offers[kind.name].append(name)

        return register

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
            known = ", ".join(sorted(kind.hook for kind in KINDS))
            self._failed(name, version, PluginError(f"unknown hook {', '.join(unknown)} (known hooks: {known})"))
            return
        info = PluginInfo(name, version)
        self.plugins[name] = info
        # Call this plugin's implementations one by one, so one that raises
        # is reported and skipped without hiding the others.
        for kind in KINDS:
            register = self._register_callback(kind, name, info)
            for impl in getattr(self.pm.hook, kind.hook).get_hookimpls():
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
        for kind, entries in self.entries.items():
            self.entries[kind] = {k: v for k, v in entries.items() if v.plugin != plugin_name}

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

    def entry(self, kind_name: str, name: str) -> Entry:
        """The registered `kind_name` (`providers`, `mailers`) called `name`, or a `ConfigError` saying why not."""
        kind = KIND_BY_NAME[kind_name]
        entry = self.entries[kind.name].get(name)
        if entry is None and name in self.errors:
            # The selected plugin is the broken one: its own error is the answer.
            raise ConfigError([f"{kind.setting}={name!r}: plugin {name!r} failed to load: {self.errors[name]}"])
        if entry is None:
            installed = ", ".join(sorted(self.entries[kind.name])) or "none"
            hint = dict(kind.missing_hint).get(name, "")
            raise ConfigError(
                [
                    f"{kind.setting}={name!r} is not installed{hint}{self._broken_hint()} "
                    f"Installed {kind.name}: {installed}."
                ]
            )
        return entry

    def build(self, kind_name: str, name: str, settings: Settings) -> tuple[Entry, Any]:
        """Call the factory of the selected `name`; its failure is a `ConfigError` naming the setting."""
        entry = self.entry(kind_name, name)
        try:
            return entry, call_factory(entry.factory, settings)
        except ConfigError:
            raise
        except Exception as exc:
            setting = KIND_BY_NAME[kind_name].setting
            raise ConfigError([f"{setting}={entry.name!r} could not start: {_error_text(exc)}"]) from exc

    def provider_entry(self, name: str) -> Entry:
        return self.entry("providers", name)

    def mailer_entry(self, name: str) -> Entry:
        return self.entry("mailers", name)

    def resolve_model(self, entry: Entry, chat_model: str | None) -> str:
        """The model to use: `CHAT_MODEL` if set (checked), else the provider's default."""
        if chat_model:
            if entry.models and chat_model not in entry.models:
                raise ConfigError(
                    [f"CHAT_MODEL={chat_model!r} is not a model of provider {entry.name!r}: {', '.join(entry.models)}."]
                )
            return chat_model
        return entry.default_model or (entry.models[0] if entry.models else entry.name)

    def build_provider(self, settings: Settings) -> tuple[Entry, str, ChatProvider]:
        entry = self.provider_entry(settings.provider)
        model = self.resolve_model(entry, settings.chat_model)
        _, provider = self.build("providers", settings.provider, settings)
        # An SDK `Provider` may yield bare strings: the core wraps them (chat.as_chunk).
        return entry, model, cast(ChatProvider, provider)

    def build_mailer(self, settings: Settings) -> Mailer:
        assert settings.mailer is not None
        _, mailer = self.build("mailers", settings.mailer, settings)
        return cast(Mailer, mailer)

    def infos(self) -> list[PluginInfo]:
        return [info for name, info in sorted(self.plugins.items()) if name != "builtin"]


__all__ = [
    "ENTRY_POINT_GROUP",
    "Entry",
    "Hookspecs",
    "MailerEntry",
    "MailerFactory",
    "PluginError",
    "PluginInfo",
    "PluginRegistry",
    "ProviderEntry",
    "ProviderFactory",
    "RegisterMailer",
    "RegisterProvider",
    "call_factory",
    "hookimpl",
    "hookspec",
    "registered",
    "takes_settings",
]
