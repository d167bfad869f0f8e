"""`/playground`: a page to try Chatlaya in a browser, served by the app itself.

One static HTML page with its script and style, shipped as package data: no
build step, nothing fetched from a CDN (the Content-Security-Policy says so to
the browser). The page uses only the public HTTP API, exactly as a front end
on another origin would, so it doubles as a worked example of the protocol.
Mounted only when `settings.playground_enabled` (development, or
`PLAYGROUND=true`).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

PATH = "/playground"
FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
         "style.css": "text/css; charset=utf-8"}
# Everything comes from this origin; the API calls too.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

router = APIRouter(include_in_schema=False)


@cache
def _read(name: str) -> bytes:
    return resources.files(__name__).joinpath(name).read_bytes()


def _file(name: str) -> Response:
    return Response(_read(name), media_type=FILES[name], headers=HEADERS)


@router.get(PATH)
async def page() -> Response:
    return _file("index.html")


@router.get(PATH + "/")
async def slash() -> RedirectResponse:
    return RedirectResponse(PATH, status_code=308)


@router.get(PATH + "/app.js")
async def script() -> Response:
    return _file("app.js")


@router.get(PATH + "/style.css")
async def style() -> Response:
    return _file("style.css")


__all__ = ["PATH", "router"]
