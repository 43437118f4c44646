"""The Revocations contract: the time before which every user was deleted, shared by every
node of a deployment (several instances made by one ``new_revocations`` share a store), and
never moving back."""

from __future__ import annotations

from .harness import NewRevocations

T0 = 1_700_000_000_000


async def test_nothing_recorded_reads_zero(new_revocations: NewRevocations) -> None:
    assert await (await new_revocations()).users_deleted_at() == 0


async def test_a_recorded_deletion_is_read_by_every_node(new_revocations: NewRevocations) -> None:
    one, two = await new_revocations(), await new_revocations()
    await one.record_users_deleted(T0)
    assert await one.users_deleted_at() == T0
    assert await two.users_deleted_at() == T0


async def test_the_time_only_moves_forward(new_revocations: NewRevocations) -> None:
    one, two = await new_revocations(), await new_revocations()
    await one.record_users_deleted(T0 + 5)
    await two.record_users_deleted(T0)  # a deletion with a clock a little behind
    assert await one.users_deleted_at() == T0 + 5
    await two.record_users_deleted(T0 + 9)
    assert await one.users_deleted_at() == T0 + 9
