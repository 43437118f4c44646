"""One pub/sub connection of the Redis bus (:mod:`.bus`) and the acknowledgements Redis owes
on it, per channel, so a subscribe returns only once Redis confirmed it (bus rule 3)."""

from __future__ import annotations

from collections.abc import Iterable

import attrs
import trio

from chatnode.core import errors

from .client import RespConnection


@attrs.define(eq=False)
class Acks:
    """Commands sent for one channel on one connection, and acknowledgements received."""

    sent: int = 0
    acked: int = 0


Tickets = dict[bytes, tuple[Acks, int]]


@attrs.define(eq=False)
class Link:
    """One pub/sub connection, and the acknowledgements Redis owes on it, per channel.

    Redis answers every channel of a SUBSCRIBE or UNSUBSCRIBE with one ack, in command order;
    the n-th command sent for a channel is therefore acknowledged by its n-th ack. A channel
    with nothing in flight is forgotten; a waiter keeps its own counter object, so a later
    command for the same channel starts a new count without disturbing it.
    """

    conn: RespConnection
    lost: bool = False
    pong: trio.Event = attrs.field(factory=trio.Event)
    _channels: dict[bytes, Acks] = attrs.field(factory=dict)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def send(self, command: bytes, channels: Iterable[bytes]) -> Tickets:
        """Queue the command; return each channel's ticket for :meth:`wait_acked`.

        Raise ``Unavailable`` if the connection is already lost.
        """
        channels = list(channels)
        if not channels:
            return {}
        self.conn.send_nowait(command, *channels)
        tickets: Tickets = {}
        for channel in channels:
            acks = self._channels.setdefault(channel, Acks())
            acks.sent += 1
            tickets[channel] = (acks, acks.sent)
        return tickets

    def acknowledge(self, channel: bytes) -> None:
        acks = self._channels.get(channel)
        if acks is None:
            return
        acks.acked += 1
        if acks.acked >= acks.sent:
            del self._channels[channel]
        self._changed.set()
        self._changed = trio.Event()

    def ponged(self) -> None:
        self.pong.set()
        self.pong = trio.Event()

    @staticmethod
    def all_acked(tickets: Tickets) -> bool:
        return all(acks.acked >= ticket for acks, ticket in tickets.values())

    async def wait_acked(self, tickets: Tickets) -> None:
        while not self.all_acked(tickets):
            if self.lost:
                raise errors.Unavailable("Redis: the bus lost its pub/sub connection")
            await self._changed.wait()

    def close(self) -> None:
        self.lost = True
        self._changed.set()
