"""Room traffic through Redis: :class:`RedisBus` (``ports.Bus``); the archive stream it feeds
is read by :class:`~chatnode.adapters.redis.archive_feed.RedisArchiveFeed`. Needs Redis >= 7.0.

Keys (``P`` is the deployment's key prefix, room ids are decimal)::

    P:room:{id}:offset  string   newest offset of the room
    P:room:{id}:log     stream   recent room log: entry id ``<offset>-0``, fields u, t, ts
                                 (and e, b: a membership change's event and by);
                                 trimmed to about ``room_log_length`` entries (MAXLEN ~)
    P:room:{id}:sent:{user}:{client id}
                        string   ``<offset>:<timestamp>`` of a send with a client id (EX the
                                 dedup window)
    P:archive           stream   every message of every room until archived: field d, its
                                 archive document (``ChatMessage.document``); trimmed by the
                                 archive feed once archived
    P:archive:lease     string   the node reading the archive stream (expires)
    P:incarnation       string   epoch ms when this Redis began holding the deployment's data
    P:room:{id}         channel  live traffic: ``m<archive document>`` for a message (the
                                 bytes of the archive entry), ``s<json event>`` for a signal

Rules:

1. **One script publishes.** ``publish`` runs one Lua script (EVALSHA, loaded again on
   NOSCRIPT): next offset, XADD the room log, XADD the archive stream, PUBLISH. Redis runs
   scripts one at a time, so offsets are dense and the same for every node, and a room's
   channel carries its messages in offset order. The archive entry and the published payload
   are the message's archive document, completed by the script: the node sends its head and
   tail, the offset goes between (one encoding of a message, made once). The script declares
   itself with ``#!lua``, so Redis refuses it before its first write when it is out of
   memory: all or nothing.
2. **One pub/sub connection per bus**, owned by ``serve``. ``subscribe`` sends SUBSCRIBE on it
   and returns once Redis acknowledged that very command: acknowledgements are counted per
   channel, so a subscribe racing an unsubscribe of the same room cannot take the other's ack.
3. **Reconnect, resubscribe, catch up.** When the connection is lost (Redis restart, CLIENT
   KILL, a keepalive PING unanswered for ``keepalive_s``), ``serve`` reconnects with
   exponential backoff, subscribes every room subscribed at that moment, and once Redis
   acknowledged them all calls ``handler.resubscribed()``: the node reads what it missed from
   the room logs, and gives back what Redis lost (rule 6). A handler that raises
   ``Unavailable`` there (or in ``deliver``: it could not read a gap) drops the connection
   too, so ``resubscribed()`` is called again after a growing backoff. A ``subscribe`` made
   while disconnected, or whose connection is lost before the ack, raises ``Unavailable`` and
   leaves the room unsubscribed.
4. **One task calls the handler**: the ``serve`` task, in arrival order, which per room is
   offset order. Traffic of a room that is no longer subscribed is dropped.
5. **Failures are loud.** A command that fails for a connection reason or times out raises
   ``Unavailable`` and is not retried here. A publish whose reply was lost may still have been
   applied: a caller retries it with the same client id (rule 8).
6. **Offsets are never reused.** Redis may lose data: restarted without persistence, an AOF
   that lost its last second with the machine, a failover to a replica that lagged. The bus
   remembers the newest offset it saw of every subscribed room (published or delivered) and
   each publish passes it as a floor. A counter that is missing is rebuilt from the room
   log's newest entry. A counter behind the floor (or missing, with an empty log) makes the
   script refuse once (``OffsetUnknown``): the node restores the room from what it holds
   (``restore``: the counter and the room log's missing tail, from its session's cache), and
   the next publish continues above the floor whatever the log then holds. With no floor
   either (this node never saw the room) the node restores the room from the archive
   (``restore(seed=True)``), which waits until ``settle_s`` after Redis lost its data
   (``P:incarnation``): time for the nodes that saw the room to reconnect and restore it
   first. Every node restores its rooms when its pub/sub connection comes back too.
7. **Every message is kept until archived.** A message in the archive stream exists only in
   Redis until the archiver stored it, so the bus keeps each message it published (its
   document, the stream id the script returned, and the serial of the connection that
   answered) until the stream has moved past it: every ``archive_check_s`` the bus reads the
   stream's first entry on its command connection and forgets the messages with a smaller id
   (the stream is trimmed only below archived entries). Ids are compared only with a read on
   the same connection: a restart or a failover ends connections, so a message kept under
   an older connection is written to the archive stream again (a new entry; the archive
   stores a message once per room and offset), and its room's counter restored. At most
   ``keep_bytes`` of documents are kept (oldest dropped first, counted in ``unprotected``):
   beyond that an archive outage's messages are as durable as Redis alone.
8. **Idempotent send.** A draft with a client id sets ``P:room:{id}:sent:{user}:{client id}``
   in the publish script; a draft finding that key is not published again, the earlier
   offset and timestamp come back.

Durability: with the recommended Redis settings (``appendonly yes``, ``appendfsync always``,
``maxmemory-policy noeviction``) Redis loses nothing a node acknowledged; rules 6 and 7 make a
Redis that does lose data lose none of the messages the nodes that published or delivered
them still hold (docs/faults.md: what is measured, and the window left).

The keys and the scripts that change them are in :mod:`.bus_keys`, a pub/sub connection and
its acknowledgements in :mod:`.subscriptions`; the bus itself keeps one state, the rooms
subscribed and their floors (rules 3, 6, 7), and the messages kept until archived.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Final, NamedTuple

import attrs
import trio

from chatnode.core import errors, ports
from chatnode.core.models import ChatMessage, Draft, RoomEvent, document_head, document_tail
from chatnode.wire.resp import Reply, RespError

from .bus_keys import (
    HEAD,
    MARK,
    PUBLISH,
    RESTORE,
    WRITE_BACK,
    BusKeys,
    logged_message,
    stream_id,
)
from .client import RespClient
from .subscriptions import Link

log = logging.getLogger(__name__)

_SUBSCRIBE: Final = b"SUBSCRIBE"
_UNSUBSCRIBE: Final = b"UNSUBSCRIBE"
_NO_OFFSET: Final = b"NOOFFSET"
_BEHIND: Final = b"BEHIND"
_WRITE_BACK_CHUNK: Final = 500


class _Kept(NamedTuple):
    """A message this bus published, kept until the archive stream moved past it (rule 7).
    (A tuple: one is made per publish.)"""

    seq: int
    """Order of keeping: kept before a read of the stream means added to it before."""
    serial: int
    """The command connection whose reply gave ``entry_id``."""
    entry_id: bytes
    room_id: int
    offset: int
    document: bytes


@attrs.define(eq=False)
class RedisBus:
    """``ports.Bus`` on Redis (rules in the module docstring). ``serve`` once at a time.

    The client belongs to the caller: ``aclose`` does not close it. Its command connection
    should be the bus's alone: publishing is on the per-message path.
    """

    _redis: RespClient
    prefix: str
    room_log_length: int = attrs.field(default=1000, kw_only=True)
    keepalive_s: float = attrs.field(default=10.0, kw_only=True)
    min_backoff_s: float = attrs.field(default=0.05, kw_only=True)
    max_backoff_s: float = attrs.field(default=1.0, kw_only=True)
    dedup_window_s: float = attrs.field(default=300.0, kw_only=True)
    """Rule 8: how long a client id keeps its send from being published again."""
    settle_s: float = attrs.field(default=10.0, kw_only=True)
    """Rule 6: after Redis lost its data, how long before a room nobody restored continues
    from the archive (the nodes reconnect within ``max_backoff_s``)."""
    archive_check_s: float = attrs.field(default=1.0, kw_only=True)
    """Rule 7: how often the kept messages are compared with the archive stream."""
    keep_bytes: int = attrs.field(default=32 << 20, kw_only=True)
    """Rule 7: the most bytes of documents kept until archived."""
    keys: BusKeys = attrs.field(init=False)
    reconnects: int = attrs.field(default=0, init=False)
    pongs: int = attrs.field(default=0, init=False)
    """Keepalive PINGs answered, over all connections (``wait_for_pongs`` waits on it)."""
    written_back: int = attrs.field(default=0, init=False)
    """Kept messages written to the archive stream again after a reconnect (rule 7)."""
    unprotected: int = attrs.field(default=0, init=False)
    """Messages dropped from the kept ones past ``keep_bytes`` before they were archived."""
    _pong_counted: trio.Event = attrs.field(factory=trio.Event, init=False)
    _rooms: set[int] = attrs.field(factory=set, init=False)
    _seen: dict[int, int] = attrs.field(factory=dict, init=False)
    """The newest offset seen of each subscribed room: the publish floor (rule 6)."""
    _behind: set[int] = attrs.field(factory=set, init=False)
    """Rooms whose counter was behind their floor once: the next publish continues above."""
    _kept: deque[_Kept] = attrs.field(factory=deque, init=False)
    _kept_bytes: int = attrs.field(default=0, init=False)
    _kept_seq: int = attrs.field(default=0, init=False)
    _link: Link | None = attrs.field(default=None, init=False)
    _serving: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self.keys = BusKeys(self.prefix)

    async def wait_for_pongs(self, count: int) -> None:
        """Return once ``pongs`` reached ``count`` (health checks, tests)."""
        while self.pongs < count:
            await self._pong_counted.wait()
        await trio.lowlevel.checkpoint()

    async def check(self) -> None:
        await self._redis.call("PING")

    async def aclose(self) -> None:
        """Nothing to release: ``serve`` ends when cancelled, the client is the caller's."""
        await trio.lowlevel.checkpoint()

    def counters(self) -> Mapping[str, int]:
        return {
            "unarchived_kept": len(self._kept),
            "unarchived_written_back_total": self.written_back,
            "unarchived_unprotected_total": self.unprotected,
        }

    # -- the log ------------------------------------------------------------------------------

    async def publish(self, draft: Draft) -> ChatMessage:
        room_id = draft.room_id
        keys = [self.keys.offset(room_id), self.keys.log(room_id), self.keys.archive]
        if draft.client_id is not None:
            keys.append(self.keys.sent(room_id, draft.user, draft.client_id))
        event = draft.event
        document_tail_ = document_tail(draft.user, draft.text, draft.timestamp_ms, event, draft.by)
        args: list[str | bytes | int] = [
            self.room_log_length,
            self.keys.channel(room_id),
            draft.user,
            draft.text,
            draft.timestamp_ms,
            document_head(room_id),
            document_tail_,
            self._seen.get(room_id, -1),
            max(1, round(self.dedup_window_s)),
            1 if room_id in self._behind else 0,
        ]
        if event is not None:
            args += [event, draft.by or ""]
        try:
            reply, serial = await PUBLISH.run_tracked(self._redis, keys, args)
        except RespError as exc:
            if exc.prefix == _BEHIND:
                self._behind.add(room_id)
            if exc.prefix in (_NO_OFFSET, _BEHIND):
                raise errors.OffsetUnknown(
                    f"Redis lost the offset of chatroom {room_id}; restoring it"
                ) from None
            raise
        self._behind.discard(room_id)
        match reply:
            case [int(offset), bytes(entry_id)] if offset > 0:
                self._keep(serial, entry_id, room_id, offset, document_tail_)
                if room_id in self._rooms and offset > self._seen.get(room_id, 0):
                    self._seen[room_id] = offset
                if event is None:
                    return ChatMessage(room_id, offset, draft.user, draft.text, draft.timestamp_ms)
                return ChatMessage(
                    room_id, offset, draft.user, draft.text, draft.timestamp_ms, event, draft.by
                )
            case [0, bytes(sent)]:
                offset_raw, _, timestamp_raw = sent.partition(b":")
                return ChatMessage(
                    room_id,
                    int(offset_raw),
                    draft.user,
                    draft.text,
                    int(timestamp_raw),
                    event,
                    draft.by if event is not None else None,
                )
        raise TypeError(f"the publish script returned {reply!r:.200}")

    def _keep(self, serial: int, entry_id: bytes, room_id: int, offset: int, tail: bytes) -> None:
        """Keep a published message until archived (rule 7), dropping the oldest kept past
        ``keep_bytes``."""
        document = document_head(room_id) + b"%d" % offset + tail
        self._kept_seq += 1
        self._kept.append(_Kept(self._kept_seq, serial, entry_id, room_id, offset, document))
        self._kept_bytes += len(document)
        while self._kept_bytes > self.keep_bytes and self._kept:
            dropped = self._kept.popleft()
            self._kept_bytes -= len(dropped.document)
            if self.unprotected % 10_000 == 0:
                log.warning(
                    "Redis bus: more than %d bytes of published messages wait for the archive;"
                    " the oldest are no longer kept by this node (%d so far)",
                    self.keep_bytes,
                    self.unprotected + 1,
                )
            self.unprotected += 1

    async def last_offset(self, room_id: int) -> int | None:
        head = await HEAD.run(self._redis, [self.keys.offset(room_id), self.keys.log(room_id)], [])
        if not isinstance(head, int):
            raise TypeError(f"the head script returned {head!r:.200}")
        if head < 0:
            return None
        if room_id in self._rooms and head > self._seen.get(room_id, 0):
            self._seen[room_id] = head
        return head

    async def restore(
        self,
        room_id: int,
        *,
        last_offset: int,
        messages: Sequence[ChatMessage] = (),
        seed: bool = False,
    ) -> int:
        args: list[str | bytes | int] = [
            last_offset,
            self.room_log_length,
            1 if seed else 0,
            int(self.settle_s * 1000),
        ]
        for m in messages:
            args += [m.offset, m.user, m.text, m.timestamp_ms, m.event or "", m.by or ""]
        reply = await RESTORE.run(
            self._redis,
            [self.keys.offset(room_id), self.keys.log(room_id), self.keys.incarnation],
            args,
        )
        match reply:
            case [int(offset), int(wait_ms)]:
                if offset < 0:
                    raise errors.Unavailable(
                        f"Redis lost its data moments ago; chatroom {room_id} waits"
                        f" {wait_ms / 1000:.1f}s for the nodes to restore it",
                        retry_after_s=wait_ms / 1000,
                    )
                if room_id in self._rooms and offset > self._seen.get(room_id, 0):
                    self._seen[room_id] = offset
                return offset
        raise TypeError(f"the restore script returned {reply!r:.200}")

    async def read_log(self, room_id: int, *, after_offset: int, limit: int) -> list[ChatMessage]:
        if limit <= 0:
            return []
        entries = await self._redis.call(
            "XRANGE", self.keys.log(room_id), f"{max(0, after_offset) + 1}-0", "+", "COUNT", limit
        )
        if not isinstance(entries, list):
            raise TypeError(f"XRANGE returned {entries!r:.200}")
        return [logged_message(room_id, entry) for entry in entries]

    # -- kept until archived (rule 7) -----------------------------------------------------------

    async def _keep_until_archived(self) -> None:
        """Every ``archive_check_s``: forget the kept messages the archive stream moved past,
        and write back those kept under an older connection."""
        while True:
            await trio.sleep(self.archive_check_s)
            if not self._kept:
                continue
            try:
                await self._check_archived()
            except errors.Unavailable as exc:
                log.debug("Redis bus: could not check the archive stream (%s)", exc)

    async def _check_archived(self) -> None:
        kept_before = self._kept_seq
        reply, serial = await self._redis.call_tracked(
            "XRANGE", self.keys.archive, "-", "+", "COUNT", 1
        )
        if not isinstance(reply, list):
            raise TypeError(f"XRANGE returned {reply!r:.200}")
        stale = [k for k in self._kept if k.serial != serial]
        if stale:
            await self._write_back(stale)
            return  # compare with a read made after the write-back, next time
        first: tuple[int, int] | None = None
        match reply:
            case [[bytes(first_id), _], *_]:
                first = stream_id(first_id)
        kept: deque[_Kept] = deque()
        for k in self._kept:
            if k.seq <= kept_before and (first is None or stream_id(k.entry_id) < first):
                self._kept_bytes -= len(k.document)
            else:
                kept.append(k)
        self._kept = kept

    async def _write_back(self, stale: list[_Kept]) -> None:
        """Redis restarted or failed over since these were kept: it may have lost them (and
        their rooms' counters). Restore each room's counter to the newest offset kept of it,
        then append the documents to the archive stream again (rule 7)."""
        newest: dict[int, int] = {}
        for k in stale:
            newest[k.room_id] = max(newest.get(k.room_id, 0), k.offset)
        for room_id, offset in newest.items():
            await self.restore(room_id, last_offset=offset)
        renewed: dict[int, _Kept] = {}
        for start in range(0, len(stale), _WRITE_BACK_CHUNK):
            chunk = stale[start : start + _WRITE_BACK_CHUNK]
            ids, serial = await WRITE_BACK.run_tracked(
                self._redis, [self.keys.archive], [k.document for k in chunk]
            )
            if not isinstance(ids, list) or len(ids) != len(chunk):
                raise TypeError(f"the write-back script returned {ids!r:.200}")
            for k, entry_id in zip(chunk, ids, strict=True):
                if isinstance(entry_id, bytes):
                    renewed[k.seq] = k._replace(serial=serial, entry_id=entry_id)
        self._kept = deque(renewed.get(k.seq, k) for k in self._kept)
        self.written_back += len(renewed)
        log.warning(
            "Redis bus: Redis restarted or failed over; wrote %d published messages not known"
            " to be archived back to the archive stream (%d rooms' offsets restored)",
            len(renewed),
            len(newest),
        )

    # -- fan-out ------------------------------------------------------------------------------

    async def signal(self, room_id: int, event: RoomEvent) -> None:
        await self._redis.call("PUBLISH", self.keys.channel(room_id), b"s" + event.data)

    async def subscribe(self, room_id: int) -> None:
        link = self._link
        if link is None or link.lost:
            await trio.lowlevel.checkpoint()
            raise errors.Unavailable("Redis: the bus is not connected (reconnecting)")
        channel = self.keys.channel(room_id)
        self._rooms.add(room_id)
        try:
            tickets = link.send(_SUBSCRIBE, [channel])
            await link.wait_acked(tickets)
        except BaseException:
            self._rooms.discard(room_id)
            self._seen.pop(room_id, None)
            self._send_quietly(link, _UNSUBSCRIBE, channel)
            raise

    async def unsubscribe(self, room_id: int) -> None:
        self._rooms.discard(room_id)
        self._seen.pop(room_id, None)
        if self._link is not None:
            self._send_quietly(self._link, _UNSUBSCRIBE, self.keys.channel(room_id))
        await trio.lowlevel.checkpoint()

    @staticmethod
    def _send_quietly(link: Link, command: bytes, channel: bytes) -> None:
        """Best effort: a lost connection takes its subscriptions with it."""
        if link.lost:
            return
        with suppress(errors.Unavailable):
            link.send(command, [channel])

    # -- the receiving side -------------------------------------------------------------------

    async def serve(self, handler: ports.BusHandler, *, task_status: ports.TaskStatus) -> None:
        """Receive until cancelled, reconnecting as needed (rules 2-4), and keep the published
        messages until archived (rule 7). ``started()`` comes once the first pub/sub
        connection is up; until then connecting is retried."""
        if self._serving:
            raise RuntimeError("this RedisBus is already serving")
        self._serving = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_until_archived)
                await self._serve_links(handler, task_status)
        finally:
            self._serving = False

    async def _serve_links(self, handler: ports.BusHandler, task_status: ports.TaskStatus) -> None:
        """One pub/sub connection after another, with exponential backoff (rule 3)."""
        backoff_s = self.min_backoff_s
        first = True
        while True:
            came_up = healthy = False
            try:
                conn = await self._redis.connect()
            except errors.Unavailable as exc:
                log.warning("Redis bus: %s; retrying in %.2fs", exc, backoff_s)
            else:
                link = Link(conn)
                try:
                    came_up, healthy = await self._run_link(link, handler, task_status, first)
                finally:
                    link.close()
                    if self._link is link:
                        self._link = None
                    await conn.aclose()
            if came_up:
                first = False
            if came_up and healthy:
                backoff_s = self.min_backoff_s
            await trio.sleep(backoff_s)
            backoff_s = min(self.max_backoff_s, 2 * backoff_s)

    async def _run_link(
        self, link: Link, handler: ports.BusHandler, task_status: ports.TaskStatus, first: bool
    ) -> tuple[bool, bool]:
        """Subscribe every current room on ``link`` and dispatch its traffic until it is lost.

        Return (came up: all rooms acknowledged, healthy: the handler did not fail). A handler
        that raises ``Unavailable`` (it could not read what it missed) drops the link: the next
        one calls ``resubscribed()`` again, after a growing backoff.
        """
        tickets = link.send(_SUBSCRIBE, [self.keys.channel(r) for r in sorted(self._rooms)])
        self._link = link
        up = False

        async def came_up() -> None:
            nonlocal up
            if await MARK.run(self._redis, [self.keys.incarnation], []) == 1:
                log.warning(
                    "Redis bus: Redis holds no data of this deployment (a new deployment, or"
                    " Redis lost its data): rooms continue above what the nodes and the"
                    " archive know"
                )
            up = True
            if first:
                task_status.started()
            else:
                self.reconnects += 1
                log.info("Redis bus: reconnected; %d rooms resubscribed", len(tickets))
                await handler.resubscribed()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.conn.write_forever)
            nursery.start_soon(self._keepalive, link)
            try:
                if link.all_acked(tickets):
                    await came_up()
                while True:
                    try:
                        pushes = await link.conn.receive()
                    except errors.Unavailable as exc:
                        log.warning("Redis bus: pub/sub connection lost (%s); reconnecting", exc)
                        return up, True
                    for push in pushes:
                        if push == b"PONG":  # a PING's answer while subscribed to nothing
                            link.ponged()
                            continue
                        if not isinstance(push, list) or len(push) < 2:
                            continue
                        kind, channel = push[0], push[1]
                        if kind == b"message" and len(push) == 3 and isinstance(channel, bytes):
                            await self._dispatch(handler, channel, push[2])
                        elif kind == b"subscribe" or kind == b"unsubscribe":
                            if isinstance(channel, bytes):
                                link.acknowledge(channel)
                            if not up and link.all_acked(tickets):
                                await came_up()
                        elif kind == b"pong":
                            link.ponged()
            except errors.Unavailable as exc:
                log.warning("Redis bus: the node could not catch up (%s); reconnecting", exc)
                return up, False
            finally:
                nursery.cancel_scope.cancel()

    async def _dispatch(self, handler: ports.BusHandler, channel: bytes, data: Reply) -> None:
        if not isinstance(data, bytes):
            return
        room_id = self.keys.room_of_channel(channel)
        if room_id is None or room_id not in self._rooms:
            return  # unsubscribed while the message was on its way
        try:
            if data.startswith(b"m"):
                message = ChatMessage.from_document(data[1:])
                if message.room_id != room_id:
                    raise ValueError("a message of another room")
            elif data.startswith(b"s"):
                event = RoomEvent.decode(data[1:])
            else:
                raise ValueError("unknown payload kind")
        except (ValueError, TypeError):
            log.warning("Redis bus: dropped a malformed payload on %r: %.80r", channel, data)
            return
        if data.startswith(b"m"):
            if message.offset > self._seen.get(room_id, 0):
                self._seen[room_id] = message.offset
            await handler.deliver(message)
        else:
            await handler.signal(room_id, event)

    async def _keepalive(self, link: Link) -> None:
        """PING every ``keepalive_s``; no PONG within ``keepalive_s`` drops the connection
        (a half-open TCP connection would otherwise look idle forever)."""
        while True:
            await trio.sleep(self.keepalive_s)
            pong = link.pong
            try:
                link.conn.send_nowait("PING")
            except errors.Unavailable:
                return  # lost: the reader sees it too
            with trio.move_on_after(self.keepalive_s):
                await pong.wait()
            if pong.is_set():
                self.pongs += 1
                self._pong_counted.set()
                self._pong_counted = trio.Event()
            else:
                log.warning("Redis bus: no PONG within %.1fs; reconnecting", self.keepalive_s)
                link.conn.fail(f"no PONG within {self.keepalive_s}s")
                return


if TYPE_CHECKING:  # mypy proves the adapters implement their ports

    def _implements_ports(redis: RespClient) -> ports.Bus:
        return RedisBus(redis, "p")
