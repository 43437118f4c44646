"""The archiver: moves messages from the archive feed into the archive.

Rules:

1. **Acknowledged only once stored.** An entry is acknowledged only after the archive stored
   it, and storing is idempotent by ``(room_id, offset)``, so a crash at any point loses
   nothing and at worst stores a message twice under the same id.
2. **The archive down means waiting.** While ``store``, ``keep_dead_letters`` or ``ack``
   raises ``Unavailable`` the archiver retries that batch with backoff and the entries wait in
   the feed (another node's archiver reads them if this node dies or hands over, rule 6). A
   batch stored but not acknowledged is not stored again, only acknowledged.
3. **A message the archive did not store is a dead letter, kept.** ``ArchiveRefused`` names
   messages that no retry would store, each with its kind: ``UNINDEXABLE`` (Elasticsearch:
   the document does not fit the mapping) or ``CONFLICT`` (its id holds a different message:
   offsets reused after a Redis data loss). Each is logged at ERROR with its full document
   (and the stored one), kept by ``Archive.keep_dead_letters`` for repair, counted in
   ``refused`` or ``conflicts`` -- never in ``archived`` -- and acknowledged with its batch
   only once kept, so one bad message cannot stop archiving and none is dropped unseen.
4. **Batches overlap.** While batches are being stored (at most ``max_in_flight`` at once,
   each acknowledged when its store returned), the next one is taken from the feed, so the
   archive never waits for the feed or for an acknowledgement while a backlog lasts: after a
   full batch at once, after a partial one only once ``linger_s`` passed (light traffic costs
   a few bulk requests a second, not one per message).
5. **Messages pass through as documents.** The feed hands out each message as its archive
   document (``ChatMessage.document``, made when it was published) and the archive takes them
   so: nothing on this path decodes or re-encodes a message (that would cost the node ~3 µs
   per message, as much again as the rest of its work, while catching up a backlog).
6. **It archives only while its feed reads.** While a batch is being stored, a task calls
   ``feed.keep_reading()`` every ``keep_reading_every_s``, whatever the archiver waits for (a
   slot while every bulk in flight retries, a linger, a drain): the feed renews its lease, or
   hands the stream over once a batch waited the lease (its Elasticsearch is unreachable).
   With nothing in flight the task sleeps (an idle reader's takes renew the lease), so an idle
   node gains no wakeups. Once the feed no longer reads -- handed over, or lost the lease -- the stores
   in flight are cancelled and the batch in hand dropped: the next reader reads them from the
   stream again (storing is idempotent), and this node takes nothing until its feed reads
   again. Why a task of its own: a reader waiting for a slot while every bulk retries would
   not look at its lease otherwise, and be taken over only once the lease expired, still
   holding and storing what it took: two readers at once (docs/faults.md, scenario 10).
"""

from __future__ import annotations

import logging
import time

import attrs
import trio

from chatnode.core.errors import Unavailable
from chatnode.core.models import ArchiveEntry, DeadLetter, RefusalKind
from chatnode.core.ports import Archive, ArchiveFeed, ArchiveRefused

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class _InFlight:
    """The stores of one turn of reading: at most ``slots`` at once (rule 4), and whether any
    runs, for the task that keeps the lease (rule 6)."""

    slots: trio.Semaphore
    count: int = 0
    _busy: trio.Event = attrs.Factory(trio.Event)

    def started(self) -> None:
        self.count += 1
        self._busy.set()

    def finished(self) -> None:
        self.count -= 1
        self.slots.release()
        if not self.count:
            self._busy = trio.Event()

    async def wait_busy(self) -> None:
        """Return once a store runs (at once if one does)."""
        await self._busy.wait()


