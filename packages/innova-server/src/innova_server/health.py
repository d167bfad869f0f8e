"""`GET /health`: is this process up, and does MongoDB answer?"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from innova_server import __version__

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    services = request.app.state.services
    mongo_ok = await services.db.shared_ping(timeout=2.0)
    body = {
        "status": "ok" if mongo_ok else "error",
        "mongo": "ok" if mongo_ok else "error",
        "version": __version__,
        "provider": services.provider_entry.name,
    }
    return JSONResponse(body, status_code=200 if mongo_ok else 503, headers={"Cache-Control": "no-store"})
