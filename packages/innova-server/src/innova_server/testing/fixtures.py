"""Shared pytest fixtures: one real MongoDB-wire server per test session.

SecantusDB runs as a separate process on a free loopback port (never
imported: it is GPL-2.0); set `TEST_MONGO_URI` to use a real `mongod`
instead. Each test gets its own database name, so tests never see each
other's data and need no cleanup.

Enable in a conftest.py: `pytest_plugins = ["innova_server.testing.fixtures"]`.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.database import Database as SyncDatabase

from innova_server.app import create_app
from innova_server.embedded import EmbeddedMongo
from innova_server.settings import Settings
from innova_server.testing.server import LiveServer, ServerProcess

# Cheap argon2 and generous limits so tests are fast; tests of those
# features set their own values.
TEST_DEFAULTS: dict[str, Any] = {
    "env": "test",
    "cookie_secure": False,
    "argon2_time_cost": 1,
    "argon2_memory_cost": 1024,
    "argon2_parallelism": 1,
    "rate_limit_register_ip": "1000/1h",
    "rate_limit_login_ip": "1000/15m",
    "rate_limit_login_email": "1000/15m",
    "rate_limit_forgot_email": "1000/1h",
    "rate_limit_forgot_ip": "1000/1h",
    "rate_limit_chat_user": "1000/1m",
    "rate_limit_conversations_user": "1000/1d",
    "allowed_origins": ["http://localhost:3000"],
    "provider": "echo",
    "mailer": "console",
}


@pytest.fixture(scope="session")
def mongo_uri() -> Iterator[str]:
    """URI of the session's MongoDB-wire server (SecantusDB, or TEST_MONGO_URI)."""
    external = os.environ.get("TEST_MONGO_URI")
    if external:
        yield external
        return
    with (
        tempfile.TemporaryDirectory(prefix="innova-test-db-") as storage,
        EmbeddedMongo(os.path.join(storage, "db")) as server,
    ):
        yield server.uri


@pytest.fixture(scope="session")
def mongo_client(mongo_uri: str) -> Iterator[MongoClient[dict[str, Any]]]:
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri, tz_aware=True)
    yield client
    client.close()


@pytest.fixture
def db_name() -> str:
    return f"innova_test_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_settings(mongo_uri: str, db_name: str) -> Callable[..., Settings]:
    """Build test `Settings`: TEST_DEFAULTS, this test's database, then `overrides`."""

    def make(**overrides: Any) -> Settings:
        values = {**TEST_DEFAULTS, "mongo_uri": mongo_uri, "db_name": db_name, **overrides}
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def db(mongo_client: MongoClient[dict[str, Any]], db_name: str) -> Iterator[SyncDatabase[dict[str, Any]]]:
    """A synchronous handle on this test's database, to check what was stored."""
    yield mongo_client[db_name]
    mongo_client.drop_database(db_name)


@dataclass
class RunningServer:
    url: str
    settings: Settings
    live: LiveServer

    @property
    def services(self) -> Any:
        return self.live.app.state.services


@pytest.fixture
def start_server(
    make_settings: Callable[..., Settings], mongo_client: MongoClient[dict[str, Any]], db_name: str
) -> Iterator[Callable[..., RunningServer]]:
    """Start the app on a real loopback port: `start_server(**setting_overrides)`."""
    started: list[LiveServer] = []

    def start(**overrides: Any) -> RunningServer:
        settings = make_settings(**overrides)
        live = LiveServer(create_app(settings)).start()
        started.append(live)
        return RunningServer(live.url, settings, live)

    yield start
    for live in started:
        live.stop()
    mongo_client.drop_database(db_name)


@pytest.fixture
def server(start_server: Callable[..., RunningServer]) -> RunningServer:
    """The app with the test defaults, served on loopback."""
    return start_server()


def settings_env(values: dict[str, Any]) -> dict[str, str]:
    """`Settings` field values as the environment variables that set them."""
    env = {}
    for name, value in values.items():
        if isinstance(value, list | tuple):
            value = ",".join(str(item) for item in value)
        env[name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


@pytest.fixture
def spawn_server(
    mongo_uri: str, db_name: str, mongo_client: MongoClient[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., ServerProcess]]:
    """Start the app in a process of its own on this test's database: `spawn_server(**setting_overrides)`.

    Lower-case keys are settings (as for `start_server`); upper-case keys are
    passed as they are (a plugin's variables, e.g. `ECHO_DELAY_MS`).
    """
    started: list[ServerProcess] = []

    def spawn(**overrides: Any) -> ServerProcess:
        values = {**TEST_DEFAULTS, "mongo_uri": mongo_uri, "db_name": db_name}
        values.update({key: value for key, value in overrides.items() if key.islower()})
        env = settings_env(values)
        env.update({key: str(value) for key, value in overrides.items() if not key.islower()})
        process = ServerProcess(env, cwd=tmp_path_factory.mktemp("server"))
        started.append(process)
        return process.start()

    yield spawn
    for process in started:
        process.stop()
    mongo_client.drop_database(db_name)
