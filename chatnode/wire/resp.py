"""RESP2, the protocol of Redis, without I/O: commands to bytes, bytes to replies.

The Redis client (``adapters/redis/client.py``) owns the sockets and calls this module: it
encodes each command with :func:`encode` and feeds what it reads to a :class:`ReplyParser`.

Rules:

1. **A command is an array of bulk strings** (:func:`encode`): ``str`` arguments are sent as
   UTF-8, ``int`` as decimal digits, ``bytes`` as they are; any byte may appear in an
   argument (bulk strings carry their length). One join per command.
2. **A reply is a Python value** (:data:`Reply`): a simple or bulk string is ``bytes``
   (an empty bulk string ``b""``), an integer ``int``, a nil bulk string or nil array
   ``None``, an array a ``list`` of replies (nested to any depth), an error reply a
   :class:`RespError`, also inside an array. An error reply is a value, not a raise: what it
   means is for the caller to decide (the client's error table).
3. **Chunking does not matter.** :meth:`ReplyParser.feed` takes bytes as the socket handed
   them over, cut anywhere (inside a length, a ``\\r\\n``, a bulk string's payload), and
   returns the replies they complete, in order; an incomplete reply waits for the next
   bytes. A reply of any size is returned whole, however many reads it took.
4. **Bytes that are not RESP fail loudly.** An unknown type byte, a malformed length or
   integer raise :class:`ProtocolError`, and the parser stays failed: the stream's framing is
   lost, so the caller drops the connection. Parsing a finite input always returns.
5. **Parsed in C.** Replies are parsed by hiredis: parsing a reply in Python cost more than
   the rest of a publish (the client's docstring gives the figures). hiredis also reads the
   RESP3 types; Redis sends none of them to a client that never asked for RESP3 (``HELLO 3``),
   and this client never does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

import hiredis

__all__ = ["Arg", "ProtocolError", "Reply", "ReplyParser", "RespError", "encode"]

Reply: TypeAlias = "bytes | int | list[Reply] | RespError | None"
"""A decoded RESP2 reply (rule 2)."""

Arg: TypeAlias = bytes | str | int
"""A command's argument (rule 1)."""


class RespError(Exception):
    """An error reply (``-PREFIX message``), as a value (rule 2)."""

    @property
    def prefix(self) -> bytes:
        """The error's first word, by Redis's convention its kind (``ERR``, ``WRONGTYPE``,
        ``NOSCRIPT``, ``MOVED``...)."""
        return str(self).split(" ", 1)[0].encode()


class ProtocolError(Exception):
    """Bytes that are not RESP (rule 4)."""


def encode(args: Sequence[Arg]) -> bytes:
    """One command as a RESP2 array of bulk strings (rule 1)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = b"%d" % arg
        parts.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(parts)


class ReplyParser:
    """Replies out of the bytes of one connection, in order (rules 2-5)."""

    __slots__ = ("_reader",)

    def __init__(self) -> None:
        self._reader = hiredis.Reader(replyError=RespError)

    def feed(self, data: bytes) -> list[Reply]:
        """Every reply ``data`` completes, in order; ``[]`` while the next one is incomplete.
        Raise :class:`ProtocolError` if the bytes are not RESP (rule 4)."""
        reader = self._reader
        reader.feed(data)
        replies: list[Reply] = []
        try:
            while (reply := reader.gets()) is not False:
                replies.append(reply)
        except hiredis.ProtocolError as exc:
            raise ProtocolError(str(exc)) from None
        return replies
