"""The WebSocket wire protocol, sans-IO: frame payloads both ways and close codes.

Two dialects share ``GET /v1/chatrooms/{id}/join`` (docs/protocol.md is the reference):

* ``plain`` (no subprotocol): the first room API's format. A client text frame is a message;
  the server sends only chat messages ``{"chatroom", "user", "message", "timestamp"}``,
  history first.
* ``chatnode.v1`` (``Sec-WebSocket-Protocol: chatnode.v1``): JSON objects with a ``type``.

Rules:

1. A server payload depends only on the message and the dialect, never on the member, so a
   broadcast encodes it once per node and dialect (:func:`server_frame`).
2. Bad client input in v1 gets an ``error`` frame and the connection lives on; in plain,
   where the client cannot read errors, it closes the connection with a documented code.
3. The node hands a member values (a :class:`~chatnode.core.models.ChatMessage`, a
   :data:`Notice`), never bytes; the member's dialect (an :class:`Encoder`) turns them into
   WebSocket frames, keeping the last one so a fan-out encodes once per dialect
   (:class:`Recipient`).
"""

from __future__ import annotations

import enum
import json
from typing import Any

import attrs

from chatnode.core import validation
from chatnode.core.errors import BadRequest
from chatnode.core.models import ChatMessage, RoomEvent
from chatnode.wire import websocket

SUBPROTOCOL_V1 = "chatnode.v1"
MAX_CLIENT_ID_CHARS = 64


class Dialect(enum.Enum):
    PLAIN = "plain"
    V1 = SUBPROTOCOL_V1


class CloseCode(enum.IntEnum):
    """WebSocket close codes. 4000-4499: reconnect (elsewhere); 4500-4999: do not."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVER_SHUTDOWN = 4000
    SLOW_CONSUMER = 4001
    BACKEND_UNAVAILABLE = 4002
    IDLE_TIMEOUT = 4003
    RATE_LIMITED = 4004
    TOKEN_EXPIRED = 4500
    FORBIDDEN = 4501
    MESSAGE_REJECTED = 4502

    @property
    def should_reconnect(self) -> bool:
        return self in (CloseCode.GOING_AWAY, CloseCode.INTERNAL_ERROR) or 4000 <= self < 4500


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


# -- client -> server -------------------------------------------------------------------------


@attrs.frozen
class Send:
    text: str
    client_id: str | None = None


@attrs.frozen
class Ping:
    client_id: str | None = None


@attrs.frozen
class Typing:
    pass


@attrs.frozen
class Refresh:
    """v1: replace the connection's token with ``token`` (same user, later expiry)."""

    token: str
    client_id: str | None = None


@attrs.frozen
class Rejected:
    """A client frame that breaks the protocol; ``client_id`` is echoed in the error frame."""

    error: BadRequest
    client_id: str | None = None


@attrs.frozen
class Subscribe:
    """``/v1/connect``: add a room to the connection (``since``: resume it from there)."""

    room_id: int
    since: int | None = None


@attrs.frozen
class Unsubscribe:
    """``/v1/connect``: take a room off the connection."""

    room_id: int


@attrs.frozen
class Mark:
    """v1 ``received`` (``read`` False) or ``read``: the member's cursor in a room moves to
    ``offset``; ``room_id`` is its ``chatroom`` (None: not given)."""

    offset: int
    read: bool
    room_id: int | None = None


ClientFrame = Send | Ping | Typing | Refresh | Rejected | Mark
ConnectFrame = ClientFrame | Subscribe | Unsubscribe
MAX_TOKEN_CHARS = 4096
MAX_ID = 2**63 - 1
ROOM_FRAMES = frozenset({"send", "typing", "subscribe", "unsubscribe", "received", "read"})
"""``/v1/connect`` frame types that name a room (``chatroom``)."""


