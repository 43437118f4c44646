"""The archive stream as ``ports.ArchiveFeed``: :class:`RedisArchiveFeed`.

:class:`~chatnode.adapters.redis_bus.RedisBus` appends every published message to
``P:archive`` (fields r, o, u, t, ts; see its module docstring for the key layout); the
archivers of all nodes read it as the consumer group ``archivers``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Final

import attrs
import trio
from coredis.commands.script import Script
from coredis.exceptions import StreamConsumerGroupError, StreamDuplicateConsumerGroupError
from coredis.response.types import StreamEntry

from chatnode.core import ports
from chatnode.core.models import ArchiveEntry, ChatMessage

from .redis_bus import BusKeys, stream_field
from .redis_connection import RedisClient, int_reply, redis_failures

log = logging.getLogger(__name__)

ARCHIVE_GROUP: Final = "archivers"

# KEYS: archive stream. ARGV: group, ids... Acknowledge and delete, in chunks (Lua's unpack
# has a small stack).
_ACK_LUA: Final = """#!lua
local acked = 0
for first = 2, #ARGV, 1000 do
  local last = math.min(first + 999, #ARGV)
  acked = acked + redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, first, last))
  redis.call('XDEL', KEYS[1], unpack(ARGV, first, last))
end
return acked
"""


def _archived(entry: StreamEntry) -> ChatMessage:
    return ChatMessage(
        int(stream_field(entry, b"r")),
        int(stream_field(entry, b"o")),
        stream_field(entry, b"u"),
        stream_field(entry, b"t"),
        int(stream_field(entry, b"ts")),
    )


@attrs.define(eq=False)
class RedisArchiveFeed:
    """``ports.ArchiveFeed`` on the archive stream, as consumer ``consumer`` of the group
    ``archivers`` (created with MKSTREAM from the start of the stream on first use).

    ``take`` first claims (XAUTOCLAIM) entries that some consumer took and left unacknowledged
    for ``claim_idle_ms`` -- a node that died, or one that is very slow, so an entry may be
    handed out twice; archiving is idempotent -- and otherwise reads new entries (XREADGROUP
    ``>``), waiting up to ``wait_ms`` for some (``wait_ms=0``: do not wait). ``ack``
    acknowledges and deletes in one script, so the stream only holds what is not archived yet.
    An entry that cannot be decoded (not written by ``RedisBus``) is logged and acknowledged.
    """

    _redis: RedisClient
    prefix: str
    consumer: str = attrs.field(kw_only=True)
    claim_idle_ms: int = attrs.field(default=30_000, kw_only=True)
    _key: str = attrs.field(init=False)
    _group_ready: bool = attrs.field(default=False, init=False)
    _claim_cursor: bytes = attrs.field(default=b"0-0", init=False)
    _ack_script: Script[bytes] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._key = BusKeys(self.prefix).archive
        self._ack_script = self._redis.register_script(_ACK_LUA)

    async def take(self, *, max_count: int, wait_ms: int) -> list[ArchiveEntry]:
        if max_count <= 0:
            await trio.lowlevel.checkpoint()
            return []
        with redis_failures("archive feed take"):
            try:
                return await self._take(max_count, wait_ms)
            except StreamConsumerGroupError:  # NOGROUP: the stream was lost (Redis restart)
                self._group_ready = False
                return await self._take(max_count, wait_ms)

    async def _take(self, max_count: int, wait_ms: int) -> list[ArchiveEntry]:
        if not self._group_ready:
            with suppress(StreamDuplicateConsumerGroupError):
                await self._redis.xgroup_create(self._key, ARCHIVE_GROUP, "0", mkstream=True)
            self._group_ready = True
        claimed = await self._redis.xautoclaim(
            self._key,
            ARCHIVE_GROUP,
            self.consumer,
            self.claim_idle_ms,
            self._claim_cursor,
            count=max_count,
        )
        cursor = claimed[0]
        self._claim_cursor = cursor.encode() if isinstance(cursor, str) else cursor
        entries: Sequence[StreamEntry] = [e for e in claimed[1] if isinstance(e, StreamEntry)]
        if not entries:
            read = await self._redis.xreadgroup(
                ARCHIVE_GROUP,
                self.consumer,
                streams={self._key: ">"},
                count=max_count,
                block=wait_ms if wait_ms > 0 else None,
            )
            entries = next(iter(read.values()), ()) if read else ()
        return await self._decode(entries)

    async def _decode(self, entries: Sequence[StreamEntry]) -> list[ArchiveEntry]:
        taken: list[ArchiveEntry] = []
        malformed: list[str] = []
        for entry in entries:
            ack_id = entry.identifier
            ack_id = ack_id.decode() if isinstance(ack_id, bytes) else ack_id
            try:
                taken.append(ArchiveEntry(ack_id, _archived(entry)))
            except (KeyError, ValueError):
                log.error("archive feed: dropping malformed entry %s: %r", ack_id, entry)
                malformed.append(ack_id)
        if malformed:
            await self._ack_ids(malformed)
        return taken

    async def ack(self, entries: Sequence[ArchiveEntry]) -> None:
        with redis_failures("archive feed ack"):
            await self._ack_ids([e.ack_id for e in entries])

    async def _ack_ids(self, ids: list[str]) -> None:
        if ids:
            await self._ack_script(keys=[self._key], args=[ARCHIVE_GROUP, *ids], callback=int_reply)
        else:
            await trio.lowlevel.checkpoint()


if TYPE_CHECKING:  # mypy proves the adapter implements its port

    def _implements_port(redis: RedisClient) -> ports.ArchiveFeed:
        return RedisArchiveFeed(redis, "p", consumer="c")
