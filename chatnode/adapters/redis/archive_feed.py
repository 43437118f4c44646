"""The archive stream as ``ports.ArchiveFeed``: :class:`RedisArchiveFeed`.

:class:`~chatnode.adapters.redis.bus.RedisBus` appends every published message to
``P:archive`` as one field, ``d``, the message's archive document (``ChatMessage.document``;
see the bus's module docstring for the key layout). Entries in the five-field layout (fields
r, o, u, t, ts) are read too, encoded into documents here.

Rules:

1. **The stream is the queue.** An entry stays in ``P:archive`` until it is archived: the
   reader trims the stream (XTRIM MINID) below the oldest entry it handed out and has not
   seen acknowledged, so whatever is in the stream is not known to be archived.
2. **One reader at a time, under a lease.** The node holding ``P:archive:lease`` (its
   consumer name, expiring after ``lease_ms``, renewed every third of it by ``take``, ``ack``
   and ``keep_reading``) reads the stream with plain XREAD from a cursor kept in the node; the
   others wait, asking for the lease every tenth of it (at most ``ASK_EVERY_S``, so a
   released lease is taken within a second whatever its length). A reader that acquires the lease
   starts from the stream's first entry, so it hands out again what a dead reader took and
   never acknowledged (archiving is idempotent). A reader counts its lease lost once
   ``lease_ms`` passed since it sent its last renewal (before Redis can give it to another
   node), or when Redis names another holder; a reader that stalled past its lease (a frozen
   process) notices at its next call. Each stop of reading -- lost, handed over, released --
   ends a *turn*: the feed forgets what it took (the next reader is handed it again) and
   ``keep_reading`` answers False. Every start and end of a turn is logged ("reads the
   archive stream", "hands the archive stream over", "lost the lease", "releases").
3. **A reader that cannot archive hands over.** Once the oldest batch it handed out has
   waited ``lease_ms`` for its acknowledgement (its Elasticsearch is unreachable, say), it
   releases the lease at its next ``take``, ``ack`` or ``keep_reading`` (the archiver calls
   that every tenth of a second while it waits: rule 6 of ``node/archiver.py``) and asks for
   it again only ``lease_ms`` later: another node reads on, from the stream's first entry.
4. **Graceful stop releases the lease** (``release``), so another node reads on at once.
5. **Only the reader trims.** An ``ack`` trims the stream only while this feed holds the
   lease, checked by the script that trims: a feed that stopped reading forgot what it took,
   so its trim would remove entries the new reader has not archived yet. The lease's own
   calls (renew, hand over, trim, release) run one at a time, so a renewal under way cannot
   take the lease back after a hand-over.

Why not a consumer group: every node reading its share through XREADGROUP makes Redis keep a
pending list entry per message (XREADGROUP ~1.2 µs per entry of Redis CPU, XACK ~0.3 µs more,
and the node encoding every id into the XACK), where XREAD costs ~0.3 µs and the trim ~0.02
(``INFO commandstats``, 100,000 entries in 1,000-entry reads). While a backlog is caught up
that path runs beside Elasticsearch on the same cores, so its cost is Elasticsearch's loss;
and one node keeps Elasticsearch as busy as two (the archiver keeps several bulks in
flight). The price: after a takeover, entries acknowledged after an older unacknowledged one
are handed out again too (at most the bulks in flight; stored twice under the same id).

Cost per entry in the node: hiredis's parse, the entry's check and its ``ArchiveEntry`` tuple
of id and document (~0.5 µs, a 1,000-entry reply, the collector frozen; decoding the five
fields of the five-field layout into a message costs ~2.4 µs more); an ``ack`` of a whole
batch is one XTRIM. The feed has clients of its own, and its blocking reads a connection of
their own (``reads``): ``XREAD ... BLOCK`` holds its connection, and an ``ack`` issued on it
meanwhile would wait behind the read for up to ``wait_ms`` (the archiver's 1 s): the last
acknowledgements of a backlog, and the stream's trim, would come up to a second late.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, cast

import attrs
import trio

from chatnode.core import ports
from chatnode.core.models import ArchiveEntry, ChatMessage
from chatnode.wire.resp import Reply

from .bus_keys import BusKeys
from .client import RespClient, Script

log = logging.getLogger(__name__)

ASK_EVERY_S: Final = 1.0
"""Rule 2: a waiting node asks for the lease at least this often."""

# KEYS: lease, archive stream. ARGV: consumer, lease ms. Take the lease if nobody holds it,
# or renew ours. Returns 1 if we held it already (renewed), 2 if we took it, 0 if another
# consumer holds it. Taking it destroys the stream's consumer group "archivers" if it has one:
# nothing reads through it, and its pending list would hold ids forever.
_LEASE: Final = Script("""#!lua
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if holder then return 1 end
if redis.call('TYPE', KEYS[2])['ok'] == 'stream' then
  redis.call('XGROUP', 'DESTROY', KEYS[2], 'archivers')
