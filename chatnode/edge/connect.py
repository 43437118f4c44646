"""``GET /v1/connect``: one WebSocket for all of a user's rooms (docs/protocol.md).

A :class:`ConnectMember` is one connection (its writes are ``edge/ws_writer.py``'s, as for a
room's connection); each room it is subscribed to is a :class:`RoomView`, a member of that
room's hub session with a seat and a ``RoomConnection`` of its own (``ChatNode.join``).

Rules:

1. A room keeps the per-room rules of ``/v1/chatrooms/{id}/join``: a seat, a replay (history
   or ``since``, in pages, ``gap``), ``live``, then live messages with no gap and no
   duplicate (hub Rule 3); every frame names its room (``chatroom``).
2. The connection keeps ONE of what bounds a connection: one write queue and backlog
   (``send_backlog_bytes``: past it, 4001 for the connection), one idle timer (4003), one
   token and its expiry (4500, ``refresh``), one revocation hold (4501). A room's replay not
   read within ``replay_timeout_s`` is a slow consumer: 4001 for the connection.
3. Replays run one at a time per connection (``_replays``): a room's join (membership check,
   seat, first page) and replay happen in its turn, so a connection holds one room's page
   and its backlog whatever the number of rooms; rooms waiting for their turn hold no seat.
4. At most ``max_connection_rooms`` rooms (subscribed or waiting for their turn);
   ``subscribe`` past it gets ``error`` ``too_many_rooms``. ``subscribe`` and
   ``unsubscribe`` frames count against the user's ``subscriptions`` rate, shared by the
   nodes; the rooms a connection opens with do not.
5. A room leaves the connection in one step (:meth:`RoomView.end`), whatever the cause: the
   client's ``unsubscribe``, the end of the membership (``Member.removed``, hub Rule 8), a
   join the node refuses (the reason is its error code: ``room_not_found``, ``room_full``,
   ``unavailable``...), a history that cannot be read (``unavailable``). The view is muted
   at once (it forwards nothing more), the ``unsubscribed`` frame is queued, and the room is
   free for a new ``subscribe``; its task then leaves the room. The connection stays open.
6. A frame naming a room the connection is not subscribed to, or whose ``joined`` has not
   been sent yet (its membership not yet confirmed), gets ``error`` ``not_subscribed``.
7. One task per subscribed room (in the connection's nursery) holds its ``join``: a room's
   seat, presence and membership live exactly as long as that task.
8. A room the user becomes a member of while connected (hub Rule 9, on any node) is
   subscribed at once, within the room limit. The user's rooms are read before the
   connection follows such events; if one came meanwhile (``hub.user_room_events``), they
   are read again once it follows them.
9. While open, the connection makes its user online and gets the ``presence`` frames
   (``online``, ``last_seen``; ``chatroom`` null) of the people the user shares a direct or
   private room with (``ChatNode.connected``, ``node/presence.py``).
"""

from __future__ import annotations

import logging

import trio

from chatnode.core import auth, errors
from chatnode.edge.admission import Admission, check_origin
from chatnode.edge.http import error_response, send_refusal
from chatnode.edge.websocket import check_handshake, handshake_response
from chatnode.edge.ws_writer import WriteBatcher, WsSettings, WsWriter
from chatnode.fdio import try_read
from chatnode.node import room as room_rules
from chatnode.node.room import RoomConnection
from chatnode.node.service import ChatNode
from chatnode.wire import frames, websocket
from chatnode.wire.frames import CloseCode, Dialect
from chatnode.wire.http import Request, Response

log = logging.getLogger(__name__)

CONNECT_PATH = "/v1/connect"
RECEIVE_BYTES = 64 * 1024
CONCURRENT_REPLAYS = 1
"""Rule 3: a replay queues up to three quarters of the backlog (``RoomConnection.replay``);
two at once could pass it."""


