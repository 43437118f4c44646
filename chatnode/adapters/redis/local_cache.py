"""The node-local layer in front of Redis of the cached directory (:mod:`.directory` rule 5):
decoded values by key, least recently used evicted past a byte budget."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Final, Generic, TypeVar

import attrs
import trio

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

ENTRY_OVERHEAD_BYTES: Final = 256


@attrs.define(eq=False)
class LocalEntry(Generic[T]):
    """A value this node got from Redis (rule 5): the bytes as Redis holds them, decoded."""

    raw: bytes
    value: tuple[T, ...]
    fresh_until: float  # trio time
    refreshing: trio.Event | None = None  # set when the read asking Redis again is done

    @property
    def cost(self) -> int:
        return ENTRY_OVERHEAD_BYTES + len(self.raw)


@attrs.define(eq=False)
class LocalTable(Generic[K, T]):
    """Entries by key, least recently used first, evicted past ``max_bytes`` of raw JSON
    (plus ``ENTRY_OVERHEAD_BYTES`` each; decoded values take about four times their JSON)."""

    max_bytes: int
    _entries: OrderedDict[K, LocalEntry[T]] = attrs.field(factory=OrderedDict, init=False)
    _bytes: int = attrs.field(default=0, init=False)

    def get(self, key: K) -> LocalEntry[T] | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: K, entry: LocalEntry[T]) -> None:
        self.pop(key)
        self._entries[key] = entry
        self._bytes += entry.cost
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.cost

    def pop(self, key: K) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.cost

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0
