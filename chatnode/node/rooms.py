"""Rooms, their members and bans: the operations of :class:`~chatnode.node.service.ChatNode`
that decide who may see and be in a room (its base class; docs/protocol.md, "Rooms, members
and bans").

Rules:

1. **Privacy.** A public room is seen by everyone; a private or direct room only by its
   members: to anyone else every path (join, history, members, users, search, adding,
   banning) answers ``room_not_found``, as for a room never made, and lists leave it out.
2. **Creation.** A room is public unless made private; a private room is made with its
   owner (the creator) and its first members in one write, within ``max_group_members``,
   or not at all (an unknown name: ``user_not_found``).
3. **Direct rooms.** One per pair of accounts, made once by the directory's unique key
   however many ask at once on any node; asking for an existing one is free, making one
   counts as a room creation. Nobody joins, leaves, is added to or banned from it.
4. **Members.** Public: a user joins (or adds) themselves, up to ``max_room_members``.
   Private: the owner and the room's admins add and remove, up to ``max_group_members``;
   the owner alone makes admins. Only current members count; a removal frees the seat at
   once and closes the user's connections to the room on every node (hub Rule 8).
5. **Bans** end the membership like a removal and keep the user out until lifted.
6. **Search** reads only rooms the caller may read: the room named (rule 1), else the
   caller's newest ``MAX_OWN_ROOMS`` memberships, a bounded filter the archive applies.
7. **Membership changes are room messages.** Adding a member to a private room, and ending
   any membership (``left``, ``removed``, ``banned``), publishes a membership change
   (``Draft.membership``) with its own offset, after the directory's write: every node
   acts on it in offset order (hub Rule 8), so a member removed at offset k gets nothing
   after k and one added at k gets what follows. Members a room is created with, the two
   of a direct room, and a public room's members have no ``added`` change (a public room
   is readable by all). Nothing is half done: when the change cannot be published the
   directory's write is undone and the call answers ``unavailable`` (retry it). A node
   that stops between the two leaves the write without its change: a removed user's
   connections open then stay until they end, and no new one gets in.
"""

from __future__ import annotations

import logging

import attrs
import trio

from chatnode.core import auth, validation
from chatnode.core.errors import BadRequest, Forbidden, NotFound, Unavailable
from chatnode.core.models import (
    ADDED,
    ADMIN,
    BANNED,
    DIRECT,
    LEFT,
    MEMBER,
    OWNER,
    PRIVATE,
    PUBLIC,
    REMOVED,
    ChatMessage,
    Draft,
    Listed,
    Member,
    Room,
    RoomEvent,
)
from chatnode.core.rooms import room_full
from chatnode.node.accounts import Accounts, now_ms
from chatnode.node.receipts import Cursors
from chatnode.wire import frames

log = logging.getLogger(__name__)

MAX_OWN_ROOMS = 1000
"""A user's rooms looked at by ``GET /v1/me/chatrooms`` and a search without ``chatroom``:
the newest memberships, so that either costs a bounded amount whatever a user joined."""
MY_ROOMS_CONCURRENCY = 32
UNREAD_EXACT = 50
"""``unread`` is counted exactly (others' messages after the read cursor, membership changes
not counted) when the room is at most this many offsets past the cursor; further behind it
is the difference of the offsets (an upper bound), so a list reads at most this many
messages per room."""


@attrs.frozen
class Activity:
    """One of a user's rooms as ``GET /v1/me/chatrooms`` shows it."""

    room: Room
    last_offset: int
    last_message: ChatMessage | None
    read_offset: int = 0
    unread: int = 0

    @property
    def active_at_ms(self) -> int:
        return (
            self.room.created_at_ms if self.last_message is None else self.last_message.timestamp_ms
        )


def _unpublished(exc: BaseException) -> Unavailable:
    """The answer to a membership change that was undone (rule 7)."""
    if isinstance(exc, Unavailable):
        return exc
    log.error("a membership change could not be published", exc_info=exc)
    return Unavailable("the membership change could not be published; retry", retry_after_s=1.0)


def no_room(room_id: int) -> NotFound:
    return NotFound(f"chatroom {room_id} does not exist", code="room_not_found")


