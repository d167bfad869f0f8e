"""The current branch of a conversation, and paths to its messages (the tree is `chatlaya.tree`).

Shared by the queries (`ChatService`) and the replies (`Replies`): both need
the branch a conversation shows, and the path from the root to a message —
from the branch itself when the message is on it (no round trip), else from
the conversation's skeleton (one).
"""

from __future__ import annotations

import logging

from innova_server import metrics
from innova_server.chatlaya.messages import MessageRecord, MessageStore
from innova_server.chatlaya.store import ConversationRecord, ConversationStore
from innova_server.chatlaya.tree import Tree, path_through
from innova_server.errors import AppError, ErrorCode

log = logging.getLogger("innova.chatlaya")


async def owned(conversations: ConversationStore, user_id: str, conversation_id: str) -> ConversationRecord:
    """The caller's conversation; 404 `conversation_not_found` for anything else (never 403)."""
    conversation = await conversations.get(user_id, conversation_id)
    if conversation is None:
        raise AppError(ErrorCode.CONVERSATION_NOT_FOUND)
    return conversation


class Branches:
    def __init__(self, conversations: ConversationStore, messages: MessageStore) -> None:
        self.conversations = conversations
        self.messages = messages

    async def current(self, conversation: ConversationRecord) -> list[str]:
        """The current branch; a conversation of the first version is chained by time first."""
        if conversation.branch is not None:
            return conversation.branch
        branch = await self.messages.adopt_linear(conversation.id)
        await self.conversations.set_branch(conversation.user_id, conversation.id, branch)
        return branch

    async def path_to(self, conversation: ConversationRecord, branch: list[str], message_id: str) -> list[str]:
        """Root→`message_id`: from the current branch when it is on it, else from the skeleton."""
        path = path_through(branch, message_id)
        if path is not None:
            return path
        return Tree(await self.messages.skeleton(conversation.id)).path_to(message_id)

    async def store_interrupted(self, record: MessageRecord) -> None:
        """Make a lapsed reply's `interrupted` permanent (its reader already sees it so)."""
        try:
            if await self.messages.interrupt(record.id):
                metrics.CHAT_TURN_ENDINGS.labels(record.provider or "unknown", "interrupted").inc()
        except Exception as error:  # the next reader tries again; this one already shows it interrupted
            log.warning("could not store reply %s as interrupted: %s", record.id, type(error).__name__)


__all__ = ["Branches", "owned"]