end
return 2
""")

# KEYS: lease. ARGV: consumer. Give the lease up if it is ours.
_RELEASE: Final = Script("""#!lua
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
""")

# KEYS: lease, archive stream. ARGV: consumer, min id. Trim below the id if the lease is ours
# (rule 5); 1 if trimmed, 0 if the lease is not ours.
_TRIM: Final = Script("""#!lua
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('XTRIM', KEYS[2], 'MINID', ARGV[2])
return 1
""")

_DOCUMENT: Final = b"d"
_OLD_FIELDS: Final = (b"r", b"o", b"u", b"t", b"ts")
_START: Final = b"0-0"

StreamId = tuple[int, int]
RawEntry = Reply
"""A stream entry as Redis sends it: ``[id, [field, value, field, value, ...]]``."""


def _document(fields: Reply) -> bytes:
    """The archive document of an entry's field list; ``KeyError``/``ValueError``/
    ``TypeError``/``AttributeError`` if it holds none.

    On every archived message's path: ``[b"d", document]`` is taken as it is (the archive
    refuses a document that is not one); the five-field layout (r, o, u, t, ts, in any order) is
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
    """The entries of an XREAD reply of one stream: ``[[stream, entries]]`` or nil."""
    if not isinstance(reply, list) or not reply:
        return []
    match reply[0]:
        case [_, list(entries)]:
            return entries
    raise TypeError(f"XREAD returned {reply!r:.200}")


def _stream_id(raw: str | bytes) -> StreamId:
    ms, _, seq = (raw.decode() if isinstance(raw, bytes) else raw).partition("-")
    return int(ms), int(seq)


@attrs.define(eq=False)
class _Taken:
    """The entries one ``take`` handed out, in stream order; the first ``acked`` of them are
    acknowledged, and ``later`` holds the ids acknowledged after an unacknowledged one."""

    entries: list[ArchiveEntry]
    taken_at: float
    acked: int = 0
    later: set[str] = attrs.Factory(set)

    @property
    def done(self) -> bool:
        return self.acked >= len(self.entries)

    def acknowledge(self, ids: set[str]) -> None:
        self.later.update(e.ack_id for e in self.entries[self.acked :] if e.ack_id in ids)
        while self.acked < len(self.entries) and self.entries[self.acked].ack_id in self.later:
            self.acked += 1


