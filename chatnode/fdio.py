"""Reading and writing a connected socket through its file descriptor.

A hot connection (a WebSocket member, the Redis bus) reads and writes its socket by its
descriptor instead of through ``trio.SocketStream``: through trio's wrappers every write
costs a scheduler pass before the bytes leave and every read that finds nothing raises
``BlockingIOError`` inside trio first. These functions never block: the caller waits with
:func:`trio.lowlevel.wait_readable` / :func:`trio.lowlevel.wait_writable` on the same
descriptor, which is also its checkpoint.

Rules:

1. :func:`try_write` returns how many bytes the kernel took: 0 when the socket would block,
   ``None`` when the peer is gone (any other ``OSError``).
2. :func:`try_read` returns what the socket holds: ``b""`` when nothing is there yet,
   ``None`` at end of file or when the peer is gone.
3. Only a plain socket has a usable descriptor: :func:`socket_fd` is ``None`` for any other
   stream (TLS, in-memory test streams), and the caller uses the stream's own methods.
"""

from __future__ import annotations

import os

import trio

__all__ = ["socket_fd", "try_read", "try_write"]


def socket_fd(stream: trio.abc.Stream) -> int | None:
    """The descriptor of a plain socket stream, or None for any other stream (rule 3)."""
    if isinstance(stream, trio.SocketStream):
        return stream.socket.fileno()
    return None


def try_write(fd: int, data: bytes | memoryview) -> int | None:
    """Hand ``data`` to the kernel without blocking (rule 1)."""
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0
    except OSError:
        return None


def try_read(fd: int, max_bytes: int) -> bytes | None:
    """Take what the socket holds without blocking (rule 2)."""
    try:
        return os.read(fd, max_bytes) or None
    except BlockingIOError:
        return b""
    except OSError:
        return None
