"""FastAPI dependencies shared by every router that needs a user."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from innova_server.auth.cookies import read_session_cookie
from innova_server.auth.manager import ClientInfo
from innova_server.auth.store import UserRecord
from innova_server.errors import AppError, ErrorCode
from innova_server.netutil import client_ip, rate_limit_subject
from innova_server.services import Services

# Every dependency is `async def`: FastAPI runs a plain `def` one in anyio's
# worker-thread pool, where it would queue behind blocking work for nothing.


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_client(request: Request, services: ServicesDep) -> ClientInfo:
    ip = client_ip(request, services.settings.trusted_proxies)
    return ClientInfo(
        ip=ip,
        user_agent=request.headers.get("user-agent"),
        network=rate_limit_subject(ip, services.settings.rate_limit_ipv6_prefix),
    )


async def get_current_user(request: Request, services: ServicesDep) -> UserRecord:
    return await services.auth.current_user(read_session_cookie(request))


ClientDep = Annotated[ClientInfo, Depends(get_client)]
CurrentUser = Annotated[UserRecord, Depends(get_current_user)]


async def require_verified_email(user: CurrentUser, services: ServicesDep) -> UserRecord:
    """The signed-in user, refused with 403 `email_not_verified` while `REQUIRE_VERIFIED_EMAIL`
    is on and their address is unconfirmed.

    Usable per route (`VerifiedUser`) or for a whole router
    (`include_router(..., dependencies=[Depends(require_verified_email)])`).
    FastAPI resolves `CurrentUser` once per request, so a route that also asks
    for it costs no second session lookup.
    """
    if services.settings.require_verified_email and not user.email_verified:
        raise AppError(ErrorCode.EMAIL_NOT_VERIFIED)
    return user


VerifiedUser = Annotated[UserRecord, Depends(require_verified_email)]
