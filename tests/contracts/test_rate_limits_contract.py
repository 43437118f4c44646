"""The RateLimits contract: token buckets shared by every node of a deployment (several
instances made by one ``new_limits`` share the buckets). A bucket starts full, refills at its
rate up to its burst, hands out whole tokens, and never more in all than it held, however many
nodes take at once. Redis runs on its own clock: bounds that depend on time allow for the
test's own delays."""

from __future__ import annotations

import math

import trio

from .harness import RateLimitsRig


async def test_a_new_bucket_is_full_and_hands_out_what_it_holds(
    rate_limits_rig: RateLimitsRig,
) -> None:
    limits = await rate_limits_rig.new_limits()
    first = await limits.take("msg:ann", 3, rate_per_s=0.001, burst=5)
    second = await limits.take("msg:ann", 3, rate_per_s=0.001, burst=5)
    assert (first.tokens, second.tokens) == (3, 2)
    assert first.retry_after_s == second.retry_after_s == 0
    empty = await limits.take("msg:ann", 1, rate_per_s=0.001, burst=5)
    assert empty.tokens == 0
    assert 900 < empty.retry_after_s <= 1000  # one token at 0.001/s


async def test_retry_after_says_when_one_token_is_back(rate_limits_rig: RateLimitsRig) -> None:
    limits = await rate_limits_rig.new_limits()
    assert (await limits.take("k", 10, rate_per_s=2.0, burst=4)).tokens == 4
    refused = await limits.take("k", 1, rate_per_s=2.0, burst=4)
    assert refused.tokens == 0 and 0.3 < refused.retry_after_s <= 0.5
    await rate_limits_rig.advance(refused.retry_after_s)
    assert (await limits.take("k", 10, rate_per_s=2.0, burst=4)).tokens >= 1


async def test_a_bucket_refills_at_its_rate_up_to_its_burst(rate_limits_rig: RateLimitsRig) -> None:
    limits = await rate_limits_rig.new_limits()
    assert (await limits.take("k", 100, rate_per_s=10.0, burst=10)).tokens == 10
    started = trio.current_time()
    await rate_limits_rig.advance(0.25)
    refilled = await limits.take("k", 100, rate_per_s=10.0, burst=10)
    elapsed = trio.current_time() - started
    assert 2 <= refilled.tokens <= max(2, math.floor((elapsed + 0.05) * 10))
    await rate_limits_rig.advance(1.2)  # long enough to be full again, not more
    assert (await limits.take("k", 100, rate_per_s=10.0, burst=10)).tokens == 10


async def test_keys_are_independent(rate_limits_rig: RateLimitsRig) -> None:
    limits = await rate_limits_rig.new_limits()
    assert (await limits.take("msg:ann", 9, rate_per_s=0.001, burst=2)).tokens == 2
    assert (await limits.take("msg:bob", 9, rate_per_s=0.001, burst=2)).tokens == 2
    assert (await limits.take("ping:ann", 9, rate_per_s=0.001, burst=3)).tokens == 3
    assert (await limits.take("msg:ann", 1, rate_per_s=0.001, burst=2)).tokens == 0


async def test_every_node_takes_from_the_same_bucket(rate_limits_rig: RateLimitsRig) -> None:
    one, two = await rate_limits_rig.new_limits(), await rate_limits_rig.new_limits()
    assert (await one.take("login-addr:10.0.0.1", 4, rate_per_s=0.001, burst=6)).tokens == 4
    assert (await two.take("login-addr:10.0.0.1", 4, rate_per_s=0.001, burst=6)).tokens == 2
    assert (await one.take("login-addr:10.0.0.1", 1, rate_per_s=0.001, burst=6)).tokens == 0


async def test_takers_at_once_never_get_more_than_the_bucket_held(
    rate_limits_rig: RateLimitsRig,
) -> None:
    nodes = [await rate_limits_rig.new_limits() for _ in range(3)]
    taken: list[int] = []

    async def taker(i: int) -> None:
        grant = await nodes[i % 3].take("rooms:ann", 2, rate_per_s=0.001, burst=25)
        taken.append(grant.tokens)

    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(taker, i)
    assert sum(taken) == 25 and len(taken) == 40


async def test_a_slow_rate_hands_out_whole_tokens_only(rate_limits_rig: RateLimitsRig) -> None:
    limits = await rate_limits_rig.new_limits()
    assert (await limits.take("login-fail:ann", 1, rate_per_s=1 / 60, burst=1)).tokens == 1
    refused = await limits.take("login-fail:ann", 1, rate_per_s=1 / 60, burst=1)
    assert refused.tokens == 0 and 59 < refused.retry_after_s <= 60
    await rate_limits_rig.advance(0.1)  # a fraction of a token is not a token
    assert (await limits.take("login-fail:ann", 1, rate_per_s=1 / 60, burst=1)).tokens == 0