class RoomView(frames.Recipient):
    """One room of a :class:`ConnectMember`, as the room's hub session sees it
    (``node.hub.Member``, and ``Holder`` for ``ChatNode.join``). Frames go to the
    connection's queue; a close is the connection's (a revocation, the node draining); the
    end of the membership only takes the room off the connection (rule 5)."""

    __slots__ = ("_conn", "conn_id", "encoder", "ended", "room", "room_id", "scope", "since")

    def __init__(self, conn: ConnectMember, room_id: int, since: int | None, serial: int) -> None:
        self._conn = conn
        self.conn_id = f"{conn.conn_id}#{serial}"
        self.encoder = conn.encoder
        self.room_id = room_id
        self.since = since
        self.ended = False
        self.room: RoomConnection | None = None  # once joined: the membership is confirmed
        self.scope: trio.CancelScope | None = None  # its task's, once it runs

    @property
    def user(self) -> str:
        return self._conn.user

    @property
    def claims(self) -> auth.Claims:
        return self._conn.claims

    def send_nowait(self, frame: bytes) -> None:
        if not self.ended:
            self._conn.send_nowait(frame)

    def close_nowait(self, code: CloseCode, reason: str) -> None:
        self._conn.close_nowait(code, reason)

    def removed(self) -> None:
        self.end("removed")

    @property
    def replay_page_bytes(self) -> int:
        return self._conn.replay_page_bytes

    async def writable(self) -> bool:
        return not self.ended and await self._conn.writable() and not self.ended

    def end(self, reason: str) -> None:
        """Take the room off the connection now (rule 5)."""
        if self.ended:
            return
        self.ended = True
        if self.scope is not None:
            self.scope.cancel()
        self._conn.room_ended(self, reason)


