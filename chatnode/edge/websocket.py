"""WebSocket room connections: the upgrade, the join, and the member's reader.

Memory is the design constraint here: a node holds thousands of idle members, and an idle
member costs what its objects and its task's suspended stack cost (``bench/memprofile.py``).
So a connection is ONE task, the reader, suspended in ``wait_readable`` with a shallow stack;
it holds no nursery, cancel scope, event or buffer while idle, and no HTTP request or h11
state once upgraded (``accept_websocket`` runs inside the HTTP connection and returns the
member; ``serve_websocket`` runs after it returned). Framing is ``wire/websocket.py``.

The member's writes (its queue in one state, the edge's ``WriteBatcher``) are
``edge/ws_writer.py``'s.

Memory per connection is bounded on every path (docs/security.md, "Connections and memory"):

1. Everything queued for a client counts against one budget, ``send_backlog_bytes``
   (``edge/ws_writer.py`` rule 1): past it, 4001.
2. The replay is written in pages as the socket drains (``RoomConnection.replay``: a quarter
   of the budget, then it waits for :meth:`WsMember.writable`), so it never holds more than a
   page and what is queued; one not read within ``replay_timeout_s`` closes with 4001. The
   reader starts once the member is live: until then what the client sends waits in the
   kernel (TCP flow control), so it cannot make the node queue anything either.
3. A member from which nothing arrived (not even the pong to a ping) for ``idle_timeout_s`` is
   closed with 4003; one whose token expires, with 4500 (a v1 ``refresh`` frame extends it).

Closing: whoever starts the close handshake (the node with ``close_nowait``, the client with a
close frame, or a framing violation), the reader keeps reading until the client's close frame,
end of file or the deadline; then the connection waits (bounded) until its queue is written
and closes the socket (cut at the deadline: ``edge/ws_writer.py`` rule 2).
"""

from __future__ import annotations

import base64
import hashlib
import logging

import trio

from chatnode.core import auth, errors, validation
from chatnode.edge.admission import Admission, check_origin
from chatnode.edge.http import error_response, send_refusal
from chatnode.edge.ws_writer import WriteBatcher, WsSettings, WsWriter
from chatnode.fdio import try_read
from chatnode.node.room import RoomConnection
from chatnode.node.service import ChatNode
from chatnode.wire import frames, websocket
from chatnode.wire.frames import CloseCode, Dialect
from chatnode.wire.http import Request, Response

log = logging.getLogger(__name__)

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
RECEIVE_BYTES = 64 * 1024


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
        lines.append(f"Sec-WebSocket-Protocol: {frames.SUBPROTOCOL_V1}")
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
    return Dialect.V1 if frames.SUBPROTOCOL_V1 in offered else Dialect.PLAIN


