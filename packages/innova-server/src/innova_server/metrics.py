"""Prometheus metrics and the `/metrics` endpoint.

With several gunicorn workers each process has its own counters; set
`PROMETHEUS_MULTIPROC_DIR` (deploy/gunicorn.conf.py does) and prometheus-client
writes them to shared files that `/metrics` aggregates, whichever worker
answers. Without it, `/metrics` shows the answering process only.
"""

from __future__ import annotations

import hmac
import os
import time

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from innova_server.errors import AppError, ErrorCode

HTTP_REQUESTS = Counter("innova_http_requests_total", "HTTP requests", ["method", "route", "status"])
HTTP_LATENCY = Histogram(
    "innova_http_request_duration_seconds",
    "Time to the end of the response (whole stream for SSE)",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
ARGON2_OPERATIONS = Counter("innova_argon2_operations_total", "argon2 hash/verify runs (CPU-heavy)", ["op"])
LOGIN_FAILURES = Counter("innova_login_failures_total", "Failed logins (unknown email or wrong password)")
RATE_LIMITED = Counter("innova_rate_limited_total", "Requests refused by a rate limit", ["limit"])
LEGACY_AUTH_HITS = Counter(
    "innova_legacy_auth_requests_total", "Hits on the deprecated /innova/api/auth prefix", ["route"]
)
MONGO_COMMANDS = Counter("innova_mongo_commands_total", "Commands sent to MongoDB (round trips)", ["command"])
MONGO_COMMAND_FAILURES = Counter("innova_mongo_command_failures_total", "MongoDB commands that failed", ["command"])
MONGO_PING_SECONDS = Histogram("innova_mongo_ping_seconds", "Health-check ping time")
EVENT_LOOP_LAG = Gauge(
    "innova_event_loop_lag_seconds", "How late the health monitor's last 1 s timer fired", multiprocess_mode="livemax"
)
MAIL_SENT = Counter("innova_mail_sent_total", "Mails handed to the mailer", ["kind"])
MAIL_FAILURES = Counter("innova_mail_failures_total", "Mails the mailer failed to deliver", ["kind"])
BACKGROUND_FAILURES = Counter(
    "innova_background_failures_total", "Background tasks that ended with an error", ["task"]
)
ACCOUNT_EVENTS = Counter(
    "innova_account_events_total",
    "Account self-service events (password_changed, wrong_password, sessions_revoked, deletion_started, "
    "account_erased, erasure_interrupted, export, verify_mail_requested, email_verified, verify_invalid_token)",
    ["event"],
)
PASSWORD_RESETS = Counter("innova_password_resets_total", "Password reset attempts by outcome", ["outcome"])
CHAT_STREAMS = Counter("innova_chat_streams_total", "Chat replies by outcome", ["provider", "status"])
CHAT_TOKENS = Counter("innova_chat_chunks_total", "Chunks streamed to clients", ["provider"])
CHAT_ACTIVE = Gauge("innova_chat_active_streams", "Replies being generated now", multiprocess_mode="livesum")
CHAT_DETACHED = Gauge(
    "innova_chat_detached_streams", "Replies being generated with no client attached here", multiprocess_mode="livesum"
)
CHAT_TURN_ENDINGS = Counter(
    "innova_chat_turn_endings_total",
    "Replies by finish_reason (stop, length, stopped, cancelled, interrupted, error)",
    ["provider", "finish_reason"],
)
CHAT_FEEDBACK = Counter(
    "innova_chat_feedback_total", "Feedback given on replies", ["provider", "model", "rating"]
)
CHAT_TITLES = Counter("innova_chat_titles_total", "Model titles by outcome (set, kept, timeout, failed)", ["outcome"])
CHAT_RESUMES = Counter(
    "innova_chat_resumes_total", "Reply streams resumed, by source (memory, checkpoints, replay)", ["source"]
)
PLUGIN_ERRORS = Gauge("innova_plugin_load_errors", "Plugins that failed to load", multiprocess_mode="max")


def _registry() -> CollectorRegistry:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics_endpoint(request: Request) -> Response:
    from innova_server.netutil import client_ip, is_loopback

    services = request.app.state.services
    token = services.settings.metrics_token
    authorization = request.headers.get("authorization", "")
    allowed = is_loopback(client_ip(request, services.settings.trusted_proxies))
    if not allowed and token is not None and authorization.startswith("Bearer "):
        allowed = hmac.compare_digest(authorization[7:].encode(), token.get_secret_value().encode())
    if not allowed:
        raise AppError(ErrorCode.FORBIDDEN, "Metrics are served to loopback, or with the METRICS_TOKEN bearer.")
    return Response(generate_latest(_registry()), media_type=CONTENT_TYPE_LATEST)


class MetricsMiddleware:
    """Counts requests by route template (never the raw path: bounded labels)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "<unmatched>"
            method = scope["method"]
            HTTP_REQUESTS.labels(method, template, str(status)).inc()
            HTTP_LATENCY.labels(method, template).observe(time.perf_counter() - started)
