"""The application factory.

`create_app()` reads the settings, and its lifespan loads the plugins, builds
the services and creates the indexes. Unsafe production settings raise
`ConfigError` before anything listens; `innova_server.asgi` turns that into
one line per problem for gunicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from innova_server import __version__, health, metrics, playground
from innova_server.auth.dependencies import require_verified_email
from innova_server.auth.legacy import LEGACY_PREFIX, LegacyAuthMiddleware
from innova_server.auth.router import build_router as build_auth_router
from innova_server.chatlaya.router import build_router as build_chat_router
from innova_server.errors import ErrorCode, error_body, install_error_handlers
from innova_server.guards import BodySizeLimitMiddleware, CSRFOriginMiddleware
from innova_server.pacing import IterationGate, RequestPacer
from innova_server.plugins import PluginRegistry
from innova_server.services import Services, build_services
from innova_server.settings import ConfigError, Settings, load_settings

log = logging.getLogger("innova")


def _mongo_uri(settings: Settings) -> str:
    uri = settings.mongo_uri_value
    if not uri:
        raise ConfigError(
            ["MONGO_URI is not set. In development run `innova serve`, which starts the embedded database."]
        )
    return uri


async def _ensure_indexes_until_done(services: Services) -> None:
    """Create the indexes; if MongoDB is down at startup, keep trying in the background."""
    delay = 1.0
    while True:
        try:
            await services.db.ensure_indexes()
            log.info("indexes ready")
            return
        except Exception as exc:
            log.error("could not create indexes (%s); retrying in %.0fs", type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    problems = settings.problems()
    if problems:
        raise ConfigError(problems)
    mongo_uri = _mongo_uri(settings)
    plugins = PluginRegistry.load(settings)
    metrics.PLUGIN_ERRORS.set(len(plugins.errors))
    # Built here, not in the lifespan, so a bad PROVIDER/MAILER stops the
    # process before it listens, with the reason.
    services = build_services(settings, plugins, mongo_uri)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        index_task = asyncio.create_task(_ensure_indexes_until_done(services))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(index_task), timeout=10)
        # Account deletions an earlier process left half done (see auth.erasure).
        services.tasks.spawn("pending_erasures", services.account.finish_pending())
        services.health.start()
        log.info(
            "innova %s ready: env=%s provider=%s model=%s mailer=%s",
            __version__, settings.env, services.provider_entry.name, services.model, settings.mailer,
        )
        try:
            yield
        finally:
            index_task.cancel()
            await services.aclose()

    app = FastAPI(
        title="Innova",
        version=__version__,
        lifespan=lifespan,
        docs_url=None if settings.env == "production" else "/docs",
        redoc_url=None,
        openapi_url=None if settings.env == "production" else "/openapi.json",
    )
    app.state.services = services
    install_error_handlers(app)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(ErrorCode.INTERNAL), status_code=500)

    app.add_exception_handler(Exception, on_unexpected)

    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(build_auth_router("/auth"))
    app.include_router(build_auth_router(LEGACY_PREFIX, deprecated=True))
    # REQUIRE_VERIFIED_EMAIL: every chat route asks for a verified address (a
    # no-op when the setting is off). Added here so Chatlaya needs no change.
    app.include_router(build_chat_router(), dependencies=[Depends(require_verified_email)])
    if settings.playground_enabled:
        app.include_router(playground.router)

    # Added innermost first: requests pass Liveness → Metrics → Pacer → CORS → Legacy → CSRF → body cap.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        CSRFOriginMiddleware, allowed_origins=settings.allowed_origins, allow_same_origin=settings.playground_enabled
    )
    app.add_middleware(LegacyAuthMiddleware)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.allowed_origins,
        allow_credentials=True,
        allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],  # PUT: message feedback
        allow_headers=["Content-Type", "Last-Event-ID"],
        # Readable by the front end's JavaScript: when to retry (429/503), and
        # the legacy routes' deprecation notice and successor.
        expose_headers=["Retry-After", "Deprecation", "Link"],
        max_age=600,
    )
    # A burst starts a few requests per loop iteration; the readiness probe is not paced (see pacing.py).
    app.state.request_gate = gate = IterationGate()
    app.add_middleware(RequestPacer, gate=gate, exempt=frozenset({"/health"}))
    app.add_middleware(metrics.MetricsMiddleware)
    # Outermost: liveness is answered before anything else runs (see health.py).
    app.add_middleware(health.LivenessProbe)
    return app
