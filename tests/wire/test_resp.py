"""RESP2 without I/O (``chatnode.wire.resp``): commands encoded as arrays of bulk strings; every
kind of reply parsed, nested, nil, empty, errors inside arrays; replies cut anywhere, down to a
byte at a time; a large bulk string over many feeds; bytes that are not RESP. Hypothesis checks
that generated replies come back the same through any chunking, that commands survive any
argument, and that garbage gives ``ProtocolError`` or replies, never another error or a hang."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatnode.wire.resp import ProtocolError, ReplyParser, RespError, encode

# -- commands (rule 1) --------------------------------------------------------------------------


def test_commands_are_arrays_of_bulk_strings() -> None:
    assert encode(["SET", b"k\r\n", 42, "zoë"]) == (
        b"*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n42\r\n$4\r\nzo\xc3\xab\r\n"
    )


def test_empty_and_negative_arguments() -> None:
    assert encode(["ECHO", b""]) == b"*2\r\n$4\r\nECHO\r\n$0\r\n\r\n"
    assert encode(["INCRBY", "k", -5]) == b"*3\r\n$6\r\nINCRBY\r\n$1\r\nk\r\n$2\r\n-5\r\n"
    assert encode([]) == b"*0\r\n"


@given(st.lists(st.one_of(st.binary(), st.text(), st.integers()), min_size=1, max_size=20))
def test_any_command_reads_back_as_its_arguments(args: list[bytes | str | int]) -> None:
    """A command parses as an array of bulk strings: what Redis reads is what was meant."""
    expected = [
        a.encode() if isinstance(a, str) else b"%d" % a if isinstance(a, int) else a for a in args
    ]
    assert ReplyParser().feed(encode(args)) == [expected]


# -- replies (rules 2-3) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reply"),
    [
        (b"+OK\r\n", b"OK"),
        (b"+\r\n", b""),
        (b":0\r\n", 0),
        (b":-42\r\n", -42),
        (b":9223372036854775807\r\n", 2**63 - 1),
        (b"$5\r\nhello\r\n", b"hello"),
        (b"$0\r\n\r\n", b""),
        (b"$-1\r\n", None),
        (b"$4\r\na\r\nb\r\n", b"a\r\nb"),  # a bulk string carries its length: any bytes
        (b"*-1\r\n", None),
        (b"*0\r\n", []),
        (b"*3\r\n:1\r\n$-1\r\n*0\r\n", [1, None, []]),
        (b"*2\r\n*2\r\n*1\r\n:1\r\n$1\r\nx\r\n*-1\r\n", [[[1], b"x"], None]),
        (b"*1\r\n" * 20 + b":7\r\n", [[[[[[[[[[[[[[[[[[[[7]]]]]]]]]]]]]]]]]]]]),
    ],
)
def test_each_kind_of_reply(raw: bytes, reply: object) -> None:
    assert ReplyParser().feed(raw) == [reply]


def test_an_error_reply_is_a_value_also_inside_an_array() -> None:
    (top,) = ReplyParser().feed(b"-WRONGTYPE Operation against a key\r\n")
    assert isinstance(top, RespError) and top.prefix == b"WRONGTYPE"
    assert str(top) == "WRONGTYPE Operation against a key"
    (array,) = ReplyParser().feed(b"*3\r\n:1\r\n-ERR inside\r\n$1\r\nz\r\n")
    assert isinstance(array, list) and array[0] == 1 and array[2] == b"z"
    assert isinstance(array[1], RespError) and array[1].prefix == b"ERR"
    (bare,) = ReplyParser().feed(b"-NOSCRIPT\r\n")
    assert isinstance(bare, RespError) and bare.prefix == b"NOSCRIPT"


def test_replies_come_out_in_order_as_they_complete() -> None:
    parser = ReplyParser()
    assert parser.feed(b"+A\r\n:1\r\n$3\r\nab") == [b"A", 1]
    assert parser.feed(b"c\r\n*2\r\n") == [b"abc"]
    assert parser.feed(b":1\r\n") == []
    assert parser.feed(b":2\r\n+B\r\n") == [[1, 2], b"B"]
    assert parser.feed(b"") == []


def test_a_reply_fed_a_byte_at_a_time() -> None:
    raw = b"*3\r\n$5\r\nhello\r\n*2\r\n:-1\r\n-ERR x\r\n$-1\r\n"
    parser = ReplyParser()
    got: list[object] = []
    for i in range(len(raw)):
        got += parser.feed(raw[i : i + 1])
        assert got == [] or i == len(raw) - 1  # nothing before the last byte
    assert len(got) == 1 and isinstance(got[0], list)
    assert got[0][0] == b"hello" and got[0][2] is None


def test_a_large_bulk_string_over_many_feeds() -> None:
    payload = bytes(range(256)) * 40_000  # 10 MB, "\r\n" inside
    raw = b"$%d\r\n%b\r\n+after\r\n" % (len(payload), payload)
    parser = ReplyParser()
    got: list[object] = []
    for start in range(0, len(raw), 65_536):
        got += parser.feed(raw[start : start + 65_536])
    assert got == [payload, b"after"]


# -- bytes that are not RESP (rule 4) -----------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"!unknown type\r\n",
        b"hello\r\n",  # an inline command is not a reply
        b":12x\r\n",
        b"$-5\r\n",
        b"$abc\r\n",
        b"*-2\r\n",
        b"*99999999999999999999\r\n",
        b"\xff\xfe",
    ],
)
def test_bytes_that_are_not_resp_raise_and_the_parser_stays_failed(raw: bytes) -> None:
    parser = ReplyParser()
    with pytest.raises(ProtocolError):
        parser.feed(raw)
    with pytest.raises(ProtocolError):
        parser.feed(b"+OK\r\n")  # the framing is lost: nothing after is trusted


def test_replies_before_garbage_are_lost_with_the_connection() -> None:
    """A feed that raises returns nothing: the caller drops the connection and fails every
    caller waiting on it, including those whose replies came before the garbage."""
    with pytest.raises(ProtocolError):
        ReplyParser().feed(b"+OK\r\n!garbage\r\n")


# -- Hypothesis ---------------------------------------------------------------------------------

_errors = st.from_regex(r"\A[A-Z]{1,12}( [ -~]{0,40})?\Z").map(RespError)
_leaves = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.binary(max_size=300),
    _errors,
)
_replies = st.recursive(_leaves, lambda inner: st.lists(inner, max_size=6), max_leaves=30)


def encode_reply(reply: Any, *, simple: bool = False) -> bytes:
    """The bytes Redis would send for ``reply`` (nil as a nil bulk string or nil array)."""
    if reply is None:
        return b"$-1\r\n" if simple else b"*-1\r\n"
    if isinstance(reply, RespError):
        return b"-%b\r\n" % str(reply).encode()
    if isinstance(reply, int):
        return b":%d\r\n" % reply
    if isinstance(reply, bytes):
        if simple and b"\r" not in reply and b"\n" not in reply:
            return b"+%b\r\n" % reply
        return b"$%d\r\n%b\r\n" % (len(reply), reply)
    return b"*%d\r\n" % len(reply) + b"".join(encode_reply(r, simple=simple) for r in reply)


def same(a: Any, b: Any) -> bool:
    """Equal replies (RespError compared by message)."""
    if isinstance(a, RespError) or isinstance(b, RespError):
        return type(a) is type(b) and str(a) == str(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@settings(max_examples=300, deadline=None)
@given(
    replies=st.lists(_replies, min_size=1, max_size=8),
    simple=st.booleans(),
    data=st.data(),
)
def test_generated_replies_survive_any_chunking(
    replies: list[Any], simple: bool, data: st.DataObject
) -> None:
    raw = b"".join(encode_reply(r, simple=simple) for r in replies)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(raw)), max_size=30)))
    parser = ReplyParser()
    got: list[Any] = []
    start = 0
    for cut in [*cuts, len(raw)]:
        got += parser.feed(raw[start:cut])
        start = cut
    assert len(got) == len(replies)
    assert all(same(g, r) for g, r in zip(got, replies, strict=True))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=10))
def test_garbage_gives_replies_or_a_protocol_error_and_always_returns(
    chunks: list[bytes],
) -> None:
    parser = ReplyParser()
    for chunk in chunks:
        try:
            parser.feed(chunk)
        except ProtocolError:
            with pytest.raises(ProtocolError):
                parser.feed(b"+OK\r\n")
            return


@settings(max_examples=300, deadline=None)
@given(
    prefix=_replies,
    noise=st.binary(min_size=1, max_size=32).filter(lambda b: b[:1] not in b"+-:$*_#,%~>|=(!"),
)
def test_a_wrong_type_byte_after_good_replies_is_a_protocol_error(
    prefix: Any, noise: bytes
) -> None:
    parser = ReplyParser()
    assert len(parser.feed(encode_reply(prefix))) == 1
    with pytest.raises(ProtocolError):
        parser.feed(noise)
