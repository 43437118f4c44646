"""The Revocations contract: what ends tokens early, shared by every node of a deployment
(several instances made by one ``new_revocations`` share a store): each record readable by
every node until it expires, times never moving back, and every record in the changes every
node follows, in order."""

from __future__ import annotations

import time

from chatnode.core.models import Revocation, RevocationKind, RevocationState

from .harness import NewRevocations

T0 = 1_700_000_000_000
HOUR_MS = 3_600_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def token(token_id: str, account_id: int = 1, *, expires_at_ms: int | None = None) -> Revocation:
    until = now_ms() + HOUR_MS if expires_at_ms is None else expires_at_ms
    return Revocation(RevocationKind.TOKEN, now_ms(), until, account_id, token_id)


def account(account_id: int, at_ms: int) -> Revocation:
    return Revocation(RevocationKind.ACCOUNT, at_ms, now_ms() + HOUR_MS, account_id)


def everyone(at_ms: int) -> Revocation:
    return Revocation(RevocationKind.ALL, at_ms, at_ms + HOUR_MS)


async def test_nothing_recorded_reads_nothing(new_revocations: NewRevocations) -> None:
    store = await new_revocations()
    assert await store.lookup(account_id=1, token_id="t1") == RevocationState()


async def test_a_record_is_read_by_every_node(new_revocations: NewRevocations) -> None:
    one, two = await new_revocations(), await new_revocations()
    await one.record(token("t1"))
    await one.record(account(2, T0))
    await one.record(everyone(T0 + 5))

    assert await two.lookup(account_id=1, token_id="t1") == RevocationState(True, 0, T0 + 5)
    assert await two.lookup(account_id=2, token_id="t2") == RevocationState(False, T0, T0 + 5)
    assert await two.lookup(account_id=1, token_id="t2") == RevocationState(False, 0, T0 + 5)


async def test_times_only_move_forward(new_revocations: NewRevocations) -> None:
    one, two = await new_revocations(), await new_revocations()
    await one.record(everyone(T0 + 5))
    await two.record(everyone(T0))  # a deletion with a clock a little behind
    await one.record(account(3, T0 + 9))
    await two.record(account(3, T0 + 1))
    state = await one.lookup(account_id=3, token_id="x")
    assert (state.all_before_ms, state.account_before_ms) == (T0 + 5, T0 + 9)
    await two.record(everyone(T0 + 9))
    assert (await one.lookup(account_id=3, token_id="x")).all_before_ms == T0 + 9


async def test_a_token_revocation_is_forgotten_once_the_token_expired(
    new_revocations: NewRevocations,
) -> None:
    store = await new_revocations()
    await store.record(token("old", expires_at_ms=now_ms() - 1))
    await store.record(token("live"))
    assert not (await store.lookup(account_id=1, token_id="old")).token_revoked
    assert (await store.lookup(account_id=1, token_id="live")).token_revoked


async def test_changes_are_read_by_every_node_in_order(new_revocations: NewRevocations) -> None:
    one, two = await new_revocations(), await new_revocations()
    await one.record(token("before"))
    start = await two.changes(None)
    assert start.revocations == () and start.complete

    recorded = [token("t1"), account(2, T0), everyone(T0 + 1), token("t3", 4)]
    for revocation, node in zip(recorded, (one, two, one, two), strict=True):
        await node.record(revocation)

    first = await two.changes(start.cursor, limit=3)
    assert first.revocations == tuple(recorded[:3]) and first.complete
    rest = await one.changes(first.cursor, limit=3)
    assert rest.revocations == tuple(recorded[3:]) and rest.complete
    idle = await one.changes(rest.cursor)
    assert idle.revocations == () and idle.cursor == rest.cursor
    assert (await one.changes(start.cursor)).revocations == tuple(recorded)
