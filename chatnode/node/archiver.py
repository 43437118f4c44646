"""The archiver: moves messages from the archive feed into the archive.

Rules:

1. **Acknowledged only once stored.** An entry is acknowledged only after the archive stored
   it, and storing is idempotent by ``(room_id, offset)``, so a crash at any point loses
   nothing and at worst stores a message twice under the same id.
2. **The archive down means waiting.** While ``store``, ``keep_dead_letters`` or ``ack``
   raises ``Unavailable`` the archiver retries that batch with backoff and the entries wait in
   the feed (another node's archiver reads them if this node dies). A batch stored but not
   acknowledged is not stored again, only acknowledged.
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
   so: nothing on this path decodes or re-encodes a message (it cost the node ~3 µs of its
   ~7 µs per message while catching up a backlog).
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
class Archiver:
    feed: ArchiveFeed
    archive: Archive
    batch_size: int = 1000
    """Messages per bulk request. Catching up a backlog (bench/, archiver-only runs, when the
    feed still read through a consumer group) the node spent ~4.3 µs per message with 500,
    ~3.2 with 1,000 and ~2.6 with 2,000 (each batch costs ~0.4 ms of node CPU whatever its
    size); Redis ~2.3, ~2.0, ~1.9. (With the lease's plain XREAD, 1,000: node 2.6-3.2 µs,
    Redis 0.56-0.7.)"""
    wait_ms: int = 1000
    """How long a take waits for traffic. Idle, the archiver's loop wakes once per wait: at
    100 ms that was ~18 of an idle node's ~24 wakeups a second (``strace -c``), CPU a loaded
    node pays too. A drain waits for a take under way, so it may take up to this much
    longer."""
    linger_s: float = 0.25
    """After a partial batch, wait this long for more (the node's default: 1 s)."""
    max_backoff_s: float = 5.0
    max_in_flight: int = 4
    """Bulks stored at once. One node archives at a time (the feed's lease), and
    Elasticsearch indexes a bulk on one thread: four keep it as busy as two nodes with two
    each did."""
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
        by then is stored and acknowledged first)."""
        self._running = True
        task_status.started()
        slots = trio.Semaphore(self.max_in_flight)
        try:
            async with trio.open_nursery() as nursery:
                batch: list[ArchiveEntry] = []
                while batch or not self._stopping:
                    if not batch:
                        batch = await self._take()
                        continue
                    await slots.acquire()
                    nursery.start_soon(self._store, batch, slots)
                    batch = await self._take_after(len(batch))
        finally:
            self._running = False
            self._stopped.set()

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

    async def _store(self, batch: list[ArchiveEntry], slot: trio.Semaphore) -> None:
        """Store ``batch`` and acknowledge it, retrying until both happened (rules 1-3); then
        give ``slot`` back."""
        try:
            await self._store_and_ack(batch)
        finally:
            slot.release()

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
