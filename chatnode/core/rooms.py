"""Rules of rooms every Directory implementation shares (no I/O).

1. **A direct room's key** is its two account ids, lower first (``direct_key``): the same
   whoever asks, and never the key of another pair, even after a name is registered again
   (ids are never reused).
2. **A private room's first members** are its owner and the named members, each once
   (``first_members``); the owner counts against the room's member limit like the others.
"""

from __future__ import annotations

from collections.abc import Sequence

from chatnode.core.errors import Forbidden, RoomFull
from chatnode.core.models import MEMBER, OWNER


def direct_key(account_id: int, other_id: int) -> str:
    low, high = sorted((account_id, other_id))
    return f"{low}:{high}"


def direct_name(user: str, other: str) -> str:
    """A direct room's name: its two users' names in code point order."""
    low, high = sorted((user, other))
    return f"{low}, {high}"


def first_members(owner: str | None, members: Sequence[str]) -> list[tuple[str, str]]:
    """(name, role) of a private room's first members: the owner first, then the others."""
    seated: list[tuple[str, str]] = []
    if owner is not None:
        seated.append((owner, OWNER))
    for name in dict.fromkeys(members):
        if name != owner:
            seated.append((name, MEMBER))
    return seated


def room_full(room_id: int, max_members: int) -> RoomFull:
    where = f"room {room_id}" if room_id else "the room"
    return RoomFull(f"{where} is full ({max_members} members); try again after someone leaves")


def banned(room_id: int, user: str) -> Forbidden:
    return Forbidden(f"{user!r} is banned from room {room_id}", code="banned")
