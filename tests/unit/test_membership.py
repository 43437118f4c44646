"""Memberships end (hub Rule 8, ``ChatNode.remove_member``): a removal closes the user's
connections to the room (4501) and the node forgets the membership it confirmed, also when
the removal races the confirmation of a join. One embedded node (SQLite, in-process bus);
a gate holds the directory's ``add_member`` open, so the race is not left to timing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio

from chatnode.adapters.memory import MemoryPresence, MemoryRevocations, MemoryTickets
from chatnode.adapters.sqlite import (
    LocalBroker,
    SqliteArchive,
    SqliteBus,
    SqliteDatabase,
    SqliteDirectory,
)
from chatnode.core import auth
from chatnode.core.errors import Forbidden, Unavailable
from chatnode.core.models import ChatMessage, Draft
from chatnode.node.service import ChatNode
from chatnode.node.settings import Backends, NodeSettings
from chatnode.wire.frames import CloseCode, Dialect
from tests.unit.test_hub import FakeMember

T0 = 1_700_000_000_000
ADMIN = auth.Claims("root", True, 2**40, account_id=3)


@attrs.define(eq=False)
class GatedDirectory:
    """A SqliteDirectory whose ``add_member`` waits for ``gate`` (when set up) once it added,
    and counts."""

    inner: SqliteDirectory
    gate: trio.Event | None = None
    entered: trio.Event = attrs.Factory(trio.Event)
    adds: int = 0

    async def add_member(
        self, room_id: int, user: str, *, max_members: int, role: str = "member"
    ) -> bool:
        """Adds, then waits: the membership is in the directory, the join not yet told."""
        self.adds += 1
        added = await self.inner.add_member(room_id, user, max_members=max_members, role=role)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        return added

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@attrs.frozen
class Rig:
    node: ChatNode
    directory: GatedDirectory
    room_id: int
    accounts: dict[str, int]


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async with await SqliteDatabase.open(":memory:") as db:
        directory = GatedDirectory(SqliteDirectory(db))
        accounts = {}
        for name in ("ann", "bob", "root"):
            accounts[name] = (await directory.create_user(name, "!", created_at_ms=T0)).id
        room = await directory.create_room("lobby", created_at_ms=T0)
        settings = NodeSettings(
            node_id="n1",
            jwt_secret="a-secret-of-at-least-thirty-two-bytes",
            token_ttl_s=3600,
            insecure=False,
            password_cost_log2=10,
            history_on_join=10,
            max_replay=100,
            rate_messages_per_s=10,
            rate_burst=10,
            presence_ttl_s=15,
        )
        backends = Backends(
            directory=directory,  # type: ignore[arg-type]
            bus=SqliteBus(db, LocalBroker()),
            archive=SqliteArchive(db),
            presence=MemoryPresence(),
            revocations=MemoryRevocations(),
            tickets=MemoryTickets(),
        )
        node = ChatNode(settings, backends)
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            assert accounts == ACCOUNTS
            yield Rig(node, directory, room.id, accounts)
            nursery.cancel_scope.cancel()


class Member(FakeMember):
    """A FakeMember of ``user`` (a Holder: claims of its account) whose close can be waited
    for."""

    def __init__(self, conn_id: str, user: str, account_id: int) -> None:
        super().__init__(conn_id, Dialect.V1)
        self.user = user
        self.claims = auth.Claims(user, False, 2**40, account_id=account_id)
        self.was_closed = trio.Event()

    def close_nowait(self, code: CloseCode, reason: str) -> None:
        super().close_nowait(code, reason)
        self.was_closed.set()

    replay_page_bytes = 1 << 20

    async def writable(self) -> bool:
        await trio.lowlevel.checkpoint()
        return self.closed is None


ACCOUNTS = {"ann": 1, "bob": 2, "root": 3}


def member(conn_id: str, user: str) -> Member:
    return Member(conn_id, user, ACCOUNTS[user])


async def test_a_removal_closes_every_connection_of_the_user_to_the_room(rig: Rig) -> None:
    node = rig.node
    ann1, ann2, bob = member("c1", "ann"), member("c2", "ann"), member("c3", "bob")
    async with (
        node.join(rig.room_id, ann1) as room1,
        node.join(rig.room_id, ann2) as room2,
        node.join(rig.room_id, bob) as room3,
    ):
        for room in (room1, room2, room3):
            await room.replay()  # live
        assert rig.directory.adds == 2  # ann's second connection: confirmed already
        with pytest.raises(Forbidden):
            await node.remove_member(member("x", "bob").claims, rig.room_id, "ann")
        assert await node.remove_member(member("y", "ann").claims, rig.room_id, "ann")
        with trio.fail_after(5):
            await ann2.was_closed.wait()  # the in-process bus delivers on its next pass
        assert ann1.closed == ann2.closed == CloseCode.FORBIDDEN
        assert bob.closed is None
        changes = [f for f in bob.frames if f.get("type") == "member"]
        assert [(f["user"], f["event"], f["by"]) for f in changes] == [("ann", "left", "ann")]
        assert ann1.frames[-1] == changes[0]  # the last thing ann got: her own removal
    assert await rig.directory.list_members(rig.room_id) == ["bob"]


async def test_a_removal_racing_a_join_is_not_forgotten(rig: Rig) -> None:
    """A join whose membership the directory confirms while a removal goes out is closed,
    and the node does not keep the confirmation: the user's next join asks again."""
    node = rig.node
    bob, ann = member("c1", "bob"), member("c2", "ann")
    async with node.join(rig.room_id, bob):  # keeps the room's session open
        rig.directory.gate = trio.Event()
        async with trio.open_nursery() as nursery:

            async def joining() -> None:
                async with node.join(rig.room_id, ann):
                    pass

            nursery.start_soon(joining)
            await rig.directory.entered.wait()  # ann is a member, her join not yet told
            assert await node.remove_member(ADMIN, rig.room_id, "ann") is True
            with trio.fail_after(5):
                await ann.was_closed.wait()
            rig.directory.gate.set()
        assert ann.closed == CloseCode.FORBIDDEN
        adds = rig.directory.adds
        async with node.join(rig.room_id, member("c3", "ann")):
            pass
        assert rig.directory.adds == adds + 1


