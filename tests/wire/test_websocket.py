"""WebSocket framing without sockets: the frame reader against wsproto's client encoder, the
rules of ``wire/websocket.py`` one by one, and the server's frames decoded by wsproto."""

from __future__ import annotations

import itertools
import os

from hypothesis import given
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Message, Ping, Pong, TextMessage
from wsproto.frame_protocol import FrameProtocol

from chatnode.wire import websocket
from chatnode.wire.websocket import Close, FrameReader, Violation

LIMIT = 1000


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0) -> bytes:
    """A masked client frame, built by hand so that it may break the rules."""
    key = os.urandom(4)
    length = len(payload)
    if length < 126:
        head = bytes((fin << 7 | rsv << 4 | opcode, 0x80 | length))
    elif length < 1 << 16:
        head = bytes((fin << 7 | rsv << 4 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((fin << 7 | rsv << 4 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    return head + key + websocket.unmask(payload, key)


def events(data: bytes, *, chunk: int | None = None, limit: int = LIMIT) -> list[websocket.Event]:
    """Every event ``data`` yields, fed in pieces of ``chunk`` bytes (all at once if None)."""
    reader = FrameReader(max_message_bytes=limit)
    out: list[websocket.Event] = []
    step = chunk or max(1, len(data))
    for i in range(0, len(data), step):
        reader.receive_data(data[i : i + step])
        while (event := reader.next_event()) is not None:
            out.append(event)
    return out


def wsproto_client_bytes(messages: list[tuple[str, list[int]]], ping: bool) -> bytes:
    """What wsproto's client sends for ``messages``, each cut into fragments at the given
    character positions, with a ping between fragments if ``ping``."""
    proto = FrameProtocol(client=True, extensions=[])
    out = b""
    for text, cuts in messages:
        bounds = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
        pieces = [text[a:b] for a, b in itertools.pairwise(bounds)] or [""]
        for i, piece in enumerate(pieces):
            out += proto.send_data(piece, fin=i == len(pieces) - 1)
            if ping and i < len(pieces) - 1:
                out += proto.ping(b"p")
    return out


@given(
    st.lists(
        st.tuples(st.text(max_size=120), st.lists(st.integers(0, 200), max_size=3)), max_size=5
    ),
    st.booleans(),
    st.integers(1, 64),
)
def test_messages_from_wsproto_arrive_whole_however_the_bytes_are_split(
    messages: list[tuple[str, list[int]]], ping: bool, chunk: int
) -> None:
    data = wsproto_client_bytes(messages, ping)
    got = events(data, chunk=chunk)
    texts = [e.text for e in got if isinstance(e, websocket.Message)]
    assert texts == [text for text, _ in messages]
    assert all(isinstance(e, websocket.Message | websocket.Ping) for e in got)


@given(st.binary(max_size=300), st.integers(1, 50))
def test_arbitrary_bytes_never_raise(data: bytes, chunk: int) -> None:
    events(data, chunk=chunk)


def test_lengths_in_all_three_encodings() -> None:
    for size in (0, 125, 126, 65_535, 65_536):
        text = "z" * size
        got = events(client_frame(websocket.OPCODE_TEXT, text.encode()), limit=size + 1)
        assert got == [websocket.Message(text)], size


def test_pings_are_reported_and_pongs_swallowed() -> None:
    data = client_frame(websocket.OPCODE_PING, b"hey") + client_frame(websocket.OPCODE_PONG, b"x")
    assert events(data) == [websocket.Ping(b"hey")]


def test_control_frames_between_fragments() -> None:
    data = (
        client_frame(websocket.OPCODE_TEXT, b"he", fin=False)
        + client_frame(websocket.OPCODE_PING, b"")
        + client_frame(websocket.OPCODE_CONTINUATION, b"ll", fin=False)
        + client_frame(websocket.OPCODE_CONTINUATION, b"o")
    )
    assert events(data, chunk=3) == [websocket.Ping(b""), websocket.Message("hello")]


def protocol_error(data: bytes) -> None:
    got = events(data + client_frame(websocket.OPCODE_TEXT, b"after"))
    assert len(got) == 1 and isinstance(got[0], Violation), got
    assert got[0].code == 1002


def test_framing_violations_are_1002_and_end_parsing() -> None:
    text = websocket.OPCODE_TEXT
    protocol_error(bytes((0x81, 2)) + b"hi")  # unmasked
    protocol_error(client_frame(text, b"hi", rsv=4))  # RSV1 without an extension
    for opcode in (3, 7, 0xB, 0xF):
        protocol_error(client_frame(opcode, b""))
    protocol_error(client_frame(websocket.OPCODE_PING, b"", fin=False))
    protocol_error(client_frame(websocket.OPCODE_PING, b"x" * 126))
    protocol_error(client_frame(websocket.OPCODE_CONTINUATION, b"x"))
    protocol_error(client_frame(text, b"a", fin=False) + client_frame(text, b"b"))
    protocol_error(bytes((0x81, 0x80 | 126)) + (5).to_bytes(2, "big") + b"kkkk" + b"x" * 5)
    protocol_error(bytes((0x81, 0x80 | 127)) + (200).to_bytes(8, "big") + b"kkkk")
    protocol_error(bytes((0x81, 0x80 | 127)) + (1 << 63).to_bytes(8, "big") + b"kkkk")


def test_invalid_utf8_is_1007_and_parsing_goes_on() -> None:
    split = "é".encode()
    data = (
        client_frame(websocket.OPCODE_TEXT, split[:1], fin=False)
        + client_frame(websocket.OPCODE_CONTINUATION, split[1:])  # valid once joined
        + client_frame(websocket.OPCODE_TEXT, b"\xff")
        + client_frame(websocket.OPCODE_TEXT, b"ok")
    )
    got = events(data)
    assert got[0] == websocket.Message("é")
    assert isinstance(got[1], Violation) and got[1].code == 1007
    assert got[2] == websocket.Message("ok")


def test_binary_is_1003_and_its_fragments_are_skipped() -> None:
    data = (
        client_frame(websocket.OPCODE_BINARY, b"\x00" * 10, fin=False)
        + client_frame(websocket.OPCODE_CONTINUATION, b"\x01" * 10)
        + client_frame(websocket.OPCODE_TEXT, b"next")
    )
    for chunk in (None, 1, 7):
        got = events(data, chunk=chunk)
        assert [type(e) for e in got] == [Violation, websocket.Message], chunk
        assert isinstance(got[0], Violation) and got[0].code == 1003
        assert got[1] == websocket.Message("next")


def test_a_message_over_the_limit_is_1009_at_its_header_and_skipped_unread() -> None:
    big = client_frame(websocket.OPCODE_TEXT, b"x" * (LIMIT + 1))
    got = events(big[:14] if len(big) > 14 else big)  # header only: refused already
    assert got == [Violation(1009, f"message over the limit of {LIMIT} bytes")]
    fragmented = (
        client_frame(websocket.OPCODE_TEXT, b"x" * 600, fin=False)
        + client_frame(websocket.OPCODE_CONTINUATION, b"y" * 600, fin=False)
        + client_frame(websocket.OPCODE_CONTINUATION, b"z" * 10)
        + client_frame(websocket.OPCODE_TEXT, b"fits")
    )
    for chunk in (None, 5, 333):
        got = events(big + fragmented, chunk=chunk)
        assert [getattr(e, "code", None) for e in got] == [1009, 1009, None], chunk
        assert got[-1] == websocket.Message("fits")


def test_the_reader_buffers_at_most_one_frame_of_a_refused_message() -> None:
    reader = FrameReader(max_message_bytes=LIMIT)
    head = bytes((0x81, 0x80 | 127)) + (1 << 40).to_bytes(8, "big") + b"kkkk"
    reader.receive_data(head)
    assert isinstance(reader.next_event(), Violation)
    for _ in range(100):
        reader.receive_data(b"\x00" * 65536)
        assert reader.next_event() is None
    assert len(reader._buffer) == 0  # skipped, not kept


def test_close_frames() -> None:
    def close(payload: bytes) -> websocket.Event:
        got = events(client_frame(websocket.OPCODE_CLOSE, payload) + client_frame(1, b"late"))
        assert len(got) == 1, got  # nothing after a close frame is parsed
        return got[0]

    assert close(b"") == Close(None, "")
    assert close((1000).to_bytes(2, "big") + "bye ✓".encode()) == Close(1000, "bye ✓")
    for code in (1001, 1003, 1007, 1011, 1014, 3000, 4000, 4999):
        assert close(code.to_bytes(2, "big")) == Close(code, ""), code
    for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000):
        assert close(code.to_bytes(2, "big")) == Violation(
            1002, "close frame with an invalid code"
        ), code
    assert close(b"\x03") == Violation(1002, "close frame with an invalid code")
    assert close((1000).to_bytes(2, "big") + b"\xff") == Violation(
        1007, "close reason is not valid UTF-8"
    )


@given(st.text(max_size=200), st.sampled_from([1000, 1009, 4001, 4999]))
def test_server_close_frames_decode_with_wsproto(reason: str, code: int) -> None:
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(websocket.close_frame(code, reason))
    (event,) = client.events()
    assert isinstance(event, CloseConnection)
    assert event.code == code
    assert reason.startswith(event.reason) and len(event.reason.encode()) <= 123


def test_server_control_frames_decode_with_wsproto() -> None:
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(
        websocket.PING_FRAME + websocket.pong_frame(b"x") + websocket.close_frame(None)
    )
    got = list(client.events())
    assert isinstance(got[0], Ping) and got[0].payload == b"chatnode"
    assert isinstance(got[1], Pong) and got[1].payload == b"x"
    assert isinstance(got[2], CloseConnection) and got[2].code == 1005


def test_text_frames_decode_with_wsproto() -> None:
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(websocket.encode_frame(websocket.OPCODE_TEXT, "ünï".encode()))
    (event,) = client.events()
    assert isinstance(event, TextMessage | Message) and event.data == "ünï"


@given(st.binary(max_size=100), st.binary(min_size=4, max_size=4))
def test_unmask_is_its_own_inverse_and_matches_the_rfc(payload: bytes, key: bytes) -> None:
    masked = websocket.unmask(payload, key)
    assert masked == bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    assert websocket.unmask(masked, key) == payload
