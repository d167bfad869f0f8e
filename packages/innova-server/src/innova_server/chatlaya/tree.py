"""The conversation tree: pure functions over a conversation's skeleton.

Every message has a `parent_id` (the message it follows; `None` for a first
user message), and parents never change. So the path from the root to any
message is fixed once that message exists, and a conversation's *current
branch* — stored on the conversation as the list of ids root→leaf — can be
replaced by any other valid path at any time, by any writer, without a
condition: whatever the interleaving of sends, regenerations, edits and
branch switches, the stored branch is always one real path of the tree (the
last writer's). That is why no operation here needs a lock.

The skeleton is `(id, parent_id)` for every message, oldest first — a small
projection read in one round trip when a path is not already known from the
current branch (a switch to another branch, a cursor from another branch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Node:
    id: str
    parent_id: str | None


class Tree:
    def __init__(self, skeleton: Sequence[Node]) -> None:
        """`skeleton` oldest first (created_at, then id): children keep that order."""
        self._parent: dict[str, str | None] = {}
        self._children: dict[str | None, list[str]] = {}
        for node in skeleton:
            self._parent[node.id] = node.parent_id
            self._children.setdefault(node.parent_id, []).append(node.id)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._parent

    def path_to(self, message_id: str) -> list[str]:
        """Root→`message_id` inclusive. A parent missing from the skeleton (deleted) ends the walk."""
        path = []
        current: str | None = message_id
        seen: set[str] = set()
        while current is not None and current in self._parent and current not in seen:
            seen.add(current)
            path.append(current)
            current = self._parent[current]
        path.reverse()
        return path

    def newest_leaf_path(self, message_id: str) -> list[str]:
        """Root→`message_id`, continued to a leaf taking the most recently created child at each step."""
        path = self.path_to(message_id)
        seen = set(path)
        current = message_id
        while self._children.get(current):
            current = self._children[current][-1]
            if current in seen:  # a cycle cannot be built through the API; never loop on bad data
                break
            seen.add(current)
            path.append(current)
        return path


def path_through(branch: Sequence[str], message_id: str) -> list[str] | None:
    """Root→`message_id` from the current branch, when the message is on it (no round trip)."""
    try:
        return list(branch[: branch.index(message_id) + 1])
    except ValueError:
        return None


__all__ = ["Node", "Tree", "path_through"]
