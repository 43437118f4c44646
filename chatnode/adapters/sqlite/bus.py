"""``ports.Bus`` on the embedded database: the room log is the ``messages`` table.

Rules:

1. **A bus never waits on a slow node.** Each serving bus has a bounded inbox drained by its
   own ``serve`` task, which alone calls the handler. When an inbox is full the bus drops
   messages until it has drained, then calls ``handler.resubscribed()`` -- what a Redis
   subscriber disconnected for a full output buffer sees -- and the node catches up with
   ``read_log``.
2. **One order for every bus** on a database: they share a :class:`LocalBroker`
   (``broker.py``), whose lock ``publish`` holds across the append and the fan-out.
3. **The append runs on the loop when it can** (``runner.py`` rule 2): no await after it
   has started, so a cancelled publish either published nothing or completes, fan-out
   included.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import attrs
import trio

from chatnode.adapters.sqlite.broker import Item, LocalBroker, Signal
from chatnode.adapters.sqlite.messages import MESSAGE_COLUMNS, last_offset, message_of, read_range
from chatnode.adapters.sqlite.runner import SqliteDatabase
from chatnode.adapters.sqlite.transaction import Transaction
from chatnode.core import errors, ports
from chatnode.core.models import ChatMessage, Draft, RoomEvent


def _append(draft: Draft, dedup_window_ms: int, conn: sqlite3.Connection) -> _Appended:
    """Insert ``draft`` as the room's next message (a membership change too, with its event
    and ``by``), or find the message its client id already published within the dedup
    window; one transaction."""
    with Transaction(conn):
        if draft.client_id is not None:
            row = conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM sent_ids AS s JOIN messages AS m"
                ' ON m.room_id = s.room_id AND m."offset" = s."offset"'
                " WHERE s.room_id = ? AND s.user = ? AND s.client_id = ? AND s.expires_at_ms > ?",
                (draft.room_id, draft.user, draft.client_id, draft.timestamp_ms),
            ).fetchone()
            if row is not None:
                return _Appended(message_of(row), duplicate=True)
        offset = last_offset(conn, draft.room_id) + 1
        event = draft.event
        by = None if event is None else draft.by or ""
        conn.execute(
            'INSERT INTO messages (room_id, "offset", user, text, timestamp_ms, event, by_user)'
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (draft.room_id, offset, draft.user, draft.text, draft.timestamp_ms, event, by),
        )
        if draft.client_id is not None:
            conn.execute(
                'INSERT OR REPLACE INTO sent_ids (room_id, user, client_id, "offset", expires_at_ms)'
                " VALUES (?, ?, ?, ?, ?)",
                (
                    draft.room_id,
                    draft.user,
                    draft.client_id,
                    offset,
                    draft.timestamp_ms + dedup_window_ms,
                ),
            )
    message = ChatMessage(
        draft.room_id, offset, draft.user, draft.text, draft.timestamp_ms, event, by
    )
    return _Appended(message, duplicate=False)


class _Appended(NamedTuple):
    message: ChatMessage
    duplicate: bool


async def _recover(handler: ports.BusHandler) -> None:
    """The handler could not apply a delivery (its gap fill hit an unavailable backend):
    retry its catch-up with backoff until it succeeds, as a Redis bus does after a reconnect."""
    backoff_s = 0.05
    while True:
        await trio.sleep(backoff_s)
        try:
            await handler.resubscribed()
            return
        except errors.Unavailable:
            backoff_s = min(2.0, backoff_s * 2)


@attrs.define(eq=False)
class SqliteBus:
    """``ports.Bus`` for the embedded node: the room log is the ``messages`` table.

    ``publish`` assigns ``offset = last + 1`` and inserts in one transaction (on the event loop
    when it can, rule 3), then hands the message to every bus serving on the same ``broker``
    (this one included) that is subscribed to the room, all under the broker's FIFO lock
    (rule 2); once the insert has started the publish completes even if the caller is
    cancelled. Each bus delivers from its own ``serve`` task, in offset order, through a bounded
    inbox of ``inbox_size`` items (rule 1). A draft whose client id the same user
    published in the room less than ``dedup_window_s`` ago is found in ``sent_ids`` (same
    transaction) and its message returned, nothing inserted or fanned out.

    Subscriptions are a set: subscribing twice and unsubscribing once ends delivery. A signal
    event is handed to every handler as it is: a ``RoomEvent`` is frozen and carries its JSON.
    """

    _db: SqliteDatabase
    _broker: LocalBroker
    inbox_size: int = attrs.field(default=1024, kw_only=True)
    dedup_window_s: float = attrs.field(default=300.0, kw_only=True)
    _rooms: set[int] = attrs.field(factory=set, init=False)
    _inbox: trio.MemorySendChannel[Item] | None = attrs.field(default=None, init=False)
    _overflowed: bool = attrs.field(default=False, init=False)

    async def check(self) -> None:
        await self._db.check()

    async def aclose(self) -> None:
        """Nothing to release: ``serve`` stops when its task is cancelled."""
        await trio.lowlevel.checkpoint()

    async def publish(self, draft: Draft) -> ChatMessage:
        broker = self._broker
        async with broker.lock:
            # No await after the append has started (rule 3).
            window_ms = int(self.dedup_window_s * 1000)
            appended = await self._db.run(partial(_append, draft, window_ms), inline=True)
            if not appended.duplicate:
                broker.fan_out(appended.message)
        return appended.message

    async def signal(self, room_id: int, event: RoomEvent) -> None:
        item = Signal(room_id, event)
        await trio.lowlevel.checkpoint()
        self._broker.fan_out(item)

    async def subscribe(self, room_id: int) -> None:
        self._rooms.add(room_id)
        await trio.lowlevel.checkpoint()

    async def unsubscribe(self, room_id: int) -> None:
        self._rooms.discard(room_id)
        await trio.lowlevel.checkpoint()

    async def last_offset(self, room_id: int) -> int:
        return await self._db.run(lambda conn: last_offset(conn, room_id))

    def counters(self) -> Mapping[str, int]:
        return {}

    async def restore(
        self,
        room_id: int,
        *,
        last_offset: int,
        messages: Sequence[ChatMessage] = (),
        seed: bool = False,
    ) -> int:
        """Nothing to restore: the room log is the database, which loses nothing that was
        acknowledged (``messages.py``)."""
        return await self.last_offset(room_id)

    async def read_log(self, room_id: int, *, after_offset: int, limit: int) -> list[ChatMessage]:
        return await self._db.run(lambda conn: read_range(conn, room_id, after_offset, None, limit))

    async def serve(self, handler: ports.BusHandler, *, task_status: ports.TaskStatus) -> None:
        """Deliver to ``handler`` until cancelled; one ``serve`` per bus at a time."""
        if self._inbox is not None:
            raise RuntimeError("this SqliteBus is already serving")
        send, receive = trio.open_memory_channel[Item](self.inbox_size)
        self._inbox, self._overflowed = send, False
        self._broker.attach(self._offer)
        try:
            task_status.started()
            async for item in receive:
                try:
                    await self._dispatch(handler, item)
                except errors.Unavailable:
                    await _recover(handler)
                if self._overflowed and receive.statistics().current_buffer_used == 0:
                    self._overflowed = False
                    await handler.resubscribed()
        finally:
            self._broker.detach(self._offer)
            self._inbox = None
            send.close()
            receive.close()

    async def _dispatch(self, handler: ports.BusHandler, item: Item) -> None:
        if item.room_id not in self._rooms:
            return  # unsubscribed while the item waited in the inbox
        if isinstance(item, ChatMessage):
            await handler.deliver(item)
        else:
            await handler.signal(item.room_id, item.event)

    def _offer(self, item: Item) -> None:
        """Queue ``item`` if subscribed; on a full inbox drop messages until drained."""
        if self._inbox is None or self._overflowed or item.room_id not in self._rooms:
            return
        try:
            self._inbox.send_nowait(item)
        except trio.WouldBlock:
            if isinstance(item, ChatMessage):
                self._overflowed = True


if TYPE_CHECKING:  # mypy proves the adapter implements its port

    def _implements_port(db: SqliteDatabase) -> ports.Bus:
        return SqliteBus(db, LocalBroker())
