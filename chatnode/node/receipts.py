"""Members' delivered and read cursors on one node (:class:`Cursors`): coalesced in memory,
written to the directory in batches, told to the room as ``receipt`` events.

Rules:

1. **Forward only.** A cursor moves to the greater of what it was and what is given;
   ``read`` implies ``delivered`` (``delivered >= read``). A value at or behind the known
   cursor changes nothing (the caller drops it silently). The directory applies the same
   rule, so nodes and connections writing in any order never move a cursor back.
2. **A bounded write rate.** ``advance`` is memory only: it merges into the pending cursor of
   (room, user), latest (greatest) wins. Pending cursors are written in ONE directory call
   every ``flush_s`` (1 s), whatever their number and however many acknowledgements came
   meanwhile, and the (room, user)'s at once when its last connection on this node leaves
   (:meth:`close`), so a client reconnecting elsewhere resumes from where it got. A node that
   crashes loses at most its last ``flush_s`` of acknowledgements (those messages are
   delivered again at the next resume). A failed write keeps the cursors pending and is
   retried at the next flush.
3. **Receipts are coalesced.** A cursor that moved is told to the room's members on every
   node (``receipt`` event on the room's bus channel, ``ChatNode.signal``) at most once per
   ``receipt_s`` per (room, user), with the latest values; the hub never shows a user their
   own receipt.
4. **Bounded memory.** A (room, user) is known here while it has a connection on this node
   (:meth:`open` ... :meth:`close`), and pending until written.
5. **The directory is optional for joining.** A cursor the directory does not give within
   ``READ_TIMEOUT_S`` counts as none (the join replays the newest ``history_on_join``), and
   for ``READ_PAUSE_S`` after such a failure joins do not ask: a MySQL outage does not slow
   joins down.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from chatnode.core.models import Cursor, RoomEvent
from chatnode.core.ports import Directory
from chatnode.wire import frames

log = logging.getLogger(__name__)

Key = tuple[int, str]
READ_TIMEOUT_S = 1.0
READ_PAUSE_S = 5.0
RECEIPT_CONCURRENCY = 64


class _State:
    __slots__ = ("delivered", "loaded", "loading", "read", "refs")

    def __init__(self, delivered: int, read: int) -> None:
        self.delivered = delivered
        self.read = read
        self.refs = 0
        self.loaded = False  # read from the directory
        self.loading: trio.Event | None = None  # while a read is under way


class Cursors:
    """This node's view of members' cursors (module rules)."""

    def __init__(
        self,
        directory: Directory,
        signal: Callable[[int, RoomEvent], Awaitable[None]],
        *,
        flush_s: float = 1.0,
        receipt_s: float = 1.0,
    ) -> None:
        self._directory = directory
        self._signal = signal
        self.flush_s = flush_s
        self.receipt_s = receipt_s
        self._known: dict[Key, _State] = {}
        self._pending: dict[Key, Cursor] = {}
        self._dirty: set[Key] = set()
        self._reads_resume_at = float("-inf")  # trio time
        self.advanced_total = 0  # acknowledgements that moved a cursor
        self.written_total = 0  # cursors written to the directory
        self.writes_total = 0  # directory writes (batches)

    # -- connections --------------------------------------------------------------------------

    async def open(self, room_id: int, user: str, *, load: bool = True) -> Cursor:
        """A connection of ``user`` entered the room: its cursor (read from the directory
        once while known here, if ``load``: a connection that cannot acknowledge, the plain
        dialect, needs none; a directory that cannot answer counts as no cursor, and the
        next connection reads again). Connections opening at once share one read."""
        key = (room_id, user)
        state = self._known.get(key)
        if state is None:
            state = self._known[key] = _State(0, 0)
        state.refs += 1  # held from here: a cancelled read leaves it to ``close``
        if load and state.loading is not None:
            await state.loading.wait()
        elif load and not state.loaded and trio.current_time() >= self._reads_resume_at:
            state.loading = trio.Event()
            stored = None
            try:
                with trio.fail_after(READ_TIMEOUT_S):
                    stored = (await self._directory.user_cursors(user, [room_id])).get(room_id)
                state.loaded = True
            except Exception:
                # the directory is down: joins go on without cursors for a while (rule 5)
                self._reads_resume_at = trio.current_time() + READ_PAUSE_S
                log.warning("room %d: %s's cursor could not be read", room_id, user, exc_info=True)
            finally:
                state.loading.set()
                state.loading = None
            if stored is not None:
                state.delivered = max(state.delivered, stored.delivered)
                state.read = max(state.read, stored.read)
        return Cursor(room_id, user, state.delivered, state.read)

    async def close(self, room_id: int, user: str) -> None:
        """A connection of ``user`` left the room: the last one writes its pending cursor."""
        key = (room_id, user)
        state = self._known.get(key)
        if state is None:
            return
        state.refs -= 1
        if state.refs > 0:
            return
        del self._known[key]
        cursor = self._pending.pop(key, None)
        if cursor is not None:
            await self._write([cursor])

    def get(self, room_id: int, user: str) -> Cursor | None:
        state = self._known.get((room_id, user))
        return None if state is None else Cursor(room_id, user, state.delivered, state.read)

    # -- acknowledgements -----------------------------------------------------------------------

    def advance(self, room_id: int, user: str, *, delivered: int, read: int = 0) -> bool:
        """Rule 1-2: move the cursor of an open (room, user); False if nothing moved."""
        state = self._known.get((room_id, user))
        if state is None:
            return False
        delivered = max(delivered, read)
        if delivered <= state.delivered and read <= state.read:
            return False
        state.delivered = max(state.delivered, delivered)
        state.read = max(state.read, read)
        key = (room_id, user)
        self._pending[key] = Cursor(room_id, user, state.delivered, state.read)
        self._dirty.add(key)
        self.advanced_total += 1
        return True

    def room_overlay(self, room_id: int, stored: list[Cursor]) -> list[Cursor]:
        """``stored`` (a room's cursors from the directory) with what this node knows newer
        (its members' acknowledgements not written yet); in name order."""
        by_user = {c.user: c for c in stored}
        for (room, user), state in self._known.items():
            if room != room_id or not state.delivered:
                continue
            c = by_user.get(user)
            if c is None or state.delivered > c.delivered or state.read > c.read:
                by_user[user] = Cursor(
                    room_id,
                    user,
                    max(state.delivered, 0 if c is None else c.delivered),
                    max(state.read, 0 if c is None else c.read),
                )
        return sorted(by_user.values(), key=lambda c: c.user)

    # -- the node's task --------------------------------------------------------------------

    async def run(self) -> None:
        """Write the pending cursors every ``flush_s`` and send receipts every
        ``receipt_s``, in two tasks (neither waits for the other: rule 2's bound holds
        however many receipts go out), until cancelled; then write what is pending
        (bounded, shielded)."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_receipts_forever)
                while True:
                    await trio.sleep(self.flush_s)
                    await self.flush()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self.flush()

    async def _send_receipts_forever(self) -> None:
        while True:
            await trio.sleep(self.receipt_s)
            await self._send_receipts()

    async def _send_receipts(self) -> None:
        """Tell the rooms every cursor that moved since the last call (rule 3), the events
        sent together (``RECEIPT_CONCURRENCY`` at once: the bus pipelines them)."""
        dirty, self._dirty = self._dirty, set()
        events = []
        for room_id, user in dirty:
            state = self._known.get((room_id, user))
            pending = self._pending.get((room_id, user))
            delivered, read = (
                (state.delivered, state.read)
                if state is not None
                else (pending.delivered, pending.read)
                if pending is not None
                else (0, 0)
            )
            if delivered:
                events.append((room_id, frames.receipt_event(room_id, user, delivered, read)))
        if len(events) == 1:
            await self._signal(*events[0])
        elif events:
            gate = trio.CapacityLimiter(RECEIPT_CONCURRENCY)

            async def send(room_id: int, event: RoomEvent) -> None:
                async with gate:
                    await self._signal(room_id, event)

            async with trio.open_nursery() as nursery:
                for room_id, event in events:
                    nursery.start_soon(send, room_id, event)

    async def flush(self) -> None:
        """Write every pending cursor in one directory call (rule 2)."""
        pending, self._pending = self._pending, {}
        if pending:
            await self._write(list(pending.values()))

    async def _write(self, cursors: list[Cursor]) -> None:
        try:
            await self._directory.advance_cursors(cursors)
        except Exception:
            log.warning("%d cursors not written; retrying", len(cursors), exc_info=True)
            for c in cursors:  # keep them pending, merged with what came meanwhile
                newer = self._pending.get((c.room_id, c.user))
                if newer is None:
                    self._pending[(c.room_id, c.user)] = c
                else:
                    self._pending[(c.room_id, c.user)] = Cursor(
                        c.room_id,
                        c.user,
                        max(c.delivered, newer.delivered),
                        max(c.read, newer.read),
                    )
            return
        self.writes_total += 1
        self.written_total += len(cursors)