def parse_connect_frame(text: str, limits: validation.Limits) -> tuple[int | None, ConnectFrame]:
    """Decode one ``/v1/connect`` client frame: its room (``chatroom``; None when it names
    none or a malformed one) and the frame. The frames of ``chatnode.v1`` plus ``subscribe``
    and ``unsubscribe``; ``send``, ``typing``, ``subscribe`` and ``unsubscribe`` need a
    ``chatroom`` (an integer, 1..2^63-1), ``since`` is an integer >= 0. Bad input is
    :class:`Rejected` as in :func:`parse_client_frame`; never raises for client input."""
    try:
        obj = validation.json_value(text, max_depth=limits.max_json_depth)
    except BadRequest as exc:
        return None, Rejected(exc)
    if not isinstance(obj, dict):
        return None, Rejected(
            BadRequest("frame must be a JSON object with a 'type'", code="invalid_frame")
        )
    raw_room = obj.get("chatroom")
    room_id = raw_room if _is_id(raw_room, minimum=1) else None
    kind = obj.get("type")
    frame = _v1_frame(obj, limits)
    if isinstance(frame, Rejected) and frame.error.code != "unknown_type":
        return room_id, frame
    try:
        if isinstance(kind, str) and kind in ROOM_FRAMES and room_id is None:
            raise BadRequest(
                f"a {kind!r} frame needs 'chatroom': a room id (integer >= 1)",
                code="invalid_frame",
            )
        if kind == "subscribe":
            since = obj.get("since")
            if since is not None and not _is_id(since, minimum=0):
                raise BadRequest("'since' must be an offset (integer >= 0)", code="invalid_frame")
            return room_id, Subscribe(room_id, since)  # type: ignore[arg-type]
        if kind == "unsubscribe":
            return room_id, Unsubscribe(room_id)  # type: ignore[arg-type]
    except BadRequest as exc:
        return room_id, Rejected(exc, getattr(frame, "client_id", None))
    if isinstance(frame, Rejected):
        frame = Rejected(
            BadRequest(
                "unknown frame type; expected 'send', 'ping', 'typing', 'refresh',"
                " 'received', 'read', 'subscribe' or 'unsubscribe'",
                code="unknown_type",
            ),
            frame.client_id,
        )
    return room_id, frame


def _is_id(value: object, *, minimum: int) -> bool:
    return type(value) is int and minimum <= value <= MAX_ID


def parse_client_frame(text: str, dialect: Dialect, limits: validation.Limits) -> ClientFrame:
    """Decode one client text frame. Bad input is returned as :class:`Rejected` with codes
    ``invalid_json`` (also: nested deeper than ``limits.max_json_depth``, or a lone
    surrogate), ``invalid_frame``, ``unknown_type``, ``message_too_large`` or
    ``invalid_message``; this function never raises for client input."""
    client_id = None
    try:
        if dialect is Dialect.PLAIN:
            return Send(validation.message_text(text, limits))
        obj = validation.json_value(text, max_depth=limits.max_json_depth)
        if not isinstance(obj, dict):
            raise BadRequest("frame must be a JSON object with a 'type'", code="invalid_frame")
    except BadRequest as exc:
        return Rejected(exc, client_id)
    return _v1_frame(obj, limits)


def _v1_frame(obj: dict[str, Any], limits: validation.Limits) -> ClientFrame:
    """A decoded ``chatnode.v1`` frame object as a frame (``Rejected`` for bad input)."""
    client_id = None
    try:
        raw_id = obj.get("id")
        if raw_id is not None and (
            not isinstance(raw_id, str) or len(raw_id) > MAX_CLIENT_ID_CHARS
        ):
            raise BadRequest(
                f"'id' must be a string of at most {MAX_CLIENT_ID_CHARS} characters",
                code="invalid_frame",
            )
        client_id = raw_id
        kind = obj.get("type")
        if kind == "send":
            return Send(validation.message_text(obj.get("message"), limits), client_id)
        if kind == "ping":
            return Ping(client_id)
        if kind == "typing":
            return Typing()
        if kind == "refresh":
            token = obj.get("token")
            if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_CHARS:
                raise BadRequest(
                    f"'token' must be a token string of at most {MAX_TOKEN_CHARS} characters",
                    code="invalid_frame",
                )
            return Refresh(token, client_id)
        if kind in ("received", "read"):
            return _mark(obj, read=kind == "read")
        raise BadRequest(
            "unknown frame type; expected 'send', 'ping', 'typing', 'refresh', 'received'"
            " or 'read'",
            code="unknown_type",
        )
    except BadRequest as exc:
        return Rejected(exc, client_id)


def _mark(obj: dict[str, Any], *, read: bool) -> Mark:
    """A ``received``/``read`` frame: ``offset`` an integer >= 0, ``chatroom`` (optional on
    a room's own connection) a room id."""
    offset, room = obj.get("offset"), obj.get("chatroom")
    if not _is_id(offset, minimum=0):
        raise BadRequest("'offset' must be an offset (integer >= 0)", code="invalid_frame")
    if room is not None and not _is_id(room, minimum=1):
        raise BadRequest("'chatroom' must be a room id (integer >= 1)", code="invalid_frame")
    return Mark(offset, read, room)  # type: ignore[arg-type]


# -- server -> client -------------------------------------------------------------------------


