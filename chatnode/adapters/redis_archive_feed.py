"""The archive stream as ``ports.ArchiveFeed``: :class:`RedisArchiveFeed`.

:class:`~chatnode.adapters.redis_bus.RedisBus` appends every published message to
``P:archive`` (fields r, o, u, t, ts; see its module docstring for the key layout); the
archivers of all nodes read it as the consumer group ``archivers``.

Cost: catching up a backlog, this is on the path of every message. coredis' ``xreadgroup``
builds a ``StreamEntry`` with an ordered dict per entry (~9 µs of node CPU per entry with
the decoding into a ``ChatMessage``); here XAUTOCLAIM and XREADGROUP go through coredis with a
pass-through reply callback and the field lists are decoded in place (~6 µs, most of it
coredis' RESP parser), and ``ack`` sends the batch's ids as one argument that the script
splits (~1 µs per entry instead of ~1.7).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio
from coredis.commands.script import Script
from coredis.exceptions import StreamConsumerGroupError, StreamDuplicateConsumerGroupError

from chatnode.core import ports
from chatnode.core.models import ArchiveEntry, ChatMessage

from .redis_bus import BusKeys
from .redis_connection import RedisClient, int_reply, redis_failures

log = logging.getLogger(__name__)

ARCHIVE_GROUP: Final = "archivers"

# KEYS: archive stream. ARGV: group, the ids separated by spaces. Acknowledge, then trim the
# stream below its oldest entry still needed: the oldest pending one, or (nothing pending) the
# first after the group's last delivered one. Entries are delivered in id order, so every
# entry below that was delivered and acknowledged. XTRIM MINID drops whole stream nodes:
# ~0.8 µs of Redis per entry, where XDEL of each id cost ~3.8 µs.
_ACK_LUA: Final = """#!lua
local function field(pairs, name)
  for i = 1, #pairs, 2 do
    if pairs[i] == name then return pairs[i + 1] end
  end
