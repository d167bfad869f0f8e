# ruff: noqa  -- written the way fastapi-users documents it, not our style: it is the peer being measured.
"""The peer for GET /auth/me: fastapi-users with CookieTransport + DatabaseStrategy on Beanie (MongoDB).

The same job as Innova's session lookup: cookie -> access-token document -> user document.
Run by benchmarks/me_bench.py in a virtualenv of its own: MONGO_URI=... uvicorn peer_fastapi_users:app --port P
"""
import os
from beanie import Document, PydanticObjectId, init_beanie
from fastapi import Depends, FastAPI
from fastapi_users import BaseUserManager, FastAPIUsers, schemas
from fastapi_users.authentication import AuthenticationBackend, CookieTransport
from fastapi_users.authentication.strategy.db import DatabaseStrategy
from fastapi_users_db_beanie import BeanieBaseUserDocument, BeanieUserDatabase, ObjectIDIDMixin
from fastapi_users_db_beanie.access_token import BeanieAccessTokenDatabase, BeanieBaseAccessTokenDocument
from pymongo import AsyncMongoClient


class User(BeanieBaseUserDocument):
    pass


class AccessToken(BeanieBaseAccessTokenDocument):
    pass


class UserRead(schemas.BaseUser[PydanticObjectId]):
    pass


class UserCreate(schemas.BaseUserCreate):
    pass


async def get_user_db():
    yield BeanieUserDatabase(User)


async def get_access_token_db():
    yield BeanieAccessTokenDatabase(AccessToken)


class UserManager(ObjectIDIDMixin, BaseUserManager[User, PydanticObjectId]):
    reset_password_token_secret = "x" * 32
    verification_token_secret = "x" * 32


async def get_user_manager(user_db=Depends(get_user_db)):
    yield UserManager(user_db)


def get_database_strategy(access_token_db=Depends(get_access_token_db)) -> DatabaseStrategy:
    return DatabaseStrategy(access_token_db, lifetime_seconds=7 * 86400)


backend = AuthenticationBackend(name="cookie", transport=CookieTransport(cookie_name="innova_session", cookie_secure=False),
                                get_strategy=get_database_strategy)
fastapi_users = FastAPIUsers[User, PydanticObjectId](get_user_manager, [backend])
app = FastAPI()
app.include_router(fastapi_users.get_auth_router(backend), prefix="/auth")
app.include_router(fastapi_users.get_register_router(UserRead, UserCreate), prefix="/auth")
current_user = fastapi_users.current_user(active=True)


@app.get("/auth/me")
async def me(user: User = Depends(current_user)):
    return {"user": {"id": str(user.id), "email": user.email}}


@app.on_event("startup")
async def startup():
    client = AsyncMongoClient(os.environ["MONGO_URI"], tz_aware=True)
    await init_beanie(database=client[os.environ.get("DB_NAME", "peer_db")], document_models=[User, AccessToken])
