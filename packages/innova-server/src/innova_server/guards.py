"""Request guards that run before any route: CSRF origin check and body size cap."""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from innova_server.errors import ErrorCode, error_body

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _origin_of(url: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


def _own_origin(scope: Scope, headers: Headers) -> str | None:
    """The origin this request was addressed to: its scheme and `Host` header."""
    host = headers.get("host")
    return f"{scope.get('scheme', 'http')}://{host}".lower() if host else None


class CSRFOriginMiddleware:
    """Refuse unsafe cross-site requests from browsers.

    Browsers send `Origin` on cross-site POSTs (and `Referer` when they do
    not); either must name an allowed origin. A request with neither comes
    from a non-browser client, which cookies cannot be forged for: allowed.

    `allow_same_origin` (on while the playground is served) also accepts a
    request whose `Origin` is the very origin it was sent to — the app's own
    pages. That is sound: a forged request comes from a page of *another*
    origin, and a browser never lets a page choose the `Origin` it sends. (A
    DNS-rebound name passes the comparison but carries no session cookie: the
    browser keeps cookies per host name.) Behind a TLS-terminating proxy the
    app sees `http` while the page says `https`: list the API's own origin in
    `ALLOWED_ORIGINS` to use the playground there.
    """

    def __init__(self, app: ASGIApp, allowed_origins: list[str], *, allow_same_origin: bool = False) -> None:
        self.app = app
        self.allowed = {origin.lower() for origin in allowed_origins}
        self.allow_same_origin = allow_same_origin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in UNSAFE_METHODS:
            headers = Headers(scope=scope)
            # A blank `Origin` names no origin: treat it as absent, so the
            # Referer is checked instead of the request passing unchecked.
            origin = (headers.get("origin") or "").strip() or None
            referer = headers.get("referer")
            claimed = origin.lower() if origin is not None else (_origin_of(referer) if referer is not None else "")
            if claimed != "" and claimed not in self.allowed and not self._same_origin(claimed, scope, headers):
                response = JSONResponse(error_body(ErrorCode.CSRF_ORIGIN), status_code=403)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


    def _same_origin(self, claimed: str | None, scope: Scope, headers: Headers) -> bool:
        return self.allow_same_origin and claimed is not None and claimed == _own_origin(scope, headers)


class BodyTooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(status_code=413)


class BodySizeLimitMiddleware:
    """Cap request bodies, by `Content-Length` up front and by counting when chunked."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse(error_body(ErrorCode.PAYLOAD_TOO_LARGE), status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException, so FastAPI's body parsing re-raises it
                    # as is and the error handlers answer 413.
                    raise BodyTooLarge()
            return message

        await self.app(scope, limited_receive, send)