end
local ids = {}
for id in string.gmatch(ARGV[2], '%S+') do
  ids[#ids + 1] = id
end
local acked = 0
for first = 1, #ids, 1000 do
  acked = acked + redis.call('XACK', KEYS[1], ARGV[1], unpack(ids, first, math.min(first + 999, #ids)))
end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1])
local keep = pending[2]
if pending[1] == 0 then
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    if field(group, 'name') == ARGV[1] then
      local ms, seq = string.match(field(group, 'last-delivered-id'), '^(%d+)-(%d+)$')
      keep = ms .. '-' .. (tonumber(seq) + 1)
    end
  end
end
if keep then
  redis.call('XTRIM', KEYS[1], 'MINID', keep)
end
return acked
"""

_FIELDS: Final = (b"r", b"o", b"u", b"t", b"ts")

RawEntry = list[Any]
"""A stream entry as Redis sends it: ``[id, [field, value, field, value, ...]]``."""


def _raw(reply: Any) -> Any:
    """Reply callback: the reply as coredis parsed it (lists, dicts, bytes), nothing built."""
    return reply


def _archived(fields: list[bytes]) -> ChatMessage:
    """The message of an entry's field list; ``KeyError``/``ValueError`` if it is not one."""
    if len(fields) == 10 and fields[0::2] == [b"r", b"o", b"u", b"t", b"ts"]:
        room, offset, user, text, timestamp = fields[1::2]  # RedisBus' order
    else:
        named = dict(zip(fields[0::2], fields[1::2], strict=True))
        room, offset, user, text, timestamp = (named[name] for name in _FIELDS)
    return ChatMessage(int(room), int(offset), user.decode(), text.decode(), int(timestamp))


def _read_entries(reply: Any) -> list[RawEntry]:
    """The entries of an XREADGROUP reply of one stream (RESP3 map or RESP2 array; nil)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(next(iter(reply.values())))
    return list(reply[0][1])


@attrs.define(eq=False)
class RedisArchiveFeed:
    """``ports.ArchiveFeed`` on the archive stream, as consumer ``consumer`` of the group
    ``archivers`` (created with MKSTREAM from the start of the stream on first use).

    ``take`` first claims (XAUTOCLAIM) entries that some consumer took and left unacknowledged
    for ``claim_idle_ms`` -- a node that died, or one that is very slow, so an entry may be
    handed out twice; archiving is idempotent -- and otherwise reads new entries (XREADGROUP
    ``>``), waiting up to ``wait_ms`` for some (``wait_ms=0``: do not wait). ``ack``
    acknowledges and trims in one script, so the stream only holds what is not archived yet.
    An entry that cannot be decoded (not written by ``RedisBus``) is logged and acknowledged.

    The claim scan walks the whole pending list (~3 ms of Redis per call with four batches in
    flight, more than reading and acknowledging the batch together), so after a scan that
    found nothing the next one waits ``claim_idle_ms / 4``: an abandoned entry is handed out
    again at most a quarter of ``claim_idle_ms`` after it became claimable.
    """

    _redis: RedisClient
    prefix: str
    consumer: str = attrs.field(kw_only=True)
    claim_idle_ms: int = attrs.field(default=30_000, kw_only=True)
    _key: str = attrs.field(init=False)
    _group_ready: bool = attrs.field(default=False, init=False)
    _claim_cursor: bytes = attrs.field(default=b"0-0", init=False)
    _next_claim_scan: float = attrs.field(default=float("-inf"), init=False)
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
        entries = await self._claim(max_count)
        if not entries:
            block: list[bytes | int] = [b"BLOCK", wait_ms] if wait_ms > 0 else []
            read = await self._redis.create_request(
                b"XREADGROUP",
                b"GROUP",
                ARCHIVE_GROUP,
                self.consumer,
                b"COUNT",
                max_count,
                *block,
                b"STREAMS",
                self._key,
                b">",
                callback=_raw,
            )
            entries = _read_entries(read)
        return await self._decode(entries)

    async def _claim(self, max_count: int) -> list[RawEntry]:
        """Entries idle for ``claim_idle_ms``, now this consumer's; nothing without a scan
        while a scan that found nothing is recent (see the class docstring)."""
        now = trio.current_time()
        if now < self._next_claim_scan:
            return []
        claimed = await self._redis.create_request(
            b"XAUTOCLAIM",
            self._key,
            ARCHIVE_GROUP,
            self.consumer,
            self.claim_idle_ms,
            self._claim_cursor,
            b"COUNT",
            max_count,
            callback=_raw,
        )
        self._claim_cursor, entries = claimed[0], claimed[1]
        if not entries and self._claim_cursor == b"0-0":
            self._next_claim_scan = now + self.claim_idle_ms / 4000
        return list(entries)

    async def _decode(self, entries: list[RawEntry]) -> list[ArchiveEntry]:
        taken: list[ArchiveEntry] = []
        malformed: list[str] = []
        for ack_id, fields in entries:
            try:
                taken.append(ArchiveEntry(ack_id.decode(), _archived(fields)))
            except (KeyError, ValueError, TypeError):
                log.error("archive feed: dropping malformed entry %r: %r", ack_id, fields)
                malformed.append(ack_id.decode())
        if malformed:
            await self._ack_ids(malformed)
        return taken

    async def ack(self, entries: Sequence[ArchiveEntry]) -> None:
        with redis_failures("archive feed ack"):
            await self._ack_ids([e.ack_id for e in entries])

    async def _ack_ids(self, ids: list[str]) -> None:
        if ids:
            await self._ack_script(
                keys=[self._key], args=[ARCHIVE_GROUP, " ".join(ids)], callback=int_reply
            )
        else:
            await trio.lowlevel.checkpoint()


if TYPE_CHECKING:  # mypy proves the adapter implements its port

    def _implements_port(redis: RedisClient) -> ports.ArchiveFeed:
        return RedisArchiveFeed(redis, "p", consumer="c")
