"""The ArchiveFeed contract: every published message is handed out until acknowledged.

Each feed made by ``feed_rig.new_feed(consumer)`` reads as one consumer (one node). One
consumer reads at a time: the others take nothing while it may still acknowledge what it took.
Once it was silent for ``claim_idle_ms`` (it died), released the feed, or handed it over (a
batch of it waited ``claim_idle_ms``), another consumer reads on and is handed what it left
unacknowledged; the turn of the first one is over, and what it acknowledges late changes
nothing. A reader that keeps reading (``keep_reading``) keeps its turn. Acknowledged messages
are not handed out again, except those acknowledged after an older one that was not, to the
next reader. Time passes through the rig's ``advance``; waits for traffic use ``wait_ms``,
never a sleep.
"""

from __future__ import annotations

import trio
import trio.testing

from chatnode.core.models import ArchiveEntry, ChatMessage, Draft
from chatnode.core.ports import ArchiveFeed

from .harness import FeedRig

T0 = 1_700_000_000_000
SHORT_WAIT_MS = 20


def draft(room_id: int, text: str, user: str = "bob") -> Draft:
    return Draft(room_id=room_id, user=user, text=text, timestamp_ms=T0)


async def publish_some(rig: FeedRig, rooms: list[int]) -> list[ChatMessage]:
    return [await rig.publish(draft(room, f"m{n}")) for n, room in enumerate(rooms)]


async def take_all(feed: ArchiveFeed, count: int, *, batch: int = 100) -> list[ArchiveEntry]:
    """Take until ``count`` entries came (the test deadline bounds it)."""
    taken: list[ArchiveEntry] = []
    while len(taken) < count:
        taken += await feed.take(max_count=batch, wait_ms=1000)
    return taken


def by_key(entries: list[ArchiveEntry]) -> list[ChatMessage]:
    return sorted((e.message for e in entries), key=lambda m: (m.room_id, m.offset))


async def test_every_published_message_is_taken_once(feed_rig: FeedRig) -> None:
    feed = feed_rig.new_feed("node-a")
    published = await publish_some(feed_rig, [1, 2, 1, 3, 1])

    taken = await take_all(feed, len(published))

    assert by_key(taken) == sorted(published, key=lambda m: (m.room_id, m.offset))
    assert len({e.ack_id for e in taken}) == len(taken)
    assert await feed.take(max_count=100, wait_ms=SHORT_WAIT_MS) == []


async def test_take_returns_at_most_max_count(feed_rig: FeedRig) -> None:
    feed = feed_rig.new_feed("node-a")
    published = await publish_some(feed_rig, [1] * 5)

    first = await feed.take(max_count=2, wait_ms=1000)
    rest = await take_all(feed, len(published) - len(first), batch=2)

    assert 1 <= len(first) <= 2
    assert by_key(first + rest) == published


async def test_a_waiting_take_returns_when_a_message_arrives(feed_rig: FeedRig) -> None:
    feed = feed_rig.new_feed("node-a")
    got: list[ArchiveEntry] = []
    async with trio.open_nursery() as nursery:

        async def taker() -> None:
            got.extend(await feed.take(max_count=10, wait_ms=4000))

        nursery.start_soon(taker)
        await trio.testing.wait_all_tasks_blocked()
        message = await feed_rig.publish(draft(1, "wake up"))

    # The taker may have started waiting after the publish: then it took the message at once.
    assert [e.message for e in got] == [message]


async def test_one_consumer_reads_at_a_time(feed_rig: FeedRig) -> None:
    a, b = feed_rig.new_feed("node-a"), feed_rig.new_feed("node-b")
    published = await publish_some(feed_rig, [1, 2] * 6)

    taken_a = await a.take(max_count=5, wait_ms=1000)
    assert await b.take(max_count=5, wait_ms=SHORT_WAIT_MS) == []
    rest = await take_all(a, len(published) - len(taken_a), batch=5)

    assert not {e.ack_id for e in taken_a} & {e.ack_id for e in rest}
    assert by_key(taken_a + rest) == sorted(published, key=lambda m: (m.room_id, m.offset))
    assert await b.take(max_count=5, wait_ms=SHORT_WAIT_MS) == []


async def test_a_released_feed_is_read_on_at_once(feed_rig: FeedRig) -> None:
    a, b = feed_rig.new_feed("node-a"), feed_rig.new_feed("node-b")
    published = await publish_some(feed_rig, [1, 2, 3])
    taken = await take_all(a, len(published))
    await a.ack(taken[:1])

    await a.release()
    later = await publish_some(feed_rig, [4])
    taken_by_b = await take_all(b, len(published) - 1 + len(later))

    assert by_key(taken_by_b) == by_key(taken[1:]) + later
    assert await a.take(max_count=5, wait_ms=SHORT_WAIT_MS) == []


async def test_acknowledged_entries_are_gone(feed_rig: FeedRig) -> None:
    feed, other = feed_rig.new_feed("node-a"), feed_rig.new_feed("node-b")
    published = await publish_some(feed_rig, [1, 1, 2])
    taken = await take_all(feed, len(published))

    await feed.ack(taken)
    await feed_rig.advance(2 * feed_rig.claim_idle_ms / 1000)

    assert await other.take(max_count=100, wait_ms=SHORT_WAIT_MS) == []
    assert await feed.take(max_count=100, wait_ms=SHORT_WAIT_MS) == []


