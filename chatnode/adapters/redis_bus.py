"""Room traffic through Redis: :class:`RedisBus` (``ports.Bus``); the archive stream it feeds
is read by :class:`~chatnode.adapters.redis_archive_feed.RedisArchiveFeed`. Needs Redis >= 7.0.

Keys (``P`` is the deployment's key prefix, room ids are decimal)::

    P:room:{id}:offset  string   newest offset of the room (INCR)
    P:room:{id}:log     stream   recent room log: entry id ``<offset>-0``, fields u, t, ts;
                                 trimmed to about ``room_log_length`` entries (MAXLEN ~)
    P:archive           stream   every message of every room until archived: field d, its
                                 archive document (``ChatMessage.document``); trimmed by the
                                 archive feed once archived
    P:archive:lease     string   the node reading the archive stream (expires)
    P:room:{id}         channel  live traffic: ``m<archive document>`` for a message (the
                                 bytes of the archive entry), ``s<json event>`` for a signal

Rules:

1. **One script publishes.** ``publish`` runs one Lua script (EVALSHA, loaded again on
   NOSCRIPT): INCR the counter, XADD the room log, XADD the archive stream, PUBLISH. Redis runs
   scripts one at a time, so offsets are dense and the same for every node, and a room's
   channel carries its messages in offset order. The archive entry and the published payload
   are the message's archive document, completed by the script: the node sends its head and
   tail, the offset goes between (one encoding of a message, made once). The script declares itself with ``#!lua``, so
   Redis refuses it before its first write when it is out of memory: all or nothing. A counter
   lost while the log survived (eviction) is rebuilt from the log's newest entry.
2. **One pub/sub connection per bus**, owned by ``serve``. ``subscribe`` sends SUBSCRIBE on it
   and returns once Redis acknowledged that very command: acknowledgements are counted per
   channel, so a subscribe racing an unsubscribe of the same room cannot take the other's ack.
3. **Reconnect, resubscribe, catch up.** When the connection is lost (Redis restart, CLIENT
   KILL, a keepalive PING unanswered for ``keepalive_s``), ``serve`` reconnects with
   exponential backoff, subscribes every room subscribed at that moment, and once Redis
   acknowledged them all calls ``handler.resubscribed()``: the node reads what it missed from
   the room logs. A handler that raises ``Unavailable`` there (or in ``deliver``: it could
   not read a gap) drops the connection too, so ``resubscribed()`` is called again after a
   growing backoff. A ``subscribe`` made while disconnected, or whose connection is lost
   before the ack, raises ``Unavailable`` and leaves the room unsubscribed.
4. **One task calls the handler**: the ``serve`` task, in arrival order, which per room is
   offset order. Traffic of a room that is no longer subscribed is dropped.
5. **Failures are loud.** A command that fails for a connection reason or times out raises
   ``Unavailable`` and is not retried here. A publish whose reply was lost may still have been
   applied: a caller that retries it can publish the message twice, under two offsets.

Durability: offsets live in Redis. A Redis restarted without persistence (``appendonly yes``)
starts every room at offset 1 again while the archive holds the old offsets. Run it with AOF.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from contextlib import suppress
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio
from coredis.response.types import StreamEntry

from chatnode.core import errors, ports
from chatnode.core.models import ChatMessage, Draft, document_head, document_tail

from .resp import Reply, RespClient, RespConnection, Script

log = logging.getLogger(__name__)

# KEYS: counter, room log, archive stream.
# ARGV: log length, channel, user, text, timestamp_ms, the archive document's head and tail.
_PUBLISH_LUA: Final = """#!lua
local offset = redis.call('INCR', KEYS[1])
if offset == 1 then
  local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
  if newest then
    offset = tonumber(string.match(newest[1], '^(%d+)')) + 1
    redis.call('SET', KEYS[1], offset)
  end
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], offset .. '-0',
  'u', ARGV[3], 't', ARGV[4], 'ts', ARGV[5])
