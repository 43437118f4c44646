"""The wire protocol without sockets: client frame parsing, server frames, WebSocket framing."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage
from wsproto.frame_protocol import FrameDecoder

from chatnode.core.models import MESSAGE_FIELDS, ChatMessage
from chatnode.core.validation import Limits
from chatnode.wire import frames
from chatnode.wire.frames import CloseCode, Dialect, Ping, Rejected, Send, Typing

LIMITS = Limits(max_message_bytes=16)
MESSAGE = ChatMessage(room_id=7, offset=3, user="ann", text="héllo", timestamp_ms=1_700_000_000_000)


def test_plain_frame_is_the_message() -> None:
    assert frames.parse_client_frame("hi there", Dialect.PLAIN, LIMITS) == Send("hi there")


def test_v1_frames() -> None:
    parse = lambda text: frames.parse_client_frame(text, Dialect.V1, LIMITS)  # noqa: E731
    assert parse('{"type":"send","message":"yo","id":"c1"}') == Send("yo", "c1")
    assert parse('{"type":"ping","id":"p"}') == Ping("p")
    assert parse('{"type":"typing"}') == Typing()


def test_v1_rejections_carry_codes_and_the_client_id() -> None:
    cases = {
        "{nope": ("invalid_json", None),
        "[1,2]": ("invalid_frame", None),
        '{"type":"send","id":5,"message":"x"}': ("invalid_frame", None),
        '{"type":"dance","id":"d"}': ("unknown_type", "d"),
        '{"type":"send","id":"big","message":"' + "x" * 17 + '"}': ("message_too_large", "big"),
        '{"type":"send","id":"e","message":"   "}': ("invalid_message", "e"),
        '{"type":"send","id":"n","message":7}': ("invalid_message", "n"),
    }
    for text, (code, client_id) in cases.items():
        result = frames.parse_client_frame(text, Dialect.V1, LIMITS)
        assert isinstance(result, Rejected), text
        assert (result.error.code, result.client_id) == (code, client_id), text


@given(st.text(max_size=200))
def test_parse_never_raises(text: str) -> None:
    for dialect in Dialect:
        frames.parse_client_frame(text, dialect, LIMITS)


def test_plain_server_frame_has_the_seed_fields_only() -> None:
    frame = json.loads(frames.server_frame(MESSAGE, Dialect.PLAIN))
    assert frame == {
        "chatroom": 7,
        "user": "ann",
        "message": "héllo",
        "timestamp": 1_700_000_000_000,
    }


def test_v1_server_frame_carries_the_offset() -> None:
    frame = json.loads(frames.server_frame(MESSAGE, Dialect.V1))
    assert frame["type"] == "message" and frame["offset"] == 3 and frame["chatroom"] == 7


@given(st.binary(max_size=70_000).map(lambda b: b.decode("latin-1")))
def test_ws_text_frame_decodes_with_wsproto(text: str) -> None:
    payload = text.encode()
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(frames.ws_text_frame(payload))
    received = "".join(e.data for e in client.events() if isinstance(e, TextMessage))
    assert received == text


def test_ws_text_frame_lengths() -> None:
    for size in (0, 125, 126, 65_535, 65_536):
        decoder = FrameDecoder(client=True)
        decoder.receive_bytes(frames.ws_text_frame(b"a" * size))
        frame = decoder.process_buffer()
        assert frame is not None and len(frame.payload) == size and frame.frame_finished


def test_close_code_ranges() -> None:
    assert CloseCode.SERVER_SHUTDOWN.should_reconnect
    assert CloseCode.SLOW_CONSUMER.should_reconnect
    assert not CloseCode.TOKEN_EXPIRED.should_reconnect
    assert not CloseCode.MESSAGE_REJECTED.should_reconnect
    assert all(c < 4000 or 4000 <= c < 5000 for c in CloseCode)


class CountingEncoder(frames.Encoder):
    __slots__ = ("encoded",)

    def __init__(self, dialect: Dialect) -> None:
        super().__init__(dialect)
        self.encoded = 0

    def encode(self, message: ChatMessage) -> bytes:
        self.encoded += 1
        return super().encode(message)


class Collecting(frames.Recipient):
    __slots__ = ("encoder", "sent")

    def __init__(self, encoder: frames.Encoder) -> None:
        self.encoder = encoder
        self.sent: list[bytes] = []

    def send_nowait(self, frame: bytes) -> None:
        self.sent.append(frame)


def test_a_fan_out_encodes_each_message_once_per_dialect() -> None:
    encoders = {dialect: CountingEncoder(dialect) for dialect in Dialect}
    members = [Collecting(encoders[dialect]) for dialect in [*Dialect] * 3]
    second = ChatMessage(1, 8, "ann", "again", 1_700_000_000_001)
    for message in (MESSAGE, second):
        for member in members:
            member.deliver(message)
    assert [e.encoded for e in encoders.values()] == [2, 2]
    for member in members:
        dialect = member.encoder.dialect
        assert member.sent == [
            frames.ws_text_frame(frames.server_frame(m, dialect)) for m in (MESSAGE, second)
        ]


def test_notices_are_v1_only_and_a_room_event_is_encoded_once() -> None:
    plain, v1 = Collecting(frames.Encoder(Dialect.PLAIN)), Collecting(frames.Encoder(Dialect.V1))
    event = frames.typing_event(1, "ann")
    for notice in (frames.Joined(1, "ann", 5, 2, "n1"), frames.Gap(1, 1, 3), event, event):
        plain.notify(notice)
        v1.notify(notice)
    assert plain.sent == []
    assert [json.loads(frame[2:]) for frame in v1.sent] == [
        {"type": "joined", "chatroom": 1, "user": "ann", "offset": 5, "history": 2, "node": "n1"},
        {"type": "gap", "chatroom": 1, "from": 1, "to": 3},
        {"type": "typing", "chatroom": 1, "user": "ann"},
        {"type": "typing", "chatroom": 1, "user": "ann"},
    ]
    assert v1.sent[2] is v1.sent[3]


def test_deliver_all_sends_nothing_over_its_bytes() -> None:
    member = Collecting(frames.Encoder(Dialect.V1))
    size = len(frames.ws_text_frame(frames.server_frame(MESSAGE, Dialect.V1)))
    assert not member.deliver_all([MESSAGE, MESSAGE], max_bytes=2 * size - 1)
    assert member.sent == []
    assert member.deliver_all([MESSAGE, MESSAGE], max_bytes=2 * size)
    assert len(member.sent) == 2


@given(st.integers(0, 2**40), st.integers(1, 2**40), st.text(), st.text(), st.integers(0, 2**50))
def test_a_message_has_one_wire_shape_everywhere(
    room_id: int, offset: int, user: str, text: str, timestamp_ms: int
) -> None:
    message = ChatMessage(room_id, offset, user, text, timestamp_ms)
    fields = message.fields()
    assert tuple(fields) == MESSAGE_FIELDS
    assert ChatMessage.from_fields(fields) == message
    if not any("\ud800" <= c <= "\udfff" for c in user + text):  # the edge refuses those
        assert json.loads(message.document) == fields
        assert json.loads(frames.server_frame(message, Dialect.V1)) == {"type": "message", **fields}
        plain = json.loads(frames.server_frame(message, Dialect.PLAIN))
        assert plain == {k: v for k, v in fields.items() if k != "offset"}


# -- /v1/connect --------------------------------------------------------------------------------


def test_connect_frames_name_their_room() -> None:
    parse = frames.parse_connect_frame
    assert parse('{"type":"send","chatroom":4,"message":"hi","id":"a"}', LIMITS) == (
        4,
        Send("hi", "a"),
    )
    assert parse('{"type":"typing","chatroom":4}', LIMITS) == (4, Typing())
    assert parse('{"type":"subscribe","chatroom":4}', LIMITS) == (4, frames.Subscribe(4))
    assert parse('{"type":"subscribe","chatroom":4,"since":0}', LIMITS) == (
        4,
        frames.Subscribe(4, 0),
    )
    assert parse('{"type":"unsubscribe","chatroom":9}', LIMITS) == (9, frames.Unsubscribe(9))
    assert parse('{"type":"ping","id":"p"}', LIMITS) == (None, Ping("p"))


def test_connect_rejections() -> None:
    def code(text: str) -> tuple[int | None, str, str | None]:
        room, frame = frames.parse_connect_frame(text, LIMITS)
        assert isinstance(frame, Rejected)
        return room, frame.error.code, frame.client_id

    assert code('{"type":"send","message":"hi","id":"a"}') == (None, "invalid_frame", "a")
    for room in ("0", "-1", "true", '"4"', "1.5", str(2**63), "null"):
        assert code(f'{{"type":"typing","chatroom":{room}}}')[1] == "invalid_frame"
    assert code('{"type":"subscribe","chatroom":4,"since":-1}') == (4, "invalid_frame", None)
    assert code('{"type":"subscribe","chatroom":4,"since":true}')[1] == "invalid_frame"
    assert code('{"type":"send","chatroom":4,"message":""}') == (4, "invalid_message", None)
    assert code('{"type":"join","chatroom":4,"id":"j"}') == (4, "unknown_type", "j")
    assert code('{"type":["send"],"chatroom":4}')[1] == "unknown_type"
    assert code("[1]") == (None, "invalid_frame", None)
    assert code("{") == (None, "invalid_json", None)


@given(st.text(max_size=200))
def test_parse_connect_never_raises(text: str) -> None:
    frames.parse_connect_frame(text, LIMITS)


def test_unsubscribed_frame() -> None:
    assert json.loads(frames.unsubscribed_frame(3, "removed")) == {
        "type": "unsubscribed",
        "chatroom": 3,
        "reason": "removed",
    }
