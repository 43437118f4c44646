"""The node: its lifecycle, history, search and room connections here; rooms, members and
bans in ``node/rooms.py`` and accounts and tokens in ``node/accounts.py`` (``ChatNode``'s
bases), a member's time in a room in ``node/room.py``. Everything here is
transport-neutral; ``edge/`` maps it to HTTP/WebSocket.

Ownership: ``ChatNode.run`` owns the node's background tasks (bus receiver, archiver,
presence heartbeat and reaper, revocation follower, push notifications) in its nursery; connections are owned by
the edge and enter a room through ``ChatNode.join``, an async context manager that leaves the
room on exit, also on cancellation.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

from chatnode.core import auth
from chatnode.core.errors import (
    Unavailable,
)
from chatnode.core.models import (
    ChatMessage,
    Cursor,
    PresenceEntry,
    Room,
    SearchHit,
    SearchQuery,
)
from chatnode.node.accounts import USER_CHECK_TTL_S, Holder
from chatnode.node.archiver import Archiver
from chatnode.node.hub import Hub, RoomSession
from chatnode.node.passwords import PasswordWork
from chatnode.node.presence import PresenceWatcher, UserPresenceFeed, contacts
from chatnode.node.push import Notifier
from chatnode.node.ratelimit import NodeLimits, Rate
from chatnode.node.receipts import Cursors
from chatnode.node.room import RoomConnection
from chatnode.node.rooms import MAX_OWN_ROOMS, Rooms, no_room
from chatnode.node.settings import Backends, NodeSettings
from chatnode.wire import frames

log = logging.getLogger(__name__)


class ChatNode(Rooms):
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
        self.cursors = Cursors(backends.directory, self.signal)  # node/receipts.py
        self.user_presence = UserPresenceFeed(backends.presence)  # node/presence.py
        self.hub.on_user_presence = self.user_presence.changed
        self.push = (
            Notifier(
                gate=backends.push_gate,
                webhook=backends.webhook,
                directory=backends.directory,
                presence=backends.presence,
                room=self.room,
                load_range=self.hub.load_range,
                local_cursors=self.cursors.room_overlay,
                node_id=settings.node_id,
                collapse_s=settings.push_collapse_s,
                give_up_s=settings.push_give_up_s,
                max_members=settings.limits.max_group_members,
            )
            if backends.webhook is not None and backends.push_gate is not None
            else None
        )  # node/push.py

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the node's background tasks until cancelled; ``started()`` once the bus is up."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.backends.bus.serve, self.hub)
            nursery.start_soon(self._follow_users_channel)
            nursery.start_soon(self._presence_loop)
            nursery.start_soon(self.user_presence.run)
            nursery.start_soon(self._follow_revocations)
            nursery.start_soon(self.cursors.run)
            if self.push is not None:
                await nursery.start(self.push.run)
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
                if reaped.entries:
                    log.info("reaped %d presence entries of dead nodes", reaped.entries)
                for user in reaped.offline:
                    await self.announce_presence(user)
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

    # -- history and search -------------------------------------------------------------------

    async def history(
        self, room_id: int, *, before: int | None, limit: int, claims: auth.Claims
    ) -> list[ChatMessage]:
        """Up to ``limit`` messages older than offset ``before`` (default: the newest), newest last."""
        await self.readable(room_id, claims)
        head = await self.hub.head(room_id)
        up_to = head if before is None else min(head, before - 1)
        after = max(0, up_to - limit)
        return await self.hub.load_range(room_id, after, up_to)

    async def search(self, query: SearchQuery, claims: auth.Claims) -> list[SearchHit]:
        """Search the rooms the caller may read (``node/rooms.py`` rule 6): the one named
        (404 if the caller may not see it), else the caller's rooms -- the newest
        ``MAX_OWN_ROOMS`` memberships, so the filter is bounded however many rooms exist."""
        if query.room_id is not None:
            await self.readable(query.room_id, claims)
            return await self.backends.archive.search(query)
        rooms = await self.backends.directory.user_rooms(claims.user, limit=MAX_OWN_ROOMS)
        return await self.backends.archive.search(
            attrs.evolve(query, rooms=tuple(sorted(room.id for room in rooms)))
        )

    # -- room connections ---------------------------------------------------------------------

    async def _ensure_member(self, session: RoomSession, claims: auth.Claims) -> None:
        """Make the claims' account a member of the session's public room unless this node
        confirmed it while subscribed (hub Rule 8); in a private or direct room only a member
        gets in (404 otherwise, ``node/rooms.py`` rule 1). ``RoomFull``, ``NotFound``,
        ``Forbidden`` (banned), ``Unavailable``."""
        if session.members.get(claims.user) == claims.account_id:
            return
        removals = session.removals
        room = await self.room(session.room_id)
        added = False
        if room.public:
            added = await self.backends.directory.add_member(
                session.room_id, claims.user, max_members=self.settings.limits.max_room_members
            )
        elif await self.backends.directory.get_member(session.room_id, claims.user) is None:
            raise no_room(session.room_id)
        if session.removals == removals:  # no removal raced the confirmation
            session.members[claims.user] = claims.account_id
        if added:
            await self.member_added(session.room_id, claims.user)

    @asynccontextmanager
    async def join(
        self, room_id: int, member: Holder, *, since: int | None = None, resume: bool = False
    ) -> AsyncIterator[RoomConnection]:
        """Enter a room: a seat, and the first page of its history, so that a refusal
        (unknown room, room full, history unavailable) comes before the caller answers the
        upgrade. The caller then runs ``RoomConnection.replay`` as the member can take it,
        and the seat goes live (hub Rules 3 and 5). Leaves on exit. While in the room the
        member is closed with 4501 once its token is revoked, or its membership ends. The
        membership is checked once the seat is taken: a removal signalled from then on finds
        it (hub Rule 8). ``resume`` (v1): with no ``since``, the replay starts at the
        member's ``delivered`` cursor, if they have one (``RoomConnection.prepare``)."""
        held = self._hold(member)
        try:
            await self.room(room_id)
            entry = PresenceEntry(room_id, member.user, self.settings.node_id, member.conn_id)
            session, seat = await self.hub.attach(room_id, member)
            entered = opened = counted = False
            try:
                await self._ensure_member(session, member.claims)
                entered = opened = True
                cursor = await self.cursors.open(room_id, member.user, load=resume)
                self._presence.add(entry)
                await self.backends.presence.add(entry)
                counted = True
                if self.user_presence.opened(member.user):
                    await self.announce_presence(member.user)
                connection = RoomConnection(self, session, seat, member)
                await connection.prepare(since, resume_from=cursor.delivered if resume else 0)
                await self.signal(room_id, frames.presence_event(room_id, member.user, "join"))
                yield connection
            finally:
                self._presence.discard(entry)
                last = counted and self.user_presence.closed(member.user)
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await self.hub.detach(room_id, member)
                    try:
                        if opened:
                            await self.cursors.close(room_id, member.user)
                        if entered:
                            await self.backends.presence.remove(entry)
                        if last:
                            await self.announce_presence(member.user)
                        if entered:
                            await self.signal(
                                room_id, frames.presence_event(room_id, member.user, "leave")
                            )
                    except Exception:
                        log.warning("presence cleanup failed for %s", entry, exc_info=True)
        finally:
            self._release(member, held)

    async def receipts(self, room_id: int, claims: auth.Claims) -> list[Cursor]:
        """The cursors of a room's members (``node/receipts.py``), of a room the caller may
        read (404 otherwise); what this node holds unwritten included, other nodes' within
        their ``flush_s``."""
        await self.readable(room_id, claims)
        stored = await self.backends.directory.room_cursors(room_id)
        return self.cursors.room_overlay(room_id, stored)

    # -- user presence (node/presence.py) -----------------------------------------------------

    async def announce_presence(self, user: str) -> None:
        """Rule 2 of ``node/presence.py``: every node is told ``user``'s presence may have
        changed (the store already has it)."""
        await self.signal(frames.USERS_CHANNEL, frames.user_presence_event(user))

    @asynccontextmanager
    async def connected(self, watcher: PresenceWatcher, conn_id: str) -> AsyncIterator[None]:
        """A ``/v1/connect`` connection while open: an entry of its user in room 0
        (``frames.USERS_CHANNEL``, no room has that id), so that the user is online even with
        no room, and a watcher of presence (:meth:`watch_contacts` says whose). A store that
        fails here costs the connection nothing: logged, and the heartbeat's restore writes
        the entry later."""
        user, feed = watcher.user, self.user_presence
        entry = PresenceEntry(frames.USERS_CHANNEL, user, self.settings.node_id, conn_id)
        self._presence.add(entry)
        feed.watch(watcher, ())
        counted = False
        try:
            try:
                await self.backends.presence.add(entry)
                counted = True
                if feed.opened(user):
                    await self.announce_presence(user)
            except Exception:
                log.warning("presence of connection %s not set up", conn_id, exc_info=True)
            yield
        finally:
            feed.unwatch(watcher)
            self._presence.discard(entry)
            last = counted and feed.closed(user)
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                try:
                    await self.backends.presence.remove(entry)
                    if last:
                        await self.announce_presence(user)
                except Exception:
                    log.warning("presence cleanup failed for %s", entry, exc_info=True)

    async def watch_contacts(self, watcher: PresenceWatcher, room_id: int | None = None) -> None:
        """Watch the presence of the people ``watcher``'s user shares a direct or private
        room with: all of them (``room_id`` None; the connection's task, so that reading them
        delays no room), or the members of ``room_id`` (a membership that began while
        connected). A directory that fails leaves them unwatched (logged)."""
        try:
            if room_id is None:
                limit = self.settings.max_connection_rooms
                users = await contacts(self.backends.directory, watcher.user, limit=limit)
            elif (await self.room(room_id)).public:
                return
            else:
                users = set(await self.backends.directory.list_members(room_id))
            self.user_presence.watch(watcher, users - {watcher.user}, only_if_watching=True)
        except Exception:
            log.warning("contacts of %s not watched", watcher.user, exc_info=True)

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
