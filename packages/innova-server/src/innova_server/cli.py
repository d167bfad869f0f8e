"""The `innova` command: serve, check, db init, plugins, chat, users (`cli_users`).

Configuration errors are printed one per line, without a traceback, and the
command exits with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Sequence

from innova_server import __version__
from innova_server.cli_users import add_users_parser
from innova_server.settings import ConfigError, Settings, load_settings

EXIT_CONFIG = 2


def _fail(lines: Sequence[str]) -> int:
    for line in lines:
        print(f"innova: {line}", file=sys.stderr)
    return EXIT_CONFIG


# -- serve ------------------------------------------------------------------


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def playground_url(host: str, port: int) -> str:
    """Where a browser on this machine finds the playground (a wildcard bind is reached on loopback)."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/playground"


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from innova_server.embedded import EmbeddedDatabaseError, EmbeddedMongo, default_storage
    from innova_server.logconfig import configure_logging

    settings = load_settings()
    problems = settings.problems()
    if problems:
        return _fail(problems)
    embedded: EmbeddedMongo | None = None
    if not settings.mongo_uri_value:
        storage = default_storage(settings.innova_data_dir)
        print(f"innova: starting the embedded database (SecantusDB); data in {storage}", file=sys.stderr)
        try:
            embedded = EmbeddedMongo(storage).start()
        except EmbeddedDatabaseError as exc:
            return _fail([str(exc)])
        # Through the environment, so that --reload's child process sees it too.
        os.environ["MONGO_URI"] = embedded.uri
        print(f"innova: embedded database listening on {embedded.uri}", file=sys.stderr)
    # uvicorn re-raises SIGTERM after its graceful shutdown; make that an
    # exception, so the `finally` below still stops the database.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    host = args.host or settings.host
    port = args.port or settings.port
    configure_logging(settings.log_level)
    if settings.playground_enabled:
        print(f"innova: playground at {playground_url(host, port)}", file=sys.stderr)
    try:
        if args.reload:
            uvicorn.run(
                "innova_server.app:create_app", factory=True, host=host, port=port, reload=True,
                proxy_headers=False, log_level=settings.log_level,
            )
        else:
            from innova_server.app import create_app

            try:
                app = create_app(load_settings())
            except ConfigError as error:
                return _fail(error.lines)
            # Client addresses are resolved by the app itself (TRUSTED_PROXIES).
            uvicorn.run(app, host=host, port=port, proxy_headers=False, log_level=settings.log_level)
    finally:
        if embedded is not None:
            print("innova: stopping the embedded database", file=sys.stderr)
            embedded.stop()
    return 0


# -- check ------------------------------------------------------------------


def _masked(settings: Settings) -> dict[str, object]:
    shown = settings.model_dump(mode="json")
    for key, value in list(shown.items()):
        if value and (key.endswith(("_pass", "_token", "_key")) or key == "mongo_uri"):
            shown[key] = "********"
    uri = settings.mongo_uri_value
    if uri:
        from pymongo.uri_parser import parse_uri

        try:
            nodes = parse_uri(uri)["nodelist"]
            shown["mongo_uri"] = "mongodb://****@" + ",".join(f"{h}:{p}" for h, p in nodes)
        except Exception:
            shown["mongo_uri"] = "(unparsable)"
    return shown


def cmd_check(args: argparse.Namespace) -> int:
    from innova_server.db import Database
    from innova_server.plugins import PluginRegistry

    try:
        settings = load_settings()
    except ConfigError as error:
        return _fail(error.lines)
    lines = list(settings.problems())
    if args.verbose:
        for key, value in _masked(settings).items():
            print(f"  {key} = {value}")
    registry = PluginRegistry.load(settings)
    for name, load_error in registry.errors.items():
        print(f"warning: plugin {name} failed to load: {load_error}")
    try:
        # Built, not just looked up: the factory is what checks the provider's
        # own settings (a missing API key, a model file that is not there).
        entry, model, provider = registry.build_provider(settings)
        asyncio.run(provider.aclose())
        print(f"ok: provider {entry.name} (model {model}, plugin {entry.plugin})")
    except ConfigError as error:
        lines.extend(error.lines)
    try:
        registry.build_mailer(settings)
        print(f"ok: mailer {settings.mailer}")
    except ConfigError as error:
        lines.extend(error.lines)
    uri = settings.mongo_uri_value
    if uri and settings.mongo_uri_problem() is None:
        async def ping() -> bool:
            db = Database(uri, settings.db_name, timeout_ms=2000)
            try:
                return await db.ping(timeout=3.0)
            finally:
                await db.close()

        if asyncio.run(ping()):
            print(f"ok: MongoDB answers (database {settings.db_name})")
        else:
            lines.append(
                "MongoDB does not answer within 3 s: check MONGO_URI (host, port, credentials, authSource) "
                "and that the server runs (see deploy/README.md)."
            )
    elif not uri and settings.env != "production":
        from innova_server.embedded import secantus_available

        if secantus_available():
            print("ok: no MONGO_URI; `innova serve` will start the embedded database")
        else:
            lines.append(
                "No MONGO_URI and the embedded database is not installed: "
                "pip install 'innova-server[embedded]', or set MONGO_URI to a MongoDB server."
            )
    for line in lines:
        print(f"error: {line}")
    print("configuration OK" if not lines else f"{len(lines)} problem(s)")
    return 0 if not lines else 1