@attrs.define(eq=False)
class RedisArchiveFeed:
    """``ports.ArchiveFeed`` on the archive stream, reading as ``consumer`` while it holds the
    lease (module docstring, rules 1-3).

    ``take`` reads the entries after its cursor (XREAD, on ``reads``), waiting up to ``wait_ms`` for some (``wait_ms=0``: do not wait; Redis is
    asked to block for less than half the reading client's timeout, the rest of the wait is a
    sleep); without the lease it waits ``wait_ms`` and returns nothing; entries read while
    the turn ended are dropped, not handed out. ``ack`` trims the stream below the oldest
    entry handed out and not acknowledged (or below the cursor's next entry when none is
    left), when that moved and the lease is ours. ``keep_reading`` renews or hands over, and
    is True while the turn of the entries last handed out lasts. An entry that cannot be
    decoded (not written by ``RedisBus``) is logged and left behind with its neighbours.
    """

    _redis: RespClient
    prefix: str
    consumer: str = attrs.field(kw_only=True)
    lease_ms: int = attrs.field(default=10_000, kw_only=True)
    reads: RespClient = attrs.field(kw_only=True)
    """The client of the blocking reads: another connection than ``_redis``'s (module
    docstring); the caller's, like ``_redis``. Only a test may pass the same client."""
    _key: str = attrs.field(init=False)
    _lease_key: str = attrs.field(init=False)
    _holding: bool = attrs.field(default=False, init=False)
    _turn: int = attrs.field(default=0, init=False)
    """Counts the starts and ends of reading (rule 2)."""
    _handed_out_turn: int = attrs.field(default=-1, init=False)
    """The turn of the entries ``take`` last handed out."""
    _renew_at: float = attrs.field(default=float("-inf"), init=False)
    _expires_at: float = attrs.field(default=float("-inf"), init=False)
    _ask_at: float = attrs.field(default=float("-inf"), init=False)
    _lease_lock: trio.Lock = attrs.Factory(trio.Lock)
    _cursor: bytes = attrs.field(default=_START, init=False)
    _taken: list[_Taken] = attrs.Factory(list)
    _trimmed_below: StreamId = attrs.field(default=(0, 0), init=False)

    def __attrs_post_init__(self) -> None:
        keys = BusKeys(self.prefix)
        self._key = keys.archive
        self._lease_key = keys.archive_lease

    @property
    def reading(self) -> bool:
        """Whether this feed held the lease when it last looked."""
        return self._holding

    async def take(self, *, max_count: int, wait_ms: int) -> list[ArchiveEntry]:
        if max_count <= 0:
            await trio.lowlevel.checkpoint()
            return []
        async with self._lease_lock:
            reading = await self._lease(ask=True)
        if not reading:
            if wait_ms > 0:
                await trio.sleep(wait_ms / 1000)
            else:
                await trio.lowlevel.checkpoint()
            return []
        turn = self._turn
        # The reply must come within the client's timeout (a later one closes the connection);
        # Redis answers a timed-out block up to 100 ms late (its idle event loop runs at hz 10).
        reads = self.reads
        block_ms = min(wait_ms, max(0, int(reads.timeout_s * 500) - 100))
        block: list[bytes | int] = [b"BLOCK", block_ms] if block_ms > 0 else []
        read = await reads.call(
            b"XREAD", b"COUNT", max_count, *block, b"STREAMS", self._key, self._cursor
        )
        entries = _read_entries(read)
        if not entries:
            if block_ms < wait_ms:  # the rest of the wait, so that idle reads stay rare
                await trio.sleep((wait_ms - block_ms) / 1000)
            return []
        if self._turn != turn:  # the turn ended during the read: the next reader's now
            return []
        taken = self._decode(entries)
        self._taken.append(_Taken(taken, trio.current_time()))
        self._handed_out_turn = turn
        if not taken:  # only entries that were not messages: nothing will acknowledge them
            async with self._lease_lock:
                await self._trim()
        return taken

    def _decode(self, entries: list[RawEntry]) -> list[ArchiveEntry]:
        """The entries' documents, the cursor moved past them; malformed ones logged."""
        taken: list[ArchiveEntry] = []
        raw_id: Reply = None
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
        assert type(raw_id) is bytes  # entries is not empty
        self._cursor = raw_id
        return taken

    async def ack(self, entries: Sequence[ArchiveEntry]) -> None:
        if not entries:
            await trio.lowlevel.checkpoint()
            return
        for taken in self._taken:
            if entries is taken.entries:  # the archiver acknowledges what it took, whole
                taken.acked = len(entries)
                break
        else:
            ids = {e.ack_id for e in entries}
            for taken in self._taken:
                taken.acknowledge(ids)
        async with self._lease_lock:
            await self._trim()
            await self._lease(ask=False)

    async def keep_reading(self) -> bool:
        async with self._lease_lock:
            reading = await self._lease(ask=False)
        return reading and self._turn == self._handed_out_turn

    async def _trim(self) -> None:
        """Trim the stream below the oldest entry handed out and not acknowledged, or below
        the cursor's next entry: everything under it since this feed took the lease was
        handed out and acknowledged or was not a message, and what was under the stream's
        first entry then had been archived already. Only while the lease is ours (rule 5).
        Under the lease lock."""
        if not self._holding:  # what it took is forgotten: nothing to trim for
            await trio.lowlevel.checkpoint()
            return
        self._taken = [taken for taken in self._taken if not taken.done]
        if self._taken:
            keep = min(_stream_id(t.entries[t.acked].ack_id) for t in self._taken)
        else:
            ms, seq = _stream_id(self._cursor)
            keep = (ms, seq + 1)
        if keep <= self._trimmed_below:
            await trio.lowlevel.checkpoint()
            return
        ours = await _TRIM.run(
            self._redis, [self._lease_key, self._key], [self.consumer, b"%d-%d" % keep]
        )
        if ours:
            self._trimmed_below = keep
        elif self._holding:
            self._stop("lost the lease to another node (seen when trimming)")

    async def _lease(self, *, ask: bool) -> bool:
        """Whether this feed holds the lease: renewed at most every third of it, given up
        while a batch waits for its acknowledgement too long (rule 3), counted lost once it
        may have expired (rule 2), asked for (``ask``) every tenth of it (at most
        ``ASK_EVERY_S``). Under the lease
        lock."""
        now = trio.current_time()
        if self._holding:
            if self._taken and now - self._taken[0].taken_at > self.lease_ms / 1000:
                await self._hand_over(now - self._taken[0].taken_at)
                return False
            if now >= self._expires_at:
                self._stop("lost the lease: it expired before a renewal")
                return False
            if now < self._renew_at:
                return True
        elif not ask or now < self._ask_at:
            return False
        held = await _LEASE.run(
            self._redis, [self._lease_key, self._key], [self.consumer, self.lease_ms]
        )
        if held == 0:
            if self._holding:
                self._stop("lost the lease to another node")
            self._ask_at = now + min(self.lease_ms / 10_000, ASK_EVERY_S)
            return False
        if held == 2 and self._holding:  # it expired meanwhile: what this turn took is moot
            self._stop("lost the lease: it expired before a renewal")
        if not self._holding:
            log.info("archive feed: %s reads the archive stream", self.consumer)
            self._holding = True
            self._turn += 1
            self._cursor = _START  # rule 2: from the first entry not archived
        self._renew_at = now + self.lease_ms / 3000
        self._expires_at = now + self.lease_ms / 1000
        return True

    def _stop(self, why: str) -> None:
        """End this turn of reading (rule 2): what it took is forgotten."""
        log.warning("archive feed: %s %s", self.consumer, why)
        self._holding = False
        self._turn += 1
        self._taken.clear()

    async def _hand_over(self, waited_s: float) -> None:
        """Rule 3: give the lease up, and another node the time to take it."""
        self._stop(
            f"hands the archive stream over: a batch taken {waited_s:.1f}s ago is not archived yet"
        )
        self._ask_at = trio.current_time() + self.lease_ms / 1000
        await _RELEASE.run(self._redis, [self._lease_key], [self.consumer])

    async def release(self) -> None:
        async with self._lease_lock:
            if self._holding:
                log.info("archive feed: %s releases the archive stream", self.consumer)
                self._holding = False
                self._turn += 1
                self._taken.clear()
                await _RELEASE.run(self._redis, [self._lease_key], [self.consumer])
            else:
                await trio.lowlevel.checkpoint()


if TYPE_CHECKING:  # mypy proves the adapter implements its port

    def _implements_port(redis: RespClient) -> ports.ArchiveFeed:
        return RedisArchiveFeed(redis, "p", reads=redis, consumer="c")
