"""WebSocket framing (RFC 6455 §5), sans-IO, for the server end of a connection.

Why not wsproto: a wsproto ``Connection`` kept ~1.6 KiB per idle connection (an event deque,
frame and message decoders, a buffer object, a generator), a tenth of an idle connection's
memory (``bench/memprofile.py``), and its generator-based parser is slow per frame. chatnode
negotiates no extension and accepts only text messages, so a :class:`FrameReader` is one small
object that holds nothing but the bytes of a frame still incomplete.

Rules (the edge closes the connection with the code of the :class:`Violation`):

1. Every client frame is masked, sets no reserved bit, has a known opcode and encodes its
   length in the fewest bytes; control frames are unfragmented with at most 125 bytes of
   payload; a continuation follows a fragment and a new message follows a finished one.
   Otherwise: 1002, and nothing after is parsed (the stream cannot be trusted).
2. A text message (fragments may be interleaved with control frames) must be UTF-8 (1007).
   One larger than ``max_message_bytes`` is refused when the header that crosses the limit
   arrives (1009) and a binary message when its first header arrives (1003); the rest of the
   refused message is skipped unread, so at most one frame of ``max_message_bytes`` is ever
   buffered. Parsing goes on after these three, so the client's close frame is still seen.
3. A close frame ends the stream: nothing after it is parsed. Its code must be one a peer may
   send (1002) and its reason UTF-8 (1007).
4. Pongs are swallowed; pings are reported for the edge to answer.
"""

from __future__ import annotations

import attrs

OPCODE_CONTINUATION = 0x0
OPCODE_TEXT = 0x1
OPCODE_BINARY = 0x2
OPCODE_CLOSE = 0x8
OPCODE_PING = 0x9
OPCODE_PONG = 0xA

MAX_CONTROL_PAYLOAD = 125
# Close codes a peer may send (RFC 6455 §7.4): 1004-1006 and 1015 are reserved or local-only,
# 1016-2999 belong to future RFCs, 3000-4999 to libraries and applications.
_PEER_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, *range(1007, 1015)))

PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003
INVALID_PAYLOAD = 1007
MESSAGE_TOO_BIG = 1009


@attrs.frozen
class Message:
    """A whole text message."""

    text: str


@attrs.frozen
class Ping:
    payload: bytes


@attrs.frozen
class Close:
    """The client's close frame; ``code`` is None when it carried none."""

    code: int | None
    reason: str


@attrs.frozen
class Violation:
    """The client broke a rule above; the connection must close with ``code``."""

    code: int
    reason: str


Event = Message | Ping | Close | Violation