# -- db init -----------------------------------------------------------------


def cmd_db_init(args: argparse.Namespace) -> int:
    from pymongo.errors import PyMongoError

    from innova_server.db import Database

    settings = load_settings()
    uri = settings.mongo_uri_value
    if not uri:
        return _fail(["MONGO_URI is not set."])
    problem = settings.mongo_uri_problem()
    if problem:
        return _fail([problem])

    async def run() -> None:
        db = Database(uri, settings.db_name, timeout_ms=settings.mongo_timeout_ms)
        try:
            await db.ensure_indexes()
        finally:
            await db.close()

    try:
        asyncio.run(run())
    except PyMongoError as exc:
        # The class name and PyMongo's first line say enough (refused,
        # timed out, authentication failed); the URI is never printed.
        reason = " ".join(str(exc).split())[:300]
        print(f"innova: could not create the indexes in {settings.db_name}: {type(exc).__name__}: {reason}",
              file=sys.stderr)
        print("innova: check MONGO_URI (host, port, credentials, authSource) and that MongoDB runs.", file=sys.stderr)
        return 1
    print(f"indexes created in {settings.db_name}")
    return 0


# -- plugins -----------------------------------------------------------------


def cmd_plugins(args: argparse.Namespace) -> int:
    from innova_server.plugins import PluginRegistry

    registry = PluginRegistry.load(load_settings())
    infos = registry.infos()
    if args.json:
        print(json.dumps([info.as_dict() for info in infos], indent=2))
        return 0
    if not infos:
        print("no plugins installed")
    for info in infos:
        print(f"{info.name} {info.version or ''}".rstrip())
        for kind, names in info.offers.items():
            if names:
                print(f"  {kind}: {', '.join(names)}")
        if info.error:
            print(f"  error: {info.error}")
    return 0


# -- chat ----------------------------------------------------------------------


def cmd_chat(args: argparse.Namespace) -> int:
    """Stream one reply from the configured provider: no HTTP, no database.

    For a deployer to try a provider (keys, model files, base URLs) on the
    server itself, with the same settings the service will use.
    """
    import time

    from innova_server.chat import ChatMessage, ChatRequest, ProviderError, as_chunk
    from innova_server.plugins import PluginRegistry

    overrides: dict[str, object] = {}
    if args.provider:
        overrides["provider"] = args.provider
    if args.model:
        overrides["chat_model"] = args.model
    settings = load_settings(**overrides)
    registry = PluginRegistry.load(settings)
    entry, model, provider = registry.build_provider(settings)
    system = settings.chat_system_prompt if args.system is None else args.system
    messages = [ChatMessage("system", system)] if system else []
    request = ChatRequest(
        messages=[*messages, ChatMessage("user", args.question)],
        model=model,
        max_tokens=settings.chat_max_tokens,
        temperature=settings.chat_temperature,
    )

    async def run() -> int:
        started = time.monotonic()
        first: float | None = None
        finish_reason, usage, chunks = None, None, 0
        stream = provider.stream(request)
        try:
            async for item in stream:
                chunk = as_chunk(item)
                if chunk.text:
                    first = first if first is not None else time.monotonic() - started
                    chunks += 1
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                finish_reason = chunk.finish_reason or finish_reason
                usage = chunk.usage or usage
        except ProviderError as error:
            print(file=sys.stdout)
            failure = f"{entry.name} failed ({error.code}, retryable={error.retryable}): {error.message}"
            print(f"innova: {failure}", file=sys.stderr)
            return 1
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
            await provider.aclose()
        print()
        summary = f"[{entry.name}/{model}] {chunks} chunks, finish_reason={finish_reason or 'stop'}"
        if first is not None:
            summary += f", first token {first * 1000:.0f} ms, total {(time.monotonic() - started) * 1000:.0f} ms"
        if usage is not None:
            summary += f", usage prompt={usage.prompt_tokens} completion={usage.completion_tokens}"
        if not args.quiet:
            print(summary, file=sys.stderr)
        return 0

    return asyncio.run(run())


# -- entry point ---------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="innova", description="INNOVAPLUS backend.")
    parser.add_argument("--version", action="version", version=f"innova {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server (embedded database in development)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--reload", action="store_true", help="restart on code changes (development)")
    serve.set_defaults(handler=cmd_serve)

    check = commands.add_parser("check", help="validate the configuration and ping MongoDB")
    check.add_argument("-v", "--verbose", action="store_true", help="print the settings (secrets masked)")
    check.set_defaults(handler=cmd_check)

    db = commands.add_parser("db", help="database tasks")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("init", help="create the indexes").set_defaults(handler=cmd_db_init)

    plugins = commands.add_parser("plugins", help="list installed plugins")
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(handler=cmd_plugins)

    chat = commands.add_parser("chat", help="stream a reply from the configured provider (no HTTP, no database)")
    chat.add_argument("question")
    chat.add_argument("--provider", help="instead of PROVIDER")
    chat.add_argument("--model", help="instead of CHAT_MODEL")
    chat.add_argument("--system", help="system prompt (default: CHAT_SYSTEM_PROMPT; '' for none)")
    chat.add_argument("-q", "--quiet", action="store_true", help="no summary line on stderr")
    chat.set_defaults(handler=cmd_chat)

    add_users_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except ConfigError as error:
        return _fail(error.lines)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
