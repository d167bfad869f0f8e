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


class CSRFOriginMiddleware:
    """Refuse unsafe cross-site requests from browsers.

    Browsers send `Origin` on cross-site POSTs (and `Referer` when they do
    not); either must name an allowed origin. A request with neither comes
    from a non-browser client, which cookies cannot be forged for: allowed.
    """

    def __init__(self, app: ASGIApp, allowed_origins: list[str]) -> None:
        self.app = app
        self.allowed = {origin.lower() for origin in allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in UNSAFE_METHODS:
            headers = Headers(scope=scope)
            # A blank `Origin` names no origin: treat it as absent, so the
            # Referer is checked instead of the request passing unchecked.
            origin = (headers.get("origin") or "").strip() or None
            referer = headers.get("referer")
            claimed = origin.lower() if origin is not None else (_origin_of(referer) if referer is not None else "")
            if claimed != "" and claimed not in self.allowed:
                response = JSONResponse(error_body(ErrorCode.CSRF_ORIGIN), status_code=403)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
