"""What the contract suites share: the implementation registry type, the service gate, and
recording doubles for the node side of a port.

Registering an implementation that needs a real service (``conftest.py``)::

    DIRECTORY_IMPLS["mysql"] = Impl(open_mysql_directory, service_env="CHATNODE_TEST_MYSQL_URL")

``open_mysql_directory(url)`` is an async context manager yielding a ``Directory`` on a database
of its own (unique name per test), dropped on exit. Such a parameter is marked
``integration``; it is skipped when ``service_env`` is unset, unless ``CI`` or
``CHATNODE_REQUIRE_SERVICES`` is set, where it fails: CI never skips silently.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Generic, TypeVar

import attrs
import pytest
import trio

from chatnode.core.models import ChatMessage, Draft, RoomEvent
from chatnode.core.ports import ArchiveFeed, Bus, Presence, RateLimits, Revocations, Tickets

T = TypeVar("T")

REQUIRE_SERVICES_VARS = ("CI", "CHATNODE_REQUIRE_SERVICES")
_FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})

NewBus = Callable[[], Awaitable[Bus]]
"""Makes one more bus ("node") on the backend under test; the backend closes them all."""

NewRevocations = Callable[[], Awaitable[Revocations]]
"""Makes one more node's Revocations on the store under test (the same store for all)."""


@attrs.frozen
class TicketsRig:
    """Tickets of several nodes on one store, and a way to let time pass for it
    (``advance``: a fake clock for memory, a real wait for Redis: keep lifetimes short)."""

    new_tickets: Callable[[], Awaitable[Tickets]]
    advance: Callable[[float], Awaitable[None]]


@attrs.frozen
class Impl(Generic[T]):
    """One implementation under contract test.

    ``open(url)`` is an async context manager yielding a fresh, empty instance; ``url`` is the
    value of ``service_env`` ("" when the implementation needs no service).
    """

    open: Callable[[str], AbstractAsyncContextManager[T]]
    service_env: str | None = None


def documents(messages: Iterable[ChatMessage]) -> list[bytes]:
    """The messages as ``Archive.store`` takes them: their archive documents."""
    return [m.document for m in messages]


def services_required(environ: Mapping[str, str] = os.environ) -> bool:
    """True under CI or ``CHATNODE_REQUIRE_SERVICES``: a missing service is a failure."""
    return any(
        environ.get(name, "").strip().lower() not in _FALSE_WORDS for name in REQUIRE_SERVICES_VARS
    )


def require_service(env_var: str, environ: Mapping[str, str] = os.environ) -> str:
    """Return the service URL in ``env_var``; skip the test without it (fail when required)."""
    url = environ.get(env_var, "").strip()
    if url:
        return url
    if services_required(environ):
        pytest.fail(
            f"{env_var} is not set, and CI/CHATNODE_REQUIRE_SERVICES forbids skipping: "
            "start the services (scripts/services) and export it",
            pytrace=False,
        )
    pytest.skip(f"{env_var} is not set; start the services (scripts/services) and export it")


def impl_params(registry: Mapping[str, Impl[Any]]) -> list[Any]:
    """One pytest param per implementation; those needing a service are ``integration``."""
    return [
        pytest.param(name, id=name, marks=[pytest.mark.integration] if impl.service_env else [])
        for name, impl in registry.items()
    ]


@asynccontextmanager
async def open_impl(impl: Impl[T]) -> AsyncIterator[T]:
    url = require_service(impl.service_env) if impl.service_env else ""
    async with impl.open(url) as instance:
        yield instance


@attrs.define(eq=False)
class Recorder:
    """A ``BusHandler`` that records what it gets; tests wait on a condition, never on time.

    It also checks the port's promise that deliveries come from one task at a time.
    """

    messages: list[ChatMessage] = attrs.field(factory=list)
    signals: list[tuple[int, RoomEvent]] = attrs.field(factory=list)
    resubscribes: int = 0
    _busy: bool = False
    _changed: trio.Event = attrs.field(factory=trio.Event)

    async def deliver(self, message: ChatMessage) -> None:
        await self._record(lambda: self.messages.append(message))

    async def signal(self, room_id: int, event: RoomEvent) -> None:
        await self._record(lambda: self.signals.append((room_id, event)))

    async def resubscribed(self) -> None:
        def count() -> None:
            self.resubscribes += 1

        await self._record(count)

    async def _record(self, record: Callable[[], None]) -> None:
        assert not self._busy, "the bus called the handler from two tasks at once"
        self._busy = True
        try:
            record()
            await trio.lowlevel.checkpoint()  # a real handler yields; let others try to overlap
        finally:
            self._busy = False
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._changed.wait()

    async def wait_for_messages(self, room_id: int, count: int) -> list[ChatMessage]:
        await self.wait_until(lambda: len(self.in_room(room_id)) >= count)
        return self.in_room(room_id)

    def in_room(self, room_id: int) -> list[ChatMessage]:
        return [m for m in self.messages if m.room_id == room_id]


async def start_node(nursery: trio.Nursery, new_bus: NewBus) -> tuple[Bus, Recorder]:
    """A bus serving a fresh :class:`Recorder` in ``nursery``: one "node" of the test."""
    bus = await new_bus()
    recorder = Recorder()
    await nursery.start(bus.serve, recorder)
    return bus, recorder


@attrs.frozen
class PresenceRig:
    """A Presence and a way to let time pass for its heartbeats.

    ``advance(seconds)`` returns once at least that much time passed for the implementation: a
    fake clock moves for the memory one, a real service may have to wait (keep TTLs ~200 ms).
    """

    presence: Presence
    advance: Callable[[float], Awaitable[None]]


@attrs.define(eq=False)
class FakeClock:
    """A monotonic clock in seconds that only moves when told."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        await trio.lowlevel.checkpoint()


@attrs.frozen
class FeedRig:
    """Archive feeds on one backend, and the bus that fills them.

    ``publish(draft)`` publishes through a bus of the backend (every publish lands in the feed);
    ``new_feed(consumer)`` makes a feed reading as ``consumer`` (one per node) that takes over
    entries left unacknowledged for ``claim_idle_ms``; ``advance(seconds)`` returns once at
    least that much time passed for the backend (a real wait for a service: keep it short).
    """

    publish: Callable[[Draft], Awaitable[ChatMessage]]
    new_feed: Callable[[str], ArchiveFeed]
    claim_idle_ms: int
    advance: Callable[[float], Awaitable[None]]


NewRateLimits = Callable[[], Awaitable[RateLimits]]
"""Makes one more node's RateLimits on the store under test (the same buckets for all)."""


@attrs.frozen
class RateLimitsRig:
    """RateLimits "nodes" sharing one store, and a way to let time pass for its buckets:
    ``advance(seconds)`` returns once at least that much time passed for the implementation
    (a fake clock for memory, a real wait for Redis: keep it short)."""

    new_limits: NewRateLimits
    advance: Callable[[float], Awaitable[None]]
