"""The Redis client every Redis port uses: RESP2 on Trio streams, pipelined, parsed by hiredis.

The encoding and parsing are :mod:`chatnode.wire.resp`'s; this module owns the sockets, the
order of replies, failures and what they mean to the ports.

Why a client of its own: the bus calls Redis on the per-message path, and through coredis a
publish (EVALSHA) cost 110-220 µs of node CPU and each received pub/sub message ~220 µs;
here they cost 10-20 µs (py-spy, ``bench/profile.py --offered 20000 --isolate``;
docs/benchmarks.md): a command is encoded with one join, the commands of one scheduler pass
leave in one write, and replies are parsed in C. The other ports use the same client so that
a node has one way to talk to Redis and one table of what a failure means.

Rules:

1. **Pipelined.** A :class:`RespConnection` is one connection. A caller appends its encoded
   command to the send buffer and a reply slot to a FIFO. On a plain socket the command is
   written at once, by its descriptor (:mod:`chatnode.fdio`), without a scheduler pass (the
   caller's checkpoint is its wait for the reply); while a write waits for the socket, the
   commands queued meanwhile join it. (Other streams, TLS: the commands of one scheduler pass
   leave in one write.)
2. **No reader task.** Replies come back in command order. The first caller waiting for a
   reply reads for everyone, filling slots in order, until its own reply is in; then it hands
   the reading over to the callers still waiting. A caller cancelled while it waits leaves its
   slot behind: its reply is read and dropped, the others' replies do not shift.
3. **A failed connection is dropped, never repaired.** A reset, EOF, a write that cannot
   finish, bytes that are not RESP, a reply nobody asked for or a reply later than
   ``timeout_s`` closes the connection; every caller waiting on it gets
   :class:`~chatnode.core.errors.Unavailable`, and :class:`RespClient` connects anew on its
   next call, with the next ``serial``. A command is never sent twice: a lost reply may have
   been applied.
4. **One error table** (:func:`check`, :func:`lost`): what Redis cannot do now is
   ``Unavailable`` (the caller may retry later) -- a connection that cannot be made or is
   lost (rule 3), a handshake refused (a wrong password, too many clients: the node cannot use
   Redis, ``/readyz`` says why), and the replies in :data:`NOT_NOW` (loading, out of memory, a
   script busy, a failover in progress, authentication). Any other error reply
   (``WRONGTYPE``, a syntax error, a script's error) is a bug and raises :class:`RespError`.
5. **Pub/sub is a connection of its own** (:meth:`RespClient.connect`), read by its owner with
   :meth:`RespConnection.receive` (every complete push of one read) while
   :meth:`RespConnection.send_nowait` queues commands that a writer task of the owner flushes
   (:meth:`RespConnection.write_forever`).
6. **One place routes a command to a connection** (:meth:`RespClient._route`): today the
   client's one connection. Not a pool: Redis runs commands one at a time anyway, and one
   pipelined connection keeps the order of a caller's commands. A blocking command
   (``XREAD BLOCK``) holds its connection, so its caller has a client of its own.
7. **One Redis, not Redis Cluster, not Sentinel**: a primary that moves must end the
   connections (rule 3). Redis Cluster would route by the keys' hash slot in rule 6 and
   follow ``MOVED``/``ASK`` replies there; the scripts of the ports compute key names, so
   they would need their keys in one slot first.
"""

from __future__ import annotations

import hashlib
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Self, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import trio

from chatnode.adapters.lifecycle import ClosesOnExit
from chatnode.core import errors
from chatnode.fdio import socket_fd, try_read, try_write
from chatnode.wire.resp import Arg, ProtocolError, Reply, ReplyParser, RespError, encode

__all__ = [
    "NOT_NOW",
    "RedisAddress",
    "RespClient",
    "RespConnection",
    "Script",
    "check",
    "lost",
]

T = TypeVar("T")

_RECEIVE_BYTES: Final = 64 * 1024

NOT_NOW: Final = frozenset(
    {
        b"LOADING",  # a restarted Redis reading its data
        b"OOM",  # maxmemory reached (noeviction)
        b"BUSY",  # a script runs past its time limit
        b"MASTERDOWN",  # a replica lost its primary
        b"NOREPLICAS",  # min-replicas-to-write not met
        b"READONLY",  # a primary became a replica: a failover in progress
        b"TRYAGAIN",
        b"CLUSTERDOWN",
        b"NOAUTH",  # the server asks for a password the node does not have
        b"WRONGPASS",  # or one it does not accept
    }
)
"""Rule 4: the error replies that mean "Redis cannot serve now", by their first word."""