def server_frame(message: ChatMessage, dialect: Dialect) -> bytes:
    """The payload of a chat message; identical for every member of one dialect (Rule 1).
    A membership change is a v1 ``member`` frame; the plain dialect has none (``b""``)."""
    if message.event is not None:
        if dialect is Dialect.PLAIN:
            return b""
        return _dumps(
            {
                "type": "member",
                "chatroom": message.room_id,
                "offset": message.offset,
                "user": message.user,
                "event": message.event,
                "by": message.by or "",
                "timestamp": message.timestamp_ms,
            }
        )
    if dialect is Dialect.PLAIN:
        fields = message.fields()
        del fields["offset"]  # the plain format has none
        return _dumps(fields)
    return _dumps({"type": "message", **message.fields()})


def joined_frame(room_id: int, user: str, *, head: int, history: int, node: str) -> bytes:
    """First v1 frame: ``head`` is the room offset the replay runs up to; ``node`` serves it."""
    return _dumps(
        {
            "type": "joined",
            "chatroom": room_id,
            "user": user,
            "offset": head,
            "history": history,
            "node": node,
        }
    )


def gap_frame(room_id: int, first: int, last: int) -> bytes:
    """Before a resume's replay: offsets ``first..last`` are not replayed (over the replay
    limit); the client pages them through the history API if it wants them."""
    return _dumps({"type": "gap", "chatroom": room_id, "from": first, "to": last})


def live_frame(room_id: int, offset: int) -> bytes:
    """Sent after the replay: every later message is live."""
    return _dumps({"type": "live", "chatroom": room_id, "offset": offset})


def ack_frame(client_id: str | None, message: ChatMessage) -> bytes:
    return _dumps(
        {
            "type": "ack",
            "id": client_id,
            "chatroom": message.room_id,
            "offset": message.offset,
            "timestamp": message.timestamp_ms,
        }
    )


def error_frame(code: str, text: str, *, client_id: str | None = None, **extra: Any) -> bytes:
    return _dumps({"type": "error", "id": client_id, "code": code, "message": text, **extra})


def pong_frame(client_id: str | None, **extra: Any) -> bytes:
    return _dumps({"type": "pong", "id": client_id, **extra})


def refreshed_frame(client_id: str | None, expires_at_s: int, **extra: Any) -> bytes:
    """Answer to ``refresh``: the connection now ends at the new token's expiry."""
    return _dumps({"type": "refreshed", "id": client_id, "expires_at": expires_at_s, **extra})


def unsubscribed_frame(room_id: int, reason: str) -> bytes:
    """``/v1/connect``: the connection gets nothing more of the room; ``reason`` says why."""
    return _dumps({"type": "unsubscribed", "chatroom": room_id, "reason": reason})


def presence_event(room_id: int, user: str, change: str) -> RoomEvent:
    return RoomEvent.of(type="presence", chatroom=room_id, user=user, event=change)


def typing_event(room_id: int, user: str) -> RoomEvent:
    return RoomEvent.of(type="typing", chatroom=room_id, user=user)


RECEIPT = "receipt"


def receipt_event(room_id: int, user: str, delivered: int, read: int) -> RoomEvent:
    """``user``'s cursors in the room (``node/receipts.py``); never shown to ``user``."""
    return RoomEvent.of(type=RECEIPT, chatroom=room_id, user=user, delivered=delivered, read=read)


USER_ROOM_ADDED = "user_room_added"
USERS_CHANNEL = 0
"""The bus's "room" (no room has id 0) every node follows for events about users, not rooms
(``user_room_added``): one subscription per node, whatever the number of users."""


def user_room_added_event(room_id: int, user: str, offset: int | None = None) -> RoomEvent:
    """Between nodes only, on :data:`USERS_CHANNEL`: ``user`` became a member of the room
    (at ``offset``: the room's ``added`` change; None where there is none, a public room);
    their ``/v1/connect`` connections subscribe it, from that offset on if there is one."""
    return RoomEvent.of(type=USER_ROOM_ADDED, chatroom=room_id, user=user, offset=offset)


# -- user presence (node/presence.py) -------------------------------------------------------

USER_PRESENCE = "user_presence"


def user_presence_event(user: str) -> RoomEvent:
    """Between nodes only, on :data:`USERS_CHANNEL`: ``user``'s presence may have changed
    (a connection of theirs opened or closed, or a reap ended their last); each node reads
    the state from the store."""
    return RoomEvent.of(type=USER_PRESENCE, user=user)


def user_presence_frame(user: str, online: bool, last_seen_ms: int | None) -> bytes:
    """``/v1/connect``: a contact's presence. Unlike a room's ``presence`` event (``event``:
    join/leave, per room) it has ``online`` and ``last_seen``, and ``chatroom`` is null."""
    return _dumps(
        {
            "type": "presence",
            "chatroom": None,
            "user": user,
            "online": online,
            "last_seen": last_seen_ms,
        }
    )


