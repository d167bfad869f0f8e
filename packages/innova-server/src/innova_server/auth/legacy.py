"""The deprecated `/innova/api/auth/*` prefix: same handlers, plus deprecation headers.

Old front ends still call it; every answer (errors too) says where the
successor lives, and each hit is counted so operators know when it can go.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from innova_server import metrics

LEGACY_PREFIX = "/innova/api/auth"


class LegacyAuthMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not (path == LEGACY_PREFIX or path.startswith(LEGACY_PREFIX + "/")):
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                # The matched route template, never the raw (client-chosen) path.
                template = getattr(scope.get("route"), "path", "") or LEGACY_PREFIX
                successor = "/auth" + template[len(LEGACY_PREFIX):]
                headers = MutableHeaders(scope=message)
                headers["Deprecation"] = "true"
                headers["Link"] = f'<{successor}>; rel="successor-version"'
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            metrics.LEGACY_AUTH_HITS.labels(getattr(route, "path", None) or "<unmatched>").inc()
