"""A WebSocket member's writes: its queue, one state (``WsWriter``), and the edge's
``WriteBatcher`` that flushes, drains, pings and cuts members. The member's reading half,
the upgrade and the join are ``edge/websocket.py``'s.

Writes: ``send_nowait`` never awaits. A member with nothing waiting to be written gets the
pre-encoded frame written at once, straight to the non-blocking socket (the common case: one
write per delivery, no second pass over the members). Otherwise (a queue, the kernel did not
take it all, or the connection not started yet) the frame is appended to the member's queue
and the member marked dirty in the edge's ``WriteBatcher``, whose task flushes every dirty
member once the producers yield, in one write per member per burst. Only when the kernel
does not take it all does the batcher start a drain task for that member (in the batcher's
nursery) that writes the rest as the socket becomes writable; flushes leave the queue to it
meanwhile, so order is kept. Sockets are written and read by descriptor (``chatnode/fdio.py``).

Rules (docs/security.md, "Connections and memory"):

1. Everything queued for a client counts against one budget, ``send_backlog_bytes``: frames,
   pongs, pings, the handshake answer and the join's replay. Past it the member is a slow
   consumer: its queue is dropped, a close frame (4001) is queued and the connection gets
   ``close_timeout_s`` to go.
2. A server-side close arms a cutter task in the batcher's nursery that shuts the socket down
   at the deadline, which wakes the reader with end of file and any drain with a broken pipe:
   no per-connection cancel scope is needed for it.
3. A member from which nothing arrived (not even the pong to a ping) for ``idle_timeout_s`` is
   closed with 4003; one whose token expires, with 4500.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import heapq
import math
import socket
import time

import attrs
import trio

from chatnode.fdio import socket_fd, try_write
from chatnode.wire import frames, websocket
from chatnode.wire.frames import CloseCode, Dialect


@attrs.frozen
class WsSettings:
    send_backlog_bytes: int
    max_message_bytes: int
    ping_interval_s: float = 30.0
    close_timeout_s: float = 2.0
    idle_timeout_s: float = 90.0
    replay_timeout_s: float = 60.0
    allowed_origins: frozenset[str] = frozenset()

    @property
    def max_frame_bytes(self) -> int:
        """Largest incoming WebSocket message: a v1 frame carrying the largest chat message
        with JSON escaping; anything larger is closed with 1009 unread."""
        return self.max_message_bytes * 6 + 1024


class WriteBatcher:
    """The edge's writer: coalesces what each member is sent during one scheduler pass into
    one write, drains the members whose socket would block, cuts closing connections at their
    deadline, pings every live member every ``ping_interval_s`` (closing those that stayed
    silent for ``idle_timeout_s``: 4003), and closes members whose token expired (4500).

    A member with something queued is marked dirty (``send_nowait``; one with nothing queued
    is written at once); the batcher's task runs once the producers yield (after a burst of
    messages from the bus, say) and flushes every dirty member: one ``write`` per member per
    burst instead of one per message. Its tasks, and the
    drain and cutter tasks it starts, are owned by the edge server's nursery; members register
    for the pings while they run.
    """

    def __init__(self, *, ping_interval_s: float = 30.0, idle_timeout_s: float = 90.0) -> None:
        self._dirty: list[WsWriter] = []
        self._wake = trio.Event()
        self.flushes = 0
        self.drains = 0  # drain tasks started: writes the kernel did not take whole
        self.ping_interval_s = ping_interval_s
        self.idle_timeout_s = idle_timeout_s
        # silent pings after which a member is idle: nothing for at least idle_timeout_s
        self._idle_pings = math.ceil(idle_timeout_s / ping_interval_s) + 1
        self.members: set[WsWriter] = set()
        self.closes: collections.Counter[int] = collections.Counter()
        """Closes the node started, by close code (``/metrics``)."""
        # Token expiries: members by the wall-clock second their token expires, and a heap
        # of those seconds (each once). A member leaves its bucket when it ends, so what is
        # kept is one entry per distinct second within the tokens' lifetime, not per
        # connection ever made.
        self._expiring: dict[int, set[WsWriter]] = {}
        self._expiry_heap: list[int] = []
        self._scheduled: set[int] = set()
        self._expiry_changed = trio.Event()
        self.encoders = {dialect: frames.Encoder(dialect) for dialect in Dialect}
        """Each dialect's encoder, shared by this node's members of that dialect."""

    def watch(self, member: WsWriter) -> None:
        """Ping ``member`` and close it when it goes idle or its token expires."""
        self.members.add(member)
        self.expire_at(member, member.expires_at_s)

    def unwatch(self, member: WsWriter) -> None:
        self.members.discard(member)
        bucket = self._expiring.get(member.expires_at_s)
        if bucket is not None:
            bucket.discard(member)
            if not bucket:
                del self._expiring[member.expires_at_s]

    def expire_at(self, member: WsWriter, at_s: int) -> None:
        """(Re)schedule ``member``'s close with 4500 at wall-clock second ``at_s``."""
        self.unwatch(member)
        self.members.add(member)
        member.expires_at_s = at_s
        bucket = self._expiring.get(at_s)
        if bucket is None:
            bucket = self._expiring[at_s] = set()
            if at_s not in self._scheduled:
                self._scheduled.add(at_s)
                heapq.heappush(self._expiry_heap, at_s)
                if self._expiry_heap[0] == at_s:
                    self._expiry_changed.set()
        bucket.add(member)

    async def expire_forever(self) -> None:
        while True:
            now_s = time.time()
            heap = self._expiry_heap
            while heap and heap[0] <= now_s:
                at_s = heapq.heappop(heap)
                self._scheduled.discard(at_s)
                for member in self._expiring.pop(at_s, ()):
                    member.close_nowait(
                        CloseCode.TOKEN_EXPIRED, "token expired: get a new one and reconnect"
                    )
            with trio.move_on_after(heap[0] - now_s if heap else math.inf):
                await self._expiry_changed.wait()
            self._expiry_changed = trio.Event()

    async def ping_forever(self) -> None:
        while True:
            await trio.sleep(self.ping_interval_s)
            for member in list(self.members):
                member.ping(self._idle_pings, self.idle_timeout_s)

    def mark(self, member: WsWriter) -> None:
        self._dirty.append(member)
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as helpers:
            task_status.started()
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                dirty, self._dirty = self._dirty, []
                self.flushes += 1
                for member in dirty:
                    member.flush(helpers)