# -- WebSocket framing (RFC 6455 §5.2; the rest is in ``wire/websocket.py``) ----------------


def ws_text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented server text frame: the same bytes for every connection, so a
    broadcast encodes it once and writes it many times."""
    return websocket.encode_frame(websocket.OPCODE_TEXT, payload)


# -- what the node hands a member, and its dialect's bytes (rules 1 and 3) ---------------------


@attrs.frozen
class Joined:
    """The start of a v1 replay: ``head`` is the room offset the replay runs up to, ``history``
    how many messages it replays, ``node`` the node serving it."""

    room_id: int
    user: str
    head: int
    history: int
    node: str


@attrs.frozen
class Gap:
    """Offsets ``first..last`` of a resume are not replayed (over the replay limit)."""

    room_id: int
    first: int
    last: int


@attrs.frozen
class Live:
    """The replay is over: every later message is live."""

    room_id: int
    offset: int


Notice = Joined | Gap | Live | RoomEvent
"""What a member is told besides messages: v1 only, the plain dialect has no frame for it."""


class Encoder:
    """One dialect's server frames as WebSocket bytes (rule 3). It keeps the frame of the
    message it encoded last, and of the room event, so a fan-out to N members of one dialect
    encodes once: each member asks, and all but the first get the kept frame (an identity
    check, no dict lookup). The bytes depend only on the message and the dialect (rule 1), so
    a kept frame is right for whoever asks; one encoder serves every member of its dialect on
    a node (``edge/ws_writer.py``'s ``WriteBatcher`` holds them). Values are kept by
    identity: a message and a room event are frozen; an event's payload is the JSON its origin
    encoded (``RoomEvent.data``), framed as it is."""

    __slots__ = ("_event", "_event_frame", "dialect", "frame", "message")

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.message: ChatMessage | None = None
        self.frame = b""
        self._event: RoomEvent | None = None
        self._event_frame = b""

    def encode(self, message: ChatMessage) -> bytes:
        """The frame of ``message``, kept as :attr:`frame` until the next message; ``b""``
        for what the dialect does not show (a membership change in plain)."""
        payload = server_frame(message, self.dialect)
        self.frame = ws_text_frame(payload) if payload else b""
        self.message = message
        return self.frame

    def notice(self, notice: Notice) -> bytes | None:
        """The frame of a notice, None in the plain dialect (which has none)."""
        if self.dialect is Dialect.PLAIN:
            return None
        if isinstance(notice, RoomEvent):
            if notice is not self._event:
                self._event_frame = ws_text_frame(notice.data)
                self._event = notice
            return self._event_frame
        if isinstance(notice, Joined):
            payload = joined_frame(
                notice.room_id,
                notice.user,
                head=notice.head,
                history=notice.history,
                node=notice.node,
            )
        elif isinstance(notice, Gap):
            payload = gap_frame(notice.room_id, notice.first, notice.last)
        else:
            payload = live_frame(notice.room_id, notice.offset)
        return ws_text_frame(payload)


class Recipient:
    """The delivering half of a member (``node.hub.Member``): what the node hands over goes
    through the member's dialect (:attr:`encoder`) to ``send_nowait``. The node never sees
    bytes; the member's connection never encodes a message a second time."""

    __slots__ = ()
    encoder: Encoder

    def send_nowait(self, frame: bytes) -> None:
        raise NotImplementedError

    def deliver(self, message: ChatMessage) -> None:
        """Send a chat message: the fan-out's call, once per live member."""
        encoder = self.encoder
        frame = encoder.frame if encoder.message is message else encoder.encode(message)
        if frame:
            self.send_nowait(frame)

    def deliver_history(self, message: ChatMessage) -> int:
        """Send a message of a replay; the bytes of its frame (the replay's pages count them)."""
        encoder = self.encoder
        frame = encoder.frame if encoder.message is message else encoder.encode(message)
        if frame:
            self.send_nowait(frame)
        return len(frame)

    def deliver_all(self, messages: list[ChatMessage], max_bytes: int | None = None) -> bool:
        """Send ``messages`` if their frames come to at most ``max_bytes``: True; else send
        nothing: False."""
        encode = self.encoder.encode
        frames = [encode(message) for message in messages]
        if max_bytes is not None and sum(map(len, frames)) > max_bytes:
            return False
        for frame in frames:
            if frame:
                self.send_nowait(frame)
        return True

    def notify(self, notice: Notice) -> None:
        """Send a notice, if the member's dialect has a frame for it."""
        frame = self.encoder.notice(notice)
        if frame is not None:
            self.send_nowait(frame)
