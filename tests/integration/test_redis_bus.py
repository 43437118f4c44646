"""RedisBus against a real Redis, beyond the Bus contract: the pub/sub connection is killed,
cut, frozen or refused, and the bus reconnects, resubscribes and tells the node; what the
script writes (room log trimming, the archive stream, a lost counter); failures as
``Unavailable``. Connections are broken with ``CLIENT KILL`` or a TCP proxy in front of the
test server, never by restarting the shared server. Each test uses its own key prefix."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import attrs
import pytest
import trio

from chatnode.adapters.redis import RespClient
from chatnode.adapters.sqlite import SqliteArchive, SqliteDatabase
from chatnode.core import errors
from chatnode.core.models import ChatMessage, Draft, RoomEvent
from chatnode.node.hub import Hub
from chatnode.wire.frames import CloseCode, Dialect, Encoder, Recipient
from tests.contracts.conftest import redis_test_clients
from tests.contracts.harness import Recorder, require_service
from tests.fault_proxy import FaultProxy
from tests.redis_support import OpeningRedisBus, RedisAdmin

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000


def draft(room_id: int, text: str) -> Draft:
    return Draft(room_id=room_id, user="bob", text=text, timestamp_ms=T0)


@pytest.fixture
def redis_url() -> str:
    return require_service("CHATNODE_TEST_REDIS_URL")


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[tuple[RedisAdmin, str, RespClient]]:
    """An admin client, the test's key prefix (its keys are deleted at the end), and a bus
    client whose connections are named after the prefix (so a test kills only its own)."""
    async with redis_test_clients(redis_url) as (clients, prefix):
        client = clients[0]
        resp = RespClient.from_url(redis_url, timeout_s=5.0, client_name=prefix)
        try:
            yield client, prefix, resp
        finally:
            await resp.aclose()


@pytest.fixture
async def proxied(
    redis_url: str, nursery: trio.Nursery
) -> AsyncIterator[tuple[FaultProxy, RespClient]]:
    """A proxy in front of the test server and a bus client connected through it."""
    parts = urlsplit(redis_url)
    proxy = FaultProxy(parts.port or 6379, parts.hostname or "127.0.0.1")
    port = await nursery.start(proxy.serve)
    client = RespClient.from_url(f"redis://127.0.0.1:{port}{parts.path}", timeout_s=2.0)
    try:
        yield proxy, client
    finally:
        await client.aclose()


async def kill_pubsub(redis: RedisAdmin, name: str) -> int:
    """CLIENT KILL the pub/sub connections named ``name``; return how many."""
    return await redis.kill_clients_named(name, kind="pubsub")


async def subscribers(redis: RedisAdmin, channel: bytes) -> int:
    """How many connections are subscribed to ``channel`` (PUBSUB NUMSUB)."""
    return await redis.pubsub_numsub(channel)


async def test_killed_pubsub_connection_reconnects_resubscribes_and_tells_the_node(
    redis: tuple[RedisAdmin, str, RespClient], nursery: trio.Nursery
) -> None:
    client, prefix, resp = redis
    bus = OpeningRedisBus(resp, prefix, min_backoff_s=0.5)
    recorder = Recorder()
    await nursery.start(bus.serve, recorder)
    await bus.subscribe(1)
    await bus.subscribe(2)
    await bus.subscribe(3)
    await bus.unsubscribe(3)
    before = await bus.publish(draft(1, "before"))
    await recorder.wait_for_messages(1, 1)

    killed = await kill_pubsub(client, prefix)
    # The subscriber is gone the moment CLIENT KILL returns, and the bus waits min_backoff_s
    # before reconnecting: this one is published while nobody listens.
    missed = await bus.publish(draft(1, "while disconnected"))
    await recorder.wait_until(lambda: recorder.resubscribes == 1)
    after = [await bus.publish(draft(room, "after")) for room in (1, 2, 3)]
    await recorder.wait_for_messages(2, 1)

    assert killed == 1
    assert bus.reconnects == 1
    assert recorder.in_room(1) == [before, after[0]]  # the gap is for the node to fill ...
    assert recorder.in_room(2) == [after[1]]
    assert recorder.in_room(3) == []  # unsubscribed before the kill: not resubscribed
    assert await bus.read_log(1, after_offset=1, limit=10) == [missed, after[0]]  # ... from here
    assert await subscribers(client, bus.keys.channel(3)) == 0


@attrs.define(eq=False)
class CatchUpFailsOnce(Recorder):
    """A node whose first catch-up after a reconnect finds Redis unavailable."""

    failed: bool = False

    async def resubscribed(self) -> None:
        await super().resubscribed()
        if not self.failed:
            self.failed = True
            raise errors.Unavailable("Redis: GET offset failed")


async def test_a_failed_catch_up_is_retried_on_a_new_connection(
    redis: tuple[RedisAdmin, str, RespClient], nursery: trio.Nursery
) -> None:
    client, prefix, resp = redis
    bus = OpeningRedisBus(resp, prefix, min_backoff_s=0.01)
    recorder = CatchUpFailsOnce()
    await nursery.start(bus.serve, recorder)
    await bus.subscribe(1)

    assert await kill_pubsub(client, prefix) == 1
    await recorder.wait_until(lambda: recorder.resubscribes == 2)
    message = await bus.publish(draft(1, "after"))

    assert await recorder.wait_for_messages(1, 1) == [message]
    assert bus.reconnects == 2


@attrs.define(eq=False)
class FakeMember(Recipient):
    """A live connection as the hub sees it, counting the frames it gets."""

    conn_id: str = "c1"
    user: str = "alice"
    dialect: Dialect = Dialect.PLAIN
    encoder: Encoder = attrs.Factory(lambda self: Encoder(self.dialect), takes_self=True)
    frames: int = 0
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def send_nowait(self, frame: bytes) -> None:
        self.frames += 1
        self._changed.set()
        self._changed = trio.Event()

    def close_nowait(self, code: CloseCode, reason: str) -> None:
        raise AssertionError(f"closed: {code} {reason}")

    def removed(self) -> None:
        raise AssertionError("removed")

    async def wait_frames(self, count: int) -> None:
        while self.frames < count:
            await self._changed.wait()


async def test_the_hub_fills_the_gap_of_a_reconnect_from_the_room_log(
    redis: tuple[RedisAdmin, str, RespClient], nursery: trio.Nursery
) -> None:
    client, prefix, resp = redis
    bus = OpeningRedisBus(resp, prefix, min_backoff_s=0.5)
    async with await SqliteDatabase.open(":memory:") as db:
        hub = Hub(bus, SqliteArchive(db), cache_size=16)
        await nursery.start(bus.serve, hub)
        member = FakeMember()
        session, seat = await hub.attach(1, member)
        hub.go_live(session, seat, sent_up_to=session.last_offset)
        await bus.publish(draft(1, "before"))
        await member.wait_frames(1)

        assert await kill_pubsub(client, prefix) == 1
        await bus.publish(draft(1, "in the gap"))  # nobody subscribed: see the kill test
        await member.wait_frames(2)  # delivered by the hub's catch-up after resubscribing
        await bus.publish(draft(1, "after"))
        await member.wait_frames(3)

        assert [m.text for m in session.recent] == ["before", "in the gap", "after"]
        assert bus.reconnects == 1
        await hub.detach(1, member)


async def test_many_reconnects_leave_one_pubsub_connection(
    redis: tuple[RedisAdmin, str, RespClient], nursery: trio.Nursery
) -> None:
    admin, prefix, resp = redis
    bus = OpeningRedisBus(resp, prefix, min_backoff_s=0.01)
    recorder = Recorder()
    await nursery.start(bus.serve, recorder)
    await bus.subscribe(1)

    for n in range(1, 8):  # each kill ends the pub/sub connection
        assert await kill_pubsub(admin, prefix) == 1
        await recorder.wait_until(lambda n=n: recorder.resubscribes == n)  # type: ignore[misc]
    message = await bus.publish(draft(1, "still delivered"))

    assert await recorder.wait_for_messages(1, 1) == [message]
    assert await kill_pubsub(admin, prefix) == 1  # exactly one: the dead ones were closed


async def test_a_subscribe_whose_connection_dies_raises_unavailable(
    redis: tuple[RedisAdmin, str, RespClient], nursery: trio.Nursery
) -> None:
    client, prefix, resp = redis
    bus = OpeningRedisBus(resp, prefix, min_backoff_s=0.5)
    recorder = Recorder()
    await nursery.start(bus.serve, recorder)
    await bus.subscribe(1)

    assert await kill_pubsub(client, prefix) == 1
    with pytest.raises(errors.Unavailable):
        await bus.subscribe(2)  # sent on the dead connection, or refused while reconnecting
    await recorder.wait_until(lambda: recorder.resubscribes == 1)

    await bus.subscribe(4)
    messages = [await bus.publish(draft(room, "x")) for room in (2, 1, 4)]
    await recorder.wait_for_messages(4, 1)
    assert recorder.messages == [messages[1], messages[2]]  # room 2 stayed unsubscribed


async def test_subscribe_before_serve_raises_unavailable(
    redis: tuple[RedisAdmin, str, RespClient],
) -> None:
    _, prefix, resp = redis
    with pytest.raises(errors.Unavailable):
        await OpeningRedisBus(resp, prefix).subscribe(1)


async def test_subscribe_unsubscribe_churn_keeps_acks_straight(
    redis: tuple[RedisAdmin, str, RespClient], nursery: trio.Nursery
) -> None:
    client, prefix, resp = redis
    bus = OpeningRedisBus(resp, prefix)
    recorder = Recorder()
    await nursery.start(bus.serve, recorder)

    for _ in range(20):
        await bus.subscribe(1)
        await bus.unsubscribe(1)  # does not wait for its ack
    await bus.subscribe(1)
    message = await bus.publish(draft(1, "still subscribed"))

    assert await recorder.wait_for_messages(1, 1) == [message]
    assert await subscribers(client, bus.keys.channel(1)) == 1


async def test_concurrent_subscribes_of_one_room_all_return(
    redis: tuple[RedisAdmin, str, RespClient], nursery: trio.Nursery
) -> None:
    _, prefix, resp = redis
    bus = OpeningRedisBus(resp, prefix)
    recorder = Recorder()
    await nursery.start(bus.serve, recorder)

    async with trio.open_nursery() as subscribers:
        for n in range(30):
            subscribers.start_soon(bus.subscribe, 1 + n % 3)
            if n % 4 == 0:
                subscribers.start_soon(bus.unsubscribe, 1 + n % 3)
    for room in (1, 2, 3):
        await bus.subscribe(room)
    messages = [await bus.publish(draft(room, "x")) for room in (1, 2, 3)]

    await recorder.wait_for_messages(3, 1)
    assert recorder.messages == messages


async def test_a_frozen_connection_is_dropped_by_the_keepalive(
    proxied: tuple[FaultProxy, RespClient],
    redis: tuple[RedisAdmin, str, RespClient],
    nursery: trio.Nursery,
) -> None:
    proxy, client = proxied
    _, prefix, _ = redis
    bus = OpeningRedisBus(client, prefix, keepalive_s=0.2)
    recorder = Recorder()
    await nursery.start(bus.serve, recorder)
    await bus.subscribe(1)

    proxy.freeze()  # the pub/sub connection stays open but nothing comes back
    await recorder.wait_until(lambda: recorder.resubscribes == 1)
    message = await bus.publish(draft(1, "through a fresh connection"))

    assert await recorder.wait_for_messages(1, 1) == [message]


async def test_the_keepalive_is_answered_with_no_room_subscribed(
    redis: tuple[RedisAdmin, str, RespClient], nursery: trio.Nursery
) -> None:
    _, prefix, resp = redis
    bus = OpeningRedisBus(resp, prefix, keepalive_s=0.05)
    recorder = Recorder()
    await nursery.start(bus.serve, recorder)
    await bus.subscribe(1)
    await bus.unsubscribe(1)  # subscribed to nothing: Redis answers PING with +PONG

    with trio.fail_after(5):
        await bus.wait_for_pongs(3)
    assert bus.reconnects == 0  # before the fix: "no PONG", a reconnect every 2 keepalives


async def test_an_outage_fails_calls_and_the_bus_recovers_after_it(
    proxied: tuple[FaultProxy, RespClient],
    redis: tuple[RedisAdmin, str, RespClient],
    nursery: trio.Nursery,
) -> None:
    proxy, client = proxied
    _, prefix, _ = redis
    bus = OpeningRedisBus(client, prefix, min_backoff_s=0.01, max_backoff_s=0.05)
    recorder = Recorder()
    await nursery.start(bus.serve, recorder)
    await bus.subscribe(1)
    first = await bus.publish(draft(1, "first"))
    await recorder.wait_for_messages(1, 1)  # through the proxy before the cut (not caught up)

    proxy.refusing = True
    proxy.drop()
    for call in (
        lambda: bus.publish(draft(1, "lost")),
        lambda: bus.last_offset(1),
        lambda: bus.read_log(1, after_offset=0, limit=10),
        bus.check,
    ):
        with pytest.raises(errors.Unavailable):
            await call()
    await proxy.wait_accepted(proxy.accepted + 3)  # the reader keeps trying, with backoff
    proxy.refusing = False
    await recorder.wait_until(lambda: recorder.resubscribes == 1)
    second = await bus.publish(draft(1, "second"))

    assert await recorder.wait_for_messages(1, 2) == [first, second]
    assert second.offset == 2  # the failed publish took no offset


async def test_serve_waits_for_redis_before_it_is_started(
    proxied: tuple[FaultProxy, RespClient],
    redis: tuple[RedisAdmin, str, RespClient],
    nursery: trio.Nursery,
) -> None:
    proxy, client = proxied
    _, prefix, _ = redis
    bus = OpeningRedisBus(client, prefix, min_backoff_s=0.01, max_backoff_s=0.05)
    recorder = Recorder()
    proxy.refusing = True
    started = trio.Event()

    async def start() -> None:
        await nursery.start(bus.serve, recorder)
        started.set()

    nursery.start_soon(start)
    await proxy.wait_accepted(3)
    assert not started.is_set()
    proxy.refusing = False
    await started.wait()
    await bus.subscribe(1)
    assert recorder.resubscribes == 0


async def test_the_room_log_is_trimmed_and_read_from_its_start(
    redis: tuple[RedisAdmin, str, RespClient],
) -> None:
    client, prefix, resp = redis
    bus = OpeningRedisBus(resp, prefix, room_log_length=10)
    published = [await bus.publish(draft(1, f"m{n}")) for n in range(300)]

    kept = await bus.read_log(1, after_offset=0, limit=1000)
    length = await client.xlen(bus.keys.log(1))

    assert 10 <= length < 300  # MAXLEN ~ trims whole stream nodes
    assert kept == published[-length:]
    assert await bus.read_log(1, after_offset=295, limit=3) == published[295:298]
    assert await bus.last_offset(1) == 300


async def test_a_lost_counter_continues_from_the_log(
    redis: tuple[RedisAdmin, str, RespClient],
) -> None:
    client, prefix, resp = redis
    bus = OpeningRedisBus(resp, prefix)
    for n in range(3):
        await bus.publish(draft(1, f"m{n}"))

    await client.delete([bus.keys.offset(1)])
    message = await bus.publish(draft(1, "after the loss"))

    assert message.offset == 4
    assert await bus.last_offset(1) == 4


async def test_publish_writes_the_archive_stream(
    redis: tuple[RedisAdmin, str, RespClient],
) -> None:
    client, prefix, resp = redis
    bus = OpeningRedisBus(resp, prefix)
    message = await bus.publish(Draft(7, "zoë", 'say "hi" 👋', T0))

    entries = await client.xrange(bus.keys.archive)

    assert len(entries) == 1
    assert dict(entries[0].field_values) == {b"d": message.document}
    assert json.loads(message.document) == {
        "chatroom": 7,
        "offset": 1,
        "user": "zoë",
        "message": 'say "hi" 👋',
        "timestamp": T0,
    }
    assert await bus.read_log(7, after_offset=0, limit=1) == [message]


async def test_foreign_payloads_on_a_room_channel_are_ignored(
    redis: tuple[RedisAdmin, str, RespClient], nursery: trio.Nursery
) -> None:
    client, prefix, resp = redis
    bus = OpeningRedisBus(resp, prefix)
    recorder = Recorder()
    await nursery.start(bus.serve, recorder)
    await bus.subscribe(1)

    other_room = b"m" + ChatMessage(2, 1, "bob", "not this room's", T0).document
    for junk in (b"", b"hello", b"m1", b"m{}", b"m1 {}", other_room, b"s[1]", b"s{", b"\xff"):
        await client.publish(bus.keys.channel(1), junk)
    message = await bus.publish(draft(1, "real"))

    assert await recorder.wait_for_messages(1, 1) == [message]
    assert recorder.signals == []


async def test_an_unreachable_redis_is_unavailable() -> None:
    client = RespClient.from_url("redis://127.0.0.1:1/0", timeout_s=1.0)
    bus = OpeningRedisBus(client, "nowhere")
    for call in (
        lambda: bus.publish(draft(1, "x")),
        lambda: bus.last_offset(1),
        lambda: bus.read_log(1, after_offset=0, limit=1),
        lambda: bus.signal(1, RoomEvent.of(type="typing")),
        bus.check,
    ):
        with pytest.raises(errors.Unavailable):
            await call()
