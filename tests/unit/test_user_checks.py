"""Who may act with a valid token: ``auth.UserChecks``' rules (no I/O), then the node's token
check (``ChatNode.authenticate``) over a directory that goes down, on trio's mock clock: a
valid token keeps working unless it is known revoked -- signed out, its account absent,
deleted or its tokens revoked (password change) -- by a lookup of this node, a revocation
made here, or one another node recorded in the shared ``Revocations``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from chatnode.adapters.memory import MemoryPresence, MemoryRevocations, MemoryTickets
from chatnode.adapters.sqlite import (
    LocalBroker,
    SqliteArchive,
    SqliteBus,
    SqliteDatabase,
    SqliteDirectory,
)
from chatnode.core import auth
from chatnode.core.errors import Unauthorized, Unavailable
from chatnode.core.models import Revocation, RevocationKind, RevocationState, User
from chatnode.core.ports import Directory
from chatnode.node.accounts import USER_CHECK_TTL_S, USER_LOOKUP_RETRY_S, account_revocation
from chatnode.node.service import ChatNode
from chatnode.node.settings import Backends, NodeSettings
from chatnode.wire.frames import CloseCode, Dialect, Encoder, Recipient

SECRET = "a-secret-of-at-least-thirty-two-bytes"
T0 = 1_700_000_000_000


def claims(account: int = 1, *, issued_at_ms: int, token_id: str = "t1") -> auth.Claims:
    return auth.Claims(
        "ann",
        False,
        issued_at_ms // 1000 + 3600,
        issued_at_ms=issued_at_ms,
        account_id=account,
        token_id=token_id,
    )


def user(account: int = 1, *, revoked_before_ms: int = 0, is_admin: bool = False) -> User:
    return User("ann", "!", T0, is_admin, id=account, revoked_before_ms=revoked_before_ms)


def code(users: auth.UserChecks, of: auth.Claims) -> str | None:
    refusal = users.refusal(of)
    return None if refusal is None else refusal.code


# -- the rules, no I/O ----------------------------------------------------------------------


def test_a_found_accounts_token_is_trusted_for_trust_s() -> None:
    users = auth.UserChecks(trust_s=5.0)
    ann = claims(issued_at_ms=T0)
    assert not users.trusted(ann, 100.0)
    users.found(ann, user(), 100.0)
    assert users.trusted(ann, 104.9)
    assert not users.trusted(ann, 105.0)
    assert not users.trusted(claims(issued_at_ms=T0, token_id="t2"), 100.0)  # per token


def test_nothing_known_refuses_nothing() -> None:
    users = auth.UserChecks(trust_s=5.0)
    assert code(users, claims(issued_at_ms=0)) is None
    assert code(users, claims(issued_at_ms=T0)) is None


def test_a_deletion_of_every_user_ends_the_tokens_issued_before_it() -> None:
    users = auth.UserChecks(trust_s=5.0)
    users.learn(Revocation(RevocationKind.ALL, at_ms=T0, expires_at_ms=T0 + 1))
    assert code(users, claims(issued_at_ms=T0 - 1)) == "token_invalid"
    assert code(users, claims(issued_at_ms=T0)) == "token_invalid"  # the same ms: refused
    assert code(users, claims(2, issued_at_ms=T0 + 1)) is None


def test_an_absent_account_ends_its_own_tokens_only() -> None:
    users = auth.UserChecks(trust_s=5.0)
    users.found(claims(issued_at_ms=T0 - 60_000), user(), 100.0)
    users.not_found(1, at_ms=T0)
    assert code(users, claims(issued_at_ms=T0 - 60_000)) == "token_invalid"  # trusted: still
    assert code(users, claims(2, issued_at_ms=T0 - 60_000)) is None  # a new "ann": a new id


def test_a_signed_out_token_is_refused_and_the_accounts_others_are_not() -> None:
    users = auth.UserChecks(trust_s=5.0)
    one, two = claims(issued_at_ms=T0, token_id="t1"), claims(issued_at_ms=T0, token_id="t2")
    users.found(one, user(), 100.0)
    users.learn(Revocation(RevocationKind.TOKEN, T0 + 5, T0 + 3_600_000, 1, "t1"))
    assert code(users, one) == "token_revoked"
    assert not users.trusted(one, 100.0)
    assert code(users, two) is None


def test_an_accounts_revocation_ends_its_earlier_tokens_even_trusted_ones() -> None:
    users = auth.UserChecks(trust_s=5.0)
    old, new = claims(issued_at_ms=T0), claims(issued_at_ms=T0 + 1, token_id="t2")
    users.found(old, user(), 100.0)
    users.learn(account_revocation(1, T0, token_ttl_s=3600))
    assert code(users, old) == "token_revoked"
    assert code(users, new) is None
    assert code(users, claims(2, issued_at_ms=T0)) is None


def test_the_directorys_account_decides_revocation_time_and_admin_rights() -> None:
    users = auth.UserChecks(trust_s=5.0)
    old = claims(issued_at_ms=T0)
    users.found(old, user(revoked_before_ms=T0), 100.0)
    assert code(users, old) == "token_revoked" and not users.trusted(old, 100.0)

    admin_token = attrs.evolve(claims(issued_at_ms=T0 + 5, token_id="t9"), is_admin=True)
    users.found(admin_token, user(is_admin=False), 100.0)
    assert code(users, admin_token) == "token_revoked"
    users.found(claims(issued_at_ms=T0 + 5, token_id="t8"), user(), 100.0)  # not admin: fine
    assert code(users, claims(issued_at_ms=T0 + 5, token_id="t8")) is None


def test_what_the_store_says_of_a_token_is_learned() -> None:
    users = auth.UserChecks(trust_s=5.0)
    ann = claims(issued_at_ms=T0)
    users.learn_state(ann, RevocationState(token_revoked=True))
    assert code(users, ann) == "token_revoked"
    other = claims(3, issued_at_ms=T0, token_id="t3")
    users.learn_state(other, RevocationState(account_before_ms=T0))
    assert code(users, other) == "token_revoked"
    users.learn_state(other, RevocationState(all_before_ms=T0 + 10))
    assert users.all_deleted_at_ms == T0 + 10


def test_times_only_move_forward() -> None:
    users = auth.UserChecks(trust_s=5.0)
    users.learn(Revocation(RevocationKind.ALL, at_ms=T0, expires_at_ms=0))
    users.learn(Revocation(RevocationKind.ALL, at_ms=T0 - 1000, expires_at_ms=0))
    assert users.all_deleted_at_ms == T0
    users.learn(account_revocation(1, T0, token_ttl_s=60))
    users.learn(account_revocation(1, T0 - 1000, token_ttl_s=60))
    assert code(users, claims(issued_at_ms=T0)) == "token_invalid"  # (ALL at T0 too)
    assert code(users, claims(issued_at_ms=T0 + 1)) is None


def test_forgetting_a_revocation_drops_every_trust() -> None:
    users = auth.UserChecks(trust_s=5.0, max_entries=2)
    trusted = claims(9, issued_at_ms=T0, token_id="t9")
    users.found(trusted, user(9), 100.0)
    for account in (1, 2):
        users.learn(account_revocation(account, T0, token_ttl_s=60))
    assert users.trusted(trusted, 100.0)
    users.learn(account_revocation(3, T0, token_ttl_s=60))  # account 1 is forgotten
    assert code(users, claims(1, issued_at_ms=T0)) is None
    assert code(users, claims(3, issued_at_ms=T0)) == "token_revoked"
    assert not users.trusted(trusted, 100.0)  # so the backends are asked again


# -- the node's token check over a directory that goes down -----------------------------------


@attrs.define(eq=False)
class SwitchableDirectory:
    """``inner``, or ``Unavailable`` from every call while ``down``; counts account lookups."""

    inner: Directory
    down: bool = False
    lookups: int = 0

    async def get_user_by_id(self, account_id: int) -> Any:
        self.lookups += 1
        if self.down:
            await trio.lowlevel.checkpoint()
            raise Unavailable("the directory is down (test)")
        return await self.inner.get_user_by_id(account_id)

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
    accounts: dict[str, int]

    def token(self, name: str, *, age_s: int = 10, token_id: str | None = None) -> str:
        """A token of account ``name`` (an unknown name: an account that never existed)
        issued ``age_s`` seconds ago."""
        issued_ms = int(time.time() * 1000) - age_s * 1000
        return auth.issue_token(
            auth.Claims(
                name,
                False,
                issued_ms // 1000 + 3600,
                issued_at_ms=issued_ms,
                account_id=self.accounts.get(name, 999),
                token_id=token_id or auth.new_token_id(),
            ),
            secret=SECRET,
        )


def settings(node_id: str) -> NodeSettings:
    return NodeSettings(
        node_id=node_id,
        jwt_secret=SECRET,
        token_ttl_s=3600,
        insecure=False,
        password_cost_log2=10,
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
        accounts = {}
        for name in ("ann", "bob", "root"):
            accounts[name] = (await directory.create_user(name, "!", created_at_ms=T0)).id
        revocations = MemoryRevocations()
        backends = Backends(
            directory=directory,  # type: ignore[arg-type]
            bus=SqliteBus(db, LocalBroker()),
            archive=SqliteArchive(db),
            presence=MemoryPresence(),
            revocations=revocations,
            tickets=MemoryTickets(),
        )
        nodes = [ChatNode(settings(n), backends) for n in ("n1", "n2")]
        yield Rig(directory, revocations, nodes, accounts)


async def refused(node: ChatNode, token: str) -> str:
    with pytest.raises(Unauthorized) as refusal:
        await node.authenticate(token)
    return refusal.value.code


async def test_a_trusted_token_costs_no_lookup(
    rig: Rig, mock_clock: trio.testing.MockClock
) -> None:
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
    mock_clock.jump(USER_CHECK_TTL_S)
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
    mock_clock.jump(USER_CHECK_TTL_S)
    for token in tokens:
        await node.authenticate(token)
    assert rig.directory.lookups == 2


async def test_an_account_this_node_found_absent_stays_refused_while_down(
    rig: Rig, mock_clock: trio.testing.MockClock
) -> None:
    node = rig.nodes[0]
    ghost = rig.token("ghost")
    assert await refused(node, ghost) == "token_invalid"
    rig.directory.down = True
    mock_clock.jump(USER_LOOKUP_RETRY_S)
    assert await refused(node, ghost) == "token_invalid"
    assert rig.directory.lookups == 1  # known absent: decided without asking
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
    assert await refused(one, ann) == "token_invalid"  # this node deleted them
    rig.directory.down = True

    mock_clock.jump(USER_CHECK_TTL_S)  # node two's trust in ann ends
    assert await refused(two, ann) == "token_invalid"  # learned from the revocations
    assert (await rig.revocations.lookup(account_id=0, token_id="")).all_before_ms > 0


async def test_tokens_issued_after_a_recorded_deletion_work_while_down(
    rig: Rig, mock_clock: trio.testing.MockClock
) -> None:
    node = rig.nodes[1]
    at_ms = int(time.time() * 1000) - 5_000
    await rig.revocations.record(Revocation(RevocationKind.ALL, at_ms, at_ms + 3_600_000))
    before, after = rig.token("ann", age_s=10), rig.token("ann", age_s=0)
    rig.directory.down = True
    assert await refused(node, before) == "token_invalid"
    assert (await node.authenticate(after)).user == "ann"


async def test_a_sign_out_on_one_node_holds_on_the_other_while_down(
    rig: Rig, mock_clock: trio.testing.MockClock
) -> None:
    one, two = rig.nodes
    ann, other = rig.token("ann"), rig.token("ann")
    for node in (one, two):
        await node.authenticate(ann)
    await one.sign_out(await one.authenticate(ann))
    assert await refused(one, ann) == "token_revoked"
    rig.directory.down = True
    mock_clock.jump(USER_CHECK_TTL_S)  # node two's trust ends: it asks the store
    assert await refused(two, ann) == "token_revoked"
    assert (await two.authenticate(other)).user == "ann"  # the account's other token


async def test_an_accounts_revocation_holds_on_every_node_while_down(
    rig: Rig, mock_clock: trio.testing.MockClock
) -> None:
    _, two = rig.nodes
    ann = rig.token("ann", age_s=10)
    await two.authenticate(ann)
    at_ms = int(time.time() * 1000) - 5_000  # a password change on another node, 5 s ago
    await rig.revocations.record(account_revocation(rig.accounts["ann"], at_ms, token_ttl_s=60))
    rig.directory.down = True
    mock_clock.jump(USER_CHECK_TTL_S)
    assert await refused(two, ann) == "token_revoked"
    assert (await two.authenticate(rig.token("ann", age_s=0))).user == "ann"


# -- following the revocations of every node -------------------------------------------------


@attrs.define(eq=False)
class FakeHolder(Recipient):
    """A connection as the node sees it (``service.Holder``): records how it was closed."""

    conn_id: str
    claims: auth.Claims
    dialect: Dialect = Dialect.V1
    encoder: Encoder = attrs.Factory(lambda self: Encoder(self.dialect), takes_self=True)
    closed: trio.Event = attrs.Factory(trio.Event)
    code: int | None = None

    @property
    def user(self) -> str:
        return self.claims.user

    def send_nowait(self, frame: bytes) -> None:
        pass

    def close_nowait(self, code: CloseCode, reason: str) -> None:
        self.code = int(code)
        self.closed.set()

    def removed(self) -> None:
        self.close_nowait(CloseCode.FORBIDDEN, "no longer a member")


async def test_a_revocation_on_another_node_closes_connections_here_within_the_poll(
    rig: Rig, mock_clock: trio.testing.MockClock
) -> None:
    one, two = rig.nodes
    token = rig.token("ann")
    signed_in = await one.authenticate(token)
    ann = FakeHolder("two/1", await two.authenticate(token))
    bob = FakeHolder("two/2", await two.authenticate(rig.token("bob")))
    for holder in (ann, bob):
        two._hold(holder)  # as ``join`` does
    async with trio.open_nursery() as nursery:
        nursery.start_soon(two._follow_revocations)
        await trio.testing.wait_all_tasks_blocked()  # it read its cursor and sleeps
        await one.sign_out(signed_in)
        mock_clock.jump(two.settings.revocation_poll_s)
        await trio.testing.wait_all_tasks_blocked()  # it read the changes and sleeps again
        assert ann.code == 4501 and not bob.closed.is_set()
        nursery.cancel_scope.cancel()
    assert two.revoked_connections == 1


async def test_changes_dropped_unread_make_the_node_check_its_connections_again(
    rig: Rig, mock_clock: trio.testing.MockClock
) -> None:
    """The store kept only the newest changes and the one ending ann's token was dropped
    before node two read it: node two checks every held token again, here with the
    directory down, so from the revocation store."""
    rig.revocations.max_changes = 2
    one, two = rig.nodes
    token, others = rig.token("ann"), [rig.token("bob") for _ in range(2)]
    sign_outs = [await one.authenticate(t) for t in (token, *others)]
    ann = FakeHolder("two/1", await two.authenticate(token))
    two._hold(ann)  # as ``join`` does
    rig.directory.down = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(two._follow_revocations)
        await trio.testing.wait_all_tasks_blocked()  # it read its cursor and sleeps
        for claims in sign_outs:  # the last two push ann's out before node two reads
            await one.sign_out(claims)
        mock_clock.jump(USER_CHECK_TTL_S)  # its next read, and its trust in ann has ended
        await trio.testing.wait_all_tasks_blocked()
        assert ann.code == 4501
        nursery.cancel_scope.cancel()


async def test_a_token_is_issued_after_every_revocation_the_node_knows(rig: Rig) -> None:
    """Other nodes, their clocks 5 s ahead, deleted every user, or revoked an account's
    tokens: a token this node issues now is not older than that, so it works."""
    node = rig.nodes[0]
    ahead_ms = int(time.time() * 1000) + 5_000
    node._users.learn(Revocation(RevocationKind.ALL, ahead_ms, ahead_ms + 3_600_000))
    bob = await rig.directory.get_user_by_id(rig.accounts["bob"])
    ann = await rig.directory.set_password(rig.accounts["ann"], "!", revoked_before_ms=ahead_ms)
    assert bob is not None and ann is not None
    for account in (bob, ann):
        token, _ = node._new_token(account)
        assert (await node.authenticate(token)).user == account.name