def check(reply: Reply) -> Reply:
    """``reply``, unless it is an error reply: raise it (rule 4)."""
    if isinstance(reply, RespError):
        if reply.prefix in NOT_NOW:
            raise errors.Unavailable(f"Redis: {reply}")
        raise reply
    return reply


def lost(why: str) -> errors.Unavailable:
    """The error of a connection that cannot be made or was lost (rule 4)."""
    return errors.Unavailable(f"Redis: {why}")


class _Pending:
    """The value of a reply slot nobody filled yet."""


_PENDING: Final = _Pending()
_NO_REPLIES: Final[list[Reply]] = []  # never mutated


@attrs.define(eq=False, slots=True)
class _Slot:
    reply: Reply | _Pending = _PENDING
    woken: trio.Event = attrs.field(factory=trio.Event)


class RespConnection:
    """One connection to Redis (rules 1-3, 5). Made by :meth:`RespClient.connect`."""

    def __init__(self, stream: trio.abc.Stream, *, timeout_s: float, serial: int = 0) -> None:
        self._stream = stream
        self.serial = serial
        """Which of its client's connections this is (1, 2, ...): replies read on one
        connection come from one run of the server (a restart or a failover ends it)."""
        # A plain socket is read and written by its descriptor: through trio's socket
        # wrappers a publish cost two scheduler passes before its write and a failed read
        # (an exception) before its reply, and every pub/sub read a failed read too.
        self._fd = socket_fd(stream)
        self._timeout_s = timeout_s
        self._parser = ReplyParser()
        self._slots: deque[_Slot] = deque()
        self._out: list[bytes] = []
        self._sending = False
        self._reading = False
        self._queued = trio.Event()
        self.failure: str | None = None

    @property
    def broken(self) -> bool:
        return self.failure is not None

    # -- request/reply (rules 1-3) ------------------------------------------------------------

    async def call(self, *args: Arg) -> Reply:
        """Send one command and return its reply (an error reply is returned, not raised)."""
        if self.failure is not None:
            await trio.lowlevel.checkpoint()
            raise lost(self.failure)
        slot = _Slot()
        self._slots.append(slot)
        self._out.append(encode(args))
        await self._flush()
        return await self._wait(slot)

    async def _flush(self) -> None:
        if self._sending:
            return  # the write under way takes our bytes with it
        if self._fd is not None and self.failure is None:
            # Write now (rule 1); only what the socket does not take waits below.
            data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
            self._out.clear()
            sent = try_write(self._fd, data)
            if sent is None:
                self.fail("connection lost while writing")
                return
            if sent == len(data):
                return
            self._out.append(data[sent:])
        self._sending = True
        try:
            # Let the other callers of this scheduler pass queue their commands (rule 1).
            await trio.lowlevel.cancel_shielded_checkpoint()
            # A command written half way would corrupt the stream: no cancellation inside.
            with trio.CancelScope(shield=True), trio.move_on_after(self._timeout_s) as timer:
                while self._out and self.failure is None:
                    data = b"".join(self._out)
                    self._out.clear()
                    await self._stream.send_all(data)
            if timer.cancelled_caught:
                self.fail(f"a write took longer than {self._timeout_s}s")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.fail(f"connection lost while writing ({exc!r})")
        finally:
            self._sending = False

    async def _wait(self, slot: _Slot) -> Reply:
        with trio.move_on_after(self._timeout_s):
            while isinstance(slot.reply, _Pending):
                if self.failure is not None:
                    raise lost(self.failure)
                if self._reading:
                    await slot.woken.wait()
                    slot.woken = trio.Event()
                else:
                    await self._read_until(slot)
        reply = slot.reply
        if isinstance(reply, _Pending):  # the timer fired
            self.fail(f"no reply within {self._timeout_s}s")
            raise lost(self.failure or "")
        return reply

    async def _read_until(self, slot: _Slot) -> None:
        """Read replies into the slots, in order, until ``slot`` has its reply (rule 2)."""
        self._reading = True
        try:
            while isinstance(slot.reply, _Pending) and self.failure is None:
                for reply in await self._receive():
                    if not self._slots:
                        self.fail("a reply nobody asked for (protocol error)")
                        return
                    done = self._slots.popleft()
                    done.reply = reply
                    done.woken.set()
        finally:
            self._reading = False
            for waiting in self._slots:  # hand over: one of them reads next
                waiting.woken.set()

    # -- pub/sub (rule 5) ---------------------------------------------------------------------

    def send_nowait(self, *args: Arg) -> None:
        """Queue a command whose answers arrive as pushes (SUBSCRIBE, UNSUBSCRIBE, PING)."""
        if self.failure is not None:
            raise lost(self.failure)
        self._out.append(encode(args))
        self._queued.set()

    async def write_forever(self) -> None:
        """Flush what :meth:`send_nowait` queues, until the connection fails."""
        while self.failure is None:
            await self._queued.wait()
            self._queued = trio.Event()
            await self._flush()

    async def receive(self) -> list[Reply]:
        """Every complete reply of the next read (at least one). Raise ``Unavailable`` when
        the connection fails."""
        replies = await self._receive()
        if self.failure is not None:
            raise lost(self.failure)
        return replies

    # -- both ---------------------------------------------------------------------------------

    async def _receive(self) -> list[Reply]:
        """The replies of the next read that completes one; ``[]`` once the connection failed.

        On a socket: wait until it is readable, then read (a reply is seldom there at once;
        waiting first spares a failed read, and the wait is the checkpoint)."""
        replies = _NO_REPLIES  # the parser's list replaces it: no list made per read here
        fd = self._fd
        while not replies and self.failure is None:
            try:
                if fd is None:
                    data: bytes | None = bytes(await self._stream.receive_some(_RECEIVE_BYTES))
                else:
                    await trio.lowlevel.wait_readable(fd)
                    if self.failure is not None:  # failed while this task was being woken
                        break
                    data = try_read(fd, _RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.fail(f"connection lost ({exc!r})")
                break
            if not data:
                if data is None or fd is None:
                    self.fail("connection closed by Redis (or lost)")
                    break
                continue  # woken with nothing to read
            try:
                replies = self._parser.feed(data)
            except ProtocolError as exc:
                self.fail(f"protocol error ({exc})")
        return replies

    def fail(self, why: str) -> None:
        """Drop the connection (rule 3): waiting callers get ``Unavailable``."""
        if self.failure is not None:
            return
        self.failure = why
        stream = self._stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        if isinstance(stream, trio.SocketStream):
            stream.socket.close()  # wakes a task blocked on it; no await: callable from anywhere
        for slot in self._slots:
            slot.woken.set()
        self._slots.clear()
        self._queued.set()

    async def aclose(self) -> None:
        self.fail("closed")
        await trio.aclose_forcefully(self._stream)


@attrs.frozen
class RedisAddress:
    """Where and how to connect, from a ``redis://``, ``rediss://`` or ``unix://`` URL:
    ``redis://[[user]:password@]host[:port][/db]``, ``unix:///path?db=n``."""

    host: str = "127.0.0.1"
    port: int = 6379
    unix_path: str | None = None
    tls: bool = False
    username: str | None = None
    password: str | None = None
    db: int = 0

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"not a Redis URL: {url!r}")
        query = parse_qs(parts.query)
        db_text = query.get("db", [""])[0] or parts.path.lstrip("/") or "0"
        if parts.scheme == "unix":
            db_text = query.get("db", ["0"])[0]
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            unix_path=parts.path if parts.scheme == "unix" else None,
            tls=parts.scheme == "rediss",
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            db=int(db_text),
        )


