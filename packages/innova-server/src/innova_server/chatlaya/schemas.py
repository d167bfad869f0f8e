"""Request and response bodies of the Chatlaya API (packages/innova-server/README.md, "Chatlaya")."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from innova_server.chatlaya.messages import MessageRecord
from innova_server.chatlaya.store import ConversationRecord

MAX_CONTENT_CHARS = 32_000
MAX_TITLE_CHARS = 200


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("content must not be empty")
    return value


# Kept exactly as typed (whitespace included): only blank content is refused.
Content = Annotated[str, Field(min_length=1, max_length=MAX_CONTENT_CHARS), AfterValidator(_not_blank)]
Title = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_TITLE_CHARS)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MessageIn(Body):
    content: Content
    conversation_id: str | None = Field(None, max_length=64)
    # A user message of that conversation: the new message becomes its sibling ("edit and resend").
    edit_of: str | None = Field(None, max_length=64)


class BranchIn(Body):
    message_id: str = Field(max_length=64)


class FeedbackIn(Body):
    rating: Literal["up", "down"]
    comment: Annotated[str, StringConstraints(strip_whitespace=True, max_length=1000)] | None = None


class FeedbackOut(BaseModel):
    rating: str
    comment: str | None


class ConversationPatch(Body):
    title: Title | None = None
    archived: bool | None = None


class ConversationOut(BaseModel):
    id: str
    title: str | None
    created_at: datetime
    updated_at: datetime
    archived: bool

    @classmethod
    def of(cls, record: ConversationRecord) -> ConversationOut:
        return cls(
            id=record.id,
            title=record.title,
            created_at=record.created_at,
            updated_at=record.updated_at,
            archived=record.archived,
        )


class ConversationEnvelope(BaseModel):
    conversation: ConversationOut


class ConversationPage(BaseModel):
    items: list[ConversationOut]
    next_cursor: str | None


class MessageOut(BaseModel):
    id: str
    conversation_id: str
    parent_id: str | None
    # Every message with the same parent, itself included, oldest first ("2 / 3").
    sibling_ids: list[str]
    feedback: FeedbackOut | None
    role: str
    content: str
    created_at: datetime
    status: str
    provider: str | None
    model: str | None
    finish_reason: str | None

    @classmethod
    def of(cls, record: MessageRecord, sibling_ids: list[str] | None = None) -> MessageOut:
        feedback = record.feedback
        return cls(
            id=record.id,
            conversation_id=record.conversation_id,
            parent_id=record.parent_id,
            sibling_ids=sibling_ids if sibling_ids is not None else [record.id],
            feedback=FeedbackOut(rating=feedback["rating"], comment=feedback.get("comment")) if feedback else None,
            role=record.role,
            content=record.content,
            created_at=record.created_at,
            status=record.status,
            provider=record.provider,
            model=record.model,
            finish_reason=record.finish_reason,
        )


class MessageEnvelope(BaseModel):
    message: MessageOut


class MessagePage(BaseModel):
    items: list[MessageOut]
    next_cursor: str | None


class UsageToday(BaseModel):
    messages: int
    prompt_tokens: int
    completion_tokens: int


class UsageOut(BaseModel):
    today: UsageToday
    daily_token_limit: int | None