class Writing(enum.IntEnum):
    """Where a member's writes stand (``WsWriter._state``); the rules are ``WsWriter``'s."""

    NEW = 0  # not started: frames queue, nothing is written (the join may still fail)
    IDLE = 1  # nothing waits: a frame goes to the kernel at once
    DONE = 2  # the connection is over: its socket is never touched again
    QUEUED = 3  # frames wait in the batcher's dirty list for its flush
    DRAINING = 4  # a drain task writes the queue as the socket takes it
    DRAINING_MARKED = 5  # draining, and in the dirty list (a frame came meanwhile)


_NEW, _IDLE, _DONE = Writing.NEW, Writing.IDLE, Writing.DONE
_QUEUED, _DRAINING, _DRAINING_MARKED = Writing.QUEUED, Writing.DRAINING, Writing.DRAINING_MARKED


class WsWriter(frames.Recipient):
    """The writing half of a WebSocket member (``edge/websocket.py``'s ``WsMember``).

    Its queue holds whole frames not yet handed to the kernel; ``_unsent`` is the rest of a
    write the kernel took in part (only while a drain task runs). ``_queued_bytes`` counts
    both, and is what ``send_backlog_bytes`` bounds (rule 1 of the module).

    Its writes are in one :class:`Writing` state, ``_state`` (``_closing`` says apart from it
    whether the node may still send; ``_close_deadline`` when a closing connection is cut):

    1. NEW until the connection task calls :meth:`start`: frames (the handshake answer first)
       queue; ``start`` marks the member dirty: QUEUED.
    2. IDLE: a frame is written at once; what the kernel does not take is queued: QUEUED.
    3. QUEUED: frames append; the batcher's flush writes them in one write: all taken, IDLE;
       part, DRAINING, and a drain task writes the rest.
    4. DRAINING: frames append for the drain task; the first marks the member dirty
       (DRAINING_MARKED) so the flush still arms a closing member's cutter; the flush then
       leaves it DRAINING. The drain task ends with the queue empty: IDLE (QUEUED if still
       marked, and the flush finds nothing to write).
    5. Every state: a close (``close_nowait``) is queued like a frame, after which the node's
       frames are dropped (a slow consumer's queue is dropped first); a peer gone empties the
       queue and cuts the socket; ``finish`` makes it DONE, which nothing leaves.
    6. A member is busy (its queue not all handed to the kernel) while it has a queue or is
       QUEUED, DRAINING or DRAINING_MARKED: ``writable`` and ``wait_written`` wait for that.
    """

    __slots__ = (
        "_batcher",
        "_close_deadline",
        "_closing",
        "_cut_armed",
        "_fd",
        "_queue",
        "_queued_bytes",
        "_quiet_pings",
        "_sent",
        "_settings",
        "_state",
        "_stream",
        "_unsent",
        "close_code",
        "encoder",
        "expires_at_s",
    )

    def __init__(
        self,
        stream: trio.SocketStream,
        *,
        dialect: Dialect,
        settings: WsSettings,
        batcher: WriteBatcher,
        greeting: bytes,
        expires_at_s: int,
    ) -> None:
        self.expires_at_s = expires_at_s  # wall-clock second its token expires
        self.encoder = batcher.encoders[dialect]
        self.close_code: CloseCode | None = None
        self._stream = stream
        fd = socket_fd(stream)
        if fd is None:
            raise TypeError("a WebSocket member needs a plain socket stream")
        self._fd = fd
        self._batcher = batcher
        self._settings = settings
        self._queue: list[bytes] | None = [greeting]
        self._queued_bytes = len(greeting)
        self._quiet_pings = 0  # pings since the client last sent anything
        self._unsent = b""
        self._state = _NEW  # rules 1-6 of the class
        self._closing = False  # no more frames are accepted from the node
        self._close_deadline: float | None = None
        self._cut_armed = False
        self._sent: trio.Event | None = None  # exists only while ``wait_written`` waits

    # -- Member ---------------------------------------------------------------------------------

    def send_nowait(self, frame: bytes) -> None:
        if self._closing:
            return
        if self._state is _IDLE:
            # Nothing of this member waits to be written, so the frame goes to the kernel now
            # (order is kept); only what it does not take is queued for the batcher. (The
            # write is inline: this is the path of every delivery.)
            sent = try_write(self._fd, frame)
            if sent is None:
                self._broken()
                return
            if sent == len(frame):
                return
            frame = frame[sent:]
        self._queue_frame(frame)
        if self._state is not _NEW and self._queued_bytes > self._settings.send_backlog_bytes:
            self.close_nowait(CloseCode.SLOW_CONSUMER, "send backlog overflow: read faster")

    def close_nowait(self, code: CloseCode, reason: str) -> None:
        """Queue a close frame (after what is queued, unless the member is a slow consumer)
        and give the connection ``close_timeout_s`` to finish."""
        if self._closing:
            return
        self._closing = True
        self.close_code = code
        self._batcher.closes[int(code)] += 1
        if code is CloseCode.SLOW_CONSUMER:
            self._queue = None
            self._queued_bytes = len(self._unsent)
        self._close_deadline = trio.current_time() + self._settings.close_timeout_s
        self._queue_frame(websocket.close_frame(int(code), reason))

    @property
    def started(self) -> bool:
        """True once the handshake answer may have been written."""
        return self._state is not _NEW

    @property
    def replay_page_bytes(self) -> int:
        """A replay queues a quarter of the backlog, then waits for :meth:`writable`, which
        lets it go on below half: so it stays under three quarters, with room for pongs."""
        return max(1, self._settings.send_backlog_bytes // 4)

    async def writable(self) -> bool:
        """Return at once while at most half the backlog is queued, else once the queue is
        handed to the kernel; False if the member is closing."""
        if (
            not self._closing
            and self._queued_bytes > self._settings.send_backlog_bytes // 2
            and (self._queue or self._state >= _QUEUED)
        ):
            self._sent = trio.Event()
            try:
                await self._sent.wait()
            finally:
                self._sent = None
        return not self._closing

    def ping(self, idle_pings: int, idle_timeout_s: float) -> None:
        """The batcher's ping: a member silent for ``idle_pings`` pings in a row is closed
        (4003), any other pinged."""
        self._quiet_pings += 1
        if self._quiet_pings >= idle_pings:
            self.close_nowait(
                CloseCode.IDLE_TIMEOUT,
                f"nothing received for {idle_timeout_s:g}s, not even a pong; reconnect",
            )
        else:
            self.send_nowait(websocket.PING_FRAME)

    # -- writing ----------------------------------------------------------------------------------

    def _queue_frame(self, frame: bytes) -> None:
        if self._queue is None:
            self._queue = [frame]
        else:
            self._queue.append(frame)
        self._queued_bytes += len(frame)
        state = self._state
        if state is _IDLE:
            self._state = _QUEUED
            self._batcher.mark(self)
        elif state is _DRAINING:
            self._state = _DRAINING_MARKED
            self._batcher.mark(self)

    def flush(self, nursery: trio.Nursery) -> None:
        """Write what was queued since the last flush, in one write, straight to the socket;
        what the kernel does not take goes to a drain task started in ``nursery``. A closing
        member also gets its cutter there. Called by the batcher."""
        state = self._state
        if state is _QUEUED:
            self._state = _IDLE
        elif state is _DRAINING_MARKED:
            self._state = _DRAINING
        if self._close_deadline is not None and not self._cut_armed:
            self._cut_armed = True
            nursery.start_soon(self._cut_at, self._close_deadline)
        if self._queue and self._state is _IDLE:
            queue, self._queue = self._queue, None
            data = queue[0] if len(queue) == 1 else b"".join(queue)
            sent = self._write(data)
            if sent is None:
                self._check_sent()
                return
            self._wrote(sent)
            if sent < len(data):
                self._unsent = data[sent:]
                self._state = _DRAINING
                self._batcher.drains += 1
                nursery.start_soon(self._drain)
        self._check_sent()

    def _write(self, data: bytes) -> int | None:
        """Hand ``data`` to the kernel: the bytes it took (0 if the socket would block), or
        None if the peer is gone (the member is then broken)."""
        sent = try_write(self._fd, data)
        if sent is None:
            self._broken()
        return sent

    async def _drain(self) -> None:
        """Write the queue as the socket becomes writable, until it is empty."""
        try:
            while self._state is not _DONE:
                if not self._unsent:
                    if not self._queue:
                        break
                    self._unsent = b"".join(self._queue)
                    self._queue = None
                await trio.lowlevel.wait_writable(self._fd)
                if self._state is _DONE:
                    break
                sent = self._write(self._unsent)
                if sent is None:
                    break
                self._wrote(sent)
                self._unsent = self._unsent[sent:]
        except trio.ClosedResourceError:
            pass  # the connection closed its socket
        finally:
            if self._state is _DRAINING:
                self._state = _IDLE
            elif self._state is _DRAINING_MARKED:
                self._state = _QUEUED
        self._check_sent()

    def _wrote(self, sent: int) -> None:
        self._queued_bytes -= sent

    def _check_sent(self) -> None:
        if self._sent is not None and not (self._queue or self._state >= _QUEUED):
            self._sent.set()

    async def _cut_at(self, deadline: float) -> None:
        await trio.sleep_until(deadline)
        self._cut()

    def _cut(self) -> None:
        """End the connection now: shutting the socket down wakes the reader with end of file
        and a drain with a broken pipe; the connection task then closes it."""
        if self._state is not _DONE:
            with contextlib.suppress(OSError):
                self._stream.socket.shutdown(socket.SHUT_RDWR)

    def _broken(self) -> None:
        """The peer is gone: write nothing more and end the connection now."""
        self._closing = True
        self._queue = None
        self._unsent = b""
        self._queued_bytes = 0
        self._cut()

    def finish(self) -> None:
        """The connection is over: nothing more is written to its socket (whose descriptor
        may be reused once closed)."""
        self._state = _DONE
        self._closing = True
        self._queue = None
        self._unsent = b""

    # -- the connection task's ------------------------------------------------------------

    def start(self) -> None:
        """The join went through: write what is queued (rule 1 of the class). A close made
        during the join gets its ``close_timeout_s`` from now."""
        if self._close_deadline is not None:
            self._close_deadline = trio.current_time() + self._settings.close_timeout_s
        self._state = _QUEUED
        self._batcher.mark(self)

    def answer_close(self, code: int | None, reason: str) -> None:
        """The client started the close handshake: queue the answering close frame (unless
        the node's close went first); the node sends nothing more."""
        if not self._closing:
            self._closing = True
            self._queue_frame(websocket.close_frame(code, reason))

    async def wait_written(self) -> None:
        """The connection is closing: return once its queue is handed to the kernel, or at
        its close deadline (``close_timeout_s`` from now if none was set)."""
        self._closing = True
        deadline = self._close_deadline
        if deadline is None:
            deadline = trio.current_time() + self._settings.close_timeout_s
        with trio.move_on_at(deadline):
            if self._queue or self._state >= _QUEUED:
                self._sent = trio.Event()
                await self._sent.wait()
