"""HTTP routes of `/auth/*` (served again under the deprecated `/innova/api/auth/*`).

`build_router(prefix)` makes one router per prefix, so every route carries its
full path (metrics and the deprecation `Link` header use the route template).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import StreamingResponse

from innova_server.auth.cookies import clear_session_cookie, read_session_cookie, set_session_cookie
from innova_server.auth.dependencies import ClientDep, CurrentUser, ServicesDep
from innova_server.auth.devices import read_device_cookie, set_device_cookie
from innova_server.auth.recovery import FORGOT_ACCEPTED, RESET_DONE
from innova_server.auth.schemas import (
    DetailOut,
    ForgotIn,
    LoginIn,
    NameIn,
    PasswordChangeIn,
    PasswordConfirmIn,
    RegisterIn,
    ResetIn,
    SessionOut,
    SessionsOut,
    UserEnvelope,
    UserOut,
    VerifyIn,
)
from innova_server.auth.store import UserRecord
from innova_server.auth.tokens import hash_token, is_well_formed

VERIFY_REQUESTED = (
    "Si l'adresse n'est pas encore confirmée, un e-mail contenant un lien de confirmation vient d'être envoyé."
)


def user_out(user: UserRecord) -> UserEnvelope:
    return UserEnvelope(
        user=UserOut(
            id=user.id,
            email=user.email,
            name=user.name,
            email_verified=user.email_verified,
            created_at=user.created_at,
        )
    )


def no_content_signed_out(services: ServicesDep) -> Response:
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    clear_session_cookie(response, services.settings)
    return response


async def register(body: RegisterIn, response: Response, services: ServicesDep, client: ClientDep) -> UserEnvelope:
    session = await services.auth.register(body.email, body.password, body.name, client)
    services.verification.schedule(session.user)
    set_session_cookie(response, session.token, services.settings)
    return user_out(session.user)


async def login(
    body: LoginIn, request: Request, response: Response, services: ServicesDep, client: ClientDep
) -> UserEnvelope:
    session = await services.auth.login(
        body.email, body.password, client, read_session_cookie(request), read_device_cookie(request)
    )
    set_session_cookie(response, session.token, services.settings)
    if session.device_token is not None:
        set_device_cookie(response, session.device_token, services.settings)
    return user_out(session.user)


async def logout(request: Request, services: ServicesDep) -> Response:
    await services.auth.logout(read_session_cookie(request))
    return no_content_signed_out(services)


async def me(user: CurrentUser) -> UserEnvelope:
    return user_out(user)


async def rename(body: NameIn, user: CurrentUser, services: ServicesDep) -> UserEnvelope:
    return user_out(await services.account.rename(user, body.name))


async def change_password(
    body: PasswordChangeIn, response: Response, user: CurrentUser, services: ServicesDep, client: ClientDep
) -> UserEnvelope:
    session = await services.account.change_password(user, body.current_password, body.new_password, client)
    set_session_cookie(response, session.token, services.settings)
    return user_out(session.user)


async def list_sessions(request: Request, user: CurrentUser, services: ServicesDep) -> SessionsOut:
    token = read_session_cookie(request)
    current = hash_token(token) if token is not None and is_well_formed(token) else None
    records = await services.account.list_sessions(user)
    return SessionsOut(
        items=[
            SessionOut(
                id=record.id,
                created_at=record.created_at,
                expires_at=record.expires_at,
                ip=record.ip,
                user_agent=record.user_agent,
                current=record.token_hash == current,
            )
            for record in records
        ]
    )


async def revoke_session(session_id: str, request: Request, user: CurrentUser, services: ServicesDep) -> Response:
    revoked = await services.account.revoke_session(user, session_id, read_session_cookie(request))
    if revoked.was_current:
        return no_content_signed_out(services)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


async def revoke_all_sessions(user: CurrentUser, services: ServicesDep) -> Response:
    await services.account.revoke_all(user)
    return no_content_signed_out(services)


async def delete_me(body: PasswordConfirmIn, user: CurrentUser, services: ServicesDep, client: ClientDep) -> Response:
    await services.account.delete(user, body.password, client)
    return no_content_signed_out(services)


async def export_me(user: CurrentUser, services: ServicesDep) -> StreamingResponse:
    chunks = await services.account.export(user)
    return StreamingResponse(
        chunks,
        media_type="application/json",
        headers={
            "Content-Disposition": 'attachment; filename="innovaplus-export.json"',
            "Cache-Control": "no-store",
        },
    )


async def request_verification(user: CurrentUser, services: ServicesDep) -> DetailOut:
    await services.verification.request(user)
    return DetailOut(detail=VERIFY_REQUESTED)


async def verify(body: VerifyIn, services: ServicesDep) -> UserEnvelope:
    return user_out(await services.verification.verify(body.token))


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
    router.add_api_route("/me", rename, methods=["PATCH"])
    router.add_api_route("/me", delete_me, methods=["DELETE"], status_code=status.HTTP_204_NO_CONTENT)
    router.add_api_route("/me/export", export_me, methods=["GET"], response_class=StreamingResponse)
    router.add_api_route("/password", change_password, methods=["POST"])
    router.add_api_route("/sessions", list_sessions, methods=["GET"])
    router.add_api_route(
        "/sessions", revoke_all_sessions, methods=["DELETE"], status_code=status.HTTP_204_NO_CONTENT
    )
    router.add_api_route(
        "/sessions/{session_id}", revoke_session, methods=["DELETE"], status_code=status.HTTP_204_NO_CONTENT
    )
    router.add_api_route(
        "/verify/request", request_verification, methods=["POST"], status_code=status.HTTP_202_ACCEPTED
    )
    router.add_api_route("/verify", verify, methods=["POST"])
    router.add_api_route("/forgot", forgot, methods=["POST"], status_code=status.HTTP_202_ACCEPTED)
    router.add_api_route("/reset", reset, methods=["POST"])
    return router