class RespClient(ClosesOnExit):
    """Commands on one pipelined connection, made on first use and again after a failure
    (rules 3, 6), plus dedicated connections for pub/sub (:meth:`connect`). Closed by
    :meth:`aclose` (or ``async with``); a port given a client never closes it.

    ``timeout_s`` bounds connecting and every reply: a Redis that accepts connections but does
    not answer fails a call with ``Unavailable`` instead of hanging it. A blocking command must
    block for less (the archive feed asks for under half of it).
    """

    def __init__(
        self, address: RedisAddress, *, timeout_s: float = 5.0, client_name: str | None = None
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.client_name = client_name
        self._conn: RespConnection | None = None
        self._connecting = trio.Lock()
        self.connects = 0
        """Connections made so far; the newest one's ``serial``."""

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 5.0, client_name: str | None = None) -> Self:
        return cls(RedisAddress.from_url(url), timeout_s=timeout_s, client_name=client_name)

    def _route(self, args: tuple[Arg, ...]) -> RespConnection | None:
        """The connection that runs ``args`` (rule 6), or None: connect first. Redis Cluster
        would pick the connection of the keys' slot here."""
        conn = self._conn
        return None if conn is None or conn.broken else conn

    async def call(self, *args: Arg) -> Reply:
        """Run one command; raise :class:`RespError` or ``Unavailable`` (rules 3-4)."""
        conn = self._route(args) or await self._connected()
        return check(await conn.call(*args))

    async def call_tracked(self, *args: Arg) -> tuple[Reply, int]:
        """:meth:`call`, and the serial of the connection that answered: two replies with
        the same serial came from one run of the server, in the order Redis ran them."""
        conn = self._route(args) or await self._connected()
        return check(await conn.call(*args)), conn.serial

    async def _connected(self) -> RespConnection:
        async with self._connecting:
            if self._conn is None or self._conn.broken:
                self._conn = await self.connect()
            return self._conn

    async def connect(self) -> RespConnection:
        """A new connection, authenticated and on the right database; the caller owns it.
        Raise ``Unavailable`` if it cannot be made (rule 4)."""
        address = self.address
        where = address.unix_path or f"{address.host}:{address.port}"
        conn: RespConnection | None = None
        try:
            with trio.fail_after(self.timeout_s):
                stream: trio.abc.Stream
                if address.unix_path is not None:
                    stream = await trio.open_unix_socket(address.unix_path)
                else:
                    stream = await trio.open_tcp_stream(address.host, address.port)
                    if address.tls:
                        stream = trio.SSLStream(
                            stream, ssl.create_default_context(), server_hostname=address.host
                        )
                conn = RespConnection(
                    stream,
                    timeout_s=self.timeout_s,
                    serial=self.connects + 1,
                )
                if isinstance(stream, trio.SSLStream):
                    await stream.do_handshake()
                for command in self._handshake():
                    reply = await conn.call(*command)
                    if isinstance(reply, RespError):
                        raise lost(f"{where} refused {command[0]!r}: {reply}")
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            if conn is not None:
                await conn.aclose()
            raise lost(f"cannot connect to {where} ({exc!r})") from exc
        except BaseException:
            if conn is not None:
                await conn.aclose()
            raise
        self.connects += 1
        conn.serial = self.connects
        return conn

    def _handshake(self) -> list[list[Arg]]:
        commands: list[list[Arg]] = []
        address = self.address
        if address.password is not None:
            user = [address.username] if address.username else []
            commands.append(["AUTH", *user, address.password])
        if address.db:
            commands.append(["SELECT", address.db])
        if self.client_name:
            commands.append(["CLIENT", "SETNAME", self.client_name])
        return commands or [["PING"]]  # a connection is up once Redis answered on it

    async def aclose(self) -> None:
        if self._conn is not None:
            await self._conn.aclose()
            self._conn = None
        else:
            await trio.lowlevel.checkpoint()


@attrs.frozen
class Script:
    """A Lua script run by its SHA1 (EVALSHA), sent whole (EVAL) when Redis lacks it."""

    source: str
    sha: str = attrs.field(init=False)

    @sha.default
    def _sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()

    async def run(self, client: RespClient, keys: Sequence[Arg], args: Sequence[Arg]) -> Reply:
        return await self._evaluate(client.call, keys, args)

    async def run_tracked(
        self, client: RespClient, keys: Sequence[Arg], args: Sequence[Arg]
    ) -> tuple[Reply, int]:
        """:meth:`run`, and the serial of the connection that answered
        (:meth:`RespClient.call_tracked`)."""
        return await self._evaluate(client.call_tracked, keys, args)

    async def _evaluate(
        self, call: Callable[..., Awaitable[T]], keys: Sequence[Arg], args: Sequence[Arg]
    ) -> T:
        try:
            return await call("EVALSHA", self.sha, len(keys), *keys, *args)
        except RespError as exc:
            if exc.prefix != b"NOSCRIPT":
                raise
        return await call("EVAL", self.source, len(keys), *keys, *args)
