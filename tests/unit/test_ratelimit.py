"""The node's limiters (``node/ratelimit.py``): leases from the shared store, refusals that
cost no store call, one lease at a time, per-node limits while the store fails, bounded
memory. On Trio's mock clock; the store is the memory one, counted."""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing

from chatnode.adapters.memory import MemoryRateLimits
from chatnode.core.errors import Unavailable
from chatnode.core.models import Grant
from chatnode.node import ratelimit
from chatnode.node.ratelimit import Limiter, Rate, address_key


@attrs.define(eq=False)
class CountingStore:
    """A MemoryRateLimits that counts its calls, and can fail or hang."""

    inner: MemoryRateLimits = attrs.Factory(MemoryRateLimits)
    calls: int = 0
    failing: bool = False
    hanging: bool = False

    async def take(self, key: str, count: int, *, rate_per_s: float, burst: int) -> Grant:
        self.calls += 1
        if self.hanging:
            await trio.sleep_forever()
        if self.failing:
            await trio.lowlevel.checkpoint()
            raise Unavailable("store down")
        return await self.inner.take(key, count, rate_per_s=rate_per_s, burst=burst)


async def allowed(limiter: Limiter, key: str, tries: int) -> int:
    return sum([await limiter.take(key) == 0.0 for _ in range(tries)])


def test_a_lease_is_an_eighth_of_the_burst_at_most_half_a_second() -> None:
    assert Rate(20.0, 40).lease == 5
    assert Rate(100_000.0, 100_000).lease == 12_500
    assert Rate(4.0, 1000).lease == 2
    assert Rate(0.5, 1).lease == 1
    assert Rate.every(60.0, 10).lease == 1


async def test_tokens_are_spent_locally_and_leased_in_batches(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = CountingStore()
    limiter = Limiter("msg", Rate(10.0, 40), store)  # the clock stands still meanwhile
    assert await allowed(limiter, "ann", 40) == 40
    assert store.calls == 8  # leases of 5
    assert limiter.leases == 8


async def test_refusals_cost_no_store_call_until_a_lease_is_due(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = CountingStore()
    limiter = Limiter("msg", Rate(20.0, 40), store)
    assert await allowed(limiter, "ann", 40) == 40
    calls = store.calls
    wait_s = await limiter.take("ann")
    assert wait_s == pytest.approx(1 / 20 + 4 / 20)  # one token, then the rest of a lease
    assert await allowed(limiter, "ann", 1000) == 0
    assert store.calls == calls + 1 and limiter.refused == 1001
    await trio.sleep(wait_s)
    assert await allowed(limiter, "ann", 5) == 5  # a whole lease is there
    assert store.calls == calls + 2


async def test_nodes_sharing_a_store_never_exceed_the_burst(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = CountingStore()
    one, two = (Limiter("msg", Rate(10.0, 40), store) for _ in range(2))
    total = 0
    for _ in range(30):
        total += await allowed(one, "ann", 3) + await allowed(two, "ann", 3)
    assert total == 40


async def test_one_lease_at_a_time_per_key(autojump_clock: trio.testing.MockClock) -> None:
    store = CountingStore()
    limiter = Limiter("msg", Rate(10.0, 40), store)
    results: list[float] = []

    async def send() -> None:
        results.append(await limiter.take("ann"))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(send)
    assert results == [0.0] * 10
    assert store.calls == 2


async def test_a_failing_store_leaves_each_node_its_own_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = CountingStore(failing=True)
    limiter = Limiter("msg", Rate(1.0, 10), store)
    assert await allowed(limiter, "ann", 15) == 10  # a local bucket, full at first
    assert store.calls == 1  # not asked again within STORE_RETRY_S
    await trio.sleep(ratelimit.STORE_RETRY_S)
    store.failing = False
    assert await limiter.take("ann") == 0.0
    assert store.calls == 2  # asked again, and back to leases
    assert limiter.leases == 1


async def test_a_store_that_does_not_answer_counts_as_failed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = CountingStore(hanging=True)
    limiter = Limiter("msg", Rate(1.0, 10), store)
    started = trio.current_time()
    assert await limiter.take("ann") == 0.0
    assert trio.current_time() - started == pytest.approx(ratelimit.LEASE_TIMEOUT_S)
    assert await allowed(limiter, "ann", 20) == 9
    assert store.calls == 1


async def test_without_a_store_a_node_limits_alone(autojump_clock: trio.testing.MockClock) -> None:
    limiter = Limiter("typing", Rate.every(2.0, 1), None)
    assert await allowed(limiter, "1:ann", 100) == 1
    await trio.sleep(2.0)
    assert await allowed(limiter, "1:ann", 100) == 1
    assert await allowed(limiter, "2:ann", 100) == 1


async def test_a_token_given_back_is_spent_again(autojump_clock: trio.testing.MockClock) -> None:
    limiter = Limiter("login-fail", Rate.every(60.0, 2), CountingStore())
    assert await allowed(limiter, "ann", 2) == 2
    limiter.give_back("ann")
    assert await allowed(limiter, "ann", 3) == 1


async def test_the_table_of_keys_is_swept_of_keys_not_in_use(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = CountingStore()
    limiter = Limiter("msg", Rate(20.0, 40), store)
    active = [f"user{i}" for i in range(1500)]
    for _ in range(3):  # 1,500 users in use: each leases once, whatever the sweeps
        for key in active:
            assert await limiter.take(key) == 0.0
    assert store.calls == 1500
    for i in range(10_000):  # one-off keys come and go
        await limiter.take(f"once{i}")
        if i % 100 == 0:
            for key in active[:100]:
                await limiter.take(key)
    assert len(limiter._budgets) <= 5_000  # of the 11,500 keys ever used
    assert all(key in limiter._budgets for key in active[:100])  # still in use, still there


def test_an_ipv6_client_counts_as_its_64() -> None:
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::2")
    assert address_key("2001:db8:1:2:aaaa::1") != address_key("2001:db8:1:3::1")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7" == address_key("192.0.2.7")
    assert address_key("unix") == "unix"


def test_the_node_defaults_are_the_configuration_defaults() -> None:
    from chatnode.app import rates
    from chatnode.config import Config
    from chatnode.node.ratelimit import Rates

    assert rates(Config()) == Rates()


@pytest.mark.parametrize(
    "variable",
    [
        "CHATNODE_RATE_PING_BURST",
        "CHATNODE_RATE_SUBSCRIBE_BURST",
        "CHATNODE_MAX_CONNECTION_ROOMS",
        "CHATNODE_TYPING_INTERVAL_S",
        "CHATNODE_ROOM_CREATE_BURST",
        "CHATNODE_LOGIN_ADDRESS_INTERVAL_S",
        "CHATNODE_LOGIN_FAILURES_BURST",
        "CHATNODE_SIGNUP_ADDRESS_INTERVAL_S",
    ],
)
def test_a_limit_of_zero_is_refused_naming_its_setting(variable: str) -> None:
    from chatnode.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=variable):
        load_config({variable: "0"})