local document = ARGV[6] .. offset .. ARGV[7]
redis.call('XADD', KEYS[3], '*', 'd', document)
redis.call('PUBLISH', ARGV[2], 'm' .. document)
return offset
"""
_PUBLISH: Final = Script(_PUBLISH_LUA)

_SUBSCRIBE: Final = b"SUBSCRIBE"
_UNSUBSCRIBE: Final = b"UNSUBSCRIBE"


@attrs.frozen
class BusKeys:
    """The key layout of the module docstring for one prefix."""

    prefix: str
    _channel_head: bytes = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_channel_head", f"{self.prefix}:room:".encode())

    def offset(self, room_id: int) -> str:
        return f"{self.prefix}:room:{room_id}:offset"

    def log(self, room_id: int) -> str:
        return f"{self.prefix}:room:{room_id}:log"

    def channel(self, room_id: int) -> bytes:
        return self._channel_head + b"%d" % room_id

    @property
    def archive(self) -> str:
        return f"{self.prefix}:archive"

    @property
    def archive_lease(self) -> str:
        return f"{self.prefix}:archive:lease"

    def room_of_channel(self, channel: bytes) -> int | None:
        head = self._channel_head
        tail = channel[len(head) :]
        if not channel.startswith(head) or not tail.isdigit():
            return None
        return int(tail)


def _offset_of(entry_id: bytes | str) -> int:
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(raw.split("-", 1)[0])


def stream_field(entry: StreamEntry, name: bytes) -> str:
    value = entry.field_values[name]
    return value.decode() if isinstance(value, bytes) else value


def _logged(room_id: int, entry: Reply) -> ChatMessage:
    """One XRANGE entry of a room log, ``[id, [field, value, ...]]``, as its message."""
    match entry:
        case [bytes(entry_id), [*pairs]] if len(pairs) % 2 == 0:
            fields = dict(zip(pairs[::2], pairs[1::2], strict=True))
            user, text, ts = fields.get(b"u"), fields.get(b"t"), fields.get(b"ts")
            if isinstance(user, bytes) and isinstance(text, bytes) and isinstance(ts, bytes):
                return ChatMessage(
                    room_id, _offset_of(entry_id), user.decode(), text.decode(), int(ts)
                )
    raise ValueError(f"malformed room log entry: {entry!r:.200}")


@attrs.define(eq=False)
class _Acks:
    """Commands sent for one channel on one connection, and acknowledgements received."""

    sent: int = 0
    acked: int = 0


_Tickets = dict[bytes, tuple[_Acks, int]]


@attrs.define(eq=False)
class _Link:
    """One pub/sub connection, and the acknowledgements Redis owes on it, per channel.

    Redis answers every channel of a SUBSCRIBE or UNSUBSCRIBE with one ack, in command order;
    the n-th command sent for a channel is therefore acknowledged by its n-th ack. A channel
    with nothing in flight is forgotten; a waiter keeps its own counter object, so a later
    command for the same channel starts a new count without disturbing it.
    """

    conn: RespConnection
    lost: bool = False
    pong: trio.Event = attrs.field(factory=trio.Event)
    _channels: dict[bytes, _Acks] = attrs.field(factory=dict)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def send(self, command: bytes, channels: Iterable[bytes]) -> _Tickets:
        """Queue the command; return each channel's ticket for :meth:`wait_acked`.

        Raise ``Unavailable`` if the connection is already lost.
        """
        channels = list(channels)
        if not channels:
            return {}
        self.conn.send_nowait(command, *channels)
        tickets: _Tickets = {}
        for channel in channels:
            acks = self._channels.setdefault(channel, _Acks())
            acks.sent += 1
            tickets[channel] = (acks, acks.sent)
        return tickets

    def acknowledge(self, channel: bytes) -> None:
        acks = self._channels.get(channel)
        if acks is None:
            return
        acks.acked += 1
        if acks.acked >= acks.sent:
            del self._channels[channel]
        self._changed.set()
        self._changed = trio.Event()

    def ponged(self) -> None:
        self.pong.set()
        self.pong = trio.Event()

    @staticmethod
    def all_acked(tickets: _Tickets) -> bool:
        return all(acks.acked >= ticket for acks, ticket in tickets.values())

    async def wait_acked(self, tickets: _Tickets) -> None:
        while not self.all_acked(tickets):
            if self.lost:
                raise errors.Unavailable("Redis: the bus lost its pub/sub connection")
            await self._changed.wait()

    def close(self) -> None:
        self.lost = True
        self._changed.set()


@attrs.define(eq=False)
class RedisBus:
    """``ports.Bus`` on Redis (rules in the module docstring). ``serve`` once at a time.

    The client belongs to the caller: ``aclose`` does not close it. It is
    :class:`~chatnode.adapters.resp.RespClient`, not coredis: this is the per-message path.
    """

    _redis: RespClient
    prefix: str
    room_log_length: int = attrs.field(default=1000, kw_only=True)
    keepalive_s: float = attrs.field(default=10.0, kw_only=True)
    min_backoff_s: float = attrs.field(default=0.05, kw_only=True)
    max_backoff_s: float = attrs.field(default=5.0, kw_only=True)
    keys: BusKeys = attrs.field(init=False)
    reconnects: int = attrs.field(default=0, init=False)
    pongs: int = attrs.field(default=0, init=False)
    """Keepalive PINGs answered, over all connections (``wait_for_pongs`` waits on it)."""
    _pong_counted: trio.Event = attrs.field(factory=trio.Event, init=False)
    _rooms: set[int] = attrs.field(factory=set, init=False)
    _link: _Link | None = attrs.field(default=None, init=False)
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

    # -- the log ------------------------------------------------------------------------------

    async def publish(self, draft: Draft) -> ChatMessage:
        room_id = draft.room_id
        offset = await _PUBLISH.run(
            self._redis,
            keys=[self.keys.offset(room_id), self.keys.log(room_id), self.keys.archive],
            args=[
                self.room_log_length,
                self.keys.channel(room_id),
                draft.user,
                draft.text,
                draft.timestamp_ms,
                document_head(room_id),
                document_tail(draft.user, draft.text, draft.timestamp_ms),
            ],
        )
        if not isinstance(offset, int):
            raise TypeError(f"the publish script returned {offset!r}")
        return ChatMessage(room_id, offset, draft.user, draft.text, draft.timestamp_ms)

    async def last_offset(self, room_id: int) -> int:
        value = await self._redis.call("GET", self.keys.offset(room_id))
        return int(value) if isinstance(value, bytes) else 0

    async def read_log(self, room_id: int, *, after_offset: int, limit: int) -> list[ChatMessage]:
        if limit <= 0:
            return []
        entries = await self._redis.call(
            "XRANGE", self.keys.log(room_id), f"{max(0, after_offset) + 1}-0", "+", "COUNT", limit
        )
        if not isinstance(entries, list):
            raise TypeError(f"XRANGE returned {entries!r:.200}")
        return [_logged(room_id, entry) for entry in entries]

    # -- fan-out ------------------------------------------------------------------------------

    async def signal(self, room_id: int, event: dict[str, Any]) -> None:
        payload = b"s" + json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()
        await self._redis.call("PUBLISH", self.keys.channel(room_id), payload)

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
            self._send_quietly(link, _UNSUBSCRIBE, channel)
            raise

    async def unsubscribe(self, room_id: int) -> None:
        self._rooms.discard(room_id)
        if self._link is not None:
            self._send_quietly(self._link, _UNSUBSCRIBE, self.keys.channel(room_id))
        await trio.lowlevel.checkpoint()

    @staticmethod
    def _send_quietly(link: _Link, command: bytes, channel: bytes) -> None:
        """Best effort: a lost connection takes its subscriptions with it."""
        if link.lost:
            return
        with suppress(errors.Unavailable):
            link.send(command, [channel])

    # -- the receiving side -------------------------------------------------------------------

    async def serve(self, handler: ports.BusHandler, *, task_status: ports.TaskStatus) -> None:
        """Receive until cancelled, reconnecting as needed (rules 2-4). ``started()`` comes
        once the first pub/sub connection is up; until then connecting is retried."""
        if self._serving:
            raise RuntimeError("this RedisBus is already serving")
        self._serving = True
        backoff_s = self.min_backoff_s
        first = True
        try:
            while True:
                came_up = healthy = False
                try:
                    conn = await self._redis.connect()
                except errors.Unavailable as exc:
                    log.warning("Redis bus: %s; retrying in %.2fs", exc, backoff_s)
                else:
                    link = _Link(conn)
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
        finally:
            self._serving = False

    async def _run_link(
        self, link: _Link, handler: ports.BusHandler, task_status: ports.TaskStatus, first: bool
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
                event = json.loads(data[1:])
                if not isinstance(event, dict):
                    raise ValueError("a signal event must be a JSON object")
            else:
                raise ValueError("unknown payload kind")
        except (ValueError, TypeError):
            log.warning("Redis bus: dropped a malformed payload on %r: %.80r", channel, data)
            return
        if data.startswith(b"m"):
            await handler.deliver(message)
        else:
            await handler.signal(room_id, event)

    async def _keepalive(self, link: _Link) -> None:
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
