"""Domain values. All are immutable (``@attrs.frozen``); times are epoch milliseconds."""

from __future__ import annotations

import attrs


@attrs.frozen
class User:
    name: str
    password_hash: str
    created_at_ms: int
    is_admin: bool = False


@attrs.frozen
class Room:
    id: int
    name: str
    created_at_ms: int


@attrs.frozen
class Draft:
    """A message as a member sent it, before the bus gives it a room offset."""

    room_id: int
    user: str
    text: str
    timestamp_ms: int


@attrs.frozen
class ChatMessage:
    """A message of a room. ``offset`` is assigned by the bus: strictly increasing per room,
    starting at 1, the same on every node. ``(room_id, offset)`` identifies it everywhere."""

    room_id: int
    offset: int
    user: str
    text: str
    timestamp_ms: int

    @property
    def key(self) -> str:
        """The archive document id: idempotent re-indexing."""
        return f"{self.room_id}:{self.offset}"


@attrs.frozen
class ArchiveEntry:
    """A message waiting in the archive feed; ``ack_id`` is the feed's own id for it."""

    ack_id: str
    message: ChatMessage


@attrs.frozen
class SearchQuery:
    text: str
    room_id: int | None = None
    user: str | None = None
    from_ms: int | None = None
    to_ms: int | None = None
    limit: int = 20


@attrs.frozen
class SearchHit:
    message: ChatMessage
    score: float


@attrs.frozen
class PresenceEntry:
    """One live connection of ``user`` in ``room_id`` on node ``node_id``."""

    room_id: int
    user: str
    node_id: str
    conn_id: str
