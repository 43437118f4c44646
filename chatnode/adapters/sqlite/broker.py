"""The buses serving on one embedded database, and the order of their deliveries.

Rule: **one order for every bus.** All buses on one database (several "nodes" in one process)
share one :class:`LocalBroker`, given to each by whoever builds them (the composition root).
``SqliteBus.publish`` holds the broker's FIFO lock across "insert, then hand the message to
every attached bus's inbox", so every bus sees a room's messages in offset order. The broker
holds no database and no bus: only the lock and the hand-off of each attached bus.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import trio

from chatnode.core.models import ChatMessage, RoomEvent


@attrs.frozen
class Signal:
    """A room's signal event (typing, presence)."""

    room_id: int
    event: RoomEvent


Item = ChatMessage | Signal
"""What the broker hands to the attached buses."""

Offer = Callable[[Item], None]
"""A bus's hand-off: queues the item or drops it, never waits."""


@attrs.define(eq=False)
class LocalBroker:
    """The hand-offs of the buses serving on one database, and the lock that orders them."""

    lock: trio.Lock = attrs.field(factory=trio.Lock)
    _offers: dict[Offer, None] = attrs.field(factory=dict, init=False)

    def attach(self, offer: Offer) -> None:
        """Hand ``offer`` every item fanned out from now on."""
        self._offers[offer] = None

    def detach(self, offer: Offer) -> None:
        self._offers.pop(offer, None)

    def fan_out(self, item: Item) -> None:
        """Hand ``item`` to every attached bus; never waits."""
        for offer in self._offers:
            offer(item)
