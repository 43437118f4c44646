"""Push notifications for members who are not connected (:class:`Notifier`): a JSON POST to
the webhook (``CHATNODE_PUSH_URL``) ``{"user", "chatroom", "offset", "sender", "preview",
"unread"}``, collapsed per member and room. Off (no object at all) when no URL is set.

Rules:

1. **Who.** A chat message (not a membership change) of a private or direct room notifies
   each member but its sender who has no live connection on any node (``Presence.users``:
   no entry in any room and no ``/v1/connect``). Public rooms never notify: they have up to
   ``max_room_members`` members, most of whom never asked to be called for them. A private
   room has at most ``max_group_members``, so a message costs at most one member list read,
   ONE presence read for all of them and ONE gate call for the offline ones.
2. **One node decides, once.** Only the node that published a message considers it. Its
   gate call (``ports.PushGate``: Redis ``SET NX PX`` in the cluster, memory embedded)
   opens each closed (room, member) window: those members it notifies at once (leading
   edge), and it holds their windows. A window already open keeps the message as its pending
   note instead (the greatest offset wins, whichever node published it).
3. **One POST per window.** The holder closes its windows ``collapse_s`` after opening them:
   a pending note is sent then (trailing edge: the latest message, the unread count of that
   moment) and the window renewed for ``collapse_s`` more; nothing pending, the window
   closes. So a (member, room) gets at most one POST per ``collapse_s`` from the whole
   cluster: the first message at once, the latest of the rest at the window's end. A
   trailing note is not sent if the member is connected by then or read up to it. A holder
   that dies loses its windows' trailing notes; its windows expire after twice ``collapse_s``.
4. **Never on the chat path.** :meth:`Notifier.published` is called once the message is
   published; it does no I/O and never waits: it puts (room, offset, sender, preview) on a
   queue of ``QUEUE`` entries; full, the message notifies nobody (dropped, counted). One task
   reads the queue (the lookups of rule 1), ``CONCURRENCY`` tasks POST from a queue of
   ``DELIVERIES`` notifications (full: dropped, counted). A slow or dead webhook, directory
   or Redis only makes these queues drop. What they hold when the node stops is lost.
5. **Retried, then dropped.** A POST not answered (refused, reset, no answer within the
   webhook's timeout) or answered 408, 429 or 5xx is retried after 0.5 s, 1 s, 2 s, ... (at
   most ``BACKOFF_MAX_S`` apart) until ``give_up_s`` after the notification was made; then
   it is dropped, logged and counted. Any other answer than 2xx drops it at once.
6. **Unread.** Others' chat messages after the member's read cursor (the directory's, or
   this node's newer unwritten one), counted exactly when the note's offset is at most
   ``UNREAD_EXACT`` past the cursor (one read of those messages for all the members
   notified), else the offset minus the cursor: an upper bound (as ``GET /v1/me/chatrooms``).
   Cursors unreadable: the offset, an upper bound.
7. **Counted.** ``sent_total`` (2xx answers), ``failed_total`` (attempts that failed),
   ``dropped_total`` (notifications never sent: queues full, gave up, refused, lookups
   failed); drops are logged at most once per ``LOG_EVERY_S``.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from chatnode.core.errors import Unavailable
from chatnode.core.models import ChatMessage, Cursor, Room
from chatnode.core.ports import Directory, Presence, PushGate, Webhook
from chatnode.node.rooms import UNREAD_EXACT

log = logging.getLogger(__name__)

QUEUE = 4096
DELIVERIES = 1024
WINDOWS = 100_000
CONCURRENCY = 8
PREVIEW_CHARS = 100
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
LOG_EVERY_S = 10.0
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@attrs.frozen
class Published:
    """What the publishing node hands over (rule 4)."""

    room_id: int
    offset: int
    sender: str
    preview: str


@attrs.frozen
class Delivery:
    user: str
    room_id: int
    offset: int
    sender: str
    preview: str
    unread: int
    deadline: float  # trio time

    @property
    def body(self) -> bytes:
        return json.dumps(
            {
                "user": self.user,
                "chatroom": self.room_id,
                "offset": self.offset,
                "sender": self.sender,
                "preview": self.preview,
                "unread": self.unread,
            },
            ensure_ascii=False,
        ).encode()


class Notifier:
    """This node's push notifications (module rules). ``run`` in the node's nursery."""

    def __init__(
        self,
        *,
        gate: PushGate,
        webhook: Webhook,
        directory: Directory,
        presence: Presence,
        room: Callable[[int], Awaitable[Room]],
        load_range: Callable[[int, int, int], Awaitable[list[ChatMessage]]],
        local_cursors: Callable[[int, list[Cursor]], list[Cursor]] = lambda _, c: c,
        node_id: str = "node",
        collapse_s: float = 30.0,
        give_up_s: float = 120.0,
        max_members: int = 200,
        queue: int = QUEUE,
        deliveries: int = DELIVERIES,
        concurrency: int = CONCURRENCY,
    ) -> None:
        self._gate, self._webhook = gate, webhook
        self._directory, self._presence = directory, presence
        self._room, self._load_range, self._local_cursors = room, load_range, local_cursors
        self.node_id = node_id
        self.collapse_s, self.give_up_s, self.max_members = collapse_s, give_up_s, max_members
        self.concurrency = concurrency
        self._queue_tx, self._queue_rx = trio.open_memory_channel[Published](queue)
        self._posts_tx, self._posts_rx = trio.open_memory_channel[Delivery](deliveries)
        self._windows: deque[tuple[float, int, str, str]] = deque()  # due, room, user, token
        self._windows_added = trio.Event()
        self._opens = 0
        self._quiet_until = float("-inf")
        self.sent_total = 0
        self.failed_total = 0
        self.dropped_total = 0

    @property
    def _window_ms(self) -> int:
        return max(1, round(self.collapse_s * 1000))

    # -- the chat path (rule 4) ---------------------------------------------------------------

    def published(self, message: ChatMessage) -> None:
        """A message this node published: considered later, never waited for."""
        if message.event is not None:
            return
        item = Published(
            message.room_id, message.offset, message.user, message.text[:PREVIEW_CHARS]
        )
        try:
            self._queue_tx.send_nowait(item)
        except trio.WouldBlock:
            self._drop(1, "the queue is full")

    # -- the tasks ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._close_windows)
            for _ in range(self.concurrency):
                nursery.start_soon(self._post_loop)
            task_status.started()
            async for item in self._queue_rx:
                try:
                    await self._consider(item)
                except Exception as exc:
                    self._drop(1, f"room {item.room_id} offset {item.offset}: {exc!r}")

    async def _consider(self, item: Published) -> None:
        """Rules 1-2 for one message."""
        room = await self._room(item.room_id)
        if room.public:
            return
        members = await self._directory.list_members(room.id)
        others = [user for user in members[: self.max_members] if user != item.sender]
        if not others:
            return
        states = await self._presence.users(others)
        offline = [u for u in others if not (u in states and states[u].online)]
        if not offline:
            return
        note = json.dumps(
            {"offset": item.offset, "sender": item.sender, "preview": item.preview},
            ensure_ascii=False,
        ).encode()
        self._opens += 1
        token = f"{self.node_id}/{self._opens}"
        opened = await self._gate.open(
            room.id, offline, offset=item.offset, note=note, token=token, window_ms=self._window_ms
        )
        if not opened:
            return
        due = trio.current_time() + self.collapse_s
        for user in opened:
            self._schedule(due, room.id, user, token)
        await self._notify(room.id, opened, item)

    def _schedule(self, due: float, room_id: int, user: str, token: str) -> None:
        if len(self._windows) >= WINDOWS:
            self._drop(1, "too many open windows; a trailing notification is lost")
            return
        self._windows.append((due, room_id, user, token))  # dues only grow: FIFO is in order
        self._windows_added.set()

    async def _close_windows(self) -> None:
        """Rule 3: close or renew this node's windows as they fall due, in batches."""
        while True:
            while not self._windows:
                self._windows_added = trio.Event()
                await self._windows_added.wait()
            await trio.sleep_until(self._windows[0][0])
            now = trio.current_time()
            due: dict[tuple[int, str], list[str]] = {}
            while self._windows and self._windows[0][0] <= now:
                _, room_id, user, token = self._windows.popleft()
                due.setdefault((room_id, token), []).append(user)
            for (room_id, token), users in due.items():
                try:
                    await self._close(room_id, users, token)
                except Exception as exc:
                    self._drop(0, f"room {room_id}: windows not closed: {exc!r}")

    async def _close(self, room_id: int, users: list[str], token: str) -> None:
        notes = await self._gate.close(room_id, users, token=token, window_ms=self._window_ms)
        pending = {user: json.loads(note) for user, note in zip(users, notes, strict=True) if note}
        if not pending:
            return
        due = trio.current_time() + self.collapse_s
        for user in pending:
            self._schedule(due, room_id, user, token)
        states = await self._presence.users(list(pending))
        by_offset: dict[tuple[int, str, str], list[str]] = {}
        for user, note in pending.items():
            if not (user in states and states[user].online):
                key = (int(note["offset"]), str(note["sender"]), str(note["preview"]))
                by_offset.setdefault(key, []).append(user)
        for (offset, sender, preview), group in by_offset.items():
            await self._notify(room_id, group, Published(room_id, offset, sender, preview))

    async def _notify(self, room_id: int, users: Sequence[str], item: Published) -> None:
        unread = await self._unread(room_id, users, item.offset)
        deadline = trio.current_time() + self.give_up_s
        for user in users:
            if unread[user] <= 0:
                continue  # read up to it meanwhile
            delivery = Delivery(
                user, room_id, item.offset, item.sender, item.preview, unread[user], deadline
            )
            try:
                self._posts_tx.send_nowait(delivery)
            except trio.WouldBlock:
                self._drop(1, "too many notifications waiting to be sent")

    async def _unread(self, room_id: int, users: Sequence[str], offset: int) -> dict[str, int]:
        """Rule 6."""
        try:
            stored = await self._directory.room_cursors(room_id)
        except Unavailable:
            return dict.fromkeys(users, offset)
        cursors = {c.user: c.read for c in self._local_cursors(room_id, stored)}
        reads = {user: min(cursors.get(user, 0), offset) for user in users}
        exact = [read for read in reads.values() if offset - read <= UNREAD_EXACT]
        if not exact:
            return {user: offset - read for user, read in reads.items()}
        try:
            recent = await self._load_range(room_id, min(exact), offset)
        except Unavailable:
            return {user: offset - read for user, read in reads.items()}
        return {
            user: sum(1 for m in recent if m.offset > read and m.user != user and m.event is None)
            if offset - read <= UNREAD_EXACT
            else offset - read
            for user, read in reads.items()
        }

    async def _post_loop(self) -> None:
        async for delivery in self._posts_rx:
            await self._post(delivery)

    async def _post(self, delivery: Delivery) -> None:
        """Rule 5 for one notification."""
        body, delay = delivery.body, BACKOFF_FIRST_S
        where = f"{delivery.user} in room {delivery.room_id} (offset {delivery.offset})"
        while True:
            status: int | None = None
            try:
                with trio.fail_at(delivery.deadline):
                    status = await self._webhook.post(body)
            except Unavailable as exc:
                why = str(exc)
            except trio.TooSlowError:
                self.failed_total += 1
                self._drop(1, f"gave up on {where} after {self.give_up_s:g}s")
                return
            else:
                why = f"answered {status}"
            if status is not None and 200 <= status < 300:
                self.sent_total += 1
                return
            if status is not None and status not in RETRY_STATUSES:
                self._drop(1, f"the webhook refused {where}: {why}")
                return
            self.failed_total += 1
            if trio.current_time() + delay >= delivery.deadline:
                self._drop(1, f"gave up on {where} after {self.give_up_s:g}s: {why}")
                return
            await trio.sleep(delay)
            delay = min(2 * delay, BACKOFF_MAX_S)

    def _drop(self, count: int, why: str) -> None:
        self.dropped_total += count
        now = trio.current_time()
        if now >= self._quiet_until:
            self._quiet_until = now + LOG_EVERY_S
            log.warning("push notifications: %s (%d dropped so far)", why, self.dropped_total)