class ConnectMember(WsWriter):
    """A ``/v1/connect`` connection: the reader task, its rooms (:class:`RoomView`), and the
    writing half it shares with every room (:class:`~chatnode.edge.ws_writer.WsWriter`)."""

    __slots__ = (
        "_frames",
        "_node",
        "_nursery",
        "_replays",
        "_serial",
        "claims",
        "client",
        "conn_id",
        "events_seen",
        "initial_rooms",
        "rooms",
        "user",
    )

    def __init__(
        self,
        stream: trio.SocketStream,
        *,
        node: ChatNode,
        conn_id: str,
        settings: WsSettings,
        batcher: WriteBatcher,
        greeting: bytes,
        trailing: bytes,
        claims: auth.Claims,
        initial_rooms: list[int],
        events_seen: int = 0,
        client: str = "",
    ) -> None:
        super().__init__(
            stream,
            dialect=Dialect.V1,
            settings=settings,
            batcher=batcher,
            greeting=greeting,
            expires_at_s=claims.expires_at_s,
        )
        self._node = node
        self.conn_id = conn_id
        self.user = claims.user
        self.claims = claims
        self.client = client
        self.initial_rooms = initial_rooms
        self.events_seen = events_seen  # ``hub.user_room_events`` before the rooms were read
        self.rooms: dict[int, RoomView] = {}
        self._serial = 0
        self._replays = trio.Semaphore(CONCURRENT_REPLAYS)
        self._nursery: trio.Nursery | None = None
        self._frames = websocket.FrameReader(
            max_message_bytes=settings.max_frame_bytes, data=trailing
        )

    def removed(self) -> None:  # the connection itself sits in no room
        pass

    def room_added(self, room_id: int, since: int | None = None) -> None:
        """Rule 8 (``hub.RoomWatcher``): from ``since`` on, if the membership has an
        ``added`` change (a new member gets what follows it)."""
        limit = self._node.settings.max_connection_rooms
        if not self._closing and room_id not in self.rooms and len(self.rooms) < limit:
            self.subscribe(room_id, since)
        if not self._closing and self._nursery is not None:  # rule 9
            self._nursery.start_soon(self._node.watch_contacts, self, room_id)

    # -- rooms ----------------------------------------------------------------------------

    def subscribe(self, room_id: int, since: int | None) -> None:
        """Add a room (rule 3: its join and replay wait for their turn)."""
        assert self._nursery is not None
        self._serial += 1
        view = RoomView(self, room_id, since, self._serial)
        self.rooms[room_id] = view
        self._nursery.start_soon(self._serve_room, view)

    def room_ended(self, view: RoomView, reason: str) -> None:
        """Rule 5: the room is off the connection; the client is told."""
        if self.rooms.get(view.room_id) is view:
            del self.rooms[view.room_id]
        self.send_nowait(frames.ws_text_frame(frames.unsubscribed_frame(view.room_id, reason)))

    async def _serve_room(self, view: RoomView) -> None:
        """A room's task (rule 7): its turn, join and replay (rule 3), then its seat until
        the room ends (rule 5: :meth:`RoomView.end` cancels it) or the connection does."""
        node, timeout_s = self._node, self._settings.replay_timeout_s
        with trio.CancelScope() as view.scope:
            if view.ended:
                return
            await self._replays.acquire()
            turn = True
            try:
                if view.ended or self._closing:
                    return
                async with node.join(view.room_id, view, since=view.since, resume=True) as room:
                    view.room = room
                    with trio.move_on_after(timeout_s) as deadline:
                        await room.replay()
                    if deadline.cancelled_caught:
                        self.close_nowait(
                            CloseCode.SLOW_CONSUMER,
                            f"replay of chatroom {view.room_id} not read within {timeout_s:g}s;"
                            " reconnect with since",
                        )
                        return
                    self._replays.release()
                    turn = False
                    await trio.sleep_forever()
            except errors.ChatError as exc:
                view.end(exc.code)
            except Exception:
                log.exception("connection %s: chatroom %d failed", self.conn_id, view.room_id)
                self.close_nowait(CloseCode.INTERNAL_ERROR, "internal error; the node logged it")
            finally:
                if turn:
                    self._replays.release()

    # -- the connection task ----------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it closes: subscribe its rooms, read client frames
        until the close handshake ends, the peer goes away or the connection is cut, then
        leave every room and wait (bounded) until the queue is written."""
        self.start()
        self._batcher.watch(self)
        hub = self._node.hub
        async with self._node.connected(self, self.conn_id), trio.open_nursery() as nursery:
            self._nursery = nursery
            for room_id in self.initial_rooms:
                self.subscribe(room_id, None)
            nursery.start_soon(self._node.watch_contacts, self)  # rule 9
            hub.watch_rooms(self)
            try:
                if hub.user_room_events != self.events_seen:  # rule 8
                    for room_id in await self._node.rooms_of(self.user):
                        self.room_added(room_id)
                await self._read()
            except errors.Unavailable:
                self.close_nowait(
                    CloseCode.BACKEND_UNAVAILABLE, "your rooms could not be read; reconnect"
                )
            finally:
                hub.unwatch_rooms(self)
                nursery.cancel_scope.cancel()
        await self.wait_written()

    async def _read(self) -> None:
        """The reader loop; ``WsMember.run`` in ``edge/websocket.py`` has it inline (why
        there)."""
        reader = self._frames
        while True:
            event = reader.next_event()
            if event is None:
                await trio.lowlevel.wait_readable(self._fd)
                data = try_read(self._fd, RECEIVE_BYTES)
                if data is None:
                    return
                self._quiet_pings = 0
                reader.receive_data(data)
            elif isinstance(event, websocket.Message):
                if not self._closing:
                    try:
                        await self._on_text(event.text)
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
                return
            else:
                self.close_nowait(CloseCode(event.code), event.reason)

    async def _on_text(self, text: str) -> None:
        node = self._node
        room_id, frame = frames.parse_connect_frame(text, node.settings.limits)
        try:
            if isinstance(frame, frames.Rejected):
                raise frame.error
            if isinstance(frame, frames.Ping):
                await room_rules.allow_ping(node, self.user)
                self._answer(frames.pong_frame(frame.client_id, chatroom=room_id))
            elif isinstance(frame, frames.Refresh):
                claims = await room_rules.refreshed_claims(node, frame.token, current=self.claims)
                if not self._closing:  # the old token may have expired meanwhile
                    self.claims = claims
                    self._batcher.expire_at(self, claims.expires_at_s)
                    self._answer(
                        frames.refreshed_frame(
                            frame.client_id, claims.expires_at_s, chatroom=room_id
                        )
                    )
            elif isinstance(frame, frames.Subscribe):
                await self._subscribe_frame(frame)
            elif isinstance(frame, frames.Unsubscribe):
                await room_rules.allow_subscription_change(node, self.user)
                self._joined(frame.room_id, any_state=True).end("unsubscribed")
            elif isinstance(frame, frames.Send):
                assert room_id is not None
                room = self._joined(room_id).room
                assert room is not None
                message = await room.send(frame.text, frame.client_id)
                self._answer(frames.ack_frame(frame.client_id, message))
            elif isinstance(frame, frames.Mark):  # received / read (node/receipts.py)
                assert room_id is not None
                room = self._joined(room_id).room
                assert room is not None
                await room.mark(frame.offset, read=frame.read)
            else:
                assert room_id is not None
                room = self._joined(room_id).room
                assert room is not None
                await room.typing()
        except errors.ChatError as exc:
            extra: dict[str, object] = {"chatroom": room_id}
            if isinstance(exc, errors.RateLimited | errors.Unavailable):
                extra["retry_after_s"] = round(exc.retry_after_s, 3)
            self._answer(
                frames.error_frame(
                    exc.code, exc.message, client_id=getattr(frame, "client_id", None), **extra
                )
            )

    async def _subscribe_frame(self, frame: frames.Subscribe) -> None:
        if frame.room_id in self.rooms:
            raise errors.BadRequest(
                f"already subscribed to chatroom {frame.room_id}; unsubscribe first",
                code="already_subscribed",
            )
        limit = self._node.settings.max_connection_rooms
        if len(self.rooms) >= limit:
            raise errors.BadRequest(
                f"a connection may be subscribed to at most {limit} rooms",
                code="too_many_rooms",
            )
        await room_rules.allow_subscription_change(self._node, self.user)
        if not self._closing and frame.room_id not in self.rooms:
            self.subscribe(frame.room_id, frame.since)

    def _joined(self, room_id: int, *, any_state: bool = False) -> RoomView:
        """The room's view if subscribed and (unless ``any_state``) joined; rule 6."""
        view = self.rooms.get(room_id)
        if view is None or not (any_state or view.room is not None):
            raise errors.BadRequest(
                f"not subscribed to chatroom {room_id}"
                + ("" if view is None else " yet: wait for its 'joined' frame"),
                code="not_subscribed",
            )
        return view

    def _answer(self, payload: bytes) -> None:
        self.send_nowait(frames.ws_text_frame(payload))


