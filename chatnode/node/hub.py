"""The local hub: which connections of this node sit in which room, and delivery to them.

Rules (the guarantees of docs/architecture.md, "path of a message"):

1. A node subscribes to a room on the bus when its first local member joins and unsubscribes
   when the last one leaves. Subscription changes are serialized, so a room is never left
   unsubscribed while it has a member.
2. ``RoomSession.last_offset`` is the newest offset this node has applied for the room, and the
   session has applied every offset up to it. A message at or below it is a duplicate and is
   dropped; one above ``last_offset + 1`` reveals a gap (the bus lost messages, e.g. across a
   Redis reconnect), which is filled from the room log before the message is applied.
3. A joining member gets a seat that is not live: messages applied meanwhile queue on the seat.
   Its replay covers ``(after, head]`` with ``head = last_offset`` at the moment of joining;
   then the queued messages above ``head`` are sent and the seat goes live, with no ``await``
   between the two. So every member sees every offset once, in order, with no gap.
   The queue is bounded: a seat holds at most ``cache_size`` messages and, going live, hands
   over at most ``max_bytes`` of frames; past either, the queue is dropped and the seat
   remembers the newest offset it dropped (``skipped_to``), which the replay then reads from
   history (``(sent_up_to, skipped_to]``) before trying again. The queue restarts with the
   next message applied, so the history read and the queue still meet with no gap.
4. Delivery never waits on a member: the message is handed to each live member's ``deliver``
   (``wire/frames.py`` rule 3: the member's dialect encodes it, once per room fan-out and
   dialect); a member whose backlog overflows closes itself. The hub never sees bytes.
5. History comes from the session's cache of recent messages when it covers the range; else it
   is loaded from the bus log (and the archive for what the log no longer holds) by one task
   at a time per room (single-flight), and the load extends the cache for the next joiner.
6. The node gives the bus back what the bus lost. When the bus's offset of a room is
   missing or behind the session's (Redis lost data), the session's newest offset and its
   cached messages are restored to the bus, so offsets continue above what members saw;
   a room without a session continues above the archive's newest offset.
7. History is complete or refused. A range neither the bus log nor the archive holds whole
   (the archive lags: its backlog, or a refresh not yet made, which the load then makes) is
   refused with ``Unavailable`` (a join answers 503, a gap fill retries after the bus's
   backoff), until ``hole_wait_s`` after the room's history first lacked messages: then the
   messages are taken as lost (logged, counted in ``history_holes``) and the range served
   without them.
8. A membership that ends ends everywhere, in offset order. ``RoomSession.members`` are the
   users (name -> account id) whose membership this node confirmed while subscribed to the
   room: a rejoin of the same account asks the directory nothing. A membership change that
   ends one (``ChatMessage.ends_membership``: ``node/rooms.py`` rule 7, a message of the
   room like any other) is applied like a message -- the user's seats get it -- and then
   drops the user from the table and tells that user's seats in the room
   (``Member.removed``: a room's connection closes with 4501, a ``/v1/connect`` connection
   unsubscribes the room), before the next offset is applied: a member removed at offset k
   gets nothing after k. ``removals`` counts them, so a confirmation that raced a removal
   is not kept. The table lives and dies with the session: a node that is not subscribed
   remembers no membership; after a bus reconnect every table is emptied. A replay shows a
   change and does not act on it: a seat is taken before its membership is checked, so a
   removal after the check reaches the seat live (or queued, Rule 3).
9. A membership that begins reaches the user's multi-room connections. Every node follows
   ``frames.USERS_CHANNEL`` on the bus (one subscription per node; it also carries
   ``user_presence``, handed to ``on_user_presence``: ``node/presence.py``); a ``user_room_added``
   signal there hands the room, and the offset of the ``added`` change if it has one, to
   each :class:`RoomWatcher` of that user on this node (``/v1/connect`` connections, which
   subscribe it from that offset on). ``user_room_events`` counts them, so a connection
   that read the user's rooms before it began watching knows to read them again.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable
from typing import Protocol

import attrs
import trio

from chatnode.core.errors import OffsetUnknown, Unavailable
from chatnode.core.models import ChatMessage, Draft, RoomEvent
from chatnode.core.ports import Archive, Bus
from chatnode.wire import frames
from chatnode.wire.frames import CloseCode

log = logging.getLogger(__name__)

HOLE_WAIT_S = 30.0
"""Rule 7: how long a history lacking messages is refused before it is served without them.
Longer than an archive outage the lease hands over (``archive_claim_idle_s``) plus a
catch-up: what the archive will hold is waited for, what it never will is not."""


class Member(Protocol):
    """A live connection as the hub sees it (implemented by the WebSocket edge)."""

    @property
    def conn_id(self) -> str: ...

    @property
    def user(self) -> str: ...

    def deliver(self, message: ChatMessage) -> None:
        """Send a chat message (the fan-out's call). Never blocks; on backlog overflow the
        member closes itself with ``CloseCode.SLOW_CONSUMER``."""

    def deliver_history(self, message: ChatMessage) -> int:
        """Send a message of the replay; the bytes it queued."""

    def deliver_all(self, messages: list[ChatMessage], max_bytes: int | None = None) -> bool:
        """Send ``messages`` if they come to at most ``max_bytes``: True; else nothing."""

    def notify(self, notice: frames.Notice) -> None:
        """Send a notice (room event, replay markers), if the member's dialect has one."""

    def close_nowait(self, code: CloseCode, reason: str) -> None: ...

    def removed(self) -> None:
        """The user's membership of the seat's room ended (Rule 8): a connection to that
        room alone closes (4501); a room of a multi-room connection is taken off it."""

    @property
    def replay_page_bytes(self) -> int:
        """Bytes of frames a replay queues before it waits for :meth:`writable`."""

    async def writable(self) -> bool:
        """Return once the member can take another page of its replay (at once while little
        is queued); False if it is closing: send it nothing more."""


class RoomWatcher(Protocol):
    """A connection that follows its user's new memberships (Rule 9)."""

    @property
    def user(self) -> str: ...

    def room_added(self, room_id: int, since: int | None = None) -> None:
        """The user became a member of the room (never blocks); ``since``: the offset before
        their ``added`` change, if it has one."""


@attrs.define(eq=False)
class Seat:
    """A member's place in a room session. ``pending`` holds what was applied while the
    member's replay ran (Rule 3); it is None once live, as it is for every idle member.
    ``skipped_to`` is the newest offset dropped from ``pending`` (Rule 3's bound)."""

    member: Member
    live: bool = False
    pending: list[ChatMessage] | None = None
    skipped_to: int = 0


@attrs.define(eq=False)
class RoomSession:
    room_id: int
    cache_size: int
    seats: dict[str, Seat] = attrs.Factory(dict)
    ready: trio.Event = attrs.Factory(trio.Event)
    early: list[ChatMessage] = attrs.Factory(list)
    last_offset: int = 0
    recent: deque[ChatMessage] = attrs.field(init=False)
    load_lock: trio.Lock = attrs.Factory(trio.Lock)
    history_loads: int = 0
    members: dict[str, int] = attrs.Factory(dict)  # Rule 8: name -> account id
    removals: int = 0

    def __attrs_post_init__(self) -> None:
        self.recent = deque(maxlen=self.cache_size)

    def cached(self, after: int, head: int) -> list[ChatMessage] | None:
        """Messages ``(after, head]`` from the cache, or None if it does not hold them all."""
        if head <= after:
            return []
        if not self.recent or self.recent[0].offset > after + 1 or self.recent[-1].offset < head:
            return None
        first = self.recent[0].offset
        return [self.recent[i - first] for i in range(after + 1, head + 1)]

    def remember(self, loaded: list[ChatMessage]) -> None:
        """Prepend a loaded contiguous range that ends where the cache starts."""
        if not loaded:
            return
        start = self.recent[0].offset if self.recent else self.last_offset + 1
        if loaded[-1].offset + 1 != start or any(
            b.offset != a.offset + 1 for a, b in itertools.pairwise(loaded)
        ):
            return
        room = self.cache_size - len(self.recent)
        if room > 0:
            self.recent.extendleft(reversed(loaded[-room:]))


class Hub:
    """Implements ``BusHandler``: the bus hands every message of a subscribed room here."""

    def __init__(self, bus: Bus, archive: Archive, *, cache_size: int) -> None:
        self._bus = bus
        self._archive = archive
        self._cache_size = cache_size
        self._sessions: dict[int, RoomSession] = {}
        self._subscription_lock = trio.Lock()
        self.deliveries = 0
        self.history_loads_total = 0
        self.archive_reads = 0
        self.history_holes = 0
        """Messages left out of a history after ``hole_wait_s`` (Rule 7)."""
        self.hole_wait_s = HOLE_WAIT_S
        self._holes: dict[int, float] = {}  # room -> when its history first lacked messages
        self._watchers: dict[str, set[RoomWatcher]] = {}  # user -> its connections (Rule 9)
        self.on_user_presence: Callable[[str], None] | None = None  # Rule 9, user presence
        self.user_room_events = 0

    # -- membership -----------------------------------------------------------------------

    async def attach(self, room_id: int, member: Member) -> tuple[RoomSession, Seat]:
        """Seat ``member`` (not yet live) and return with the room subscribed (Rule 1, 3)."""
        session = await self._session(room_id)
        seat = Seat(member)
        session.seats[member.conn_id] = seat
        return session, seat

    async def detach(self, room_id: int, member: Member) -> None:
        session = self._sessions.get(room_id)
        if session is None or session.seats.pop(member.conn_id, None) is None:
            return
        if session.seats:
            return
        async with self._subscription_lock:
            if self._sessions.get(room_id) is session and not session.seats:
                del self._sessions[room_id]
                try:
                    await self._bus.unsubscribe(room_id)
                except Unavailable:
                    # Harmless: with no session the hub ignores the room's traffic, and the
                    # next first member subscribes again.
                    log.warning("room %d: unsubscribe failed (bus unavailable)", room_id)

    async def _session(self, room_id: int) -> RoomSession:
        session = self._sessions.get(room_id)
        if session is not None and session.ready.is_set():
            return session
        async with self._subscription_lock:
            session = self._sessions.get(room_id)
            if session is None:
                session = RoomSession(room_id, self._cache_size)
                self._sessions[room_id] = session
                try:
                    await self._bus.subscribe(room_id)
                    head = await self.head(room_id)
                except BaseException:
                    del self._sessions[room_id]
                    raise
                session.last_offset = head
                session.ready.set()
                early, session.early = session.early, []
                for message in early:
                    await self._apply(session, message)
            return session

    def go_live(
        self, session: RoomSession, seat: Seat, *, sent_up_to: int, max_bytes: int | None = None
    ) -> bool:
        """Flush what queued during the replay and make the seat live (Rule 3): True. Sync:
        nothing can be applied between the flush and the switch. False, with nothing sent,
        when the queue cannot be handed over whole: it dropped messages above ``sent_up_to``
        or holds more than ``max_bytes`` of frames. The caller then sends
        ``(sent_up_to, seat.skipped_to]`` from history and calls again."""
        if seat.skipped_to > sent_up_to or not seat.member.deliver_all(
            [m for m in seat.pending or () if m.offset > sent_up_to], max_bytes
        ):
            if seat.pending:
                seat.skipped_to = max(seat.skipped_to, seat.pending[-1].offset)
            seat.pending = None
            return False
        seat.pending = None
        seat.live = True
        return True

    # -- offsets the bus lost (Rule 6) -------------------------------------------------------

    async def publish(self, draft: Draft) -> ChatMessage:
        """Publish ``draft`` on the bus; if the bus lost the room's offset, restore the room
        first (:meth:`restore`) and publish again. ``Unavailable`` if it cannot be."""
        try:
            return await self._bus.publish(draft)
        except OffsetUnknown:
            await self.restore(draft.room_id)
            return await self._bus.publish(draft)

    async def head(self, room_id: int) -> int:
        """The room's newest offset; if the bus lost it, restored first (:meth:`restore`)."""
        head = await self._bus.last_offset(room_id)
        if head is None:
            head = await self.restore(room_id)
        return head

    async def restore(self, room_id: int) -> int:
        """Tell the bus what this node knows of a room whose offset it lost (Rule 6): the
        session's newest offset and cached messages, or, with no session, the archive's
        newest offset (a seed, which the bus may refuse for a while: ``Unavailable``)."""
        session = self._sessions.get(room_id)
        if session is not None and session.ready.is_set():
            return await self._restore_session(session)
        archived = await self._archive.last_offset(room_id)
        head = await self._bus.restore(room_id, last_offset=archived, seed=True)
        log.warning("room %d: the bus lost its offset; continuing above %d", room_id, head)
        return head

    async def _restore_session(self, session: RoomSession) -> int:
        head = await self._bus.restore(
            session.room_id, last_offset=session.last_offset, messages=list(session.recent)
        )
        log.warning(
            "room %d: the bus had lost messages up to offset %d; restored %d from this node",
            session.room_id,
            session.last_offset,
            len(session.recent),
        )
        return head

    # -- history ----------------------------------------------------------------------------

    async def history(self, session: RoomSession, after: int, head: int) -> list[ChatMessage]:
        """Messages ``(after, head]`` ascending (Rule 5)."""
        found = session.cached(after, head)
        if found is not None:
            return found
        async with session.load_lock:
            found = session.cached(after, head)
            if found is not None:
                return found
            session.history_loads += 1
            self.history_loads_total += 1
            loaded = await self.load_range(session.room_id, after, head)
            session.remember(loaded)
            return loaded

    async def load_range(self, room_id: int, after: int, head: int) -> list[ChatMessage]:
        """``(after, head]`` from the bus log, and from the archive for what the log does not
        hold (Rule 7). Raise ``Unavailable`` while some of it is in neither."""
        if head <= after:
            return []
        logged = [
            m
            for m in await self._bus.read_log(room_id, after_offset=after, limit=head - after)
            if m.offset <= head
        ]
        messages = await self._with_archived(room_id, after, head, logged)
        if len(messages) != head - after:
            await self._archive.refresh()  # indexed but not searchable yet, maybe
            messages = await self._with_archived(room_id, after, head, logged)
        if len(messages) == head - after:
            self._holes.pop(room_id, None)
            return messages
        missing = head - after - len(messages)
        now = trio.current_time()
        since = self._holes.setdefault(room_id, now)
        if now - since < self.hole_wait_s:
            raise Unavailable(
                f"chatroom {room_id}: {missing} messages of ({after}, {head}] are not archived"
                " yet; retry",
                retry_after_s=1.0,
            )
        log.error(
            "room %d: history (%d, %d] has lacked %d messages for %.0fs; serving it without them",
            room_id,
            after,
            head,
            missing,
            now - since,
        )
        self.history_holes += missing
        return messages

    async def _with_archived(
        self, room_id: int, after: int, head: int, logged: list[ChatMessage]
    ) -> list[ChatMessage]:
        """``logged`` with the offsets of ``(after, head]`` it lacks read from the archive:
        those the log trimmed, and holes Redis left (Rule 6)."""
        found = {m.offset: m for m in logged}
        missing = [offset for offset in range(after + 1, head + 1) if offset not in found]
        if missing:
            self.archive_reads += 1
            archived = await self._archive.read(
                room_id,
                after_offset=missing[0] - 1,
                up_to_offset=missing[-1],
                limit=missing[-1] - missing[0] + 1,
            )
            for m in archived:
                found.setdefault(m.offset, m)
        return [found[offset] for offset in sorted(found)]

    # -- BusHandler ---------------------------------------------------------------------------

    async def deliver(self, message: ChatMessage) -> None:
        session = self._sessions.get(message.room_id)
        if session is None:
            return
        if not session.ready.is_set():
            session.early.append(message)
            return
        await self._apply(session, message)

    async def _apply(self, session: RoomSession, message: ChatMessage) -> None:
        if message.offset <= session.last_offset:
            return
        if message.offset > session.last_offset + 1:
            missing = await self.load_range(
                session.room_id, session.last_offset, message.offset - 1
            )
            for m in missing:
                self._fan_out(session, m)
        self._fan_out(session, message)

    def _fan_out(self, session: RoomSession, message: ChatMessage) -> None:
        if message.offset <= session.last_offset:
            return
        session.last_offset = message.offset
        session.recent.append(message)
        delivered = 0
        for seat in session.seats.values():  # the loop of every delivery: kept inline
            if seat.live:
                seat.member.deliver(message)  # encoded once per dialect (Rule 4)
                delivered += 1
            elif seat.pending is None:
                seat.pending = [message]
            elif len(seat.pending) < self._cache_size:
                seat.pending.append(message)
            else:  # Rule 3's bound: the replay reads these from history instead
                seat.skipped_to = seat.pending[-1].offset
                seat.pending = [message]
        self.deliveries += delivered
        if message.event is not None and message.ends_membership:
            self._removed(session, message.user)  # Rule 8

    async def signal(self, room_id: int, event: RoomEvent) -> None:
        session = self._sessions.get(room_id)
        if session is None:
            if room_id == frames.USERS_CHANNEL and event.kind == frames.USER_ROOM_ADDED:
                self._room_added(event)
            elif room_id == frames.USERS_CHANNEL and event.kind == frames.USER_PRESENCE:
                self._user_presence(event)
            return
        if event.kind == frames.RECEIPT:  # never a user's own receipt
            user = event.fields.get("user")
            for seat in session.seats.values():
                if seat.live and seat.member.user != user:
                    seat.member.notify(event)
            return
        for seat in session.seats.values():
            if seat.live:
                seat.member.notify(event)

    def _room_added(self, event: RoomEvent) -> None:
        """Rule 9: tell the user's watchers on this node."""
        self.user_room_events += 1
        fields = event.fields
        room_id, user, offset = fields.get("chatroom"), fields.get("user"), fields.get("offset")
        if type(room_id) is not int or not isinstance(user, str):
            return
        since = offset - 1 if type(offset) is int and offset > 0 else None
        for watcher in list(self._watchers.get(user, ())):
            watcher.room_added(room_id, since)

    def _user_presence(self, event: RoomEvent) -> None:
        """Rule 9: a user's presence may have changed (``node/presence.py`` rule 2)."""
        user = event.fields.get("user")
        if self.on_user_presence is not None and isinstance(user, str):
            self.on_user_presence(user)

    def watch_rooms(self, watcher: RoomWatcher) -> None:
        self._watchers.setdefault(watcher.user, set()).add(watcher)

    def unwatch_rooms(self, watcher: RoomWatcher) -> None:
        watchers = self._watchers.get(watcher.user)
        if watchers is not None:
            watchers.discard(watcher)
            if not watchers:
                del self._watchers[watcher.user]

    def _removed(self, session: RoomSession, user: str) -> None:
        """Rule 8: ``user`` is no longer a member; their seats in the room are told."""
        session.members.pop(user, None)
        session.removals += 1
        for seat in list(session.seats.values()):
            if seat.member.user == user:
                seat.member.removed()

    async def resubscribed(self) -> None:
        """After a bus reconnect: catch every subscribed room up from the room log, and give
        the bus back what it lost of a room this node saw further (Rule 6). Removals
        signalled meanwhile were missed: every confirmed membership is forgotten (Rule 8)."""
        self.forget_members()
        for session in list(self._sessions.values()):
            if not session.ready.is_set():
                continue
            head = await self._bus.last_offset(session.room_id)
            if head is None or head < session.last_offset:
                await self._restore_session(session)
            elif head > session.last_offset:
                for message in await self.load_range(session.room_id, session.last_offset, head):
                    self._fan_out(session, message)

    # -- operations -------------------------------------------------------------------------

    def forget_members(self) -> None:
        """Forget every membership confirmed so far (Rule 8): every user was deleted, or
        removals may have been missed."""
        for session in self._sessions.values():
            session.members.clear()
            session.removals += 1

    def close_all(self, code: CloseCode, reason: str) -> None:
        for session in self._sessions.values():
            for seat in list(session.seats.values()):
                seat.member.close_nowait(code, reason)

    @property
    def connections(self) -> int:
        return sum(len(s.seats) for s in self._sessions.values())

    @property
    def rooms(self) -> int:
        return len(self._sessions)