async def test_acknowledging_nothing_or_twice_is_harmless(feed_rig: FeedRig) -> None:
    feed = feed_rig.new_feed("node-a")
    taken = await take_all(feed, len(await publish_some(feed_rig, [1])))

    await feed.ack([])
    await feed.ack(taken)
    await feed.ack(taken)

    assert await feed.take(max_count=100, wait_ms=SHORT_WAIT_MS) == []


async def test_unacknowledged_entries_of_a_dead_consumer_are_taken_over(
    feed_rig: FeedRig,
) -> None:
    dead, survivor = feed_rig.new_feed("node-dead"), feed_rig.new_feed("node-alive")
    published = await publish_some(feed_rig, [1, 2, 1, 1])
    taken_by_dead = await take_all(dead, len(published))
    await dead.ack(taken_by_dead[:1])  # it archived one batch of one, then died

    assert await survivor.take(max_count=100, wait_ms=SHORT_WAIT_MS) == []  # not idle yet
    await feed_rig.advance(1.5 * feed_rig.claim_idle_ms / 1000)
    taken_over = await take_all(survivor, len(published) - 1)

    assert by_key(taken_over) == by_key(taken_by_dead[1:])
    await survivor.ack(taken_over)
    await feed_rig.advance(1.5 * feed_rig.claim_idle_ms / 1000)
    assert await survivor.take(max_count=100, wait_ms=SHORT_WAIT_MS) == []


async def test_new_messages_still_flow_while_entries_are_pending(feed_rig: FeedRig) -> None:
    feed = feed_rig.new_feed("node-a")
    first = await take_all(feed, len(await publish_some(feed_rig, [1, 1])))

    later = await publish_some(feed_rig, [2])
    taken = await take_all(feed, 1)

    assert [e.message for e in taken] == later
    assert not {e.ack_id for e in first} & {e.ack_id for e in taken}


async def test_acknowledged_out_of_order_nothing_unacknowledged_is_lost(
    feed_rig: FeedRig,
) -> None:
    dead, survivor = feed_rig.new_feed("node-dead"), feed_rig.new_feed("node-alive")
    published = await publish_some(feed_rig, [1, 1, 1, 2, 2, 2])
    first = await take_all(dead, 3, batch=3)
    second = await take_all(dead, 3, batch=3)
    await dead.ack(second)  # the second bulk was stored first, then the node died

    await feed_rig.advance(1.5 * feed_rig.claim_idle_ms / 1000)
    taken_over = await take_all(survivor, len(first))

    assert by_key(taken_over)[: len(first)] == by_key(first)  # maybe the second again too
    assert set(by_key(taken_over)) <= set(published)


async def test_a_consumer_that_never_read_is_not_reading(feed_rig: FeedRig) -> None:
    await publish_some(feed_rig, [1])

    assert await feed_rig.new_feed("node-a").keep_reading() is False


async def test_a_reader_that_keeps_reading_keeps_its_turn(feed_rig: FeedRig) -> None:
    a, b = feed_rig.new_feed("node-a"), feed_rig.new_feed("node-b")
    taken = await take_all(a, len(await publish_some(feed_rig, [1, 2])))
    await a.ack(taken)
    later = await publish_some(feed_rig, [3])

    for _ in range(20):  # twice the lease, with nothing taken or acknowledged meanwhile
        assert await a.keep_reading()
        assert await b.take(max_count=10, wait_ms=0) == []
        await feed_rig.advance(feed_rig.claim_idle_ms / 10_000)

    assert [e.message for e in await take_all(a, 1)] == later


async def test_a_reader_whose_batch_waits_too_long_hands_over_and_forgets_it(
    feed_rig: FeedRig,
) -> None:
    a, b = feed_rig.new_feed("node-a"), feed_rig.new_feed("node-b")
    published = await publish_some(feed_rig, [1, 2, 1])
    stuck = await take_all(a, len(published))
    assert await a.keep_reading()

    await feed_rig.advance(1.2 * feed_rig.claim_idle_ms / 1000)  # its archive is down
    assert await a.keep_reading() is False  # handed over: b reads on at once
    taken_over = await take_all(b, len(published))
    await a.ack(stuck)  # its store returned after all: too late, the turn is over

    assert by_key(taken_over) == by_key(stuck)
    assert await a.take(max_count=10, wait_ms=SHORT_WAIT_MS) == []
    assert await a.keep_reading() is False
    await b.ack(taken_over)
    assert await b.take(max_count=10, wait_ms=SHORT_WAIT_MS) == []


async def test_an_acknowledgement_after_the_turn_ended_leaves_the_entries_to_the_next_reader(
    feed_rig: FeedRig,
) -> None:
    stalled, next_reader = feed_rig.new_feed("node-a"), feed_rig.new_feed("node-b")
    published = await publish_some(feed_rig, [1, 1, 1, 1])
    taken = await take_all(stalled, len(published))

    await feed_rig.advance(1.5 * feed_rig.claim_idle_ms / 1000)  # stalled past its lease
    first = await next_reader.take(max_count=1, wait_ms=1000)  # took over, read one so far
    await stalled.ack(taken)  # the stalled reader wakes up: its trim would drop the rest
    rest = await next_reader.take(max_count=10, wait_ms=1000)  # there at once

    assert by_key(first + rest) == by_key(taken)
