"""The node's operations, as the edge calls them: rooms, history, search and room
connections here, accounts and tokens in ``node/accounts.py`` (``ChatNode``'s base), a
member's time in a room in ``node/room.py``. Everything here is transport-neutral;
``edge/`` maps it to HTTP/WebSocket.

Ownership: ``ChatNode.run`` owns the node's background tasks (bus receiver, archiver,
presence heartbeat and reaper, revocation follower) in its nursery; connections are owned by
the edge and enter a room through ``ChatNode.join``, an async context manager that leaves the
room on exit, also on cancellation.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from chatnode.core import auth, validation
from chatnode.core.errors import (
    Forbidden,
    NotFound,
    Unavailable,
)
from chatnode.core.models import (
    ChatMessage,
    PresenceEntry,
    Room,
    RoomEvent,
    SearchHit,
    SearchQuery,
)
from chatnode.node.accounts import USER_CHECK_TTL_S, Accounts, Holder, now_ms
from chatnode.node.archiver import Archiver
from chatnode.node.hub import Hub, RoomSession
from chatnode.node.passwords import PasswordWork
from chatnode.node.ratelimit import NodeLimits, Rate
from chatnode.node.room import RoomConnection
from chatnode.node.settings import Backends, NodeSettings
from chatnode.wire import frames

log = logging.getLogger(__name__)


class ChatNode(Accounts):
    def __init__(self, settings: NodeSettings, backends: Backends) -> None:
        self.settings = settings
        self.backends = backends
        self.hub = Hub(
            backends.bus, backends.archive, cache_size=max(256, 2 * settings.history_on_join)
        )
        self.archiver = (
            Archiver(backends.feed, backends.archive, linger_s=settings.archive_linger_s)
            if backends.feed
            else None
        )
        self._conn_counter = 0
        # Unknown names are checked against this hash so that a wrong name costs the same
        # time as a wrong password (no user enumeration by timing).
        self._decoy_hash = auth.hash_password("decoy", cost_log2=settings.password_cost_log2)
        self.passwords = PasswordWork(
            concurrency=settings.password_concurrency,
            max_waiting=settings.password_queue,
            cost_log2=settings.password_cost_log2,
        )
        self._tokens = auth.TokenVerifier(settings.jwt_secret)
        self._users = auth.UserChecks(trust_s=USER_CHECK_TTL_S)
        self._lookups_resume_at = float("-inf")  # trio time
        self._revocation_reads_resume_at = float("-inf")  # trio time
        self._holders: dict[int, dict[str, Holder]] = {}  # account id -> conn id -> member
        self.login_failures = 0
        self.revoked_connections = 0
        # Rooms are never deleted or renamed: what this node has seen once it need not ask the
        # directory again. (Memberships can end: the hub keeps those it confirmed, Rule 8.)
        self._rooms: dict[int, Room] = {}
        self.limits = NodeLimits(
            Rate(settings.rate_messages_per_s, settings.rate_burst),
            settings.rates,
            backends.rate_limits,
        )
        self.rooms_created = 0
        self._presence: set[PresenceEntry] = set()  # this node's live connections

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the node's background tasks until cancelled; ``started()`` once the bus is up."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.backends.bus.serve, self.hub)
            nursery.start_soon(self._follow_users_channel)
            nursery.start_soon(self._presence_loop)
            nursery.start_soon(self._follow_revocations)
            if self.archiver is not None:
                await nursery.start(self.archiver.run)
            task_status.started()

    async def _follow_users_channel(self) -> None:
        """Subscribe to ``frames.USERS_CHANNEL`` (hub Rule 9), retrying while the bus is
        down; the bus keeps it across its reconnects."""
        while True:
            try:
                await self.backends.bus.subscribe(frames.USERS_CHANNEL)
                return
            except Unavailable:
                log.warning("the users channel is not followed yet (bus unavailable); retrying")
                await trio.sleep(1.0)

    async def _presence_loop(self) -> None:
        """Heartbeat and reap every ``presence_ttl_s / 3``. A heartbeat that comes after a
        failed one, or later than ``presence_ttl_s`` after the last good one, may come after
        another node reaped this node's entries as a dead node's (a Redis outage longer than
        the TTL does that), so it is followed by writing every local entry again."""
        ttl_s = self.settings.presence_ttl_s
        last_ok: float | None = None
        failed = False
        while True:
            try:
                await self.backends.presence.heartbeat(
                    self.settings.node_id, ttl_ms=int(ttl_s * 1000)
                )
                now = trio.current_time()
                if failed or (last_ok is not None and now - last_ok >= ttl_s):
                    await self._restore_presence()
                last_ok, failed = now, False
                reaped = await self.backends.presence.reap()
                if reaped:
                    log.info("reaped %d presence entries of dead nodes", reaped)
            except Exception:
                failed = True
                log.warning("presence heartbeat failed; retrying", exc_info=True)
            await trio.sleep(ttl_s / 3)

    async def _restore_presence(self) -> None:
        """Write every local entry again (idempotent). An entry whose connection ended
        meanwhile is removed again afterwards, whatever order the two writes took."""
        entries = list(self._presence)
        for entry in entries:
            await self.backends.presence.add(entry)
        for entry in entries:
            if entry not in self._presence:
                await self.backends.presence.remove(entry)
        if entries:
            log.info("presence: wrote %d local entries again after a heartbeat gap", len(entries))

    def next_conn_id(self) -> str:
        self._conn_counter += 1
        return f"{self.settings.node_id}/{self._conn_counter}"

    # -- rooms --------------------------------------------------------------------------------

    async def create_room(self, name: object, *, claims: auth.Claims) -> Room:
        """Create a room; a user (not an admin) is limited to ``room_creations``."""
        if name is None:
            name = "room"
        name = validation.room_name(name, self.settings.limits)
        if not claims.is_admin:
            await self._within(self.limits.room_creations, claims.user, "too many rooms created")
        room = await self.backends.directory.create_room(name, created_at_ms=now_ms())
        self.rooms_created += 1
        try:  # the room starts at offset 0 on the bus: its first message needs no archive read
            await self.backends.bus.restore(room.id, last_offset=0)
        except Unavailable as exc:
            log.info("room %d: offset not set on the bus yet (%s)", room.id, exc)
        return room

    async def list_rooms(self, *, after_id: int, limit: int) -> list[Room]:
        return await self.backends.directory.list_rooms(after_id=after_id, limit=limit)

    async def room(self, room_id: int) -> Room:
        room = self._rooms.get(room_id)
        if room is None:
            room = await self.backends.directory.get_room(room_id)
            if room is None:
                raise NotFound(f"chatroom {room_id} does not exist", code="room_not_found")
            if len(self._rooms) > 100_000:
                self._rooms.clear()
            self._rooms[room_id] = room
        return room

    async def _ensure_member(self, session: RoomSession, claims: auth.Claims) -> None:
        """Make the claims' account a member of the session's room unless this node confirmed
        it while subscribed (hub Rule 8); ``RoomFull``, ``NotFound``, ``Unavailable``."""
        if session.members.get(claims.user) == claims.account_id:
            return
        removals = session.removals
        added = await self.backends.directory.add_member(
            session.room_id, claims.user, max_members=self.settings.limits.max_room_members
        )
        if session.removals == removals:  # no removal raced the confirmation
            session.members[claims.user] = claims.account_id
        if added:
            await self.member_added(session.room_id, claims.user)

    async def member_added(self, room_id: int, user: str) -> None:
        """``user`` became a member of the room: their ``/v1/connect`` connections on every
        node subscribe it (hub Rule 9). Best effort: a connection that missed it gets the
        room when it next opens."""
        await self.signal(frames.USERS_CHANNEL, frames.user_room_added_event(room_id, user))

    async def remove_member(self, claims: auth.Claims, room_id: int, name: str) -> bool:
        """End the membership of the user ``name`` (ignoring case) in the room: themselves,
        or anyone for an admin. The seat is free at once; every node closes the user's
        connections to the room (4501, hub Rule 8). Whether they were a member; the user may
        join again later (a new membership, within the room's limit). Idempotent: retry it
        after ``Unavailable`` (the signal to the nodes may not have gone out)."""
        if validation.name_key(name) != validation.name_key(claims.user) and not claims.is_admin:
            raise Forbidden(
                "only the member themselves or an admin may remove a member", code="admin_only"
            )
        await self.room(room_id)
        user = await self.backends.directory.get_user(name)
        name = user.name if user is not None else name
        removed = await self.backends.directory.remove_member(room_id, name)
        await self.backends.bus.signal(room_id, frames.member_removed_event(room_id, name))
        return removed

    async def room_users(self, room_id: int) -> tuple[list[str], list[str]]:
        """(members, online) of a room."""
        await self.room(room_id)
        members = await self.backends.directory.list_members(room_id)
        online = await self.backends.presence.online(room_id)
        return members, online

    async def rooms_of(self, user: str) -> list[int]:
        """The rooms ``user`` is a member of, at most ``max_connection_rooms`` (the rooms a
        ``/v1/connect`` connection subscribes to when it opens)."""
        return await self.backends.directory.rooms_of(
            user, limit=self.settings.max_connection_rooms
        )

    async def history(self, room_id: int, *, before: int | None, limit: int) -> list[ChatMessage]:
        """Up to ``limit`` messages older than offset ``before`` (default: the newest), newest last."""
        await self.room(room_id)
        head = await self.hub.head(room_id)
        up_to = head if before is None else min(head, before - 1)
        after = max(0, up_to - limit)
        return await self.hub.load_range(room_id, after, up_to)

    async def search(self, query: SearchQuery) -> list[SearchHit]:
        return await self.backends.archive.search(query)

    # -- room connections ---------------------------------------------------------------------

    @asynccontextmanager
    async def join(
        self, room_id: int, member: Holder, *, since: int | None = None
    ) -> AsyncIterator[RoomConnection]:
        """Enter a room: a seat, and the first page of its history, so that a refusal
        (unknown room, room full, history unavailable) comes before the caller answers the
        upgrade. The caller then runs ``RoomConnection.replay`` as the member can take it,
        and the seat goes live (hub Rules 3 and 5). Leaves on exit. While in the room the
        member is closed with 4501 once its token is revoked, or its membership ends. The
        membership is checked once the seat is taken: a removal signalled from then on finds
        it (hub Rule 8)."""
        held = self._hold(member)
        try:
            await self.room(room_id)
            entry = PresenceEntry(room_id, member.user, self.settings.node_id, member.conn_id)
            session, seat = await self.hub.attach(room_id, member)
            entered = False
            try:
                await self._ensure_member(session, member.claims)
                entered = True
                self._presence.add(entry)
                await self.backends.presence.add(entry)
                connection = RoomConnection(self, session, seat, member)
                await connection.prepare(since)
                await self.signal(room_id, frames.presence_event(room_id, member.user, "join"))
                yield connection
            finally:
                self._presence.discard(entry)
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await self.hub.detach(room_id, member)
                    try:
                        if entered:
                            await self.backends.presence.remove(entry)
                            await self.signal(
                                room_id, frames.presence_event(room_id, member.user, "leave")
                            )
                    except Exception:
                        log.warning("presence cleanup failed for %s", entry, exc_info=True)
        finally:
            self._release(member, held)

    async def signal(self, room_id: int, event: RoomEvent) -> None:
        try:
            await self.backends.bus.signal(room_id, event)
        except Exception:
            log.warning("room %d: event not sent", room_id, exc_info=True)

    async def check(self) -> dict[str, str]:
        """Readiness of every backend: name -> "ok" or the error."""
        result: dict[str, str] = {}
        for name, backend in (
            ("directory", self.backends.directory),
            ("bus", self.backends.bus),
            ("archive", self.backends.archive),
            ("presence", self.backends.presence),
        ):
            try:
                with trio.fail_after(2):
                    await backend.check()
                result[name] = "ok"
            except Exception as exc:
                result[name] = f"{type(exc).__name__}: {exc}"
        return result
