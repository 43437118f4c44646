"""WebSocket room connections: the upgrade, the member's outbox, reader and writer.

Ownership: one nursery per connection holds its writer; the reader runs in the connection task.
The handshake answer is the first item of the outbox, so the replay that ``ChatNode.join``
queues follows it in order and the node never writes to a socket outside the writer.

Backpressure (DESIGN.md §4.3): ``send_nowait`` never awaits: it appends the pre-encoded frame
to the member's pending list and marks the member dirty in the ``WriteBatcher``, whose task
flushes every dirty member once the producers yield, in one write per member per burst. A flush
writes straight to the non-blocking socket when nothing is queued and the writer is idle (the
common case: no task switch per member); whatever the kernel does not take goes to the outbox
and wakes the member's writer task, which alone writes while anything is queued, so order is
kept. When pending plus unsent bytes pass ``send_backlog_bytes`` the member is a slow
consumer: its backlog is dropped, a close frame (4001) is queued and the connection gets
``close_timeout_s`` to go, after which it is cut. Others in the room never wait.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os

import attrs
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import RemoteProtocolError

from chatnode.core import errors, protocol
from chatnode.core.protocol import CloseCode, Dialect
from chatnode.edge.http import Request, Response, error_response
from chatnode.node.service import ChatNode, RoomConnection

log = logging.getLogger(__name__)

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
RECEIVE_BYTES = 64 * 1024


@attrs.frozen
class WsSettings:
    send_backlog_bytes: int
    max_message_bytes: int
    ping_interval_s: float = 30.0
    close_timeout_s: float = 2.0

    @property
    def max_frame_bytes(self) -> int:
        """Largest incoming WebSocket message: a v1 frame carrying the largest chat message
        with JSON escaping; anything larger is closed with 1009 unread."""
        return self.max_message_bytes * 6 + 1024


def accept_token(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


def handshake_response(request: Request, dialect: Dialect) -> bytes:
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_token(request.headers['sec-websocket-key'])}",
    ]
    if dialect is Dialect.V1:
        lines.append(f"Sec-WebSocket-Protocol: {protocol.SUBPROTOCOL_V1}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def check_handshake(request: Request) -> Dialect:
    """The dialect the client asked for; ``BadRequest`` for a malformed handshake."""
    if request.headers.get("sec-websocket-version") != "13":
        raise errors.BadRequest(
            "unsupported WebSocket version; send Sec-WebSocket-Version: 13",
            code="unsupported_websocket_version",
        )
    key = request.headers.get("sec-websocket-key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except ValueError:
        raise errors.BadRequest(
            "Sec-WebSocket-Key is missing or malformed", code="bad_handshake"
        ) from None
    offered = [p.strip() for p in request.headers.get("sec-websocket-protocol", "").split(",")]
    return Dialect.V1 if protocol.SUBPROTOCOL_V1 in offered else Dialect.PLAIN


class WriteBatcher:
    """Coalesces what each member is sent during one scheduler pass into one write, and pings
    every member every ``ping_interval_s``.

    A broadcast marks members dirty (``send_nowait``); the batcher's task runs once the
    producers yield (after a burst of messages from the bus, say) and flushes every dirty
    member: one ``write`` per member per burst instead of one per message. Its tasks are owned
    by the edge server's nursery; members register for the pings while they run.
    """

    def __init__(self, *, ping_interval_s: float = 30.0) -> None:
        self._dirty: list[WsMember] = []
        self._wake = trio.Event()
        self.flushes = 0
        self.ping_interval_s = ping_interval_s
        self.members: set[WsMember] = set()

    async def ping_forever(self) -> None:
        while True:
            await trio.sleep(self.ping_interval_s)
            for member in list(self.members):
                member.ping_nowait()

    def mark(self, member: WsMember) -> None:
        self._dirty.append(member)
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            dirty, self._dirty = self._dirty, []
            self.flushes += 1
            for member in dirty:
                member.flush()


class WsMember:
    """A joined WebSocket connection; implements ``node.hub.Member``."""

    def __init__(
        self,
        stream: trio.SocketStream,
        ws: Connection,
        *,
        conn_id: str,
        user: str,
        dialect: Dialect,
        settings: WsSettings,
        greeting: bytes,
        batcher: WriteBatcher,
    ) -> None:
        self._stream = stream
        self._batcher = batcher
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._marked = False
        self._ws = ws
        self._settings = settings
        self.conn_id = conn_id
        self.user = user
        self.dialect = dialect
        self._outbox: list[bytes] = [greeting]
        self._outbox_bytes = len(greeting)
        self._wake = trio.Event()
        self._closing = False
        self._writing = False
        self._fd = stream.socket.fileno()
        self._reader_done = False
        self._cancel_scope: trio.CancelScope | None = None
        self.close_code: CloseCode | None = None

    # -- Member ---------------------------------------------------------------------------------

    def send_nowait(self, frame: bytes) -> None:
        if self._closing:
            return
        self._pending.append(frame)
        self._pending_bytes += len(frame)
        # Only once ``run`` started: before, the outbox holds the handshake answer and the
        # join's replay, which is bounded by ``max_replay``, not by the backlog (a resume
        # longer than the backlog must not be cut before its first byte, answer included).
        if (
            self.started
            and self._pending_bytes + self._outbox_bytes > self._settings.send_backlog_bytes
        ):
            self._pending.clear()
            self._pending_bytes = 0
            self._outbox.clear()
            self._outbox_bytes = 0
            self.close_nowait(CloseCode.SLOW_CONSUMER, "send backlog overflow: read faster")
            return
        if not self._marked:
            self._marked = True
            self._batcher.mark(self)

    def flush(self) -> None:
        """Write what ``send_nowait`` gathered since the last flush, in one write: straight to
        the non-blocking socket when nothing is queued and the writer is idle (the common
        case: no task switch), else to the outbox for the writer. Called by the batcher."""
        self._marked = False
        if self._closing or not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        if not self._outbox and not self._writing:
            try:
                sent = os.write(self._fd, data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._broken()
                return
            if sent == len(data):
                return
            data = data[sent:]
        self._outbox.append(data)
        self._outbox_bytes += len(data)
        self._wake.set()

    def finish(self) -> None:
        """The connection is over: nothing more is written to its socket (whose descriptor
        may be reused once closed)."""
        self._closing = True
        self._pending.clear()

    def close_nowait(self, code: CloseCode, reason: str) -> None:
        """Queue a close frame and give the connection ``close_timeout_s`` to finish."""
        if self._closing:
            return
        if self._pending and code is not CloseCode.SLOW_CONSUMER:
            self._outbox.append(b"".join(self._pending))  # what was sent before the close
        self._pending.clear()
        self._closing = True
        self.close_code = code
        if self._ws.state is ConnectionState.OPEN:
            data = self._ws.send(CloseConnection(code=int(code), reason=reason))
            self._outbox.append(data)
            self._outbox_bytes += len(data)
        self._wake.set()
        if self._cancel_scope is not None:
            self._cancel_scope.deadline = min(
                self._cancel_scope.deadline, trio.current_time() + self._settings.close_timeout_s
            )

    @property
    def started(self) -> bool:
        """True once the handshake answer may have been written."""
        return self._cancel_scope is not None

    # -- tasks ------------------------------------------------------------------------------------

    async def run(self, room: RoomConnection) -> None:
        """Serve the connection until it closes: the reader runs in this task, the writer in a
        nursery; the writer returns once the reader is done and the outbox is flushed, within
        ``close_timeout_s`` of either side starting to close. (Two tasks per connection: an
        idle connection's memory is mostly its tasks.)"""
        # The handshake answer and the replay queued so far (bounded by ``max_replay``, not by
        # the backlog) go to the writer first and do not count against the backlog.
        self.flush()
        self._outbox_bytes = 0
        with trio.CancelScope() as scope:
            self._cancel_scope = scope
            if self._closing:
                scope.deadline = trio.current_time() + self._settings.close_timeout_s
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                await self._reader(room)
                self._reader_done = self._closing = True
                self._wake.set()
                scope.deadline = min(
                    scope.deadline, trio.current_time() + self._settings.close_timeout_s
                )

    async def _writer(self) -> None:
        while True:
            while not self._outbox:
                if self._reader_done:
                    return
                self._wake = trio.Event()
                await self._wake.wait()
            chunks, self._outbox = self._outbox, []
            self._outbox_bytes = 0
            self._writing = True
            try:
                await self._stream.send_all(b"".join(chunks))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._broken()
                return
            finally:
                self._writing = False

    def _broken(self) -> None:
        """The peer is gone: stop writing and end the connection now."""
        self._closing = True
        self._outbox.clear()
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    def ping_nowait(self) -> None:
        """Keep an idle connection (and the proxies on its way) alive; the edge's pinger calls
        this for every member every ``ping_interval_s``."""
        if not self._closing and self._state() is ConnectionState.OPEN:
            self._queue_control(self._ws.send(Ping(payload=b"chatnode")))

    def _state(self) -> ConnectionState:
        return self._ws.state

    def _queue_control(self, data: bytes) -> None:
        self._outbox.append(data)
        self._outbox_bytes += len(data)
        self._wake.set()

    async def _reader(self, room: RoomConnection) -> None:
        """Read client frames until the close handshake ends or the peer goes away."""
        parts: list[str] = []
        size = 0
        while self._ws.state not in (ConnectionState.CLOSED, ConnectionState.REMOTE_CLOSING):
            try:
                data = await self._stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            try:
                self._ws.receive_data(data)
                for event in self._ws.events():
                    if isinstance(event, TextMessage):
                        size += len(event.data)
                        if size > self._settings.max_frame_bytes:
                            self.close_nowait(CloseCode.MESSAGE_TOO_BIG, "message too big")
                            return
                        parts.append(event.data)
                        if event.message_finished:
                            text = "".join(parts)
                            parts, size = [], 0
                            if not self._closing:
                                await self._on_text(room, text)
                    elif isinstance(event, BytesMessage):
                        self.close_nowait(
                            CloseCode.UNSUPPORTED_DATA, "binary frames are not supported; send text"
                        )
                    elif isinstance(event, Ping):
                        self._queue_control(self._ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        if self._state() is ConnectionState.REMOTE_CLOSING:
                            self._queue_control(self._ws.send(event.response()))
                        return
            except RemoteProtocolError as exc:
                self.close_nowait(
                    CloseCode.PROTOCOL_ERROR, f"WebSocket protocol error: {exc}"[:120]
                )
                return

    async def _on_text(self, room: RoomConnection, text: str) -> None:
        frame = protocol.parse_client_frame(text, self.dialect, room.limits)
        try:
            if isinstance(frame, protocol.Rejected):
                raise frame.error
            if isinstance(frame, protocol.Send):
                message = await room.send(frame.text)
                if self.dialect is Dialect.V1:
                    self.send_nowait(
                        protocol.ws_text_frame(protocol.ack_frame(frame.client_id, message))
                    )
            elif isinstance(frame, protocol.Ping):
                self.send_nowait(protocol.ws_text_frame(protocol.pong_frame(frame.client_id)))
            else:
                await room.typing()
        except errors.ChatError as exc:
            self._reject(exc, getattr(frame, "client_id", None))

    def _reject(self, exc: errors.ChatError, client_id: str | None) -> None:
        """v1: an error frame, the connection lives on. Plain: the client cannot read errors,
        so a rejected message closes the connection with a code that says why."""
        if self.dialect is Dialect.V1:
            extra: dict[str, object] = {}
            if isinstance(exc, errors.RateLimited | errors.Unavailable):
                extra["retry_after_s"] = round(exc.retry_after_s, 3)
            self.send_nowait(
                protocol.ws_text_frame(
                    protocol.error_frame(exc.code, exc.message, client_id=client_id, **extra)
                )
            )
        elif isinstance(exc, errors.MessageTooLarge):
            self.close_nowait(CloseCode.MESSAGE_TOO_BIG, exc.message[:120])
        elif isinstance(exc, errors.Unavailable):
            self.close_nowait(CloseCode.BACKEND_UNAVAILABLE, "backend unavailable; reconnect")
        elif isinstance(exc, errors.RateLimited):
            self.close_nowait(CloseCode.RATE_LIMITED, "too many messages; slow down and reconnect")
        else:
            self.close_nowait(CloseCode.MESSAGE_REJECTED, f"{exc.code}: {exc.message}"[:120])


async def serve_websocket(
    node: ChatNode,
    settings: WsSettings,
    batcher: WriteBatcher,
    request: Request,
    stream: trio.SocketStream,
    trailing: bytes,
) -> Response | None:
    """Handle ``GET /v1/chatrooms/{id}/join`` with an upgrade. Refusals before the handshake
    are HTTP errors; after it, close codes (docs/protocol.md)."""
    try:
        room_id, since = parse_join(request)
        dialect = check_handshake(request)
        claims = await node.authenticate(request.bearer_token, user_param=request.query.get("user"))
        if not claims.user:
            raise errors.BadRequest(
                "join needs ?user=<name> (insecure mode) or a token", code="user_required"
            )
    except errors.ChatError as exc:
        return error_response(exc)
    ws = Connection(ConnectionType.SERVER, extensions=[], trailing_data=trailing)
    member = WsMember(
        stream,
        ws,
        conn_id=node.next_conn_id(),
        user=claims.user,
        dialect=dialect,
        settings=settings,
        greeting=handshake_response(request, dialect),
        batcher=batcher,
    )
    try:
        async with node.join(room_id, member, since=since) as room:
            batcher.members.add(member)
            await member.run(room)
    except errors.ChatError as exc:
        if member.started:
            raise
        return error_response(exc)  # refused before the handshake answer went out
    finally:
        batcher.members.discard(member)
        member.finish()
    return None


def parse_join(request: Request) -> tuple[int, int | None]:
    parts = request.path.strip("/").split("/")
    try:
        room_id = int(parts[2])
    except (IndexError, ValueError):
        raise errors.NotFound("chatroom id must be an integer", code="room_not_found") from None
    since_raw = request.query.get("since")
    since = None
    if since_raw:
        try:
            since = int(since_raw)
        except ValueError:
            raise errors.BadRequest(
                "since must be an integer offset", code="invalid_parameter"
            ) from None
        if since < 0:
            raise errors.BadRequest("since must be >= 0", code="invalid_parameter")
    return room_id, since