class WsMember(WsWriter):
    """A joined WebSocket connection; implements ``node.hub.Member``: the connection task
    (its reader) here, its writes in :class:`~chatnode.edge.ws_writer.WsWriter`."""

    __slots__ = ("_frames", "claims", "client", "conn_id", "dialect", "room_id", "since", "user")

    def __init__(
        self,
        stream: trio.SocketStream,
        *,
        conn_id: str,
        user: str,
        dialect: Dialect,
        room_id: int,
        since: int | None,
        settings: WsSettings,
        batcher: WriteBatcher,
        greeting: bytes,
        trailing: bytes,
        claims: auth.Claims,
        client: str = "",
    ) -> None:
        super().__init__(
            stream,
            dialect=dialect,
            settings=settings,
            batcher=batcher,
            greeting=greeting,
            expires_at_s=claims.expires_at_s,
        )
        self.conn_id = conn_id
        self.user = user
        self.claims = claims  # its token's, for revocation (a ``refresh`` replaces them)
        self.client = client  # the client's address, as admitted (``Admission``)
        self.dialect = dialect
        self.room_id = room_id
        self.since = since
        self._frames = websocket.FrameReader(
            max_message_bytes=settings.max_frame_bytes, data=trailing
        )

    def removed(self) -> None:
        self.close_nowait(
            CloseCode.FORBIDDEN, "no longer a member of this room; join again to be one"
        )

    # -- the connection task ----------------------------------------------------------------

    async def run(self, room: RoomConnection) -> None:
        """Serve the connection until it closes (see the module docstring): write the
        handshake answer and the replay (within ``replay_timeout_s``), then read client
        frames until the close handshake ends, the peer goes away or the connection is cut,
        then wait (bounded) until the queue is written. (The reader loop is inline: every
        suspended coroutine frame is memory an idle connection keeps. ``edge/connect.py``
        has the same loop; one shared method cost 0.3 KiB more per idle connection, 5.8
        against 5.5 KiB in ``bench/run --extras idle``.)"""
        self.start()
        await self._replay(room)
        if not self._closing:
            self._batcher.watch(self)
        reader = self._frames
        while True:
            event = reader.next_event()
            if event is None:
                await trio.lowlevel.wait_readable(self._fd)
                data = try_read(self._fd, RECEIVE_BYTES)  # inline: the path of every frame
                if data is None:
                    break
                self._quiet_pings = 0
                reader.receive_data(data)
            elif isinstance(event, websocket.Message):
                if not self._closing:
                    try:
                        await self._on_text(room, event.text)
                    except Exception:
                        log.exception("connection %s: a frame's handler failed", self.conn_id)
                        self.close_nowait(
                            CloseCode.INTERNAL_ERROR, "internal error; the node logged it"
                        )
            elif isinstance(event, websocket.Ping):
                if not self._closing:
                    self.send_nowait(websocket.pong_frame(event.payload))
            elif isinstance(event, websocket.Close):
                self.answer_close(event.code, event.reason)
                break
            else:
                self.close_nowait(CloseCode(event.code), event.reason)
        await self.wait_written()

    async def _replay(self, room: RoomConnection) -> None:
        """The join's replay (module rule 2), bounded by ``replay_timeout_s``: not read in
        time, 4001; the history unavailable, 4002; a failure, 1011 (logged once)."""
        timeout_s = self._settings.replay_timeout_s
        with trio.move_on_after(timeout_s) as deadline:
            try:
                await room.replay()
            except errors.Unavailable:
                self.close_nowait(
                    CloseCode.BACKEND_UNAVAILABLE, "history unavailable; reconnect with since"
                )
            except Exception:
                log.exception("connection %s: the replay failed", self.conn_id)
                self.close_nowait(CloseCode.INTERNAL_ERROR, "internal error; the node logged it")
        if deadline.cancelled_caught:
            self.close_nowait(
                CloseCode.SLOW_CONSUMER,
                f"replay not read within {timeout_s:g}s; reconnect with since",
            )

    async def _on_text(self, room: RoomConnection, text: str) -> None:
        frame = frames.parse_client_frame(text, self.dialect, room.limits)
        try:
            if isinstance(frame, frames.Rejected):
                raise frame.error
            if isinstance(frame, frames.Send):
                if self.dialect is Dialect.PLAIN:
                    await self._send_paced(room, frame.text)
                    return
                message = await room.send(frame.text, frame.client_id)
                self.send_nowait(frames.ws_text_frame(frames.ack_frame(frame.client_id, message)))
            elif isinstance(frame, frames.Ping):
                await room.ping()
                self.send_nowait(frames.ws_text_frame(frames.pong_frame(frame.client_id)))
            elif isinstance(frame, frames.Refresh):
                claims = await room.refresh(frame.token, current=self.claims)
                if not self._closing:  # the old token may have expired meanwhile
                    self.claims = claims
                    self._batcher.expire_at(self, claims.expires_at_s)
                    self.send_nowait(
                        frames.ws_text_frame(
                            frames.refreshed_frame(frame.client_id, claims.expires_at_s)
                        )
                    )
            elif isinstance(frame, frames.Mark):
                if frame.room_id is not None and frame.room_id != room.room_id:
                    raise errors.BadRequest(
                        f"this connection is in chatroom {room.room_id}, not {frame.room_id}",
                        code="not_subscribed",
                    )
                await room.mark(frame.offset, read=frame.read)
            else:
                await room.typing()
        except errors.ChatError as exc:
            self._reject(exc, getattr(frame, "client_id", None))

    async def _send_paced(self, room: RoomConnection, text: str) -> None:
        """Plain dialect: a message over the user's rate waits for its turn instead of being
        refused (the client cannot read an error). The reader reads nothing meanwhile, so
        the kernel's buffers fill and TCP slows the sender down: a pasted paragraph arrives
        whole, at the user's rate. A connection closing meanwhile sends nothing more; one
        held back is not idle (rule 3): its client is sending."""
        while not self._closing:
            try:
                await room.send(text)
                return
            except errors.RateLimited as exc:
                await trio.sleep(exc.retry_after_s)
                self._quiet_pings = 0

    def _reject(self, exc: errors.ChatError, client_id: str | None) -> None:
        """v1: an error frame, the connection lives on. Plain: the client cannot read errors,
        so a rejected message closes the connection with a code that says why."""
        if self.dialect is Dialect.V1:
            extra: dict[str, object] = {}
            if isinstance(exc, errors.RateLimited | errors.Unavailable):
                extra["retry_after_s"] = round(exc.retry_after_s, 3)
            self.send_nowait(
                frames.ws_text_frame(
                    frames.error_frame(exc.code, exc.message, client_id=client_id, **extra)
                )
            )
        elif isinstance(exc, errors.MessageTooLarge):
            self.close_nowait(CloseCode.MESSAGE_TOO_BIG, exc.message[:120])
        elif isinstance(exc, errors.Unavailable):
            self.close_nowait(CloseCode.BACKEND_UNAVAILABLE, "backend unavailable; reconnect")
        else:
            self.close_nowait(CloseCode.MESSAGE_REJECTED, f"{exc.code}: {exc.message}"[:120])


