"""HTTP routes of `/chatlaya/*`: thin; the queries are `ChatService`, the replies `Replies`.

The router carries its full prefix itself (`APIRouter(prefix="/chatlaya")`):
metrics label requests by route template, which must be the full path.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Response, status
from fastapi.exceptions import RequestValidationError

from innova_server.auth.dependencies import CurrentUser, ServicesDep
from innova_server.chatlaya.schemas import (
    BranchIn,
    ConversationEnvelope,
    ConversationOut,
    ConversationPage,
    ConversationPatch,
    FeedbackIn,
    MessageEnvelope,
    MessageIn,
    MessageOut,
    MessagePage,
    UsageOut,
    UsageToday,
)
from innova_server.chatlaya.sse import EventStreamResponse
from innova_server.chatlaya.store import InvalidCursor
from innova_server.chatlaya.streams import MAX_EVENT_ID, InvalidEventId, LiveStream

PREFIX = "/chatlaya"

Limit = Annotated[int, Query(ge=1, le=100)]
Cursor = Annotated[str | None, Query(max_length=200)]


def _invalid(loc: tuple[str, str], message: str) -> RequestValidationError:
    error: dict[str, Any] = {"type": "value_error", "loc": loc, "msg": message}
    return RequestValidationError([error])


def _bad_cursor(name: str, value: str) -> RequestValidationError:
    return _invalid(("query", name), "invalid cursor")


async def session(user: CurrentUser, services: ServicesDep) -> ConversationEnvelope:
    return ConversationEnvelope(conversation=ConversationOut.of(await services.chat.session(user.id)))


async def create_conversation(user: CurrentUser, services: ServicesDep) -> ConversationEnvelope:
    return ConversationEnvelope(conversation=ConversationOut.of(await services.chat.create_conversation(user.id)))


async def list_conversations(
    user: CurrentUser,
    services: ServicesDep,
    limit: Limit = 20,
    cursor: Cursor = None,
    archived: bool = False,
    q: Annotated[str | None, Query(min_length=1, max_length=100)] = None,
) -> ConversationPage:
    try:
        items, next_cursor = await services.chat.list_conversations(
            user.id, archived=archived, limit=limit, cursor=cursor, query=q
        )
    except InvalidCursor:
        raise _bad_cursor("cursor", cursor or "") from None
    return ConversationPage(items=[ConversationOut.of(item) for item in items], next_cursor=next_cursor)


async def update_conversation(
    conversation_id: str, body: ConversationPatch, user: CurrentUser, services: ServicesDep
) -> ConversationEnvelope:
    record = await services.chat.update_conversation(user.id, conversation_id, title=body.title, archived=body.archived)
    return ConversationEnvelope(conversation=ConversationOut.of(record))


async def delete_conversation(conversation_id: str, user: CurrentUser, services: ServicesDep) -> Response:
    await services.chat.delete_conversation(user.id, conversation_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


async def list_messages(
    user: CurrentUser,
    services: ServicesDep,
    conversation_id: Annotated[str | None, Query(max_length=64)] = None,
    limit: Limit = 50,
    before: Cursor = None,
) -> MessagePage:
    try:
        items, next_cursor = await services.chat.list_messages(user.id, conversation_id, limit=limit, before=before)
    except InvalidCursor:
        raise _bad_cursor("before", before or "") from None
    return MessagePage(items=[MessageOut.of(m.record, m.sibling_ids) for m in items], next_cursor=next_cursor)


async def send_message(body: MessageIn, user: CurrentUser, services: ServicesDep) -> EventStreamResponse:
    turn = await services.replies.open_turn(user.id, body.content, body.conversation_id, body.edit_of)
    return EventStreamResponse(LiveStream(turn), ping_seconds=services.settings.chat_ping_seconds)


async def switch_branch(
    conversation_id: str, body: BranchIn, user: CurrentUser, services: ServicesDep
) -> ConversationEnvelope:
    record = await services.chat.switch_branch(user.id, conversation_id, body.message_id)
    return ConversationEnvelope(conversation=ConversationOut.of(record))


MessageId = Annotated[str, Path(max_length=64)]


async def message_events(
    message_id: MessageId,
    user: CurrentUser,
    services: ServicesDep,
    last_event_id: Annotated[str | None, Query(max_length=MAX_EVENT_ID)] = None,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> EventStreamResponse:
    """Resume (or replay) a reply after the last event id the client saw.

    The header wins over the query parameter: an EventSource reconnecting to a
    URL that carries the first id sends the newer one in the header.
    """
    position: str | None = last_event_id
    loc = ("query", "last_event_id")
    if last_event_id_header is not None:
        loc, position = ("header", "Last-Event-ID"), last_event_id_header.strip()
    if position is not None and len(position) > MAX_EVENT_ID:
        raise _invalid(loc, f"at most {MAX_EVENT_ID} characters")
    try:
        source = await services.replies.resume(user.id, message_id, position)
    except InvalidEventId:
        raise _invalid(loc, "this id names no position of this message") from None
    return EventStreamResponse(source, ping_seconds=services.settings.chat_ping_seconds)


async def stop_message(message_id: MessageId, user: CurrentUser, services: ServicesDep) -> MessageEnvelope:
    return MessageEnvelope(message=MessageOut.of(await services.replies.stop(user.id, message_id)))


async def regenerate(message_id: MessageId, user: CurrentUser, services: ServicesDep) -> EventStreamResponse:
    turn = await services.replies.regenerate(user.id, message_id)
    return EventStreamResponse(LiveStream(turn), ping_seconds=services.settings.chat_ping_seconds)


async def put_feedback(
    message_id: MessageId, body: FeedbackIn, user: CurrentUser, services: ServicesDep
) -> MessageEnvelope:
    record = await services.chat.set_feedback(user.id, message_id, body.rating, body.comment or None)
    return MessageEnvelope(message=MessageOut.of(record))


async def delete_feedback(message_id: MessageId, user: CurrentUser, services: ServicesDep) -> Response:
    await services.chat.clear_feedback(user.id, message_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


async def usage(user: CurrentUser, services: ServicesDep) -> UsageOut:
    today = await services.chat.usage_today(user.id)
    return UsageOut(
        today=UsageToday(
            messages=today.messages, prompt_tokens=today.prompt_tokens, completion_tokens=today.completion_tokens
        ),
        daily_token_limit=services.settings.chat_daily_tokens_user,
    )


def _stream_route(router: APIRouter, path: str, endpoint: Any, method: str, description: str) -> None:
    # FastAPI's OpenAPI cannot infer the status or the media type from our response class.
    router.add_api_route(
        path,
        endpoint,
        methods=[method],
        status_code=status.HTTP_200_OK,
        response_class=EventStreamResponse,
        responses={200: {"content": {"text/event-stream": {}}, "description": description}},
    )


def _no_content_route(router: APIRouter, path: str, endpoint: Any) -> None:
    router.add_api_route(
        path, endpoint, methods=["DELETE"], status_code=status.HTTP_204_NO_CONTENT, response_class=Response
    )


def build_router() -> APIRouter:
    router = APIRouter(prefix=PREFIX, tags=["chatlaya"])
    router.add_api_route("/session", session, methods=["POST"])
    router.add_api_route("/conversations", create_conversation, methods=["POST"], status_code=status.HTTP_201_CREATED)
    router.add_api_route("/conversations", list_conversations, methods=["GET"])
    router.add_api_route("/conversations/{conversation_id}", update_conversation, methods=["PATCH"])
    _no_content_route(router, "/conversations/{conversation_id}", delete_conversation)
    router.add_api_route("/conversations/{conversation_id}/branch", switch_branch, methods=["POST"])
    router.add_api_route("/messages", list_messages, methods=["GET"])
    _stream_route(router, "/message", send_message, "POST", "start, token…, done")
    _stream_route(router, "/messages/{message_id}/events", message_events, "GET", "start, token…, done after an id")
    _stream_route(router, "/messages/{message_id}/regenerate", regenerate, "POST", "start, token…, done")
    router.add_api_route(
        "/messages/{message_id}/stop", stop_message, methods=["POST"], status_code=status.HTTP_202_ACCEPTED
    )
    router.add_api_route("/messages/{message_id}/feedback", put_feedback, methods=["PUT"])
    _no_content_route(router, "/messages/{message_id}/feedback", delete_feedback)
    router.add_api_route("/usage", usage, methods=["GET"])
    return router
