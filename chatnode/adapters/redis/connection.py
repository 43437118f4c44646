"""Connecting to Redis, and what a Redis failure means to the ports.

:func:`open_redis` makes the one ``coredis.Redis`` client a node shares between its Redis ports
(bus, archive feed, presence, directory cache). coredis is anyio based and runs on Trio; its
client owns a task group (the connection tasks), so it must be entered with ``async with`` by a
task that outlives every user of the client, i.e. the composition root. Its pool is coredis'
own with one leak fixed (:class:`_SlotKeepingPool`): without it, every pub/sub reconnect
would cost the pool one of its ``max_connections`` slots for good.

The client never retries by itself (``NoRetryPolicy``): a command that failed for a connection
reason raises at once, mapped by :func:`redis_failures` to
:class:`~chatnode.core.errors.Unavailable`, and the caller decides. That matters for the
publish script: replaying it after a reply was lost would publish a message twice.

What is ``Unavailable`` (the backend cannot serve now, retry later):

- ``coredis.exceptions.ConnectionError`` (refused, reset, lost mid-reply, ``LOADING`` after a
  restart, max clients), ``TimeoutError`` (connect or stream timeout of the client),
- replies that mean "not now": ``OOM``, ``BUSY``, ``MASTERDOWN``, ``NOREPLICAS``,
  ``READONLY`` (a failover in progress), ``TRYAGAIN``, ``CLUSTERDOWN``,
- authentication failures (a misconfigured node cannot use Redis; ``/readyz`` says why).

Anything else (``WRONGTYPE``, a syntax error, a script error) is a bug and propagates as is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Final

import coredis
from coredis.connection import BaseConnection
from coredis.exceptions import (
    AuthenticationError,
    ClusterDownError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from coredis.pool import ConnectionPool
from coredis.retry import NoRetryPolicy

from chatnode.core import errors

RedisClient = coredis.Redis[bytes]
"""The client type every Redis port takes: responses are not decoded (``bytes``)."""

_NOT_NOW_REPLIES: Final = frozenset({"OOM", "BUSY", "MASTERDOWN", "NOREPLICAS"})
_NOT_NOW_ERRORS: Final = (
    coredis.exceptions.ConnectionError,
    TimeoutError,
    ReadOnlyError,
    TryAgainError,
    ClusterDownError,
    AuthenticationError,
)


class _SlotKeepingPool(ConnectionPool[BaseConnection]):
    """coredis' pool, minus a leak.

    coredis 6.9's ``ConnectionPool`` is a stack of ``max_connections`` slots (a connection or
    ``None``). ``release()`` puts a connection back only if it is still usable, and a
    connection that dies while leased (a pub/sub connection killed or lost, a blocking
    XREADGROUP whose connection broke) never gives its slot back: after ``max_connections``
    such deaths every command waits forever for a connection. Here the slot comes back as
    ``None``, as the pool itself does for an idle connection that dies.
    """

    def release(self, connection: BaseConnection) -> None:
        super().release(connection)
        if not connection.usable and not self._available_connections.full():
            self._available_connections.append_nowait(None)


@asynccontextmanager
async def open_redis(
    url: str,
    *,
    timeout_s: float | None = None,
    client_name: str | None = None,
    max_connections: int = 64,
) -> AsyncIterator[RedisClient]:
    """A client for ``url`` (``redis://[user:password@]host:port/db``, ``rediss://``,
    ``unix://``), closed on exit.

    ``timeout_s`` bounds connecting and each reply (coredis' ``connect_timeout`` and
    ``stream_timeout``): a Redis that accepts connections but does not answer then fails a call
    with ``Unavailable`` instead of hanging it. It must be longer than any ``BLOCK`` wait a port
    uses (the archive feed's ``wait_ms``). The pub/sub connection of a bus is not subject to it
    (it waits for traffic); the bus' keepalive PING watches that one.

    ``max_connections`` bounds the pool: commands share (multiplex) connections, but a blocking
    command (XREADGROUP BLOCK) and each bus' pub/sub connection hold one of their own.
    """
    pool = _SlotKeepingPool.from_url(
        url,
        decode_responses=False,
        connect_timeout=timeout_s,
        stream_timeout=timeout_s,
        client_name=client_name,
        max_connections=max_connections,
    )
    client: RedisClient = coredis.Redis(
        connection_pool=pool, decode_responses=False, retry_policy=NoRetryPolicy()
    )
    async with client:
        yield client


def is_unavailable(exc: BaseException) -> bool:
    """True if ``exc`` means Redis cannot serve now (see the module docstring)."""
    if isinstance(exc, _NOT_NOW_ERRORS):
        return True
    return isinstance(exc, ResponseError) and str(exc).split(" ", 1)[0] in _NOT_NOW_REPLIES


@contextmanager
def redis_failures(what: str) -> Iterator[None]:
    """Map a Redis failure inside the block to ``Unavailable``; let everything else through.

    coredis raises plain exceptions from commands; should one arrive wrapped in an exception
    group, it is mapped only if every exception in it is a Redis failure.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        _, rest = group.split(is_unavailable)
        if rest is None:
            raise errors.Unavailable(f"Redis: {what} failed: {group.exceptions[0]}") from group
        raise
    except Exception as exc:
        if is_unavailable(exc):
            raise errors.Unavailable(f"Redis: {what} failed: {exc}") from exc
        raise


def int_reply(value: object) -> int:
    """Script reply callback for scripts returning an integer.

    coredis types a script call with its default callback as ``CommandRequest[Never]``; an
    explicit callback gives it a real type (and checks the reply).
    """
    if not isinstance(value, int):
        raise TypeError(f"a script returned {value!r}, expected an integer")
    return value


def any_reply(value: object) -> object:
    """Script reply callback for scripts whose reply the caller inspects itself."""
    return value
