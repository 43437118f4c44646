"""The archive stream as ``ports.ArchiveFeed``: :class:`RedisArchiveFeed`.

:class:`~chatnode.adapters.redis_bus.RedisBus` appends every published message to
``P:archive`` as one field, ``d``, the message's archive document (``ChatMessage.document``;
see the bus's module docstring for the key layout); the archivers of all nodes read it as the
consumer group ``archivers``. Entries an older chatnode wrote (fields r, o, u, t, ts) are
read too, encoded into documents here.

Cost: catching up a backlog, this is on the path of every message. Through coredis, reading
an entry cost 9-14 µs of node CPU (its ``StreamEntry`` and RESP parser); here the feed has a
:class:`~chatnode.adapters.resp.RespClient` of its own: hiredis's parse, the entry's check and
its ``ArchiveEntry`` tuple of id and document take ~0.5 µs an entry together (a 500-entry
reply, the collector frozen; decoding the five fields of the older layout into a message cost
~2.4 µs more), and ``ack`` sends XACK with
the batch's ids, then runs the trim script (Redis: XACK ~0.46 µs per id; sending the ids to a
script as one argument to split cost ~0.66 µs per id more). Its own client, because
``XREADGROUP ... BLOCK`` holds the connection: an ``ack`` issued meanwhile waits behind it
for at most ``wait_ms``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, cast

import attrs
import trio

from chatnode.core import ports
from chatnode.core.models import ArchiveEntry, ChatMessage

from .redis_bus import BusKeys
from .resp import Reply, RespClient, RespError, Script

log = logging.getLogger(__name__)

ARCHIVE_GROUP: Final = "archivers"

# KEYS: archive stream. ARGV: group. Trim the stream below its oldest entry still needed: the
# oldest pending one, or (nothing pending) the first after the group's last delivered one.
# Entries are delivered in id order, so every entry below that was delivered and acknowledged.
# XTRIM MINID drops whole stream nodes: ~0.05 µs of Redis per entry, where XDEL of each id
# cost ~3.8 µs. One script, so what it reads is what it trims by; run after each XACK.
_TRIM: Final = Script("""#!lua
local function field(pairs, name)
  for i = 1, #pairs, 2 do
    if pairs[i] == name then return pairs[i + 1] end
  end
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
return 0
""")

_DOCUMENT: Final = b"d"
_OLD_FIELDS: Final = (b"r", b"o", b"u", b"t", b"ts")

RawEntry = Reply
"""A stream entry as Redis sends it: ``[id, [field, value, field, value, ...]]``."""


def _document(fields: Reply) -> bytes:
    """The archive document of an entry's field list; ``KeyError``/``ValueError``/
    ``TypeError``/``AttributeError`` if it holds none.

    On every archived message's path: ``[b"d", document]`` is taken as it is (the archive
    refuses a document that is not one); the older layout (r, o, u, t, ts, in any order) is
    decoded and encoded."""
    if type(fields) is list and len(fields) == 2 and fields[0] == _DOCUMENT:
        document = fields[1]
        if type(document) is bytes:
            return document
    if type(fields) is not list:
        raise TypeError(f"stream fields that are not a list: {fields!r:.200}")
    values = cast(list[bytes], fields)  # checked by int() and decode()
    named = dict(zip(values[0::2], values[1::2], strict=True))
    room, offset, user, text, timestamp = (named[name] for name in _OLD_FIELDS)
    message = ChatMessage(int(room), int(offset), user.decode(), text.decode(), int(timestamp))
    return message.document


def _read_entries(reply: Reply) -> list[RawEntry]:
    """The entries of an XREADGROUP reply of one stream: ``[[stream, entries]]`` or nil."""
    if not isinstance(reply, list) or not reply:
        return []
    match reply[0]:
        case [_, list(entries)]:
            return entries
    raise TypeError(f"XREADGROUP returned {reply!r:.200}")


@attrs.define(eq=False)
class RedisArchiveFeed:
    """``ports.ArchiveFeed`` on the archive stream, as consumer ``consumer`` of the group
    ``archivers`` (created with MKSTREAM from the start of the stream on first use).

    ``take`` first claims (XAUTOCLAIM) entries that some consumer took and left unacknowledged
    for ``claim_idle_ms`` -- a node that died, or one that is very slow, so an entry may be
    handed out twice; archiving is idempotent -- and otherwise reads new entries (XREADGROUP
    ``>``), waiting up to ``wait_ms`` for some (``wait_ms=0``: do not wait). ``ack``
    acknowledges, then trims with one script, so the stream only holds what is not archived yet.
    An entry that cannot be decoded (not written by ``RedisBus``) is logged and acknowledged.

    The claim scan walks the whole pending list (~3 ms of Redis per call with four batches in
    flight, more than reading and acknowledging the batch together), so after a scan that
    found nothing the next one waits ``claim_idle_ms / 4``: an abandoned entry is handed out
    again at most a quarter of ``claim_idle_ms`` after it became claimable.
    """

    _redis: RespClient
    prefix: str
    consumer: str = attrs.field(kw_only=True)
    claim_idle_ms: int = attrs.field(default=30_000, kw_only=True)
    _key: str = attrs.field(init=False)
    _group_ready: bool = attrs.field(default=False, init=False)
    _claim_cursor: bytes = attrs.field(default=b"0-0", init=False)
    _next_claim_scan: float = attrs.field(default=float("-inf"), init=False)

    def __attrs_post_init__(self) -> None:
        self._key = BusKeys(self.prefix).archive

    async def take(self, *, max_count: int, wait_ms: int) -> list[ArchiveEntry]:
        if max_count <= 0:
            await trio.lowlevel.checkpoint()
            return []
        try:
            return await self._take(max_count, wait_ms)
        except RespError as exc:
            if exc.prefix != b"NOGROUP":
                raise
            self._group_ready = False  # the stream was lost (a Redis restart)
            return await self._take(max_count, wait_ms)

    async def _take(self, max_count: int, wait_ms: int) -> list[ArchiveEntry]:
        if not self._group_ready:
            try:
                await self._redis.call(
                    "XGROUP", "CREATE", self._key, ARCHIVE_GROUP, "0", "MKSTREAM"
                )
            except RespError as exc:
                if exc.prefix != b"BUSYGROUP":
                    raise
            self._group_ready = True
        entries = await self._claim(max_count)
        if not entries:
            block: list[bytes | int] = [b"BLOCK", wait_ms] if wait_ms > 0 else []
            read = await self._redis.call(
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
            )
            entries = _read_entries(read)
        return await self._decode(entries)

    async def _claim(self, max_count: int) -> list[RawEntry]:
        """Entries idle for ``claim_idle_ms``, now this consumer's; nothing without a scan
        while a scan that found nothing is recent (see the class docstring)."""
        now = trio.current_time()
        if now < self._next_claim_scan:
            return []
        claimed = await self._redis.call(
            b"XAUTOCLAIM",
            self._key,
            ARCHIVE_GROUP,
            self.consumer,
            self.claim_idle_ms,
            self._claim_cursor,
            b"COUNT",
            max_count,
        )
        match claimed:
            case [bytes(cursor), list(entries), *_]:
                self._claim_cursor = cursor
            case _:
                raise TypeError(f"XAUTOCLAIM returned {claimed!r:.200}")
        if not entries and self._claim_cursor == b"0-0":
            self._next_claim_scan = now + self.claim_idle_ms / 4000
        return list(entries)

    async def _decode(self, entries: list[RawEntry]) -> list[ArchiveEntry]:
        taken: list[ArchiveEntry] = []
        malformed: list[str] = []
        for entry in entries:
            if type(entry) is not list or len(entry) != 2:
                raise TypeError(f"a stream entry that is not [id, fields]: {entry!r:.200}")
            raw_id, fields = entry
            if type(raw_id) is not bytes or type(fields) is not list:
                raise TypeError(f"a stream entry that is not [id, fields]: {entry!r:.200}")
            ack_id = raw_id.decode()
            try:
                taken.append(ArchiveEntry(ack_id, _document(fields)))
            except (KeyError, ValueError, TypeError, AttributeError):
                log.error("archive feed: dropping malformed entry %s: %r", ack_id, fields)
                malformed.append(ack_id)
        if malformed:
            await self._ack_ids(malformed)
        return taken

    async def ack(self, entries: Sequence[ArchiveEntry]) -> None:
        await self._ack_ids([e.ack_id for e in entries])

    async def _ack_ids(self, ids: list[str]) -> None:
        if ids:
            await self._redis.call(b"XACK", self._key, ARCHIVE_GROUP, *ids)
            await _TRIM.run(self._redis, [self._key], [ARCHIVE_GROUP])
        else:
            await trio.lowlevel.checkpoint()


if TYPE_CHECKING:  # mypy proves the adapter implements its port

    def _implements_port(redis: RespClient) -> ports.ArchiveFeed:
        return RedisArchiveFeed(redis, "p", consumer="c")
