"""Who may act with a valid token: ``auth.UserChecks``' rules (no I/O), then the node's user
check (``ChatNode.authenticate``) over a directory that goes down, on trio's mock clock: a
valid token keeps working unless its user is known deleted -- by a lookup of this node, by a
deletion made here, or by one another node recorded in the shared ``Revocations``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from chatnode.adapters.memory import MemoryPresence, MemoryRevocations
from chatnode.adapters.sqlite import SqliteArchive, SqliteBus, SqliteDatabase, SqliteDirectory
from chatnode.core import auth
from chatnode.core.errors import Unauthorized, Unavailable
from chatnode.core.ports import Directory
from chatnode.node.service import (
    USER_CHECK_TTL_S,
    USER_LOOKUP_RETRY_S,
    Backends,
    ChatNode,
    NodeSettings,
)

SECRET = "a-secret-of-at-least-thirty-two-bytes"
T0 = 1_700_000_000_000


def claims(user: str = "ann", *, issued_at_s: int) -> auth.Claims:
    return auth.Claims(user, False, issued_at_s + 3600, issued_at_s)


# -- the rules, no I/O ----------------------------------------------------------------------


def test_a_found_user_is_trusted_for_trust_s() -> None:
    users = auth.UserChecks(trust_s=5.0)
    assert not users.trusted("ann", 100.0)
    users.found("ann", 100.0)
    assert users.trusted("ann", 104.9)
    assert not users.trusted("ann", 105.0)
    assert not users.trusted("bob", 100.0)


def test_nothing_known_means_no_user_is_known_deleted() -> None:
    users = auth.UserChecks(trust_s=5.0)
    assert not users.known_deleted(claims(issued_at_s=0))
    assert not users.known_deleted(claims(issued_at_s=1_700_000_000))


def test_a_deletion_of_every_user_ends_the_tokens_issued_before_it() -> None:
    users = auth.UserChecks(trust_s=5.0)
    users.users_deleted(at_ms=T0 + 500)
    assert users.known_deleted(claims(issued_at_s=T0 // 1000 - 1))
    # the same second: it may have been issued before (the safe side: refused)
    assert users.known_deleted(claims(issued_at_s=T0 // 1000))
    assert not users.known_deleted(claims(issued_at_s=T0 // 1000 + 1))
    assert not users.known_deleted(claims("bob", issued_at_s=T0 // 1000 + 1))


def test_a_lookup_that_found_nobody_ends_that_users_older_tokens_only() -> None:
    users = auth.UserChecks(trust_s=5.0)
    users.found("ann", 100.0)
    users.not_found("ann", at_ms=T0)
    assert not users.trusted("ann", 100.0)
    assert users.known_deleted(claims("ann", issued_at_s=T0 // 1000 - 60))
    assert not users.known_deleted(claims("ann", issued_at_s=T0 // 1000 + 1))  # a new "ann"
    assert not users.known_deleted(claims("bob", issued_at_s=T0 // 1000 - 60))


def test_deletions_drop_trust_and_time_only_moves_forward() -> None:
    users = auth.UserChecks(trust_s=5.0)
    users.found("ann", 100.0)
    users.users_deleted(at_ms=T0)
    assert not users.trusted("ann", 100.0)

    users.found("ann", 100.0)
    users.learned_users_deleted(at_ms=T0 - 1000)  # older than what is known: nothing changes
    users.learned_users_deleted(at_ms=T0)  # the same deletion, learned again
    assert users.trusted("ann", 100.0)
    assert users.users_deleted_at_ms == T0

    users.learned_users_deleted(at_ms=T0 + 1000)  # another node deleted everyone later
    assert not users.trusted("ann", 100.0)
    assert users.users_deleted_at_ms == T0 + 1000


def test_absent_names_are_bounded_oldest_forgotten_first() -> None:
    users = auth.UserChecks(trust_s=5.0, max_names=2)
    for name in ("a", "b", "c"):
        users.not_found(name, at_ms=T0)
    old = T0 // 1000 - 60
    assert not users.known_deleted(claims("a", issued_at_s=old))
    assert users.known_deleted(claims("b", issued_at_s=old))
    assert users.known_deleted(claims("c", issued_at_s=old))


# -- the node's user check over a directory that goes down ------------------------------------


@attrs.define(eq=False)
class SwitchableDirectory:
    """``inner``, or ``Unavailable`` from every call while ``down``; counts user lookups."""

    inner: Directory
    down: bool = False
    lookups: int = 0

    async def get_user(self, name: str) -> Any:
        self.lookups += 1
        if self.down:
            await trio.lowlevel.checkpoint()
            raise Unavailable("the directory is down (test)")
        return await self.inner.get_user(name)

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method: Callable[..., Awaitable[Any]] = getattr(self.inner, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                await trio.lowlevel.checkpoint()
                raise Unavailable("the directory is down (test)")
            return await method(*args, **kwargs)

        return call


@attrs.define
class Rig:
    directory: SwitchableDirectory
    revocations: MemoryRevocations
    nodes: list[ChatNode]

    def token(self, user: str, *, age_s: int = 10) -> str:
        """A token of ``user`` issued ``age_s`` seconds ago."""
        return auth.issue_token(
            user, is_admin=False, secret=SECRET, now_s=int(time.time()) - age_s, ttl_s=3600
        )


def settings(node_id: str) -> NodeSettings:
    return NodeSettings(
        node_id=node_id,
        jwt_secret=SECRET,
        token_ttl_s=3600,
        admins=frozenset({"root"}),
        insecure=False,
        password_cost_log2=2,
        history_on_join=10,
        max_replay=100,
        rate_messages_per_s=10,
        rate_burst=10,
        presence_ttl_s=15,
    )


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    """Two nodes over one directory and one Revocations (what Redis is to a cluster)."""
    async with await SqliteDatabase.open(":memory:") as db:
        directory = SwitchableDirectory(SqliteDirectory(db))
        for name in ("ann", "bob", "root"):
            await directory.create_user(name, "!", created_at_ms=T0)
        revocations = MemoryRevocations()
        backends = Backends(
            directory=directory,  # type: ignore[arg-type]
            bus=SqliteBus(db),
            archive=SqliteArchive(db),
            presence=MemoryPresence(),
            revocations=revocations,
        )
        yield Rig(directory, revocations, [ChatNode(settings(n), backends) for n in ("n1", "n2")])


async def refused(node: ChatNode, token: str) -> str:
    with pytest.raises(Unauthorized) as refusal:
        await node.authenticate(token)
    return refusal.value.code


async def test_a_trusted_user_costs_no_lookup(rig: Rig, mock_clock: trio.testing.MockClock) -> None:
    node = rig.nodes[0]
    ann = rig.token("ann")
    for _ in range(3):
        assert (await node.authenticate(ann)).user == "ann"
    assert rig.directory.lookups == 1
    mock_clock.jump(USER_CHECK_TTL_S)
    await node.authenticate(ann)
    assert rig.directory.lookups == 2


async def test_a_valid_token_keeps_working_while_the_directory_is_down(
    rig: Rig, mock_clock: trio.testing.MockClock
) -> None:
    one, two = rig.nodes
    ann, bob = rig.token("ann"), rig.token("bob")
    await one.authenticate(ann)
    rig.directory.down = True
    mock_clock.jump(USER_CHECK_TTL_S)  # the check is due
    assert (await one.authenticate(ann)).user == "ann"
    assert (await two.authenticate(bob)).user == "bob"  # a node that never checked bob

    rig.directory.down = False
    mock_clock.jump(USER_LOOKUP_RETRY_S)
    assert (await one.authenticate(ann)).user == "ann"  # the directory decides again


async def test_while_down_one_lookup_per_retry_period(
    rig: Rig, mock_clock: trio.testing.MockClock
) -> None:
    node = rig.nodes[0]
    rig.directory.down = True
    tokens = [rig.token(name) for name in ("ann", "bob", "root")]
    for _ in range(3):
        for token in tokens:
            await node.authenticate(token)
    assert rig.directory.lookups == 1
    mock_clock.jump(USER_LOOKUP_RETRY_S)
    for token in tokens:
        await node.authenticate(token)
    assert rig.directory.lookups == 2


async def test_a_user_this_node_found_absent_stays_refused_while_down(
    rig: Rig, mock_clock: trio.testing.MockClock
) -> None:
    node = rig.nodes[0]
    ghost = rig.token("ghost")
    assert await refused(node, ghost) == "token_invalid"
    rig.directory.down = True
    assert await refused(node, ghost) == "token_invalid"
    mock_clock.jump(USER_LOOKUP_RETRY_S)
    assert await refused(node, ghost) == "token_invalid"
    assert rig.directory.lookups == 3
    assert (await node.authenticate(rig.token("ann"))).user == "ann"


async def test_a_deletion_on_another_node_ends_older_tokens_here_while_down(
    rig: Rig, mock_clock: trio.testing.MockClock
) -> None:
    one, two = rig.nodes
    ann = rig.token("ann")
    for node in (one, two):
        await node.authenticate(ann)  # trusted on both
    root = await one.authenticate(rig.token("root"))
    assert await one.delete_all_users(attrs.evolve(root, is_admin=True)) == 3
    assert await refused(one, ann) == "token_invalid"  # the directory says so
    rig.directory.down = True
    assert await refused(one, ann) == "token_invalid"  # this node deleted them

    mock_clock.jump(USER_CHECK_TTL_S)  # node two's trust in ann ends
    assert await refused(two, ann) == "token_invalid"  # learned from the revocations
    assert await rig.revocations.users_deleted_at() == one._users.users_deleted_at_ms


async def test_tokens_issued_after_a_recorded_deletion_work_while_down(
    rig: Rig, mock_clock: trio.testing.MockClock
) -> None:
    node = rig.nodes[1]
    await rig.revocations.record_users_deleted(int(time.time() * 1000) - 5_000)
    before, after = rig.token("ann", age_s=10), rig.token("ann", age_s=0)
    rig.directory.down = True
    assert await refused(node, before) == "token_invalid"
    assert (await node.authenticate(after)).user == "ann"
