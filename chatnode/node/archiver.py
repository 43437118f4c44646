"""The archiver: moves messages from the archive feed into the archive.

Guarantee: an entry is acknowledged only after the archive stored it, and storing is
idempotent by ``(room_id, offset)``, so a crash at any point loses nothing and at worst stores a
message twice under the same id. While the archive is down the archiver retries with backoff and
the entries wait in the feed (another node's archiver claims them if this node dies).
"""

from __future__ import annotations

import logging

import attrs
import trio

from chatnode.core.errors import Unavailable
from chatnode.core.ports import Archive, ArchiveFeed

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class Archiver:
    feed: ArchiveFeed
    archive: Archive
    batch_size: int = 500
    wait_ms: int = 100
    linger_s: float = 0.25
    max_backoff_s: float = 5.0
    archived: int = 0
    failures: int = 0
    _stopping: bool = False
    _running: bool = False
    _stopped: trio.Event = attrs.Factory(trio.Event)
    _stop_requested: trio.Event = attrs.Factory(trio.Event)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Archive until cancelled, or until ``drain()`` asked it to stop after its batch."""
        self._running = True
        task_status.started()
        try:
            while not self._stopping:
                archived = await self.step()
                if 0 < archived < self.batch_size and not self._stopping:
                    # A partial batch: let the next one gather for ``linger_s``, so light
                    # traffic costs a few bulk requests a second, not one per message.
                    with trio.move_on_after(self.linger_s):
                        await self._stop_requested.wait()
        finally:
            self._running = False
            self._stopped.set()

    async def step(self) -> int:
        """Archive one batch (possibly empty); return its size. Retries until stored."""
        try:
            entries = await self.feed.take(max_count=self.batch_size, wait_ms=self.wait_ms)
        except Unavailable:
            self.failures += 1
            await trio.sleep(1.0)
            return 0
        if not entries:
            return 0
        backoff_s = 0.05
        while True:
            try:
                await self.archive.store([e.message for e in entries])
                await self.feed.ack(entries)
                break
            except Unavailable as exc:
                self.failures += 1
                log.warning("archive unavailable (%s); retrying in %.2fs", exc, backoff_s)
                await trio.sleep(backoff_s)
                backoff_s = min(self.max_backoff_s, backoff_s * 2)
        self.archived += len(entries)
        return len(entries)

    async def drain(self) -> None:
        """Graceful stop: take nothing new, and return once the batch ``run`` holds is stored
        and acknowledged. (Taking more would compete with the other nodes for their traffic
        until the caller's deadline cancels a batch midway, leaving it unacknowledged until
        another node claims it after ``archive_claim_idle_s``.)"""
        self._stopping = True
        self._stop_requested.set()
        if self._running:
            await self._stopped.wait()
        else:
            await trio.lowlevel.checkpoint()