@attrs.define(eq=False)
class Archiver:
    feed: ArchiveFeed
    archive: Archive
    batch_size: int = 1000
    """Messages per bulk request. Each batch costs ~0.4 ms of node CPU whatever its size:
    ~0.4 µs per message at 1,000, of the node's 2.6-3.2 µs (Redis 0.56-0.7 µs) catching up a
    backlog; half as many doubles that share (docs/benchmarks.md, "What limits")."""
    wait_ms: int = 1000
    """How long a take waits for traffic. Idle, the archiver's loop wakes once per wait: at
    100 ms it would be ~18 of an idle node's ~24 wakeups a second (``strace -c``), CPU a loaded
    node pays too. A drain waits for a take under way, so it may take up to this much
    longer."""
    linger_s: float = 0.25
    """After a partial batch, wait this long for more (the node's default: 1 s)."""
    max_backoff_s: float = 5.0
    max_in_flight: int = 4
    """Bulks stored at once. One node archives at a time (the feed's lease), and
    Elasticsearch indexes a bulk on one thread: four keep it as busy as two nodes with two
    each did."""
    keep_reading_every_s: float = 0.1
    """How often the feed is asked to keep reading while stores are in flight (rule 6): a
    twentieth of the fault tests' 2 s lease, so a hand-over comes at most this late. The feed
    calls Redis only when a renewal is due (every third of the lease); otherwise a call
    compares times."""
    archived: int = 0
    failures: int = 0
    refused: int = 0
    """Messages the archive can never index, kept as dead letters (rule 3)."""
    conflicts: int = 0
    """Messages whose id holds a different message, kept as dead letters (rule 3)."""
    _stopping: bool = False
    _running: bool = False
    _stopped: trio.Event = attrs.Factory(trio.Event)
    _stop_requested: trio.Event = attrs.Factory(trio.Event)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Archive until cancelled, or until ``drain()`` asked it to stop (every batch taken
        by then is stored and acknowledged first, unless the feed stopped reading)."""
        self._running = True
        task_status.started()
        try:
            while not self._stopping:
                batch = await self._take()
                if batch:
                    await self._read(batch)
        finally:
            self._running = False
            self._stopped.set()

    async def _read(self, batch: list[ArchiveEntry]) -> None:
        """Archive ``batch`` and what follows while the feed reads (rules 4 and 6); return
        when it stopped reading, or once draining and every batch taken is acknowledged."""
        in_flight = _InFlight(trio.Semaphore(self.max_in_flight))
        async with trio.open_nursery() as turn:
            turn.start_soon(self._keep_reading, turn.cancel_scope, in_flight)
            async with trio.open_nursery() as stores:
                while batch or not self._stopping:
                    if not batch:
                        batch = await self._take()
                        continue
                    await in_flight.slots.acquire()
                    in_flight.started()
                    stores.start_soon(self._store, batch, in_flight)
                    batch = await self._take_after(len(batch))
            turn.cancel_scope.cancel()  # everything taken is acknowledged: a drain releases

    async def _keep_reading(self, turn: trio.CancelScope, in_flight: _InFlight) -> None:
        """While stores are in flight, keep the feed's lease current; cancel ``turn`` once the
        feed stops reading."""
        failing = False
        while True:
            await in_flight.wait_busy()
            await trio.sleep(self.keep_reading_every_s)
            try:
                reading = await self.feed.keep_reading()
            except Unavailable as exc:  # the feed stops reading once its lease ran out
                if not failing:  # one failure per outage, not one per check
                    self.failures += 1
                    log.warning("archive feed unavailable (%s); asking again", exc)
                failing = True
                continue
            failing = False
            if not reading:
                log.warning(
                    "archiver: this node no longer reads the archive stream; what it took "
                    "and did not archive is left to the next reader"
                )
                turn.cancel()
                return

    async def _take_after(self, previous_size: int) -> list[ArchiveEntry]:
        """The batch after one of ``previous_size`` entries (rule 4); nothing once draining."""
        if previous_size < self.batch_size and not self._stopping:
            with trio.move_on_after(self.linger_s):
                await self._stop_requested.wait()
        if self._stopping:
            await trio.lowlevel.checkpoint()
            return []
        return await self._take()

    async def _take(self) -> list[ArchiveEntry]:
        try:
            return await self.feed.take(max_count=self.batch_size, wait_ms=self.wait_ms)
        except Unavailable as exc:
            self.failures += 1
            log.warning("archive feed unavailable (%s); retrying in 1s", exc)
            await trio.sleep(1.0)
            return []

    async def _store(self, batch: list[ArchiveEntry], in_flight: _InFlight) -> None:
        """Store ``batch`` and acknowledge it, retrying until both happened (rules 1-3); then
        give its slot back."""
        try:
            await self._store_and_ack(batch)
        finally:
            in_flight.finished()

    async def _store_and_ack(self, batch: list[ArchiveEntry]) -> None:
        to_store = [entry.document for entry in batch]
        to_keep: list[DeadLetter] = []
        refused = conflicts = 0
        backoff_s = 0.05
        while True:
            try:
                if to_store:
                    try:
                        await self.archive.store(to_store)
                    except ArchiveRefused as exc:
                        to_keep = self._dead_letters(exc)
                        conflicts = sum(
                            1 for d in to_keep if d.refusal.kind is RefusalKind.CONFLICT
                        )
                        refused = len(to_keep) - conflicts
                    to_store = []
                if to_keep:
                    await self.archive.keep_dead_letters(to_keep)
                    to_keep = []
                await self.feed.ack(batch)
                break
            except Unavailable as exc:
                self.failures += 1
                log.warning("archive unavailable (%s); retrying in %.2fs", exc, backoff_s)
                await trio.sleep(backoff_s)
                backoff_s = min(self.max_backoff_s, backoff_s * 2)
        self.archived += len(batch) - refused - conflicts
        self.refused += refused
        self.conflicts += conflicts

    def _dead_letters(self, refused: ArchiveRefused) -> list[DeadLetter]:
        """Log each refusal at ERROR, whole (rule 3); the dead letters to keep."""
        kept_at_ms = time.time_ns() // 1_000_000
        for refusal in refused.refused:
            key = refusal.key or "(not a message document)"
            document = refusal.document.decode(errors="backslashreplace")
            if refusal.kind is RefusalKind.CONFLICT:
                log.error(
                    "archive conflict: message %s is not the one the archive holds under its "
                    "id; keeping it as a dead letter (%s): %s; stored: %s",
                    key,
                    refusal.reason,
                    document,
                    (refusal.stored or b"").decode(errors="backslashreplace"),
                )
            else:
                log.error(
                    "archive refused message %s; keeping it as a dead letter (%s): %s",
                    key,
                    refusal.reason,
                    document,
                )
        return [DeadLetter(refusal, kept_at_ms) for refusal in refused.refused]

    async def drain(self) -> None:
        """Graceful stop: take nothing new, return once the batches ``run`` holds are stored
        and acknowledged, and release the feed so another node reads on at once. (Taking
        more would read traffic another node could archive until the caller's deadline
        cancels a batch midway, leaving it for the next reader.)"""
        self._stopping = True
        self._stop_requested.set()
        if self._running:
            await self._stopped.wait()
        try:
            await self.feed.release()
        except Unavailable as exc:  # the lease expires by itself
            log.warning("archive feed: could not release it (%s)", exc)