async def test_a_membership_is_confirmed_for_an_account_not_a_name(rig: Rig) -> None:
    """A name registered again is another account: what the node confirmed for the old one
    does not stand for it."""
    node = rig.node
    async with node.join(rig.room_id, member("c1", "ann")):
        adds = rig.directory.adds
        async with node.join(rig.room_id, member("c2", "ann")):
            assert rig.directory.adds == adds
        async with node.join(rig.room_id, Member("c3", "ann", account_id=42)):
            assert rig.directory.adds == adds + 1


async def test_a_change_that_cannot_be_published_is_undone(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``node/rooms.py`` rule 7: nothing half done. A membership change the bus refuses
    leaves the directory as it was, and the caller gets ``unavailable``."""
    node = rig.node
    ann = member("c1", "ann").claims
    room = await node.create_room("group", claims=ann, visibility="private", members=["bob"])
    directory = rig.directory.inner
    publish = node.hub.publish

    async def refusing(draft: Draft) -> ChatMessage:
        """The node's publish, refusing membership changes."""
        if draft.event is not None:
            raise Unavailable("the bus is away")
        return await publish(draft)

    monkeypatch.setattr(node.hub, "publish", refusing)
    with pytest.raises(Unavailable):
        await node.add_member(ann, room.id, "root")
    assert await directory.get_member(room.id, "root") is None
    with pytest.raises(Unavailable):
        await node.remove_member(ann, room.id, "bob")
    assert await directory.get_member(room.id, "bob") is not None
    with pytest.raises(Unavailable):
        await node.ban(ann, room.id, "bob")
    assert await directory.get_member(room.id, "bob") is not None
    assert await directory.list_bans(room.id, limit=10) == []

    monkeypatch.undo()
    await node.ban(ann, room.id, "bob")
    assert await directory.get_member(room.id, "bob") is None
    await node.add_member(ann, room.id, "root")
    history = await node.history(room.id, before=None, limit=10, claims=ann)
    assert [(m.offset, m.user, m.event, m.by) for m in history] == [
        (1, "bob", "banned", "ann"),
        (2, "root", "added", "ann"),
    ]
