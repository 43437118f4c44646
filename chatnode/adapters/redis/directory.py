"""A Redis cache in front of any Directory: :class:`RedisCachedDirectory`.

The list of chat rooms and the users list of each chat room are cached in Redis; the rooms
and the memberships the directory confirmed are kept too, so that they stay known while
the directory is down (rule 6). Keys (``P`` is the deployment's key prefix; ``{v}`` are
version tokens)::

    P:dir:rooms:version                       string  token of the rooms list
    P:dir:rooms:{v}:{after_id}:{limit}        string  a cached ``list_rooms`` page (JSON), PX ttl
    P:dir:visible:{v}:{user}:{after_id}:{limit}  string  a cached ``visible_rooms`` page (JSON)
    P:dir:members:version                     string  token of every member list and every
                                                      room's confirmed members
    P:dir:room:{id}:members:version           string  token of one room's member list
    P:dir:room:{id}:members:{v}:{v_room}      string  a cached ``list_members`` (JSON), PX ttl
    P:dir:room:{id}:roles:{v}:{v_room}        string  a cached ``list_roles`` (JSON), PX ttl
    P:dir:room:{id}                           string  a room (JSON), PX known_ttl, renewed by reads
    P:dir:room:{id}:removals:version          string  token of one room's confirmed members
    P:dir:room:{id}:joined:{v}:{v_room}       set     users the directory confirmed as members
                                                      of the room, PX known_ttl

The scripts and the JSON rows are in :mod:`.directory_store`, the node-local layer in
:mod:`.local_cache`; the rules below are read together, so the cache itself is one file.

Rules that make it correct:

1. **Versioned keys.** A read fetches the current version tokens and the cached value in one
   script, *before* it asks the inner directory on a miss; a write changes the inner directory
   *first* and then replaces the tokens. A page read before a write can therefore only be
   stored under the old tokens, where no reader looks any more: a read that starts after a
   write completed sees that write. If invalidating failed (Redis down at that moment), a
   cached value can be up to ``ttl_s`` out of date.
2. **Tokens are random**, not counters: a version key that vanished (eviction, restart) is
   recreated with a fresh token, so old cached values can never be picked up again.
3. **Writes invalidate what they change**: ``create_room`` and ``direct_room`` the rooms
   lists, ``add_member`` / ``remove_member`` / ``ban`` that changed something (or whose
   outcome is unknown) that room's members and the rooms lists (they show member counts;
   ``remove_member`` and ``ban`` its confirmed members too, rule 6), ``delete_all_users``
   every member list and every room's confirmed members. ``visible_rooms`` is cached per
   user (each sees the public rooms and their own); the rooms token covers them all.
4. **Redis is optional.** Any Redis failure on a read falls back to the inner directory, and
   after a failure Redis is left alone for ``retry_after_s`` so an outage does not add a
   connection attempt to every read. The cache never raises ``Unavailable`` of its own.
5. **A node-local layer in front of Redis.** What a read got from Redis is kept in the node
   (decoded; least recently used pages evicted past ``local_bytes``) and served without asking Redis again for
   ``local_ttl_s`` after the read that fetched or confirmed it *started*; then the next read
   asks Redis again and keeps the decoded value if the bytes are unchanged. Staleness bound:
   on the node that wrote, none — a write drops the node's local entries it invalidates
   (after it replaced the tokens), and a read that was in flight across a write does not
   store what it got; on every other node, a read that starts more than ``local_ttl_s`` after
   a write completed sees it. Reads that went to the inner directory because Redis failed
   are not kept. While a read asks Redis about a due entry, the node's other reads of it wait
   for that answer instead of asking too (a refresh is one Redis read, not one per request in
   flight). They take it only if it is fresh by their own start time, so the bound holds for
   them too; otherwise they ask Redis themselves.

6. **The directory is optional for what Redis knows** (the reverse of rule 4). Rooms are never
   deleted or renamed: a room read or created is kept in Redis for ``known_ttl_s`` after the
   last read, and read from there first. A membership the inner directory confirmed
   (``add_member`` answered, added or already there; ``get_member`` found it) is added to
   the room's set of confirmed members, under version tokens read *before* asking the directory (rule 1):
   ``remove_member`` replaces the room's token, ``delete_all_users`` every room's, each after
   its write, so a confirmation that raced a removal is stored where no reader looks. While
   the inner directory raises ``Unavailable``, ``add_member`` of a confirmed member answers
   False ("already a member") and ``get_member`` a member (role ``member``: the role is not
   kept; managing members needs the directory anyway); anything else raises the inner directory's ``Unavailable``
   (a new membership, users, lists past ``ttl_s``), also when Redis fails too. A set decides
   nothing while the directory answers. A removal forgets the whole room's confirmations (each
   member is confirmed again by the next node that asks for it); a removal or deletion whose
   new token could not be written (Redis down at that moment) leaves its confirmations
   readable for up to ``known_ttl_s``: during a directory outage in that time, such a member
   may rejoin.

Why rule 6: a MySQL outage must not stop members from rejoining their rooms on any node
(docs/faults.md, scenario 6); only a new membership needs MySQL.

Why rule 5: ``GET /v1/chatrooms`` costs ~1.2 ms of node CPU per request with a Lua read through
a Redis client library and a JSON decode into 100 ``Room`` objects on every request, 75-88 µs
with the local layer (docs/benchmarks.md, profile 5): a request asks Redis about ten times a
second per page, not on every request.

The inner directory belongs to the cache (``aclose`` closes it); the Redis client does not.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Hashable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Final, TypeVar

import attrs
import trio

from chatnode.core import errors, ports
from chatnode.core.models import MEMBER, PUBLIC, Cursor, Listed, Member, Room, User

from .client import RespClient
from .directory_store import (
    CONFIRM,
    CONFIRMED,
    READ,
    confirmed_reply,
    member_of,
    room_fields,
    room_of,
)
from .local_cache import LocalEntry, LocalTable

log = logging.getLogger(__name__)

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

DAY_S: Final = 86_400.0


@attrs.define(eq=False)
class RedisCachedDirectory:
    """``ports.Directory``: ``inner`` with ``list_rooms`` and ``list_members`` cached in Redis
    for ``ttl_s``, and in the node for ``local_ttl_s``; rooms and confirmed memberships known
    in Redis for ``known_ttl_s`` (rules in the module docstring)."""

    inner: ports.Directory
    _redis: RespClient
    prefix: str
    ttl_s: float = attrs.field(default=5.0, kw_only=True)
    local_ttl_s: float = attrs.field(default=0.1, kw_only=True)
    local_bytes: int = attrs.field(default=2 << 20, kw_only=True)  # per table (rule 5)
    retry_after_s: float = attrs.field(default=1.0, kw_only=True)
    known_ttl_s: float = attrs.field(default=7 * DAY_S, kw_only=True)  # rule 6
    hits: int = attrs.field(default=0, init=False)
    misses: int = attrs.field(default=0, init=False)
    local_hits: int = attrs.field(default=0, init=False)
    _skip_until: float = attrs.field(default=float("-inf"), init=False)
    _failing: bool = attrs.field(default=False, init=False)
    _local_rooms: LocalTable[tuple[int, int], Room] = attrs.field(init=False)
    _local_visible: LocalTable[tuple[str, int, int], Listed] = attrs.field(init=False)
    _local_members: LocalTable[int, str] = attrs.field(init=False)
    _local_roles: LocalTable[int, Member] = attrs.field(init=False)
    _generation: int = attrs.field(default=0, init=False)  # +1 on every local invalidation

    def __attrs_post_init__(self) -> None:
        self._local_rooms = LocalTable(self.local_bytes)
        self._local_visible = LocalTable(self.local_bytes)
        self._local_members = LocalTable(self.local_bytes)
        self._local_roles = LocalTable(self.local_bytes)

    # -- keys -----------------------------------------------------------------------------------

    @property
    def _rooms_version(self) -> str:
        return f"{self.prefix}:dir:rooms:version"

    @property
    def _members_version(self) -> str:
        return f"{self.prefix}:dir:members:version"

    def _room_members_version(self, room_id: int) -> str:
        return f"{self.prefix}:dir:room:{room_id}:members:version"

    def _room_key(self, room_id: int) -> str:
        return f"{self.prefix}:dir:room:{room_id}"

    def _room_removals_version(self, room_id: int) -> str:
        return f"{self.prefix}:dir:room:{room_id}:removals:version"

    @property
    def _known_px(self) -> int:
        return max(1, int(self.known_ttl_s * 1000))

    # -- reads ----------------------------------------------------------------------------------

    async def list_rooms(self, *, after_id: int, limit: int) -> list[Room]:
        async def load() -> str:
            rooms = await self.inner.list_rooms(after_id=after_id, limit=limit)
            return json.dumps([room_fields(r) for r in rooms], ensure_ascii=False)

        def decode(raw: bytes) -> tuple[Room, ...]:
            return tuple(room_of(row) for row in json.loads(raw))

        rooms = await self._cached(
            self._local_rooms,
            (after_id, limit),
            [self._rooms_version],
            f"{self.prefix}:dir:rooms:",
            f":{after_id}:{limit}",
            load,
            decode,
        )
        return list(rooms)

    async def visible_rooms(self, user: str, *, after_id: int, limit: int) -> list[Listed]:
        async def load() -> str:
            rooms = await self.inner.visible_rooms(user, after_id=after_id, limit=limit)
            return json.dumps(
                [[*room_fields(r.room), r.member_count] for r in rooms], ensure_ascii=False
            )

        def decode(raw: bytes) -> tuple[Listed, ...]:
            return tuple(Listed(room_of(row[:-1]), int(row[-1])) for row in json.loads(raw))

        listed = await self._cached(
            self._local_visible,
            (user, after_id, limit),
            [self._rooms_version],
            f"{self.prefix}:dir:visible:",
            f":{user}:{after_id}:{limit}",
            load,
            decode,
        )
        return list(listed)

    async def list_members(self, room_id: int) -> list[str]:
        async def load() -> str:
            return json.dumps(await self.inner.list_members(room_id), ensure_ascii=False)

        def decode(raw: bytes) -> tuple[str, ...]:
            return tuple(str(name) for name in json.loads(raw))

        members = await self._cached(
            self._local_members,
            room_id,
            [self._members_version, self._room_members_version(room_id)],
            f"{self.prefix}:dir:room:{room_id}:members:",
            "",
            load,
            decode,
        )
        return list(members)

    async def list_roles(self, room_id: int) -> list[Member]:
        async def load() -> str:
            members = await self.inner.list_roles(room_id)
            return json.dumps(
                [[m.user, m.role, m.joined_at_ms] for m in members], ensure_ascii=False
            )

        def decode(raw: bytes) -> tuple[Member, ...]:
            return tuple(member_of(row) for row in json.loads(raw))

        members = await self._cached(
            self._local_roles,
            room_id,
            [self._members_version, self._room_members_version(room_id)],
            f"{self.prefix}:dir:room:{room_id}:roles:",
            "",
            load,
            decode,
        )
        return list(members)

    async def _cached(
        self,
        local: LocalTable[K, T],
        key: K,
        versions: list[str],
        head: str,
        tail: str,
        load: Callable[[], Awaitable[str]],
        decode: Callable[[bytes], tuple[T, ...]],
    ) -> tuple[T, ...]:
        """The value under ``key``: this node's if fresh (rule 5), else the one cached in
        Redis under the current ``versions``, else ``load()``'s, stored."""
        started = trio.current_time()
        entry = local.get(key)
        if entry is not None and entry.refreshing is not None and started >= entry.fresh_until:
            await entry.refreshing.wait()  # one read per entry asks Redis; the others share it
            entry = local.get(key)
        if entry is not None and started < entry.fresh_until:
            self.local_hits += 1
            return entry.value
        generation = self._generation
        refreshing = trio.Event()
        if entry is not None:
            entry.refreshing = refreshing
        try:
            raw, from_redis = await self._shared(versions, head, tail, load)
        finally:
            refreshing.set()
            if entry is not None:
                entry.refreshing = None
        value = entry.value if entry is not None and entry.raw == raw else decode(raw)
        if from_redis and generation == self._generation:
            local.put(key, LocalEntry(raw, value, started + self.local_ttl_s))
        return value

    async def _shared(
        self, versions: list[str], head: str, tail: str, load: Callable[[], Awaitable[str]]
    ) -> tuple[bytes, bool]:
        """The JSON cached in Redis under the current ``versions``, else ``load()``'s, stored;
        and whether Redis answered (False: read through to the inner directory)."""
        found = await self._redis_or_none(
            lambda: READ.run(self._redis, versions, [secrets.token_hex(8), head, tail])
        )
        match found:
            case [bytes(cache_key), value]:
                pass
            case _:
                self.misses += 1
                return (await load()).encode(), False
        if isinstance(value, bytes):
            self.hits += 1
            return value, True
        self.misses += 1
        loaded = (await load()).encode()
        px = max(1, int(self.ttl_s * 1000))
        await self._redis_or_none(lambda: self._redis.call("SET", cache_key, loaded, "PX", px))
        return loaded, True

    async def _redis_or_none(self, call: Callable[[], Awaitable[T]]) -> T | None:
        """``call()``, or None if Redis failed (then leave it alone for ``retry_after_s``)."""
        if trio.current_time() < self._skip_until:
            await trio.lowlevel.checkpoint()
            return None
        try:
            result = await call()
        except errors.Unavailable as exc:
            self._skip_until = trio.current_time() + self.retry_after_s
            if not self._failing:
                self._failing = True
                log.warning("directory cache: Redis failed (%s); reading through", exc)
            return None
        if self._failing:
            self._failing = False
            log.info("directory cache: Redis is back")
        return result

    # -- invalidation: new tokens in Redis (rule 1), then this node's entries (rule 5) --------
    # Local entries are dropped after the new token is in place, even if setting it failed or
    # was cancelled: a read that started before that may not keep what it got.

    async def _invalidate_rooms(self) -> None:
        try:
            await self._new_token(self._rooms_version)
        finally:
            self._generation += 1
            self._local_rooms.clear()
            self._local_visible.clear()

    async def _invalidate_room_members(self, room_id: int) -> None:
        """The room's member list, and every rooms list (they show member counts)."""
        try:
            await self._new_token(self._room_members_version(room_id))
        finally:
            self._generation += 1
            self._local_members.pop(room_id)
            self._local_roles.pop(room_id)
        await self._invalidate_rooms()

    async def _invalidate_all_members(self) -> None:
        try:
            await self._new_token(self._members_version)
        finally:
            self._generation += 1
            self._local_members.clear()
            self._local_roles.clear()
        await self._invalidate_rooms()

    async def _forget_confirmed(self, room_id: int) -> None:
        await self._new_token(self._room_removals_version(room_id))

    async def _new_token(self, version_key: str) -> None:
        await self._redis_or_none(
            partial(self._redis.call, "SET", version_key, secrets.token_hex(8))
        )

    # -- writes ---------------------------------------------------------------------------------

    async def create_room(
        self,
        name: str,
        *,
        created_at_ms: int,
        visibility: str = PUBLIC,
        owner: str | None = None,
        members: Sequence[str] = (),
        max_members: int = 0,
    ) -> Room:
        try:
            room = await self.inner.create_room(
                name,
                created_at_ms=created_at_ms,
                visibility=visibility,
                owner=owner,
                members=members,
                max_members=max_members,
            )
        finally:  # an error may still have created it: invalidate either way
            await self._invalidate_rooms()
        await self._keep_room(room)
        return room

    async def direct_room(self, user: str, other: str, *, created_at_ms: int) -> tuple[Room, bool]:
        try:
            room, made = await self.inner.direct_room(user, other, created_at_ms=created_at_ms)
        except errors.Unavailable:
            await self._invalidate_rooms()
            raise
        if made:
            await self._invalidate_rooms()
        await self._keep_room(room)
        return room, made

    async def add_member(
        self, room_id: int, user: str, *, max_members: int, role: str = MEMBER
    ) -> bool:
        """The inner directory's answer, remembered as a confirmation; while it is
        unavailable, False for a member confirmed before (rule 6)."""
        set_key, confirmed = await self._confirmed(room_id, user)
        try:
            added = await self.inner.add_member(room_id, user, max_members=max_members, role=role)
        except errors.Unavailable:
            if confirmed:
                return False
            await self._invalidate_room_members(room_id)  # it may have been added
            raise
        if added:
            await self._invalidate_room_members(room_id)
        if set_key is not None:
            await self._confirm(set_key, user)
        return added

    async def remove_member(self, room_id: int, user: str) -> bool:
        removed = True  # unless the directory says otherwise, it may have been removed
        try:
            removed = await self._member_write(
                room_id, lambda: self.inner.remove_member(room_id, user)
            )
        finally:
            if removed:
                await self._forget_confirmed(room_id)
        return removed

    async def ban(self, room_id: int, user: str, *, by: str, at_ms: int) -> bool:
        """A ban may end a membership: it forgets the room's confirmations and member list
        whatever it answers (rules 3 and 6)."""
        try:
            return await self.inner.ban(room_id, user, by=by, at_ms=at_ms)
        finally:
            await self._forget_confirmed(room_id)
            await self._invalidate_room_members(room_id)

    async def unban(self, room_id: int, user: str) -> bool:
        return await self.inner.unban(room_id, user)

    async def list_bans(self, room_id: int, *, limit: int) -> list[str]:
        return await self.inner.list_bans(room_id, limit=limit)

    async def find_direct(self, user: str, other: str) -> Room | None:
        return await self.inner.find_direct(user, other)

    async def user_rooms(self, user: str, *, limit: int) -> list[Room]:
        return await self.inner.user_rooms(user, limit=limit)

    async def get_member(self, room_id: int, user: str) -> Member | None:
        """The inner directory's answer, a found member remembered as a confirmation; while
        it is unavailable, a member confirmed before, with the role ``member`` and no join
        time (rule 6: a private room's members rejoin and read it during an outage)."""
        set_key, confirmed = await self._confirmed(room_id, user)
        try:
            member = await self.inner.get_member(room_id, user)
        except errors.Unavailable:
            if confirmed:
                return Member(user)
            raise
        if member is not None and set_key is not None and not confirmed:
            await self._confirm(set_key, user)
        return member

    async def _confirmed(self, room_id: int, user: str) -> tuple[bytes | None, bool]:
        """(the key of the room's confirmed members under the current tokens, whether
        ``user`` is one of them); read before asking the directory (rule 6)."""
        found = await self._redis_or_none(
            lambda: CONFIRMED.run(
                self._redis,
                [self._members_version, self._room_removals_version(room_id)],
                [secrets.token_hex(8), f"{self.prefix}:dir:room:{room_id}:joined:", "", user],
            )
        )
        return confirmed_reply(found)

    async def _confirm(self, set_key: bytes, user: str) -> None:
        await self._redis_or_none(
            lambda: CONFIRM.run(self._redis, [set_key], [user, self._known_px])
        )

    async def _member_write(self, room_id: int, write: Callable[[], Awaitable[bool]]) -> bool:
        """Invalidate the room's members if the write changed them, or may have."""
        try:
            changed = await write()
        except errors.ChatError as exc:
            if isinstance(exc, errors.Unavailable):
                await self._invalidate_room_members(room_id)
            raise  # NotFound, RoomFull: nothing changed
        if changed:
            await self._invalidate_room_members(room_id)
        return changed

    async def delete_all_users(self) -> int:
        try:
            return await self.inner.delete_all_users()
        finally:
            await self._invalidate_all_members()

    # -- pass-through ---------------------------------------------------------------------------

    async def create_user(
        self, name: str, password_hash: str, *, created_at_ms: int, is_admin: bool = False
    ) -> User:
        return await self.inner.create_user(
            name, password_hash, created_at_ms=created_at_ms, is_admin=is_admin
        )

    async def get_user(self, name: str) -> User | None:
        return await self.inner.get_user(name)

    async def get_user_by_id(self, account_id: int) -> User | None:
        return await self.inner.get_user_by_id(account_id)

    async def set_password(
        self, account_id: int, password_hash: str, *, revoked_before_ms: int
    ) -> User | None:
        return await self.inner.set_password(
            account_id, password_hash, revoked_before_ms=revoked_before_ms
        )

    async def set_admin(
        self, name: str, is_admin: bool, *, revoked_before_ms: int = 0
    ) -> User | None:
        return await self.inner.set_admin(name, is_admin, revoked_before_ms=revoked_before_ms)

    async def get_room(self, room_id: int) -> Room | None:
        """The room as Redis keeps it (renewed for ``known_ttl_s``), else the inner
        directory's, kept (rule 6). An unknown room is not kept: it may be created later."""
        raw = await self._redis_or_none(
            lambda: self._redis.call("GETEX", self._room_key(room_id), "PX", self._known_px)
        )
        if isinstance(raw, bytes):
            return room_of(json.loads(raw))
        room = await self.inner.get_room(room_id)
        if room is not None:
            await self._keep_room(room)
        return room

    async def _keep_room(self, room: Room) -> None:
        raw = json.dumps(room_fields(room), ensure_ascii=False)
        await self._redis_or_none(
            lambda: self._redis.call("SET", self._room_key(room.id), raw, "PX", self._known_px)
        )

    # cursors are not cached: written in batches, read at joins and by lists (one query each)
    async def advance_cursors(self, cursors: Sequence[Cursor]) -> None:
        await self.inner.advance_cursors(cursors)

    async def room_cursors(self, room_id: int) -> list[Cursor]:
        return await self.inner.room_cursors(room_id)

    async def user_cursors(self, user: str, room_ids: Sequence[int]) -> dict[int, Cursor]:
        return await self.inner.user_cursors(user, room_ids)

    async def check(self) -> None:
        await self.inner.check()

    async def aclose(self) -> None:
        await self.inner.aclose()


if TYPE_CHECKING:  # mypy proves the adapter implements its port

    def _implements_port(inner: ports.Directory, redis: RespClient) -> ports.Directory:
        return RedisCachedDirectory(inner, redis, "p")