class FrameReader:
    """Client frames in, :data:`Event` values out: ``receive_data(bytes)`` then
    ``next_event()`` until it returns None (it needs more data)."""

    __slots__ = ("_buffer", "_fragments", "_max_message_bytes", "_pos", "_size", "_skip", "_state")

    # _state: what the next data frame may be, or why nothing more is parsed.
    _EXPECT_MESSAGE = 0  # a new message (text or binary)
    _EXPECT_CONTINUATION = 1  # the next fragment of a text message in ``_fragments``
    _SKIP_CONTINUATION = 2  # the next fragment of a refused message, to skip
    _DONE = 3  # after a close frame or a framing violation

    def __init__(self, *, max_message_bytes: int, data: bytes = b"") -> None:
        self._buffer = data
        self._pos = 0
        self._max_message_bytes = max_message_bytes
        self._fragments: list[bytes] | None = None
        self._size = 0  # payload bytes of the message in progress
        self._skip = 0  # payload bytes of a refused frame still to discard
        self._state = self._EXPECT_MESSAGE

    def receive_data(self, data: bytes) -> None:
        if self._state == self._DONE:
            return
        if self._skip:
            skipped = min(self._skip, len(data))
            self._skip -= skipped
            data = data[skipped:]
        if self._pos < len(self._buffer):
            self._buffer = self._buffer[self._pos :] + data
        else:
            self._buffer = data
        self._pos = 0

    def next_event(self) -> Event | None:
        """The next event, or None until more data arrives."""
        while self._state != self._DONE and not self._skip:
            buf, pos = self._buffer, self._pos
            available = len(buf) - pos
            if available < 2:
                return None
            first, second = buf[pos], buf[pos + 1]
            fin, opcode, length = first & 0x80, first & 0x0F, second & 0x7F
            header = 6
            if length == 126:
                header = 8
                if available < 4:
                    return None
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                if length <= MAX_CONTROL_PAYLOAD:
                    return self._broken("payload length not in its shortest encoding")
            elif length == 127:
                header = 14
                if available < 10:
                    return None
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                if length <= 0xFFFF:
                    return self._broken("payload length not in its shortest encoding")
                if length >> 63:
                    return self._broken("payload length with its most significant bit set")
            problem = self._check_header(first, second, fin, opcode, length)
            if problem is not None:
                return self._broken(problem)
            if available < header:
                return None
            if opcode < OPCODE_CLOSE:
                if self._state == self._SKIP_CONTINUATION:
                    self._skip_frame(fin, length, header)
                    continue
                refusal = self._refusal(opcode, length)
                if refusal is not None:
                    self._skip_frame(fin, length, header)
                    return refusal
            end = pos + header + length
            if len(buf) < end:
                return None
            payload = unmask(buf[pos + header : end], buf[pos + header - 4 : pos + header])
            self._pos = end
            event = self._frame(fin, opcode, payload)
            if event is not None:
                return event
        return None

    def _check_header(
        self, first: int, second: int, fin: int, opcode: int, length: int
    ) -> str | None:
        if first & 0x70:
            return "reserved bits set; no extension was negotiated"
        if not second & 0x80:
            return "client frames must be masked"
        if opcode >= OPCODE_CLOSE:
            if opcode > OPCODE_PONG:
                return f"unknown opcode {opcode:#x}"
            if not fin:
                return "control frames must not be fragmented"
            if length > MAX_CONTROL_PAYLOAD:
                return "control frame payload over 125 bytes"
            return None
        if opcode > OPCODE_BINARY:
            return f"unknown opcode {opcode:#x}"
        if opcode == OPCODE_CONTINUATION and self._state == self._EXPECT_MESSAGE:
            return "continuation frame with no message to continue"
        if opcode != OPCODE_CONTINUATION and self._state != self._EXPECT_MESSAGE:
            return "new message before the fragmented one finished"
        return None

    def _refusal(self, opcode: int, length: int) -> Violation | None:
        if opcode == OPCODE_BINARY:
            return Violation(UNSUPPORTED_DATA, "binary frames are not supported; send text")
        if self._size + length > self._max_message_bytes:
            return Violation(
                MESSAGE_TOO_BIG, f"message over the limit of {self._max_message_bytes} bytes"
            )
        return None

    def _skip_frame(self, fin: int, length: int, header: int) -> None:
        """Discard this frame's payload (what is buffered now, the rest as it arrives), and
        the message's later fragments if this is not its last."""
        self._fragments = None
        self._size = 0
        self._state = self._EXPECT_MESSAGE if fin else self._SKIP_CONTINUATION
        start = self._pos + header
        in_buffer = min(length, max(0, len(self._buffer) - start))
        self._skip = length - in_buffer
        self._pos = start + in_buffer

    def _frame(self, fin: int, opcode: int, payload: bytes) -> Event | None:
        if opcode == OPCODE_PING:
            return Ping(payload)
        if opcode == OPCODE_PONG:
            return None
        if opcode == OPCODE_CLOSE:
            return self._close(payload)
        # text or its continuation
        if fin and self._fragments is None:
            return self._text(payload)
        if self._fragments is None:
            self._fragments = []
        self._fragments.append(payload)
        self._size += len(payload)
        if not fin:
            self._state = self._EXPECT_CONTINUATION
            return None
        whole = b"".join(self._fragments)
        self._fragments = None
        self._size = 0
        self._state = self._EXPECT_MESSAGE
        return self._text(whole)

    def _text(self, payload: bytes) -> Event:
        try:
            return Message(payload.decode())
        except UnicodeDecodeError:
            return Violation(INVALID_PAYLOAD, "text message is not valid UTF-8")

    def _close(self, payload: bytes) -> Event:
        self._finish()
        if not payload:
            return Close(None, "")
        code = int.from_bytes(payload[:2], "big")
        if len(payload) == 1 or not (code in _PEER_CLOSE_CODES or 3000 <= code <= 4999):
            return Violation(PROTOCOL_ERROR, "close frame with an invalid code")
        try:
            return Close(code, payload[2:].decode())
        except UnicodeDecodeError:
            return Violation(INVALID_PAYLOAD, "close reason is not valid UTF-8")

    def _broken(self, reason: str) -> Violation:
        self._finish()
        return Violation(PROTOCOL_ERROR, reason)

    def _finish(self) -> None:
        self._state = self._DONE
        self._buffer = b""
        self._pos = 0
        self._fragments = None


def unmask(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte masking ``key`` repeated (RFC 6455 §5.3), as one big
    integer operation rather than a Python loop over the bytes."""
    n = len(payload)
    if not n:
        return b""
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked, unfragmented server frame. Servers never mask and chatnode negotiates no
    extension, so these bytes are the same for every connection: encode once, write many."""
    length = len(payload)
    if length < 126:
        header = bytes((0x80 | opcode, length))
    elif length < 1 << 16:
        header = bytes((0x80 | opcode, 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 127)) + length.to_bytes(8, "big")
    return header + payload


def close_frame(code: int | None, reason: str = "") -> bytes:
    """A close frame; the reason is cut to fit 125 bytes at a character boundary."""
    if code is None:
        return encode_frame(OPCODE_CLOSE, b"")
    raw = reason.encode()[: MAX_CONTROL_PAYLOAD - 2].decode(errors="ignore").encode()
    return encode_frame(OPCODE_CLOSE, code.to_bytes(2, "big") + raw)


def pong_frame(payload: bytes) -> bytes:
    return encode_frame(OPCODE_PONG, payload)


PING_FRAME = encode_frame(OPCODE_PING, b"chatnode")
"""The server's keep-alive ping: the same bytes for every connection."""
