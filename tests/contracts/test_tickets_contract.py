"""The Tickets contract: a ticket stands for its token once, on any node sharing the store,
within its lifetime; an account gets a bounded number per lifetime."""

from __future__ import annotations

import trio

from .harness import TicketsRig

TTL_MS = 300


async def test_a_ticket_is_redeemed_once_on_any_node(tickets_rig: TicketsRig) -> None:
    one, two = await tickets_rig.new_tickets(), await tickets_rig.new_tickets()
    assert await one.issue("ticket-1", "token-1", account_id=1, ttl_ms=TTL_MS, max_per_account=5)

    assert await two.redeem("ticket-1") == "token-1"
    assert await one.redeem("ticket-1") is None
    assert await two.redeem("ticket-1") is None
    assert await one.redeem("never-issued") is None


async def test_concurrent_redeems_hand_a_ticket_out_once(tickets_rig: TicketsRig) -> None:
    nodes = [await tickets_rig.new_tickets() for _ in range(4)]
    await nodes[0].issue("ticket-1", "token-1", account_id=1, ttl_ms=5000, max_per_account=5)
    got: list[str | None] = []

    async def redeem(index: int) -> None:
        got.append(await nodes[index % len(nodes)].redeem("ticket-1"))

    async with trio.open_nursery() as nursery:
        for index in range(8):
            nursery.start_soon(redeem, index)
    assert got.count("token-1") == 1 and got.count(None) == 7


async def test_a_ticket_expires(tickets_rig: TicketsRig) -> None:
    tickets = await tickets_rig.new_tickets()
    await tickets.issue("ticket-1", "token-1", account_id=1, ttl_ms=TTL_MS, max_per_account=5)
    await tickets.issue("ticket-2", "token-1", account_id=1, ttl_ms=TTL_MS * 10, max_per_account=5)
    await tickets_rig.advance(TTL_MS / 1000 + 0.05)
    assert await tickets.redeem("ticket-1") is None
    assert await tickets.redeem("ticket-2") == "token-1"


async def test_an_account_gets_a_bounded_number_per_lifetime(tickets_rig: TicketsRig) -> None:
    one, two = await tickets_rig.new_tickets(), await tickets_rig.new_tickets()
    issued = [
        await (one if n % 2 else two).issue(
            f"ticket-{n}", "token", account_id=7, ttl_ms=TTL_MS, max_per_account=3
        )
        for n in range(5)
    ]
    assert issued == [True, True, True, False, False]
    assert await one.redeem("ticket-3") is None  # refused: nothing was kept
    assert await one.issue("other", "token", account_id=8, ttl_ms=TTL_MS, max_per_account=3)
    await tickets_rig.advance(TTL_MS / 1000 + 0.05)
    assert await two.issue("ticket-5", "token", account_id=7, ttl_ms=TTL_MS, max_per_account=3)