class Rooms(Accounts):
    """The rooms-and-members operations of :class:`~chatnode.node.service.ChatNode`, its
    base class; the attributes below are set by ``ChatNode.__init__``."""

    rooms_created: int
    _rooms: dict[int, Room]
    cursors: Cursors

    async def create_room(
        self,
        name: object,
        *,
        claims: auth.Claims,
        visibility: object = None,
        members: object = None,
    ) -> Room:
        """Create a room (rules 1-2); a user (not an admin) is limited to
        ``room_creations``. ``members`` only for a private room: the creator is its owner and
        counts against ``max_group_members``; every name must be a user's."""
        if name is None:
            name = "room"
        limits = self.settings.limits
        name = validation.room_name(name, limits)
        visibility = PUBLIC if visibility is None else visibility
        if visibility not in (PUBLIC, PRIVATE):
            raise BadRequest(
                "visibility is 'public' or 'private' (a direct room: POST /v1/direct)",
                code="invalid_parameter",
            )
        names: list[str] = []
        if members is not None:
            if visibility != PRIVATE:
                raise BadRequest("members are only for a private room", code="invalid_parameter")
            if not isinstance(members, list):
                raise BadRequest("members is a list of user names", code="invalid_parameter")
            if len(members) >= limits.max_group_members:  # the owner takes a seat too
                raise room_full(0, limits.max_group_members)
            for member in members:  # every name checked before any is looked up
                validation.user_name(member, limits)
        if not claims.is_admin:
            await self._within(self.limits.room_creations, claims.user, "too many rooms created")
        if members:
            names = [await self._user_named(member) for member in members]
        room = await self.backends.directory.create_room(
            name,
            created_at_ms=now_ms(),
            visibility=visibility,
            owner=claims.user if claims.account_id else None,
            members=names,
            max_members=limits.max_group_members,
        )
        self.rooms_created += 1
        await self._start_offsets(room)
        if visibility == PRIVATE:  # its members' open connections subscribe it
            for member in {claims.user, *names}:
                await self.member_added(room.id, member)
        return room

    async def direct_room(self, claims: auth.Claims, other: object) -> tuple[Room, bool]:
        """The direct room of the caller and ``other`` (rule 3): (room, made now).
        Asking for an existing one is free; making one counts as a room creation."""
        name = await self._user_named(other)
        if validation.name_key(name) == validation.name_key(claims.user):
            raise BadRequest("a direct room is with someone else", code="direct_with_self")
        found = await self.backends.directory.find_direct(claims.user, name)
        if found is not None:
            return found, False
        if not claims.is_admin:
            await self._within(self.limits.room_creations, claims.user, "too many rooms created")
        room, made = await self.backends.directory.direct_room(
            claims.user, name, created_at_ms=now_ms()
        )
        if made:
            self.rooms_created += 1
            await self._start_offsets(room)
            for member in (claims.user, name):  # their open connections subscribe it
                await self.member_added(room.id, member)
        return room, made

    async def _start_offsets(self, room: Room) -> None:
        try:  # the room starts at offset 0 on the bus: its first message needs no archive read
            await self.backends.bus.restore(room.id, last_offset=0)
        except Unavailable as exc:
            log.info("room %d: offset not set on the bus yet (%s)", room.id, exc)

    async def _user_named(self, name: object) -> str:
        """The stored name of the user ``name`` names (ignoring case); 404
        ``user_not_found``."""
        name = validation.user_name(name, self.settings.limits)
        user = await self.backends.directory.get_user(name)
        if user is None:
            raise NotFound(f"there is no user {name!r}", code="user_not_found")
        return user.name

    async def list_rooms(self, *, after_id: int, limit: int) -> list[Room]:
        return await self.backends.directory.list_rooms(after_id=after_id, limit=limit)

    async def visible_rooms(
        self, claims: auth.Claims, *, after_id: int, limit: int
    ) -> list[Listed]:
        """The public rooms and the caller's own, with member counts (rule 1)."""
        return await self.backends.directory.visible_rooms(
            claims.user, after_id=after_id, limit=limit
        )

    async def room(self, room_id: int) -> Room:
        room = self._rooms.get(room_id)
        if room is None:
            room = await self.backends.directory.get_room(room_id)
            if room is None:
                raise no_room(room_id)
            if len(self._rooms) > 100_000:
                self._rooms.clear()
            self._rooms[room_id] = room
        return room

    async def readable(self, room_id: int, claims: auth.Claims) -> Room:
        """The room, if the caller may see it: any public room (no directory read: history
        and search of public rooms need no MySQL), a private or direct one only as a member;
        else 404 ``room_not_found``, the answer for a room that does not exist (rooms
        rule 1)."""
        room = await self.room(room_id)
        if (
            not room.public
            and await self.backends.directory.get_member(room_id, claims.user) is None
        ):
            raise no_room(room_id)
        return room

    async def _managed(self, room_id: int, claims: auth.Claims) -> Room:
        """The room, if the caller manages its members (rule 4): its owner or an admin
        of the room, or (public rooms) an admin of the deployment; 403 ``forbidden`` for
        anyone else who may see the room, 404 for whoever may not."""
        room = await self.readable(room_id, claims)
        if room.public and claims.is_admin:
            return room
        member = await self.backends.directory.get_member(room_id, claims.user)
        if member is not None and member.role in (OWNER, ADMIN):
            return room
        raise Forbidden("only the room's owner and admins manage its members", code="forbidden")

    async def _change(self, claims: auth.Claims) -> None:
        if not claims.is_admin:
            await self._within(
                self.limits.member_changes, claims.user, "too many membership changes"
            )

    async def member_added(self, room_id: int, user: str, offset: int | None = None) -> None:
        """``user`` became a member of the room (at ``offset``, its ``added`` change, if it
        has one): their ``/v1/connect`` connections on every node subscribe it (hub Rule 9).
        Best effort: a connection that missed it gets the room when it next opens."""
        await self.signal(frames.USERS_CHANNEL, frames.user_room_added_event(room_id, user, offset))

    async def _publish_change(self, room_id: int, user: str, event: str, by: str) -> ChatMessage:
        """Publish a membership change (rule 7); ``Unavailable`` if it could not be."""
        return await self.hub.publish(Draft.membership(room_id, user, event, by=by, at_ms=now_ms()))

    def _max_members(self, room: Room) -> int:
        limits = self.settings.limits
        return limits.max_room_members if room.public else limits.max_group_members

    async def add_member(
        self, claims: auth.Claims, room_id: int, name: object, role: object = None
    ) -> tuple[Member, bool]:
        """Add the user ``name`` to the room (rule 4): in a public room a user adds
        themselves (or its managers anyone), in a private room its owner and admins add
        anyone, a direct room takes no one (400 ``direct_room``). ``role`` ``member``
        (default) or ``admin`` (the owner only); a member already in keeps their role.
        (Their membership, whether added now.) ``user_not_found``, ``room_full``,
        ``banned``, ``forbidden``."""
        role = MEMBER if role is None else role
        if role not in (MEMBER, ADMIN):
            raise BadRequest("role is 'member' or 'admin'", code="invalid_parameter")
        user = await self._user_named(name)
        room = await self.readable(room_id, claims)
        if room.visibility == DIRECT:
            raise BadRequest("a direct room has its two users, no more", code="direct_room")
        if role == ADMIN:
            owner = await self.backends.directory.get_member(room_id, claims.user)
            if owner is None or owner.role != OWNER:
                raise Forbidden("only the room's owner makes admins", code="forbidden")
        elif not (room.public and user == claims.user):
            await self._managed(room_id, claims)
        await self._change(claims)
        directory = self.backends.directory
        added = await directory.add_member(
            room_id, user, max_members=self._max_members(room), role=role
        )
        offset = None
        if added and not room.public:
            try:
                offset = (await self._publish_change(room_id, user, ADDED, claims.user)).offset
            except Exception as exc:
                with trio.CancelScope(shield=True):
                    await directory.remove_member(room_id, user)
                raise _unpublished(exc) from None
        if added:
            await self.member_added(room_id, user, offset)
        member = await directory.get_member(room_id, user)
        return member or Member(user), added

    async def remove_member(self, claims: auth.Claims, room_id: int, name: str) -> bool:
        """End the membership of the user ``name`` (ignoring case) in the room: themselves,
        or anyone for the room's owner and admins (and the deployment's admins in a public
        room). Nobody leaves a direct room (400 ``direct_room``). The seat is free at once;
        every node closes the user's connections to the room (4501, hub Rule 8). Whether
        they were a member; the user may join again later (a new membership, within the
        room's limit). Idempotent: retry it after ``Unavailable`` (the signal to the nodes
        may not have gone out)."""
        room = await self.readable(room_id, claims)
        if room.visibility == DIRECT:
            raise BadRequest("nobody leaves a direct room", code="direct_room")
        if validation.name_key(name) != validation.name_key(claims.user):
            await self._managed(room_id, claims)
            await self._change(claims)
        directory = self.backends.directory
        user = await directory.get_user(name)
        name = user.name if user is not None else name
        member = await directory.get_member(room_id, name)
        removed = await directory.remove_member(room_id, name)
        if removed:
            event = LEFT if name == claims.user else REMOVED
            try:
                await self._publish_change(room_id, name, event, claims.user)
            except Exception as exc:
                with trio.CancelScope(shield=True):
                    await directory.add_member(
                        room_id,
                        name,
                        max_members=self._max_members(room) + 1,
                        role=member.role if member is not None and member.role == ADMIN else MEMBER,
                    )
                raise _unpublished(exc) from None
        return removed

    async def ban(self, claims: auth.Claims, room_id: int, name: object) -> bool:
        """Ban the user ``name`` from the room (rule 5): their membership ends, on every
        node (4501, hub Rule 8), and they cannot join or be added until unbanned. By the
        room's owner and admins; nobody bans in a direct room, nobody bans the owner or
        themselves. Whether newly banned; idempotent (retry after ``Unavailable``)."""
        user = await self._user_named(name)
        room = await self.readable(room_id, claims)
        if room.visibility == DIRECT:
            raise BadRequest("nobody is banned from a direct room", code="direct_room")
        await self._managed(room_id, claims)
        target = await self.backends.directory.get_member(room_id, user)
        if user == claims.user or (target is not None and target.role == OWNER):
            raise Forbidden("the owner and yourself cannot be banned", code="forbidden")
        await self._change(claims)
        directory = self.backends.directory
        banned = await directory.ban(room_id, user, by=claims.user, at_ms=now_ms())
        if banned and target is not None:  # their membership ended with the ban
            try:
                await self._publish_change(room_id, user, BANNED, claims.user)
            except Exception as exc:
                with trio.CancelScope(shield=True):
                    await directory.unban(room_id, user)
                    await directory.add_member(
                        room_id,
                        user,
                        max_members=self._max_members(room) + 1,
                        role=target.role if target.role == ADMIN else MEMBER,
                    )
                raise _unpublished(exc) from None
        return banned

    async def unban(self, claims: auth.Claims, room_id: int, name: str) -> bool:
        """Lift a ban (the room's owner and admins); whether there was one."""
        await self._managed(room_id, claims)
        await self._change(claims)
        user = await self.backends.directory.get_user(name)
        return await self.backends.directory.unban(room_id, user.name if user else name)

    async def bans(self, claims: auth.Claims, room_id: int) -> list[str]:
        """Who is banned from the room (its owner and admins), the first ``max_page``."""
        await self._managed(room_id, claims)
        return await self.backends.directory.list_bans(room_id, limit=self.settings.limits.max_page)

    async def room_users(self, room_id: int, claims: auth.Claims) -> tuple[list[str], list[str]]:
        """(members, online) of a room the caller may see."""
        await self.readable(room_id, claims)
        members = await self.backends.directory.list_members(room_id)
        online = await self.backends.presence.online(room_id)
        return members, online

    async def rooms_of(self, user: str) -> list[int]:
        """The rooms ``user`` is a member of, newest membership first, at most
        ``max_connection_rooms`` (the rooms a ``/v1/connect`` connection subscribes to when
        it opens)."""
        rooms = await self.backends.directory.user_rooms(
            user, limit=self.settings.max_connection_rooms
        )
        return [room.id for room in rooms]

    async def room_members(self, room_id: int, claims: auth.Claims) -> list[Member]:
        """The members of a room the caller may see, with roles."""
        await self.readable(room_id, claims)
        return await self.backends.directory.list_roles(room_id)

    async def my_rooms(self, claims: auth.Claims, *, limit: int) -> list[Activity]:
        """The caller's rooms, most recent activity first (the newest message's time, else
        when the room was made), at most ``limit``, each with the caller's read cursor and
        unread count (:data:`UNREAD_EXACT`). The newest ``MAX_OWN_ROOMS`` memberships are
        looked at: each costs a read of its newest messages (at most ``UNREAD_EXACT``), made
        ``MY_ROOMS_CONCURRENCY`` at a time, and one directory read for all their cursors."""
        user = claims.user
        rooms = await self.backends.directory.user_rooms(user, limit=MAX_OWN_ROOMS)
        stored = await self.backends.directory.user_cursors(user, [room.id for room in rooms])
        found: list[Activity] = []
        gate = trio.CapacityLimiter(MY_ROOMS_CONCURRENCY)

        async def last_of(room: Room) -> None:
            read = stored[room.id].read if room.id in stored else 0
            local = self.cursors.get(room.id, user)
            read = max(read, 0 if local is None else local.read)
            async with gate:
                head = await self.hub.head(room.id)
                read = min(read, head)
                exact = head - read <= UNREAD_EXACT
                try:
                    after = min(read, head - 1) if exact else head - 1
                    last = await self.hub.load_range(room.id, max(0, after), head) if head else []
                except Unavailable:  # its newest messages are in neither log nor archive yet
                    last, exact = [], False
            unread = (
                sum(1 for m in last if m.offset > read and m.user != user and m.event is None)
                if exact
                else head - read
            )
            found.append(Activity(room, head, last[-1] if last else None, read, unread))

        async with trio.open_nursery() as nursery:
            for room in rooms:
                nursery.start_soon(last_of, room)
        found.sort(key=lambda a: (a.active_at_ms, a.room.id), reverse=True)
        return found[:limit]

    async def signal(self, room_id: int, event: RoomEvent) -> None:
        try:
            await self.backends.bus.signal(room_id, event)
        except Exception:
            log.warning("room %d: event not sent", room_id, exc_info=True)
