"""User presence (online, last seen): who may see whom, and the ``presence`` frames of
``/v1/connect`` (:class:`UserPresenceFeed`). The store is ``ports.Presence``.

Rules:

1. A user's **contacts** are the people they share a direct or private room with (at most
   their newest ``limit`` memberships are looked at; a ``/v1/connect`` connection reads them
   when it opens, and adds the members of a room its user joins while it is open). Only a contact, or the user themself,
   may read a user's presence (``GET /v1/users/{name}``); anyone else gets
   ``user_not_found``, as for a user that does not exist: presence is not shown to strangers.
2. A user's presence can change only when one of their connections opens or closes on some
   node, or a reap removes a dead node's entries. Where that happens, once the store has it,
   the node publishes ``user_presence`` (``frames.user_presence_event``) on the bus's users
   channel (``frames.USERS_CHANNEL``: one subscription per node, whatever the number of
   users): when the user's first connection on this node opens, when their last one here
   closes, and for each user a reap left offline. Nothing is sent per user and second.
3. The event carries no state: each node reads the store (``Presence.users``, one call for
   every user due), so events arriving in any order from any node end on the latest state.
4. Coalesced: a watched user's state is read at most once per ``interval_s`` (1 s) per node;
   events in between only mark the user due, and the latest state wins. A frame is sent to
   the user's watchers only when what they would see changed (``online``, and ``last_seen``
   while offline) since this node last sent one, encoded once for all of them.
5. An event about a user nobody on this node watches costs one dict lookup.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Protocol

import trio

from chatnode.core import auth
from chatnode.core.errors import NotFound
from chatnode.core.models import UserPresence
from chatnode.core.ports import Directory, Presence
from chatnode.wire import frames

log = logging.getLogger(__name__)

INTERVAL_S = 1.0
"""Rule 4: at most one presence frame per watched user per this many seconds."""


class PresenceWatcher(Protocol):
    """A ``/v1/connect`` connection, told of its user's contacts' presence."""

    @property
    def user(self) -> str: ...

    def send_nowait(self, frame: bytes) -> None: ...


async def contacts(directory: Directory, user: str, *, limit: int) -> set[str]:
    """Rule 1: the people ``user`` shares a direct or private room with (not themself)."""
    found: set[str] = set()
    for room in await directory.user_rooms(user, limit=limit):
        if not room.public:
            found.update(await directory.list_members(room.id))
    found.discard(user)
    return found


async def lookup(
    directory: Directory, presence: Presence, claims: auth.Claims, name: str, *, limit: int
) -> UserPresence:
    """``GET /v1/users/{name}`` (rule 1): the presence of the caller or of a contact of
    theirs; ``user_not_found`` for anyone else."""
    if name != claims.user and not await _shares_room(directory, claims.user, name, limit):
        raise NotFound(f"there is no user {name!r}", code="user_not_found")
    return (await presence.users([name]))[name]


async def _shares_room(directory: Directory, user: str, other: str, limit: int) -> bool:
    if await directory.find_direct(user, other) is not None:
        return True
    for room in await directory.user_rooms(user, limit=limit):
        if not room.public and await directory.get_member(room.id, other) is not None:
            return True
    return False


def _seen_as(state: UserPresence) -> tuple[bool, int | None]:
    """What a watcher sees of a state (rule 4): ``last_seen`` only matters while offline."""
    return (state.online, None if state.online else state.last_seen_ms)


class UserPresenceFeed:
    """This node's half of user presence: its users' connection counts (rule 2) and the
    coalesced frames to its watchers (rules 3-5). :meth:`run` is the node's flush task."""

    def __init__(self, presence: Presence, *, interval_s: float = INTERVAL_S) -> None:
        self._presence = presence
        self.interval_s = interval_s
        self._local: dict[str, int] = {}  # user -> their connections' entries on this node
        self._watchers: dict[str, set[PresenceWatcher]] = {}  # watched user -> watchers
        self._watching: dict[PresenceWatcher, frozenset[str]] = {}
        self._sent: dict[str, tuple[bool, int | None]] = {}  # watched user -> last frame's
        self._read_at: dict[str, float] = {}  # watched user -> its last read (trio time)
        self._due: dict[str, float] = {}  # watched user -> when it may be read next
        self._wake = trio.Event()
        self.frames_sent = 0

    # -- rule 2: local transitions ---------------------------------------------------------

    def opened(self, user: str) -> bool:
        """One more entry of ``user`` here: True if it is their first (announce it)."""
        count = self._local.get(user, 0) + 1
        self._local[user] = count
        return count == 1

    def closed(self, user: str) -> bool:
        """One entry of ``user`` less here: True if it was their last (announce it)."""
        count = self._local.get(user, 0) - 1
        if count > 0:
            self._local[user] = count
            return False
        self._local.pop(user, None)
        return True

    # -- watchers ----------------------------------------------------------------------------

    def watch(
        self, watcher: PresenceWatcher, users: Iterable[str], *, only_if_watching: bool = False
    ) -> None:
        """``watcher`` gets the frames of ``users`` too (``only_if_watching``: unless it
        stopped watching meanwhile, or never began)."""
        if only_if_watching and watcher not in self._watching:
            return
        watched = frozenset(users) | self._watching.get(watcher, frozenset())
        self._watching[watcher] = watched
        for user in watched:
            self._watchers.setdefault(user, set()).add(watcher)

    def unwatch(self, watcher: PresenceWatcher) -> None:
        for user in self._watching.pop(watcher, frozenset()):
            watchers = self._watchers.get(user)
            if watchers is None:
                continue
            watchers.discard(watcher)
            if not watchers:
                del self._watchers[user]
                self._sent.pop(user, None)
                self._read_at.pop(user, None)
                self._due.pop(user, None)

    @property
    def watched(self) -> int:
        return len(self._watchers)

    # -- rules 3-5 ----------------------------------------------------------------------------

    def changed(self, user: str) -> None:
        """A ``user_presence`` event arrived (the hub's call; never blocks)."""
        if user not in self._watchers or user in self._due:
            return
        self._due[user] = max(
            trio.current_time(), self._read_at.get(user, -math.inf) + self.interval_s
        )
        self._wake.set()

    async def run(self) -> None:
        """Read the due users' states and send what changed, until cancelled."""
        while True:
            if not self._due:
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            now = trio.current_time()
            soonest = min(self._due.values())
            if soonest > now:
                with trio.move_on_after(soonest - now):
                    await self._wake.wait()
                self._wake = trio.Event()
                continue
            due = [user for user, at in self._due.items() if at <= now]
            for user in due:
                del self._due[user]
                self._read_at[user] = now
            try:
                states = await self._presence.users(due)
            except Exception:
                log.warning("user presence not read; retrying", exc_info=True)
                for user in due:
                    if user in self._watchers:
                        self._due.setdefault(user, now + self.interval_s)
                continue
            for user, state in states.items():
                self._send(user, state)

    def _send(self, user: str, state: UserPresence) -> None:
        watchers = self._watchers.get(user)
        seen = _seen_as(state)
        if not watchers or self._sent.get(user) == seen:
            return
        self._sent[user] = seen
        frame = frames.ws_text_frame(
            frames.user_presence_frame(user, state.online, state.last_seen_ms)
        )
        for watcher in list(watchers):
            watcher.send_nowait(frame)
            self.frames_sent += 1
