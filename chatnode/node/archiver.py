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
    max_backoff_s: float = 5.0
    archived: int = 0
    failures: int = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self.step()

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
        """Archive until the feed has nothing for this node (used on graceful stop)."""
        while await self.step():
            pass
