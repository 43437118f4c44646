"""The archiver's rules (``chatnode/node/archiver.py``) against an in-memory feed and archive
that record what happened, in order: acknowledged only once stored, waiting while the archive
is down, keeping as dead letters what the archive refuses or holds another message for, the
next batch taken while one is stored, a drain that leaves nothing taken behind, and archiving
only while the feed reads."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import attrs
import pytest
import trio
import trio.testing

from chatnode.core.errors import Unavailable
from chatnode.core.models import ArchiveEntry, ChatMessage, DeadLetter, Refusal, RefusalKind
from chatnode.core.ports import ArchiveRefused
from chatnode.node.archiver import Archiver

T0 = 1_700_000_000_000


def entries(first: int, count: int) -> list[ArchiveEntry]:
    return [
        ArchiveEntry(
            f"{offset}-0", ChatMessage(1, offset, "bob", f"m{offset}", T0 + offset).document
        )
        for offset in range(first, first + count)
    ]


@attrs.define
class Feed:
    """Hands out ``waiting`` in order while ``reading``; records takes and acks in
    ``events``, and when ``keep_reading`` was called in ``kept``."""

    events: list[str]
    waiting: list[ArchiveEntry] = attrs.Factory(list)
    acked: list[str] = attrs.Factory(list)
    takes: int = 0
    ack_failures: int = 0
    released: bool = False
    reading: bool = True
    kept: list[float] = attrs.Factory(list)
    arrived: trio.Event = attrs.Factory(trio.Event)
    _acked_changed: trio.Event = attrs.Factory(trio.Event)

    async def wait_acked(self, count: int) -> None:
        while len(self.acked) < count:
            await self._acked_changed.wait()
            self._acked_changed = trio.Event()

    async def take(self, *, max_count: int, wait_ms: int) -> list[ArchiveEntry]:
        self.takes += 1
        if not self.reading:
            await trio.sleep(wait_ms / 1000)
            return []
        if not self.waiting:
            with trio.move_on_after(wait_ms / 1000):
                await self.arrived.wait()
        batch, self.waiting = self.waiting[:max_count], self.waiting[max_count:]
        self.events.append(f"take {len(batch)}")
        await trio.lowlevel.checkpoint()
        return batch

    async def ack(self, batch: Sequence[ArchiveEntry]) -> None:
        await trio.lowlevel.checkpoint()
        if self.ack_failures:
            self.ack_failures -= 1
            raise Unavailable("redis down")
        self.acked += [e.ack_id for e in batch]
        self.events.append(f"ack {len(batch)}")
        self._acked_changed.set()

    async def keep_reading(self) -> bool:
        await trio.lowlevel.checkpoint()
        self.kept.append(trio.current_time())
        return self.reading

    async def release(self) -> None:
        await trio.lowlevel.checkpoint()
        self.released = True


@attrs.define
class Archive:
    """Stores into ``stored`` (first version wins); fails ``failures`` times first; refuses
    ``refuse`` (offsets) as unindexable, and a message that differs from the stored one as a
    conflict; a store waits for ``gate`` when one is set. Keeps dead letters in
    ``letters``, failing ``keep_failures`` times first."""

    events: list[str]
    stored: dict[int, ChatMessage] = attrs.Factory(dict)
    failures: int = 0
    refuse: frozenset[int] = frozenset()
    gate: trio.Event | None = None
    calls: int = 0
    cancelled: int = 0
    letters: list[DeadLetter] = attrs.Factory(list)
    keep_failures: int = 0

    async def store(self, documents: Sequence[bytes]) -> None:
        messages = [ChatMessage.from_document(document) for document in documents]
        self.calls += 1
        self.events.append(f"store {len(messages)}")
        try:
            if self.gate is not None:
                await self.gate.wait()
            await trio.lowlevel.checkpoint()
        except trio.Cancelled:
            self.cancelled += 1
            raise
        if self.failures:
            self.failures -= 1
            raise Unavailable("es down")
        refused: list[Refusal] = []
        for m in messages:
            if m.offset in self.refuse:
                refused.append(
                    Refusal(RefusalKind.UNINDEXABLE, m.document, "HTTP 400 document_parsing")
                )
            elif self.stored.setdefault(m.offset, m) != m:
                refused.append(
                    Refusal(
                        RefusalKind.CONFLICT,
                        m.document,
                        "HTTP 409: a different message",
                        self.stored[m.offset].document,
                    )
                )
        if refused:
            raise ArchiveRefused(refused)
        self.events.append(f"stored {len(messages)}")

    async def keep_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        await trio.lowlevel.checkpoint()
        if self.keep_failures:
            self.keep_failures -= 1
            raise Unavailable("es down")
        self.letters += [d for d in letters if d not in self.letters]
        self.events.append(f"kept {len(letters)}")


@attrs.define
class Rig:
    feed: Feed
    archive: Archive
    archiver: Archiver


@pytest.fixture
def rig() -> Rig:
    events: list[str] = []
    feed, archive = Feed(events), Archive(events)
    archiver = Archiver(feed, archive, batch_size=10, max_in_flight=2)  # type: ignore[arg-type]
    return Rig(feed, archive, archiver)


async def archive_all(rig: Rig, count: int) -> None:
    """Run the archiver until ``count`` entries were acknowledged, then drain it."""
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.archiver.run)
        await rig.feed.wait_acked(count)
        await rig.archiver.drain()


async def test_every_entry_is_stored_then_acknowledged(
    rig: Rig, autojump_clock: trio.testing.MockClock
) -> None:
    rig.feed.waiting = entries(1, 25)

    await archive_all(rig, 25)

    assert sorted(rig.archive.stored) == list(range(1, 26))
    assert rig.feed.acked == [f"{n}-0" for n in range(1, 26)]
    assert rig.archiver.archived == 25
    # Each batch's ack comes after the archive answered for that batch.
    stores = [e for e in rig.feed.events if e.startswith(("stored", "ack"))]
    assert stores == ["stored 10", "ack 10", "stored 10", "ack 10", "stored 5", "ack 5"]


async def test_batches_are_stored_side_by_side_while_the_next_is_taken(
    rig: Rig, autojump_clock: trio.testing.MockClock
) -> None:
    rig.feed.waiting = entries(1, 30)
    rig.archive.gate = trio.Event()

    async with trio.open_nursery() as nursery:
        await nursery.start(rig.archiver.run)
        await trio.testing.wait_all_tasks_blocked()
        # Two stores hang (max_in_flight); the third batch was taken and waits for a slot.
        assert sorted(rig.feed.events) == ["store 10"] * 2 + ["take 10"] * 3
        assert rig.feed.acked == []
        rig.archive.gate.set()
        await rig.feed.wait_acked(30)
        await rig.archiver.drain()

    assert sorted(rig.archive.stored) == list(range(1, 31))


async def test_an_unavailable_archive_is_waited_for_and_nothing_is_lost(
    rig: Rig, autojump_clock: trio.testing.MockClock
) -> None:
    rig.feed.waiting = entries(1, 10)
    rig.archive.failures = 4

    await archive_all(rig, 10)

    assert rig.archive.calls == 5
    assert rig.feed.events.index("ack 10") > rig.feed.events.index("stored 10")
    assert sorted(rig.archive.stored) == list(range(1, 11))
    assert rig.archiver.failures == 4


async def test_a_failed_ack_is_retried_without_storing_again(
    rig: Rig, autojump_clock: trio.testing.MockClock
) -> None:
    rig.feed.waiting = entries(1, 10)
    rig.feed.ack_failures = 2

    await archive_all(rig, 10)

    assert rig.archive.calls == 1
    assert rig.feed.acked == [f"{n}-0" for n in range(1, 11)]
    assert rig.archiver.failures == 2


async def test_refused_messages_are_dead_lettered_not_retried_forever(
    rig: Rig, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    rig.feed.waiting = entries(1, 10)
    rig.archive.refuse = frozenset({3, 7})

    await archive_all(rig, 10)

    assert rig.archive.calls == 1
    assert sorted(rig.archive.stored) == [1, 2, 4, 5, 6, 8, 9, 10]
    assert rig.feed.acked == [f"{n}-0" for n in range(1, 11)]
    assert (rig.archiver.archived, rig.archiver.refused, rig.archiver.conflicts) == (8, 2, 0)
    dead = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.args[0] for r in dead] == ["1:3", "1:7"]  # type: ignore[index]
    assert '"offset":3,"user":"bob","message":"m3"' in dead[0].getMessage()
    assert [d.refusal.key for d in rig.archive.letters] == ["1:3", "1:7"]
    assert rig.feed.events.index("ack 10") > rig.feed.events.index("kept 2")


async def test_a_different_message_under_a_stored_id_is_kept_logged_and_counted_not_archived(
    rig: Rig, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    before = ChatMessage(1, 4, "alice", "said before the offsets were reused", T0)
    rig.archive.stored[4] = before
    rig.feed.waiting = entries(1, 10)

    await archive_all(rig, 10)

    assert (rig.archiver.archived, rig.archiver.conflicts, rig.archiver.refused) == (9, 1, 0)
    assert rig.archive.stored[4] == before  # the stored version stays
    ours = entries(4, 1)[0].document
    (kept,) = rig.archive.letters
    assert (kept.refusal.kind, kept.refusal.document, kept.refusal.stored) == (
        RefusalKind.CONFLICT,
        ours,
        before.document,
    )
    (logged,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert ours.decode() in logged.getMessage() and before.document.decode() in logged.getMessage()
    assert rig.feed.events.index("ack 10") > rig.feed.events.index("kept 1")


async def test_a_dead_letter_not_kept_is_retried_and_its_batch_not_acknowledged_before(
    rig: Rig, autojump_clock: trio.testing.MockClock
) -> None:
    rig.feed.waiting = entries(1, 10)
    rig.archive.refuse = frozenset({2})
    rig.archive.keep_failures = 3

    await archive_all(rig, 10)

    assert rig.archive.calls == 1  # stored once; keeping the letter retried
    assert [e for e in rig.feed.events if e.startswith(("kept", "ack"))] == ["kept 1", "ack 10"]
    assert (rig.archiver.archived, rig.archiver.refused, rig.archiver.failures) == (9, 1, 3)


async def test_drain_stores_what_was_taken_and_takes_nothing_new(
    rig: Rig, autojump_clock: trio.testing.MockClock
) -> None:
    rig.feed.waiting = entries(1, 10)
    rig.archive.gate = trio.Event()

    async with trio.open_nursery() as nursery:
        await nursery.start(rig.archiver.run)
        await trio.testing.wait_all_tasks_blocked()  # the first store hangs at the gate
        rig.feed.waiting += entries(11, 5)  # arrives while the batch is in flight
        drained = trio.Event()

        async def drain() -> None:
            await rig.archiver.drain()
            drained.set()

        nursery.start_soon(drain)
        await trio.testing.wait_all_tasks_blocked()
        assert not drained.is_set() and not rig.feed.released
        rig.archive.gate.set()
        await drained.wait()
        assert rig.feed.released  # once every batch was acknowledged: another node reads on

    # The second batch, taken (pending) when the drain began, was stored and acknowledged too.
    taken = sum(int(e.split()[1]) for e in rig.feed.events if e.startswith("take"))
    assert rig.feed.acked == [f"{n}-0" for n in range(1, taken + 1)]
    assert sorted(rig.archive.stored) == list(range(1, taken + 1))


async def test_while_every_store_waits_the_feed_is_kept_reading_until_it_hands_over(
    rig: Rig, autojump_clock: trio.testing.MockClock
) -> None:
    rig.feed.waiting = entries(1, 30)
    rig.archive.gate = trio.Event()  # Elasticsearch does not answer

    async with trio.open_nursery() as nursery:
        await nursery.start(rig.archiver.run)
        await trio.sleep(3.0)  # two stores in flight, the third batch waits for a slot
        assert rig.archive.calls == 2 and rig.feed.acked == []
        kept = list(rig.feed.kept)
        assert len(kept) >= 25 and max(b - a for a, b in itertools.pairwise(kept)) <= 0.11

        rig.feed.reading = False  # the feed handed the stream over
        await trio.sleep(0.2)
        assert rig.archive.cancelled == 2  # the stores in flight were cancelled
        takes = rig.feed.takes
        rig.archive.gate.set()
        await trio.sleep(5.0)
        assert rig.feed.acked == [] and rig.archive.calls == 2  # nothing of the turn stored
        assert rig.feed.takes > takes  # waiting for the feed to read again

        rig.feed.reading = True  # read again: everything from the stream's first entry
        rig.feed.waiting = entries(1, 30)
        await rig.feed.wait_acked(30)
        await rig.archiver.drain()

    assert sorted(rig.archive.stored) == list(range(1, 31))
    assert rig.archiver.archived == 30


async def test_a_drain_keeps_the_feed_reading_while_it_waits_for_the_stores(
    rig: Rig, autojump_clock: trio.testing.MockClock
) -> None:
    rig.feed.waiting = entries(1, 10)
    rig.archive.gate = trio.Event()

    async with trio.open_nursery() as nursery:
        await nursery.start(rig.archiver.run)
        await trio.testing.wait_all_tasks_blocked()
        drained = trio.Event()

        async def drain() -> None:
            await rig.archiver.drain()
            drained.set()

        nursery.start_soon(drain)
        await trio.sleep(1.0)
        kept = len(rig.feed.kept)
        await trio.sleep(1.0)
        assert len(rig.feed.kept) >= kept + 9 and not drained.is_set()
        rig.archive.gate.set()
        await drained.wait()

    assert rig.feed.acked == [f"{n}-0" for n in range(1, 11)] and rig.feed.released


async def test_an_idle_reader_is_not_woken_to_keep_reading(
    rig: Rig, autojump_clock: trio.testing.MockClock
) -> None:
    rig.feed.waiting = entries(1, 10)

    async with trio.open_nursery() as nursery:
        await nursery.start(rig.archiver.run)
        await rig.feed.wait_acked(10)
        await trio.sleep(1.0)
        kept, takes = len(rig.feed.kept), rig.feed.takes
        await trio.sleep(10.0)  # no traffic: its takes wait for some and renew the lease
        assert len(rig.feed.kept) == kept and rig.feed.takes <= takes + 11
        rig.feed.waiting = entries(11, 5)
        rig.feed.arrived.set()
        await rig.feed.wait_acked(15)
        await rig.archiver.drain()


async def test_light_traffic_lingers_between_batches(
    rig: Rig, autojump_clock: trio.testing.MockClock
) -> None:
    rig.archiver.batch_size = 100
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.archiver.run)
        for n in range(1, 21):  # one message every 10 ms for 200 ms
            rig.feed.waiting += entries(n, 1)
            rig.feed.arrived.set()
            rig.feed.arrived = trio.Event()
            await trio.sleep(0.01)
        await rig.feed.wait_acked(20)
        await rig.archiver.drain()

    # The first message alone, then the ones that gathered during the 250 ms linger.
    assert rig.archive.calls == 2
