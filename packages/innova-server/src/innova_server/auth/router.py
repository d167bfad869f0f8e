"""HTTP routes of `/auth/*` (served again under the deprecated `/innova/api/auth/*`).

`build_router(prefix)` makes one router per prefix, so every route carries its
full path (metrics and the deprecation `Link` header use the route template).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from innova_server.auth.cookies import clear_session_cookie, read_session_cookie, set_session_cookie
from innova_server.auth.dependencies import ClientDep, CurrentUser, ServicesDep
from innova_server.auth.recovery import FORGOT_ACCEPTED, RESET_DONE
from innova_server.auth.schemas import DetailOut, ForgotIn, LoginIn, RegisterIn, ResetIn, UserEnvelope, UserOut
from innova_server.auth.store import UserRecord


def user_out(user: UserRecord) -> UserEnvelope:
    return UserEnvelope(user=UserOut(id=user.id, email=user.email, name=user.name, created_at=user.created_at))


async def register(body: RegisterIn, response: Response, services: ServicesDep, client: ClientDep) -> UserEnvelope:
    session = await services.auth.register(body.email, body.password, body.name, client)
    set_session_cookie(response, session.token, services.settings)
    return user_out(session.user)


async def login(
    body: LoginIn, request: Request, response: Response, services: ServicesDep, client: ClientDep
) -> UserEnvelope:
    session = await services.auth.login(body.email, body.password, client, read_session_cookie(request))
    set_session_cookie(response, session.token, services.settings)
    return user_out(session.user)


async def logout(request: Request, services: ServicesDep) -> Response:
    await services.auth.logout(read_session_cookie(request))
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    clear_session_cookie(response, services.settings)
    return response


async def me(user: CurrentUser) -> UserEnvelope:
    return user_out(user)


async def forgot(body: ForgotIn, services: ServicesDep, client: ClientDep) -> DetailOut:
    # Same answer for every address: the work happens in the background.
    await services.recovery.forgot(body.email, client)
    return DetailOut(detail=FORGOT_ACCEPTED)


async def reset(body: ResetIn, services: ServicesDep) -> DetailOut:
    await services.recovery.reset(body.token, body.email, body.password)
    return DetailOut(detail=RESET_DONE)


def build_router(prefix: str, *, deprecated: bool = False) -> APIRouter:
    router = APIRouter(prefix=prefix, tags=["auth"], deprecated=deprecated or None)
    router.add_api_route("/register", register, methods=["POST"], status_code=status.HTTP_201_CREATED)
    router.add_api_route("/login", login, methods=["POST"])
    router.add_api_route("/logout", logout, methods=["POST"], status_code=status.HTTP_204_NO_CONTENT)
    router.add_api_route("/me", me, methods=["GET"])
    router.add_api_route("/forgot", forgot, methods=["POST"], status_code=status.HTTP_202_ACCEPTED)
    router.add_api_route("/reset", reset, methods=["POST"])
    return router
