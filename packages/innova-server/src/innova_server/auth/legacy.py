"""The deprecated `/innova/api/auth/*` prefix: same handlers, plus deprecation headers.

Old front ends still call it; every answer (errors too) says where the
successor lives, and each hit is counted so operators know when it can go.

A request refused before routing (CSRF 403, body too large 413) has no
matched route; its successor is then found by looking the rest of the path
up among the auth routes' own paths, so the `Link` header and the metric
label still only ever hold a route template, never client-chosen text.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from innova_server import metrics
from innova_server.auth.router import build_router

LEGACY_PREFIX = "/innova/api/auth"
# "/register", "/login", …: the one list is the router's.
_AUTH_PATHS = frozenset(getattr(route, "path", "") for route in build_router("").routes)


def route_template(scope: Scope) -> str | None:
    """The legacy route template this request is for: the matched one, else its known path, else None."""
    template = getattr(scope.get("route"), "path", None)
    if template:
        return str(template)
    rest = str(scope.get("path", ""))[len(LEGACY_PREFIX) :]
    return LEGACY_PREFIX + rest if rest in _AUTH_PATHS else None


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
                # A route template, never the raw (client-chosen) path.
                template = route_template(scope) or LEGACY_PREFIX
                successor = "/auth" + template[len(LEGACY_PREFIX):]
                headers = MutableHeaders(scope=message)
                headers["Deprecation"] = "true"
                headers["Link"] = f'<{successor}>; rel="successor-version"'
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            metrics.LEGACY_AUTH_HITS.labels(route_template(scope) or "<unmatched>").inc()
