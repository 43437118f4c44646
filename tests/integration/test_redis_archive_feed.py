"""RedisArchiveFeed against a real Redis, beyond the ArchiveFeed contract: the stream does not
grow, the lease names its reader and expires, only the lease's holder trims, a reader counts
its lease lost before Redis could give it away, every turn of reading is logged from its start
to its end, a stream that vanished is read again, a foreign entry does not block the feed,
failures are ``Unavailable``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from chatnode.adapters.redis import RedisArchiveFeed, RespClient
from chatnode.core import errors
from chatnode.core.models import ChatMessage, Draft
from tests.contracts.conftest import redis_test_clients
from tests.contracts.harness import require_service
from tests.redis_support import OpeningRedisBus, RedisAdmin

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000


def draft(room_id: int, text: str) -> Draft:
    return Draft(room_id=room_id, user="bob", text=text, timestamp_ms=T0)


async def publish_some(bus: OpeningRedisBus, count: int) -> None:
    for n in range(count):
        await bus.publish(draft(1, f"m{n}"))


async def reading(feed: RedisArchiveFeed) -> RedisArchiveFeed:
    """``feed``, once it took the lease of an empty stream."""
    assert await feed.take(max_count=10, wait_ms=0) == []
    assert feed.reading
    return feed


@pytest.fixture
async def redis() -> AsyncIterator[tuple[RedisAdmin, str, OpeningRedisBus, RespClient]]:
    """An admin client, the test's key prefix, a bus publishing under it and a client for
    the feeds."""
    url = require_service("CHATNODE_TEST_REDIS_URL")
    async with redis_test_clients(url) as (clients, prefix):
        publisher = RespClient.from_url(url, timeout_s=5.0)
        feeds = RespClient.from_url(url, timeout_s=5.0)
        try:
            yield clients[0], prefix, OpeningRedisBus(publisher, prefix), feeds
        finally:
            await publisher.aclose()
            await feeds.aclose()


async def test_acknowledged_entries_leave_the_stream_below_the_oldest_unacknowledged(
    redis: tuple[RedisAdmin, str, OpeningRedisBus, RespClient],
) -> None:
    client, prefix, bus, feeds = redis
    feed = RedisArchiveFeed(feeds, prefix, reads=feeds, consumer="n1")
    await publish_some(bus, 6)
    first = await feed.take(max_count=2, wait_ms=100)
    second = await feed.take(max_count=2, wait_ms=100)
    third = await feed.take(max_count=2, wait_ms=100)

    await feed.ack(second)
    await feed.ack(third)
    assert await client.xlen(bus.keys.archive) == 6  # the first still waits for the archive
    await feed.ack(first[1:])
    await feed.ack(first[:1])
    assert await client.xlen(bus.keys.archive) == 0


async def test_an_ack_does_not_wait_behind_a_blocked_read(
    redis: tuple[RedisAdmin, str, OpeningRedisBus, RespClient],
) -> None:
    client, prefix, bus, feeds = redis
    reads = RespClient(feeds.address, timeout_s=5.0)
    feed = await reading(RedisArchiveFeed(feeds, prefix, consumer="n1", reads=reads))
    try:
        await publish_some(bus, 3)
        batch = await feed.take(max_count=10, wait_ms=100)
        assert len(batch) == 3
        async with trio.open_nursery() as nursery:

            async def read_on() -> None:
                assert await feed.take(max_count=10, wait_ms=2000) == []

            nursery.start_soon(read_on)
            await trio.testing.wait_all_tasks_blocked()  # the XREAD ... BLOCK 2000 is sent
            with trio.fail_after(1):
                await feed.ack(batch)
                assert await client.xlen(bus.keys.archive) == 0
            nursery.cancel_scope.cancel()
    finally:
        await reads.aclose()


async def test_the_lease_names_the_reader_and_is_released(
    redis: tuple[RedisAdmin, str, OpeningRedisBus, RespClient],
) -> None:
    client, prefix, bus, feeds = redis
    feed = await reading(RedisArchiveFeed(feeds, prefix, reads=feeds, consumer="n1", lease_ms=5000))

    assert await client.get(bus.keys.archive_lease) == b"n1"
    assert 0 < await client.pttl(bus.keys.archive_lease) <= 5000
    await feed.release()
    assert await client.get(bus.keys.archive_lease) is None
    assert not feed.reading


async def test_a_wait_longer_than_the_clients_timeout_is_cut_to_fit_it(
    redis: tuple[RedisAdmin, str, OpeningRedisBus, RespClient],
) -> None:
    _, prefix, _bus, _ = redis
    client = RespClient.from_url(require_service("CHATNODE_TEST_REDIS_URL"), timeout_s=0.5)
    try:
        feed = RedisArchiveFeed(client, prefix, reads=client, consumer="n1")
        # XREAD BLOCK 600 would outlive the client's 0.5 s reply timeout: Unavailable
        assert await feed.take(max_count=10, wait_ms=600) == []
        assert await feed.take(max_count=10, wait_ms=600) == []
    finally:
        await client.aclose()


async def test_a_reader_that_lost_its_lease_stops_reading(
    redis: tuple[RedisAdmin, str, OpeningRedisBus, RespClient],
) -> None:
    client, prefix, bus, feeds = redis
    feed = await reading(RedisArchiveFeed(feeds, prefix, reads=feeds, consumer="n1", lease_ms=300))
    await client.set(bus.keys.archive_lease, "n2", px=5000)  # n1 stalled; n2 took over
    await bus.publish(draft(1, "for n2"))

    await trio.sleep(0.1)  # a third of the lease: n1 renews at its next take
    assert await feed.take(max_count=10, wait_ms=0) == []
    assert not feed.reading
    await feed.release()  # not ours: left alone
    assert await client.get(bus.keys.archive_lease) == b"n2"


async def test_a_reader_whose_batch_is_not_archived_in_time_hands_over(
    redis: tuple[RedisAdmin, str, OpeningRedisBus, RespClient],
) -> None:
    client, prefix, bus, feeds = redis
    stuck = RedisArchiveFeed(feeds, prefix, reads=feeds, consumer="n1", lease_ms=300)
    other = RedisArchiveFeed(feeds, prefix, reads=feeds, consumer="n2", lease_ms=300)
    message = await bus.publish(draft(1, "its Elasticsearch is down"))
    taken = await stuck.take(max_count=10, wait_ms=100)
    assert await other.take(max_count=10, wait_ms=0) == []

    await trio.sleep(0.4)  # the batch waited longer than the lease
    assert await stuck.take(max_count=10, wait_ms=0) == []  # released, takes nothing
    assert await client.get(bus.keys.archive_lease) is None
    assert [e.message for e in await other.take(max_count=10, wait_ms=100)] == [message]

    await stuck.ack(taken)  # stored at last: the turn is over, the other node stores it again
    assert await client.xlen(bus.keys.archive) == 1
    assert await stuck.take(max_count=10, wait_ms=0) == []  # gives the others a lease's time
    assert not stuck.reading


async def test_an_ack_never_trims_when_the_lease_is_another_nodes(
    redis: tuple[RedisAdmin, str, OpeningRedisBus, RespClient],
) -> None:
    client, prefix, bus, feeds = redis
    feed = RedisArchiveFeed(feeds, prefix, reads=feeds, consumer="n1", lease_ms=60_000)
    await publish_some(bus, 3)
    taken = await feed.take(max_count=10, wait_ms=100)
    await client.set(bus.keys.archive_lease, "n2", px=60_000)  # n1 stalled; n2 took over

    await feed.ack(taken)  # n1 still believes it reads: the trim script checks the lease

    assert await client.xlen(bus.keys.archive) == 3
    assert not feed.reading
    assert await feed.keep_reading() is False


async def test_a_reader_counts_its_lease_lost_once_it_may_have_expired(
    redis: tuple[RedisAdmin, str, OpeningRedisBus, RespClient], caplog: pytest.LogCaptureFixture
) -> None:
    client, prefix, bus, feeds = redis
    feed = RedisArchiveFeed(feeds, prefix, reads=feeds, consumer="n1", lease_ms=300)
    await publish_some(bus, 2)
    taken = await feed.take(max_count=1, wait_ms=100)
    await feed.ack(taken)

    await trio.sleep(0.35)  # no call for longer than the lease: a frozen process

    assert await feed.keep_reading() is False  # without asking Redis, which may disagree
    assert not feed.reading
    assert any("n1 lost the lease: it expired" in r.getMessage() for r in caplog.records)
    assert await client.xlen(bus.keys.archive) == 1  # the untaken one stays
    assert [e.message.text for e in await feed.take(max_count=10, wait_ms=100)] == ["m1"]


async def test_each_turn_is_logged_from_its_start_to_its_end(
    redis: tuple[RedisAdmin, str, OpeningRedisBus, RespClient], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chatnode.adapters.redis.archive_feed")
    _, prefix, bus, feeds = redis
    feed = RedisArchiveFeed(feeds, prefix, reads=feeds, consumer="n1", lease_ms=300)
    await publish_some(bus, 1)
    assert len(await feed.take(max_count=10, wait_ms=100)) == 1
    await trio.sleep(0.35)
    assert await feed.keep_reading() is False  # handed over: its batch waited too long
    await trio.sleep(0.35)  # it asks again a lease later
    assert len(await feed.take(max_count=10, wait_ms=100)) == 1
    await feed.release()

    turns = [
        r.getMessage().split("n1 ", 1)[1].split(":")[0]
        for r in caplog.records
        if r.name == "chatnode.adapters.redis.archive_feed"
    ]
    assert turns == [
        "reads the archive stream",
        "hands the archive stream over",
        "reads the archive stream",
        "releases the archive stream",
    ]


async def test_a_waiting_node_asks_for_the_lease_every_tenth_of_it(
    redis: tuple[RedisAdmin, str, OpeningRedisBus, RespClient],
) -> None:
    _, prefix, _bus, feeds = redis
    calls: list[object] = []

    class Counting:
        async def call(self, *args: object) -> object:
            calls.append(args[0])
            return await feeds.call(*args)  # type: ignore[arg-type]

    reader = RedisArchiveFeed(feeds, prefix, reads=feeds, consumer="n1", lease_ms=60_000)
    counting = Counting()
    waiting = RedisArchiveFeed(
        counting,  # type: ignore[arg-type]
        prefix,
        reads=counting,  # type: ignore[arg-type]
        consumer="n2",
        lease_ms=60_000,
    )
    assert await reader.take(max_count=10, wait_ms=0) == []

    for _ in range(5):  # the archiver's loop: a take every wait_ms
        assert await waiting.take(max_count=10, wait_ms=1) == []

    assert len(calls) == 1  # one EVALSHA of the lease script; the next is due 6 s later


async def test_the_consumer_group_of_an_older_chatnode_is_dropped(
    redis: tuple[RedisAdmin, str, OpeningRedisBus, RespClient],
) -> None:
    _, prefix, bus, feeds = redis
    message = await bus.publish(draft(1, "taken by an old node, never acknowledged"))
    await feeds.call("XGROUP", "CREATE", bus.keys.archive, "archivers", "0")
    await feeds.call("XREADGROUP", "GROUP", "archivers", "old", "STREAMS", bus.keys.archive, ">")

    taken = await RedisArchiveFeed(feeds, prefix, reads=feeds, consumer="n1").take(
        max_count=10, wait_ms=0
    )

    assert [e.message for e in taken] == [message]
    assert await feeds.call("XINFO", "GROUPS", bus.keys.archive) == []


async def test_a_node_restarted_under_the_same_name_reads_at_once(
    redis: tuple[RedisAdmin, str, OpeningRedisBus, RespClient],
) -> None:
    _, prefix, bus, feeds = redis
    before = RedisArchiveFeed(feeds, prefix, reads=feeds, consumer="n1", lease_ms=60_000)
    message = await bus.publish(draft(1, "taken, never acknowledged"))
    assert [e.message for e in await before.take(max_count=10, wait_ms=100)] == [message]

    again = RedisArchiveFeed(
        feeds, prefix, reads=feeds, consumer="n1", lease_ms=60_000
    )  # kill -9, start

    assert [e.message for e in await again.take(max_count=10, wait_ms=100)] == [message]


async def test_a_feed_started_late_gets_what_was_published_before(
    redis: tuple[RedisAdmin, str, OpeningRedisBus, RespClient],
) -> None:
    _, prefix, bus, feeds = redis
    published = [await bus.publish(draft(1, f"m{n}")) for n in range(3)]

    taken = await RedisArchiveFeed(feeds, prefix, reads=feeds, consumer="late").take(
        max_count=10, wait_ms=100
    )

    assert [e.message for e in taken] == published


async def test_a_stream_that_vanished_is_read_again(
    redis: tuple[RedisAdmin, str, OpeningRedisBus, RespClient],
) -> None:
    client, prefix, bus, feeds = redis
    feed = RedisArchiveFeed(feeds, prefix, reads=feeds, consumer="n1", lease_ms=300)
    await bus.publish(draft(1, "before"))
    assert len(await feed.take(max_count=10, wait_ms=0)) == 1

    # A Redis restarted without persistence: the stream and the lease are gone. The next
    # renewal takes the lease again and reads from the start (an entry made in the same
    # millisecond as the last one read has no later id).
    await client.delete([bus.keys.archive, bus.keys.archive_lease])
    message = await bus.publish(draft(1, "after"))
    await trio.sleep(0.1)  # a third of the lease

    assert [e.message for e in await feed.take(max_count=10, wait_ms=100)] == [message]


async def test_a_malformed_entry_is_dropped_not_handed_out(
    redis: tuple[RedisAdmin, str, OpeningRedisBus, RespClient],
) -> None:
    client, prefix, bus, feeds = redis
    feed = RedisArchiveFeed(feeds, prefix, reads=feeds, consumer="n1")
    await client.xadd(bus.keys.archive, {"garbage": "1"})
    message = await bus.publish(draft(1, "real"))

    taken = await feed.take(max_count=10, wait_ms=100)

    assert [e.message for e in taken] == [message]
    await feed.ack(taken)
    assert await client.xlen(bus.keys.archive) == 0  # the garbage went with its neighbour


async def test_entries_an_older_chatnode_wrote_are_decoded_by_name_and_checked(
    redis: tuple[RedisAdmin, str, OpeningRedisBus, RespClient],
) -> None:
    client, prefix, bus, feeds = redis
    feed = RedisArchiveFeed(feeds, prefix, reads=feeds, consumer="n1")
    fields = {"r": "7", "o": "3", "u": "zoë", "t": 'héllo \n"x"', "ts": str(T0)}  # before d
    await client.xadd(bus.keys.archive, dict(reversed(fields.items())))  # another order
    for bad in (
        dict(fields, o="x3"),  # not a number
        dict(fields, u=b"\xff"),  # not UTF-8
        {k: v for k, v in fields.items() if k != "ts"},  # a field missing
        dict({"x": "1"}, **{k: v for k, v in fields.items() if k != "r"}),  # one renamed
        dict(fields, extra="1"),  # one more (a later writer's): still a message
    ):
        await client.xadd(bus.keys.archive, bad)

    taken = await feed.take(max_count=10, wait_ms=100)

    expected = ChatMessage(7, 3, "zoë", 'héllo \n"x"', T0)
    assert [e.message for e in taken] == [expected, expected]
    await feed.ack(taken)
    assert await client.xlen(bus.keys.archive) == 0  # the dropped ones were acknowledged


async def test_an_unreachable_redis_is_unavailable() -> None:
    nowhere = RespClient.from_url("redis://127.0.0.1:1/0", timeout_s=1.0)
    feed = RedisArchiveFeed(nowhere, "nowhere", reads=nowhere, consumer="n1")
    with pytest.raises(errors.Unavailable):
        await feed.take(max_count=10, wait_ms=0)