async def accept_websocket(
    node: ChatNode,
    settings: WsSettings,
    batcher: WriteBatcher,
    admission: Admission,
    request: Request,
    stream: trio.SocketStream,
    trailing: bytes,
) -> Response | WsMember:
    """Check a ``GET /v1/chatrooms/{id}/join`` upgrade: an HTTP error, or the member (not yet
    joined, counted by ``admission``) that ``serve_websocket`` serves once the HTTP request
    is gone."""
    try:
        check_origin(request.headers, settings.allowed_origins)
        room_id, since = parse_join(request)
        dialect = check_handshake(request)
        ticket = request.query.get("ticket")
        token = await node.redeem_ticket(ticket) if ticket else request.bearer_token
        claims = await node.authenticate(token, user_param=request.query.get("user"))
        if not claims.user:
            raise errors.BadRequest(
                "join needs ?user=<name> (insecure mode) or a token", code="user_required"
            )
        admission.admit(claims.user, request.client)
    except errors.ChatError as exc:
        return error_response(exc)
    return WsMember(
        stream,
        conn_id=node.next_conn_id(),
        user=claims.user,
        dialect=dialect,
        room_id=room_id,
        since=since,
        settings=settings,
        batcher=batcher,
        greeting=handshake_response(request, dialect),
        trailing=trailing,
        claims=claims,
        client=request.client,
    )


async def serve_websocket(
    node: ChatNode,
    batcher: WriteBatcher,
    admission: Admission,
    member: WsMember,
    stream: trio.SocketStream,
) -> None:
    """Join the member's room and serve it until the connection ends, then close the stream
    and release its ``admission``. A join refused before the handshake answer went out gets
    an HTTP error; after it, close codes (docs/protocol.md)."""
    try:
        async with node.join(
            member.room_id, member, since=member.since, resume=member.dialect is Dialect.V1
        ) as room:
            await member.run(room)
    except errors.ChatError as exc:
        if member.started:
            raise
        await send_refusal(stream, error_response(exc))
    finally:
        admission.release(member.user, member.client)
        batcher.unwatch(member)
        member.finish()
        with trio.move_on_after(1) as cleanup:
            cleanup.shield = True
            await stream.aclose()


def parse_join(request: Request) -> tuple[int, int | None]:
    parts = request.path.strip("/").split("/")
    try:
        room_id = int(parts[2])
    except (IndexError, ValueError):
        raise errors.NotFound("chatroom id must be an integer", code="room_not_found") from None
    since = validation.optional_int(request.query.get("since"), "since", minimum=0)
    return room_id, since
