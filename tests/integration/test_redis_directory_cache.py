"""RedisCachedDirectory against a real Redis, in front of an in-memory SQLite directory that
counts its reads: hits, invalidation by every write, the write/read race, lost version keys,
TTL, and reading through when Redis is down; then the node-local layer (rule 5) with two
caches on one Redis as two nodes, on trio's mock clock: a node sees its own writes at once,
another node within ``local_ttl_s``; then what stays known while the directory is down
(rule 6): rooms, and memberships it confirmed, on every node, until a removal or deletion.
(It also passes the Directory contract: see the ``redis-cached`` entry of the directory
registry.)"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import attrs
import pytest
import trio

from chatnode.adapters.redis import RedisCachedDirectory, RespClient
from chatnode.adapters.redis.local_cache import ENTRY_OVERHEAD_BYTES
from chatnode.adapters.sqlite import SqliteDatabase, SqliteDirectory
from chatnode.core import errors
from chatnode.core.models import Member
from chatnode.core.ports import Directory
from tests.contracts.conftest import redis_test_clients
from tests.contracts.harness import require_service
from tests.redis_support import RedisAdmin

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000


@attrs.define(eq=False)
class CountingDirectory:
    """Delegates to ``inner``, counting list and room reads; ``gate`` (if set) holds
    list_members after it read, and ``add_gate`` add_member after it wrote, until the test
    opens it; while ``down``, every call raises ``Unavailable`` (MySQL is down)."""

    inner: Directory
    reads: dict[str, int] = attrs.field(factory=lambda: {"list_rooms": 0, "list_members": 0})
    room_reads: int = 0
    gate: trio.Event | None = None
    reading: trio.Event = attrs.field(factory=trio.Event)
    add_gate: trio.Event | None = None
    adding: trio.Event = attrs.field(factory=trio.Event)
    down: bool = False

    async def _up(self) -> None:
        if self.down:
            await trio.lowlevel.checkpoint()
            raise errors.Unavailable("the directory is down (test)")

    async def list_rooms(self, *, after_id: int, limit: int) -> list[Any]:
        await self._up()
        self.reads["list_rooms"] += 1
        return await self.inner.list_rooms(after_id=after_id, limit=limit)

    async def list_members(self, room_id: int) -> list[str]:
        await self._up()
        self.reads["list_members"] += 1
        members = await self.inner.list_members(room_id)
        if self.gate is not None:
            self.reading.set()
            await self.gate.wait()
        return members

    async def get_room(self, room_id: int) -> Any:
        await self._up()
        self.room_reads += 1
        return await self.inner.get_room(room_id)

    async def add_member(
        self, room_id: int, user: str, *, max_members: int, role: str = "member"
    ) -> bool:
        await self._up()
        added = await self.inner.add_member(room_id, user, max_members=max_members, role=role)
        if self.add_gate is not None:
            self.adding.set()
            await self.add_gate.wait()
        return added

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method: Callable[..., Awaitable[Any]] = getattr(self.inner, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            await self._up()
            return await method(*args, **kwargs)

        return call


@pytest.fixture
async def inner() -> AsyncIterator[CountingDirectory]:
    async with await SqliteDatabase.open(":memory:") as db:
        directory = SqliteDirectory(db)
        for name in ("alice", "bob", "carol"):
            await directory.create_user(name, "h", created_at_ms=T0)
        yield CountingDirectory(directory)


@pytest.fixture
async def redis() -> AsyncIterator[tuple[RedisAdmin, str]]:
    async with redis_test_clients(require_service("CHATNODE_TEST_REDIS_URL")) as (clients, prefix):
        yield clients[0], prefix


@pytest.fixture
def cached(inner: CountingDirectory, redis: tuple[RedisAdmin, str]) -> RedisCachedDirectory:
    """The Redis layer alone (rules 1-4): no node-local layer, every read asks Redis."""
    client, prefix = redis
    return RedisCachedDirectory(inner, client, prefix, ttl_s=60.0, local_ttl_s=0.0)  # type: ignore[arg-type]


async def test_rooms_pages_are_cached_and_a_new_room_invalidates_them(
    cached: RedisCachedDirectory, inner: CountingDirectory
) -> None:
    first = await cached.create_room("one", created_at_ms=T0)
    assert await cached.list_rooms(after_id=0, limit=10) == [first]
    assert await cached.list_rooms(after_id=0, limit=10) == [first]
    assert await cached.list_rooms(after_id=0, limit=5) == [first]  # another page: own key
    assert inner.reads["list_rooms"] == 2

    second = await cached.create_room("two", created_at_ms=T0)

    assert await cached.list_rooms(after_id=0, limit=10) == [first, second]
    assert await cached.list_rooms(after_id=1, limit=10) == [second]
    assert inner.reads["list_rooms"] == 4
    assert cached.hits == 1


async def test_members_are_cached_per_room_and_writes_invalidate_their_room(
    cached: RedisCachedDirectory, inner: CountingDirectory
) -> None:
    r1 = await cached.create_room("one", created_at_ms=T0)
    r2 = await cached.create_room("two", created_at_ms=T0)
    await cached.add_member(r1.id, "bob", max_members=10)
    await cached.add_member(r2.id, "carol", max_members=10)
    assert await cached.list_members(r1.id) == ["bob"]
    assert await cached.list_members(r2.id) == ["carol"]
    reads = inner.reads["list_members"]

    assert not await cached.add_member(r1.id, "bob", max_members=10)  # no change: still cached
    assert await cached.list_members(r1.id) == ["bob"]
    assert await cached.add_member(r1.id, "alice", max_members=10)
    assert await cached.list_members(r1.id) == ["alice", "bob"]
    assert await cached.list_members(r2.id) == ["carol"]  # the other room stays cached
    assert inner.reads["list_members"] == reads + 1

    assert await cached.remove_member(r1.id, "bob")
    assert await cached.list_members(r1.id) == ["alice"]
    assert inner.reads["list_members"] == reads + 2


async def test_deleting_all_users_invalidates_every_member_list(
    cached: RedisCachedDirectory,
) -> None:
    rooms = [await cached.create_room(f"r{n}", created_at_ms=T0) for n in range(3)]
    for room in rooms:
        await cached.add_member(room.id, "alice", max_members=10)
        assert await cached.list_members(room.id) == ["alice"]

    assert await cached.delete_all_users() == 3

    for room in rooms:
        assert await cached.list_members(room.id) == []


async def test_failed_writes_do_not_invalidate(
    cached: RedisCachedDirectory, inner: CountingDirectory
) -> None:
    room = await cached.create_room("one", created_at_ms=T0)
    await cached.add_member(room.id, "alice", max_members=1)
    assert await cached.list_members(room.id) == ["alice"]
    reads = inner.reads["list_members"]

    with pytest.raises(errors.RoomFull):
        await cached.add_member(room.id, "bob", max_members=1)
    with pytest.raises(errors.NotFound):
        await cached.add_member(room.id, "nobody", max_members=10)

    assert await cached.list_members(room.id) == ["alice"]
    assert inner.reads["list_members"] == reads


async def test_a_read_that_overlaps_a_write_never_caches_stale_data(
    cached: RedisCachedDirectory, inner: CountingDirectory
) -> None:
    room = await cached.create_room("one", created_at_ms=T0)
    inner.gate = trio.Event()
    seen: list[list[str]] = []
    async with trio.open_nursery() as nursery:

        async def slow_reader() -> None:
            seen.append(await cached.list_members(room.id))

        nursery.start_soon(slow_reader)
        await inner.reading.wait()  # it read [] from the directory and holds it
        await cached.add_member(room.id, "alice", max_members=10)
        inner.gate.set()  # now it stores [] in the cache, under the old version
    inner.gate = None

    assert seen == [[]]
    assert await cached.list_members(room.id) == ["alice"]


async def test_a_lost_version_key_never_revives_old_entries(
    cached: RedisCachedDirectory, inner: CountingDirectory, redis: tuple[RedisAdmin, str]
) -> None:
    room = await cached.create_room("one", created_at_ms=T0)
    assert await cached.list_members(room.id) == []
    await inner.inner.add_member(room.id, "alice", max_members=10)  # behind the cache's back
    assert await cached.list_members(room.id) == []  # cached until invalidated or expired

    client, prefix = redis
    await client.delete([f"{prefix}:dir:room:{room.id}:members:version"])

    assert await cached.list_members(room.id) == ["alice"]


async def test_entries_expire_after_the_ttl(
    inner: CountingDirectory, redis: tuple[RedisAdmin, str]
) -> None:
    client, prefix = redis
    cached = RedisCachedDirectory(inner, client, prefix, ttl_s=0.3)  # type: ignore[arg-type]
    await cached.list_rooms(after_id=0, limit=10)
    await cached.list_rooms(after_id=0, limit=10)
    assert inner.reads["list_rooms"] == 1

    await trio.sleep(0.4)  # let the TTL pass (time, not an event)
    await cached.list_rooms(after_id=0, limit=10)

    assert inner.reads["list_rooms"] == 2


async def test_without_redis_everything_reads_through(inner: CountingDirectory) -> None:
    async with RespClient.from_url("redis://127.0.0.1:1/0", timeout_s=1.0) as client:
        cached = RedisCachedDirectory(inner, client, "nowhere")
        room = await cached.create_room("one", created_at_ms=T0)
        assert await cached.add_member(room.id, "bob", max_members=10)

        assert await cached.list_rooms(after_id=0, limit=10) == [room]
        assert await cached.list_members(room.id) == ["bob"]
        assert await cached.list_members(room.id) == ["bob"]
        assert inner.reads == {"list_rooms": 1, "list_members": 2}
        await cached.check()


# -- rule 5: the node-local layer -------------------------------------------------------------

LOCAL_TTL_S = 0.5


@pytest.fixture
async def nodes(
    inner: CountingDirectory,
) -> AsyncIterator[tuple[RedisCachedDirectory, RedisCachedDirectory]]:
    """Two caches ("nodes") with clients of their own on one Redis, over one directory."""
    async with redis_test_clients(require_service("CHATNODE_TEST_REDIS_URL"), count=2) as (
        clients,
        prefix,
    ):
        yield tuple(  # type: ignore[misc]
            RedisCachedDirectory(
                inner,  # type: ignore[arg-type]
                client,
                prefix,
                ttl_s=60.0,
                local_ttl_s=LOCAL_TTL_S,
            )
            for client in clients
        )


async def test_reads_within_the_local_ttl_do_not_ask_redis(
    nodes: tuple[RedisCachedDirectory, RedisCachedDirectory],
    inner: CountingDirectory,
    mock_clock: trio.testing.MockClock,
) -> None:
    a, _ = nodes
    room = await a.create_room("one", created_at_ms=T0)
    assert await a.list_rooms(after_id=0, limit=10) == [room]
    assert (a.hits, a.misses, a.local_hits) == (0, 1, 0)

    for _ in range(3):
        assert await a.list_rooms(after_id=0, limit=10) == [room]
    assert (a.hits, a.misses, a.local_hits) == (0, 1, 3)

    mock_clock.jump(LOCAL_TTL_S)  # the local copy is due: Redis confirms it, once
    assert await a.list_rooms(after_id=0, limit=10) == [room]
    assert await a.list_rooms(after_id=0, limit=10) == [room]
    assert (a.hits, a.misses, a.local_hits) == (1, 1, 4)
    assert inner.reads["list_rooms"] == 1


async def test_a_node_sees_its_own_new_room_at_once_and_another_node_within_the_local_ttl(
    nodes: tuple[RedisCachedDirectory, RedisCachedDirectory], mock_clock: trio.testing.MockClock
) -> None:
    a, b = nodes
    first = await a.create_room("one", created_at_ms=T0)
    assert await a.list_rooms(after_id=0, limit=10) == [first]
    assert await b.list_rooms(after_id=0, limit=10) == [first]

    second = await a.create_room("two", created_at_ms=T0)

    assert await a.list_rooms(after_id=0, limit=10) == [first, second]
    assert await b.list_rooms(after_id=0, limit=10) in ([first], [first, second])
    mock_clock.jump(LOCAL_TTL_S)  # the staleness bound of another node
    assert await b.list_rooms(after_id=0, limit=10) == [first, second]


async def test_member_lists_follow_the_same_bound_on_every_write(
    nodes: tuple[RedisCachedDirectory, RedisCachedDirectory], mock_clock: trio.testing.MockClock
) -> None:
    a, b = nodes
    room = await a.create_room("one", created_at_ms=T0)
    assert await a.list_members(room.id) == [] == await b.list_members(room.id)

    assert await b.add_member(room.id, "alice", max_members=10)
    assert await b.list_members(room.id) == ["alice"]
    mock_clock.jump(LOCAL_TTL_S)
    assert await a.list_members(room.id) == ["alice"]

    assert await a.remove_member(room.id, "alice")
    assert await a.list_members(room.id) == []
    mock_clock.jump(LOCAL_TTL_S)
    assert await b.list_members(room.id) == []

    assert await a.add_member(room.id, "bob", max_members=10)
    assert await a.list_members(room.id) == ["bob"]
    assert await b.delete_all_users() == 3
    assert await b.list_members(room.id) == []
    mock_clock.jump(LOCAL_TTL_S)
    assert await a.list_members(room.id) == []


async def test_a_read_in_flight_across_a_write_keeps_nothing_locally(
    nodes: tuple[RedisCachedDirectory, RedisCachedDirectory], inner: CountingDirectory
) -> None:
    a, _ = nodes
    room = await a.create_room("one", created_at_ms=T0)
    inner.gate = trio.Event()
    seen: list[list[str]] = []
    async with trio.open_nursery() as nursery:

        async def slow_reader() -> None:
            seen.append(await a.list_members(room.id))

        nursery.start_soon(slow_reader)
        await inner.reading.wait()  # it read [] from the directory and holds it
        await a.add_member(room.id, "alice", max_members=10)
        inner.gate.set()
    inner.gate = None

    assert seen == [[]]
    assert await a.list_members(room.id) == ["alice"]  # same node, no time passed


async def test_unchanged_redis_bytes_keep_the_decoded_value(
    nodes: tuple[RedisCachedDirectory, RedisCachedDirectory], mock_clock: trio.testing.MockClock
) -> None:
    a, _ = nodes
    await a.create_room("one", created_at_ms=T0)
    before = await a.list_rooms(after_id=0, limit=10)
    mock_clock.jump(LOCAL_TTL_S)
    after = await a.list_rooms(after_id=0, limit=10)
    assert a.hits == 1  # Redis was asked again
    assert after == before and after is not before  # a fresh list every call ...
    assert after[0] is before[0]  # ... of the objects decoded once


async def test_the_local_layer_is_bounded(
    inner: CountingDirectory, redis: tuple[RedisAdmin, str]
) -> None:
    client, prefix = redis
    two_empty_pages = 2 * (ENTRY_OVERHEAD_BYTES + len(b"[]"))
    cached = RedisCachedDirectory(
        inner,  # type: ignore[arg-type]
        client,
        prefix,
        local_ttl_s=60.0,
        local_bytes=two_empty_pages,
    )
    for limit in (1, 2, 3, 1):  # the page of limit=1 was the oldest and is gone
        await cached.list_rooms(after_id=0, limit=limit)
    assert cached.local_hits == 0
    await cached.list_rooms(after_id=0, limit=3)
    assert cached.local_hits == 1


async def test_reads_of_a_due_entry_share_one_redis_read(
    nodes: tuple[RedisCachedDirectory, RedisCachedDirectory], mock_clock: trio.testing.MockClock
) -> None:
    a, _ = nodes
    room = await a.create_room("one", created_at_ms=T0)
    await a.list_rooms(after_id=0, limit=10)
    mock_clock.jump(LOCAL_TTL_S)
    seen: list[list[Any]] = []

    async def read() -> None:
        seen.append(await a.list_rooms(after_id=0, limit=10))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(read)

    assert seen == [[room]] * 5
    assert (a.hits, a.local_hits) == (1, 4)


# -- rule 6: what stays known while the directory is down ---------------------------------------


async def test_rooms_are_read_from_redis_and_stay_known_while_the_directory_is_down(
    nodes: tuple[RedisCachedDirectory, RedisCachedDirectory], inner: CountingDirectory
) -> None:
    a, b = nodes
    created = await a.create_room("one", created_at_ms=T0)  # kept as it is created
    behind = await inner.inner.create_room("two", created_at_ms=T0)  # not seen by the cache
    assert await b.get_room(created.id) == created
    assert inner.room_reads == 0
    assert await a.get_room(behind.id) == behind  # read from the directory once, kept
    assert await b.get_room(behind.id) == behind
    assert inner.room_reads == 1
    assert await a.get_room(99) is None  # not kept: it may be created later

    inner.down = True

    for node in (a, b):
        assert await node.get_room(created.id) == created
        assert await node.get_room(behind.id) == behind
        with pytest.raises(errors.Unavailable):
            await node.get_room(99)


async def test_a_confirmed_membership_is_known_to_every_node_while_the_directory_is_down(
    nodes: tuple[RedisCachedDirectory, RedisCachedDirectory], inner: CountingDirectory
) -> None:
    a, b = nodes
    room = await a.create_room("one", created_at_ms=T0)
    assert await a.add_member(room.id, "alice", max_members=10)  # added: confirmed
    await inner.inner.add_member(room.id, "bob", max_members=10)  # behind the cache's back
    assert not await b.add_member(room.id, "bob", max_members=10)  # already there: confirmed

    inner.down = True

    for node in (a, b):
        assert not await node.add_member(room.id, "alice", max_members=10)
        assert not await node.add_member(room.id, "bob", max_members=10)
        with pytest.raises(errors.Unavailable):  # a new membership needs the directory
            await node.add_member(room.id, "carol", max_members=10)
    async with RespClient.from_url("redis://127.0.0.1:1/0", timeout_s=1.0) as nowhere:
        without_redis = RedisCachedDirectory(inner, nowhere, a.prefix)
        with pytest.raises(errors.Unavailable):  # neither answers: the directory's error
            await without_redis.add_member(room.id, "alice", max_members=10)
        with pytest.raises(errors.Unavailable):
            await without_redis.get_room(room.id)

    inner.down = False  # the directory decides again, and the answers agree
    assert not await a.add_member(room.id, "alice", max_members=10)
    assert await a.add_member(room.id, "carol", max_members=10)


async def test_a_private_rooms_members_are_known_while_the_directory_is_down(
    nodes: tuple[RedisCachedDirectory, RedisCachedDirectory], inner: CountingDirectory
) -> None:
    a, b = nodes
    room = await a.create_room(
        "g", created_at_ms=T0, visibility="private", owner="alice", members=["bob"], max_members=9
    )
    assert (await a.get_member(room.id, "alice")) is not None  # found: confirmed
    assert await b.get_member(room.id, "carol") is None

    inner.down = True
    for node in (a, b):
        assert await node.get_member(room.id, "alice") == Member("alice")
        with pytest.raises(errors.Unavailable):  # never confirmed: the directory decides
            await node.get_member(room.id, "bob")

    inner.down = False
    await b.ban(room.id, "alice", by="bob", at_ms=T0)  # forgets the room's confirmations
    inner.down = True
    with pytest.raises(errors.Unavailable):
        await a.get_member(room.id, "alice")


async def test_a_removal_or_a_deletion_of_users_ends_what_is_known(
    nodes: tuple[RedisCachedDirectory, RedisCachedDirectory], inner: CountingDirectory
) -> None:
    a, b = nodes
    room = await a.create_room("one", created_at_ms=T0)
    other = await a.create_room("two", created_at_ms=T0)
    for name in ("alice", "bob"):
        await a.add_member(room.id, name, max_members=10)
    await a.add_member(other.id, "bob", max_members=10)
    assert await b.remove_member(room.id, "alice")  # forgets the room's confirmations

    inner.down = True
    for name in ("alice", "bob"):
        with pytest.raises(errors.Unavailable):
            await a.add_member(room.id, name, max_members=10)
    assert not await a.add_member(other.id, "bob", max_members=10)  # other rooms: known

    inner.down = False
    assert not await a.add_member(room.id, "bob", max_members=10)  # confirmed again
    inner.down = True
    assert not await b.add_member(room.id, "bob", max_members=10)

    inner.down = False
    assert await b.delete_all_users() == 3
    inner.down = True
    for node in (a, b):
        for room_id in (room.id, other.id):
            with pytest.raises(errors.Unavailable):
                await node.add_member(room_id, "bob", max_members=10)


async def test_a_confirmation_that_raced_a_removal_is_not_kept(
    nodes: tuple[RedisCachedDirectory, RedisCachedDirectory], inner: CountingDirectory
) -> None:
    a, b = nodes
    room = await a.create_room("one", created_at_ms=T0)
    assert await a.add_member(room.id, "bob", max_members=10)
    inner.add_gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(a.add_member, room.id, "alice", max_members=10))
        await inner.adding.wait()  # alice is a member in the directory; not confirmed yet
        assert await b.remove_member(room.id, "alice")  # completes before the confirmation
        inner.add_gate.set()
    inner.add_gate = None
    assert await inner.inner.list_members(room.id) == ["bob"]
    assert not await a.add_member(room.id, "bob", max_members=10)  # confirmed after it

    inner.down = True
    with pytest.raises(errors.Unavailable):
        await b.add_member(room.id, "alice", max_members=10)
    assert not await b.add_member(room.id, "bob", max_members=10)