async def accept_connect(
    node: ChatNode,
    settings: WsSettings,
    batcher: WriteBatcher,
    admission: Admission,
    request: Request,
    stream: trio.SocketStream,
    trailing: bytes,
) -> Response | ConnectMember:
    """Check a ``GET /v1/connect`` upgrade (as a join's: origin, handshake, ticket or token,
    admission; the ``chatnode.v1`` subprotocol is required) and read the user's rooms
    (``?rooms=none``: none, the client subscribes them itself): an HTTP error, or the
    connection that :func:`serve_connect` serves."""
    try:
        check_origin(request.headers, settings.allowed_origins)
        if check_handshake(request) is not Dialect.V1:
            raise errors.BadRequest(
                f"/v1/connect needs Sec-WebSocket-Protocol: {frames.SUBPROTOCOL_V1}",
                code="bad_handshake",
            )
        ticket = request.query.get("ticket")
        token = await node.redeem_ticket(ticket) if ticket else request.bearer_token
        claims = await node.authenticate(token, user_param=request.query.get("user"))
        if not claims.user:
            raise errors.BadRequest(
                "connect needs ?user=<name> (insecure mode) or a token", code="user_required"
            )
        opening = request.query.get("rooms", "all")
        if opening not in ("all", "none"):
            raise errors.BadRequest("rooms must be 'all' or 'none'", code="invalid_parameter")
        events_seen = node.hub.user_room_events
        rooms = await node.rooms_of(claims.user) if opening == "all" else []
        admission.admit(claims.user, request.client)
    except errors.ChatError as exc:
        return error_response(exc)
    return ConnectMember(
        stream,
        node=node,
        conn_id=node.next_conn_id(),
        settings=settings,
        batcher=batcher,
        greeting=handshake_response(request, Dialect.V1),
        trailing=trailing,
        claims=claims,
        initial_rooms=rooms,
        events_seen=events_seen,
        client=request.client,
    )


async def serve_connect(
    node: ChatNode,
    batcher: WriteBatcher,
    admission: Admission,
    member: ConnectMember,
    stream: trio.SocketStream,
) -> None:
    """Serve the connection until it ends (rule 2: it holds its token against revocations),
    then close the stream and release its ``admission``."""
    try:
        try:
            held = node.hold(member)
        except errors.ChatError as exc:
            await send_refusal(stream, error_response(exc))
            return
        try:
            await member.run()
        finally:
            node.release(member, held)
    finally:
        admission.release(member.user, member.client)
        batcher.unwatch(member)
        member.finish()
        with trio.move_on_after(1) as cleanup:
            cleanup.shield = True
            await stream.aclose()
