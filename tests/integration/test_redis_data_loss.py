"""What the Redis bus and the hub do when Redis lost data (redis_bus.py rules 6-8, hub Rule
6), against a real Redis: the loss is made by deleting or rewinding the test's own keys (its
own key prefix) and by dropping the bus's command connection, never by restarting the shared
server (tests/faults/test_redis_data_loss.py restarts a Redis of its own)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from chatnode.adapters.redis import RedisBus, RespClient
from chatnode.adapters.sqlite import SqliteArchive, SqliteDatabase
from chatnode.core import errors
from chatnode.core.models import ChatMessage, Draft
from chatnode.node.hub import Hub
from tests.contracts.conftest import redis_test_clients
from tests.contracts.harness import Recorder, require_service
from tests.redis_support import RedisAdmin
from tests.unit.test_hub import FakeMember

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000


def draft(room_id: int, text: str, client_id: str | None = None, user: str = "bob") -> Draft:
    return Draft(room_id=room_id, user=user, text=text, timestamp_ms=T0, client_id=client_id)


@pytest.fixture
async def redis() -> AsyncIterator[tuple[RedisAdmin, str, RespClient]]:
    """An admin client, the test's key prefix (its keys are deleted at the end) and a bus
    client."""
    url = require_service("CHATNODE_TEST_REDIS_URL")
    async with redis_test_clients(url) as (clients, prefix):
        client = clients[0]
        resp = RespClient.from_url(url, timeout_s=5.0)
        try:
            yield client, prefix, resp
        finally:
            await resp.aclose()


async def command(*args: str | bytes) -> object:
    """One raw command on a connection of its own (not the bus's)."""
    admin = RespClient.from_url(require_service("CHATNODE_TEST_REDIS_URL"), timeout_s=5.0)
    try:
        return await admin.call(*args)
    finally:
        await admin.aclose()


async def lose_room(client: RedisAdmin, bus: RedisBus, room_id: int) -> None:
    """What a Redis restarted without its data leaves of a room: nothing."""
    await client.delete([bus.keys.offset(room_id), bus.keys.log(room_id)])


async def rewind_room(client: RedisAdmin, bus: RedisBus, kept: list[ChatMessage]) -> None:
    """What a Redis that came back with older data leaves of a room: its counter and log as
    they were when ``kept`` (its first messages) were all it had."""
    room_id = kept[0].room_id
    await lose_room(client, bus, room_id)
    for m in kept:
        await command(
            "XADD", bus.keys.log(room_id), f"{m.offset}-0",
            "u", m.user, "t", m.text, "ts", str(m.timestamp_ms),
        )  # fmt: skip
    await client.set(bus.keys.offset(room_id), str(kept[-1].offset).encode())


# -- rule 6: offsets are never reused -----------------------------------------------------------


async def test_a_room_the_bus_never_held_is_unknown_until_restored(
    redis: tuple[RedisAdmin, str, RespClient],
) -> None:
    _, prefix, resp = redis
    bus = RedisBus(resp, prefix)

    assert await bus.last_offset(1) is None
    with pytest.raises(errors.OffsetUnknown):
        await bus.publish(draft(1, "where?"))
    assert await bus.restore(1, last_offset=0) == 0  # what creating the room does
    assert (await bus.publish(draft(1, "first"))).offset == 1


async def test_a_subscribed_room_whose_counter_was_lost_continues_above_what_the_node_saw(
    redis: tuple[RedisAdmin, str, RespClient], nursery: trio.Nursery
) -> None:
    client, prefix, resp = redis
    bus = RedisBus(resp, prefix)
    await nursery.start(bus.serve, Recorder())
    await bus.subscribe(1)
    await bus.restore(1, last_offset=0)
    for n in range(5):
        await bus.publish(draft(1, f"m{n}"))

    await lose_room(client, bus, 1)
    with pytest.raises(errors.OffsetUnknown):  # once: the node restores what it holds first
        await bus.publish(draft(1, "after the loss"))
    after = await bus.publish(draft(1, "after the loss"))  # then it continues above the floor

    assert after.offset == 6
    assert await bus.last_offset(1) == 6


async def test_a_counter_behind_what_the_node_saw_is_not_reused(
    redis: tuple[RedisAdmin, str, RespClient], nursery: trio.Nursery
) -> None:
    client, prefix, resp = redis
    bus = RedisBus(resp, prefix)
    await nursery.start(bus.serve, Recorder())
    await bus.subscribe(1)
    await bus.restore(1, last_offset=0)
    for n in range(8):
        await bus.publish(draft(1, f"m{n}"))

    await client.set(bus.keys.offset(1), b"3")  # a failover to a replica that lagged
    with pytest.raises(errors.OffsetUnknown):
        await bus.publish(draft(1, "after"))
    assert await bus.restore(1, last_offset=8) == 8
    assert (await bus.publish(draft(1, "after"))).offset == 9


async def test_a_seed_from_the_archive_waits_until_the_nodes_could_restore(
    redis: tuple[RedisAdmin, str, RespClient],
) -> None:
    _, prefix, resp = redis
    settling = RedisBus(resp, prefix, settle_s=30)
    settled = RedisBus(resp, prefix, settle_s=0)

    with pytest.raises(errors.Unavailable) as refused:  # Redis "just" lost its data
        await settling.restore(1, last_offset=40, seed=True)
    assert 0 < refused.value.retry_after_s <= 30
    assert await settling.last_offset(1) is None
    assert await settled.restore(1, last_offset=40, seed=True) == 40
    assert (await settled.publish(draft(1, "next"))).offset == 41
    # a room with nothing archived starts at once: nothing can be reused
    assert await settling.restore(2, last_offset=0, seed=True) == 0


async def test_restore_refills_the_log_tail_and_never_lowers_the_counter(
    redis: tuple[RedisAdmin, str, RespClient],
) -> None:
    client, prefix, resp = redis
    bus = RedisBus(resp, prefix)
    await bus.restore(1, last_offset=0)
    published = [await bus.publish(draft(1, f"m{n}")) for n in range(6)]
    await rewind_room(client, bus, published[:2])

    assert await bus.restore(1, last_offset=6, messages=published) == 6
    assert await bus.read_log(1, after_offset=0, limit=10) == published
    assert await bus.restore(1, last_offset=4) == 6
    # below the log's newest entry nothing can be added (a stream only grows at its end):
    # history reads such holes from the archive
    await command(b"XDEL", bus.keys.log(1), b"3-0")
    assert await bus.restore(1, last_offset=6, messages=published) == 6
    assert await bus.read_log(1, after_offset=0, limit=10) == published[:2] + published[3:]


# -- rule 7: every message is kept until archived -----------------------------------------------


async def test_kept_messages_are_forgotten_once_the_stream_moved_past_them(
    redis: tuple[RedisAdmin, str, RespClient],
) -> None:
    client, prefix, resp = redis
    bus = RedisBus(resp, prefix)
    await bus.restore(1, last_offset=0)
    for n in range(4):
        await bus.publish(draft(1, f"m{n}"))
    entries = await client.xrange(bus.keys.archive)
    assert bus.counters()["unarchived_kept"] == 4

    await command(b"XTRIM", bus.keys.archive, b"MINID", entries[2].identifier)
    await bus._check_archived()
    assert bus.counters()["unarchived_kept"] == 2

    await client.delete([bus.keys.archive])  # all archived: the stream trimmed to nothing
    await bus._check_archived()
    assert bus.counters()["unarchived_kept"] == 0


async def test_kept_messages_go_back_to_the_stream_after_redis_lost_them(
    redis: tuple[RedisAdmin, str, RespClient],
) -> None:
    client, prefix, resp = redis
    bus = RedisBus(resp, prefix)
    await bus.restore(1, last_offset=0)
    await bus.restore(2, last_offset=0)
    published = [await bus.publish(draft(1 + n % 2, f"m{n}")) for n in range(5)]

    await client.delete([bus.keys.archive, bus.keys.offset(1), bus.keys.offset(2)])
    await client.delete([bus.keys.log(1), bus.keys.log(2)])
    assert resp._conn is not None
    resp._conn.fail("Redis restarted")  # a restart or a failover ends connections
    await bus._check_archived()

    entries = await client.xrange(bus.keys.archive)
    assert sorted(e.field_values[b"d"] for e in entries) == sorted(m.document for m in published)
    assert bus.written_back == 5
    assert await bus.last_offset(1) == 3  # counters back at the newest offset kept
    assert await bus.last_offset(2) == 2
    await bus._check_archived()  # the same connection now: nothing written twice
    assert await client.xlen(bus.keys.archive) == 5


async def test_kept_messages_are_bounded_by_bytes(
    redis: tuple[RedisAdmin, str, RespClient],
) -> None:
    _, prefix, resp = redis
    bus = RedisBus(resp, prefix, keep_bytes=1000)
    await bus.restore(1, last_offset=0)
    for n in range(30):
        await bus.publish(draft(1, f"{n:03d}" + "x" * 97))

    assert bus.counters()["unarchived_kept"] < 10
    assert bus.unprotected == 30 - bus.counters()["unarchived_kept"]


# -- rule 8: idempotent send ----------------------------------------------------------------------


async def test_a_client_id_sent_again_gets_the_first_offset_and_stores_nothing(
    redis: tuple[RedisAdmin, str, RespClient],
) -> None:
    client, prefix, resp = redis
    node_a, node_b = RedisBus(resp, prefix), RedisBus(resp, prefix)
    await node_a.restore(1, last_offset=0)

    first = await node_a.publish(draft(1, "hello", client_id="c-1"))
    again = await node_b.publish(draft(1, "hello", client_id="c-1"))  # another node, a retry
    other_user = await node_b.publish(draft(1, "hello", client_id="c-1", user="ann"))
    next_one = await node_a.publish(draft(1, "next", client_id="c-2"))

    assert (again.offset, again.timestamp_ms) == (first.offset, first.timestamp_ms) == (1, T0)
    assert (other_user.offset, next_one.offset) == (2, 3)
    assert await client.xlen(node_a.keys.log(1)) == 3
    assert await client.xlen(node_a.keys.archive) == 3
    assert 0 < await client.ttl(node_a.keys.sent(1, "bob", "c-1")) <= 300


# -- hub Rule 6: the node gives back what Redis lost ----------------------------------------------


@pytest.fixture
async def archive() -> AsyncIterator[SqliteArchive]:
    db = await SqliteDatabase.open(":memory:")
    try:
        yield SqliteArchive(db)
    finally:
        await db.aclose()


async def joined_hub(
    bus: RedisBus, archive: SqliteArchive, nursery: trio.Nursery, room_id: int
) -> tuple[Hub, FakeMember]:
    hub = Hub(bus, archive, cache_size=256)
    await nursery.start(bus.serve, hub)
    member = FakeMember("m1")
    session, seat = await hub.attach(room_id, member)
    hub.go_live(session, seat, sent_up_to=session.last_offset)
    return hub, member


async def test_after_a_wipe_the_hub_restores_the_counter_and_the_log_from_its_session(
    redis: tuple[RedisAdmin, str, RespClient], archive: SqliteArchive, nursery: trio.Nursery
) -> None:
    client, prefix, resp = redis
    bus = RedisBus(resp, prefix)
    await bus.restore(1, last_offset=0)
    hub, member = await joined_hub(bus, archive, nursery, 1)
    published = [await bus.publish(draft(1, f"m{n}")) for n in range(10)]
    assert await member.until(10) == list(range(1, 11))

    await lose_room(client, bus, 1)
    await hub.resubscribed()  # what the bus calls once its connection is back

    assert await bus.last_offset(1) == 10
    assert await bus.read_log(1, after_offset=0, limit=100) == published
    assert (await bus.publish(draft(1, "after"))).offset == 11
    assert await member.until(11) == list(range(1, 12))  # no offset dropped as a duplicate


async def test_a_publish_after_a_rollback_restores_the_room_before_it_continues(
    redis: tuple[RedisAdmin, str, RespClient], archive: SqliteArchive, nursery: trio.Nursery
) -> None:
    client, prefix, resp = redis
    bus = RedisBus(resp, prefix)
    await bus.restore(1, last_offset=0)
    hub, member = await joined_hub(bus, archive, nursery, 1)
    published = [await bus.publish(draft(1, f"m{n}")) for n in range(10)]
    await member.until(10)

    await rewind_room(client, bus, published[:4])
    try:
        await bus.publish(draft(1, "after"))
    except errors.OffsetUnknown:  # what RoomConnection.send does
        await hub.restore(1)
        message = await bus.publish(draft(1, "after"))

    assert message.offset == 11
    assert await bus.read_log(1, after_offset=0, limit=100) == [*published, message]
    assert await member.until(11) == list(range(1, 12))


async def test_history_reads_holes_in_the_log_from_the_archive(
    redis: tuple[RedisAdmin, str, RespClient], archive: SqliteArchive
) -> None:
    _, prefix, resp = redis
    bus = RedisBus(resp, prefix)
    await bus.restore(1, last_offset=0)
    published = [await bus.publish(draft(1, f"m{n}")) for n in range(10)]
    await archive.store([m.document for m in published])
    for offset in (4, 5, 8):  # lost by Redis, written back to the archive
        await command(b"XDEL", bus.keys.log(1), f"{offset}-0".encode())
    hub = Hub(bus, archive, cache_size=256)

    assert await hub.load_range(1, 0, 10) == published
    assert await hub.load_range(1, 3, 9) == published[3:9]


async def test_a_room_without_a_session_continues_above_the_archive(
    redis: tuple[RedisAdmin, str, RespClient], archive: SqliteArchive
) -> None:
    _, prefix, resp = redis
    bus = RedisBus(resp, prefix, settle_s=0)
    await archive.store([ChatMessage(1, n, "bob", f"m{n}", T0).document for n in range(1, 31)])
    hub = Hub(bus, archive, cache_size=256)

    assert await hub.head(1) == 30
    assert (await bus.publish(draft(1, "next"))).offset == 31


async def test_a_history_the_archive_does_not_hold_yet_is_refused_not_cut(
    redis: tuple[RedisAdmin, str, RespClient], archive: SqliteArchive
) -> None:
    client, prefix, resp = redis
    bus = RedisBus(resp, prefix, room_log_length=10)
    await bus.restore(1, last_offset=0)
    published = [await bus.publish(draft(1, f"m{n}")) for n in range(300)]
    first_logged = (await bus.read_log(1, after_offset=0, limit=1))[0].offset
    assert first_logged > 100  # the log trimmed the oldest: they come from the archive
    hub = Hub(bus, archive, cache_size=256)

    await archive.store([m.document for m in published[:50]])  # the archiver lags
    with pytest.raises(errors.Unavailable) as refused:
        await hub.load_range(1, 0, 300)
    assert refused.value.retry_after_s > 0
    await archive.store([m.document for m in published[50:]])  # it caught up
    assert await hub.load_range(1, 0, 300) == published

    assert hub.history_holes == 0

    db = await SqliteDatabase.open(":memory:")  # an archive that lost 260..269 for good
    try:
        partial = SqliteArchive(db)
        await partial.store([m.document for m in published if not 260 <= m.offset < 270])
        await client.delete([bus.keys.log(1)])
        lossy = Hub(bus, partial, cache_size=256)
        with pytest.raises(errors.Unavailable):
            await lossy.load_range(1, 250, 300)
        lossy.hole_wait_s = 0  # waited long enough: served without them, counted
        assert await lossy.load_range(1, 250, 300) == published[250:259] + published[269:]
        assert lossy.history_holes == 10
    finally:
        await db.aclose()
