"""The ports: what the node needs from the outside world, as Protocols.

Each port has implementations in ``chatnode/adapters/`` (SQLite/memory always; MySQL, Redis,
Elasticsearch for the cluster) and one contract test suite in ``tests/contracts/`` that every
implementation passes. ``wiring.py`` is the only place that picks and builds one.

Errors: an implementation raises :class:`chatnode.core.errors.Unavailable` when its backend
cannot be reached (the caller may retry), and the domain errors named on each method; any other
exception is a bug.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, overload

from chatnode.core.models import (
    MEMBER,
    PUBLIC,
    ArchiveEntry,
    ChatMessage,
    Cursor,
    DeadLetter,
    Draft,
    Grant,
    Listed,
    Member,
    PresenceEntry,
    Reaped,
    Refusal,
    Revocation,
    RevocationChanges,
    RevocationState,
    Room,
    RoomEvent,
    SearchHit,
    SearchQuery,
    User,
    UserPresence,
)


class TaskStatus(Protocol):
    """What ``trio.TaskStatus`` offers; ``core`` does not import trio."""

    @overload
    def started(self) -> None: ...

    @overload
    def started(self, value: Any, /) -> None: ...


class Closeable(Protocol):
    async def check(self) -> None:
        """Return if the backend answers; raise ``Unavailable`` otherwise (``/readyz``)."""

    async def aclose(self) -> None:
        """Release connections. Idempotent."""


class Directory(Closeable, Protocol):
    """Users, rooms and durable room membership (SQLite, MySQL).

    Accounts: each user gets an ``id`` at creation, increasing and never reused (a name
    registered again after its account was deleted gets a new one). Names are unique by
    ``validation.name_key`` (NFKC, case-folded): ``ann`` and ``ANN`` are one name.
    Accounts migrated from before that rule whose names collide by key all stay, each
    reached by its exact name; a different case of the name reaches the oldest of them.

    Rooms: a room's visibility (``public``, ``private``, ``direct``) is fixed when it is made.
    Memberships have a role (``owner``, ``admin``, ``member``) and a join time; only current
    members count toward a room's limit, and every check-then-write (the limit, a ban, a
    direct room's pair) is decided atomically by the store, never by the caller. Users are
    named exactly (the node resolves a name's case first).
    """

    async def create_user(
        self, name: str, password_hash: str, *, created_at_ms: int, is_admin: bool = False
    ) -> User:
        """The new account, with its id. Raise ``Conflict`` if the name's key is taken."""

    async def get_user(self, name: str) -> User | None:
        """The account named exactly ``name``, else the one whose name has ``name``'s key."""

    async def get_user_by_id(self, account_id: int) -> User | None: ...

    async def set_password(
        self, account_id: int, password_hash: str, *, revoked_before_ms: int
    ) -> User | None:
        """Replace the account's password hash and revoke its tokens issued at or before
        ``revoked_before_ms`` (the account's ``revoked_before_ms`` only moves forward), in one
        write; the account as it is now, or None if there is none."""

    async def set_admin(
        self, name: str, is_admin: bool, *, revoked_before_ms: int = 0
    ) -> User | None:
        """Grant or withdraw admin rights of the account ``get_user(name)`` finds, and
        revoke its tokens issued at or before ``revoked_before_ms`` (0: none), in one write;
        the account as it is now, or None if there is none."""

    async def delete_all_users(self) -> int:
        """Delete every user and every membership; return how many users were deleted."""

    async def create_room(
        self,
        name: str,
        *,
        created_at_ms: int,
        visibility: str = PUBLIC,
        owner: str | None = None,
        members: Sequence[str] = (),
        max_members: int = 0,
    ) -> Room:
        """Rooms get increasing integer ids starting at 1; names need not be unique.

        ``owner`` (the creator) is recorded as ``created_by``; in a ``private`` room the owner
        and ``members`` become members (role ``owner`` and ``member``), all in one write, at
        most ``max_members`` of them (else ``RoomFull``, nothing made). An unknown user among
        them raises ``NotFound`` (code ``user_not_found``) and makes nothing. A public room
        starts with no member (its creator joins as ``owner``: ``add_member``)."""

    async def direct_room(self, user: str, other: str, *, created_at_ms: int) -> tuple[Room, bool]:
        """The ``direct`` room of the two users, made (both members) if there is none:
        (the room, True if made now). One room per pair of accounts, whoever asks and however
        many ask at once on any node: a unique key on the ordered pair of account ids decides,
        never a check then an insert. ``NotFound`` (``user_not_found``) for an unknown user."""

    async def find_direct(self, user: str, other: str) -> Room | None:
        """The ``direct`` room of the two users if there is one (unknown users: None)."""

    async def get_room(self, room_id: int) -> Room | None: ...

    async def list_rooms(self, *, after_id: int, limit: int) -> list[Room]:
        """Rooms with ``id > after_id`` in id order, at most ``limit`` (every visibility)."""

    async def visible_rooms(self, user: str, *, after_id: int, limit: int) -> list[Listed]:
        """The rooms ``user`` may see -- the public ones and those ``user`` is a member of --
        with ``id > after_id`` in id order, at most ``limit``, each with its member count."""

    async def user_rooms(self, user: str, *, limit: int) -> list[Room]:
        """The rooms ``user`` is a member of, newest membership first, at most ``limit``."""

    async def get_member(self, room_id: int, user: str) -> Member | None:
        """``user``'s membership of the room (exact name), None if not a member."""

    async def add_member(
        self, room_id: int, user: str, *, max_members: int, role: str = MEMBER
    ) -> bool:
        """Make ``user`` a member with ``role`` (``owner`` instead if they created the room);
        True if newly added, False if already one (their role unchanged).

        Raise ``NotFound`` for an unknown room or user (code ``user_not_found``),
        ``Forbidden`` (code ``banned``) for a user banned from the room, ``RoomFull`` when the
        room already has ``max_members`` members and ``user`` is not one of them. A failed
        add changes nothing.
        """

    async def remove_member(self, room_id: int, user: str) -> bool:
        """End ``user``'s membership; whether they were a member. The seat is free at once."""

    async def list_members(self, room_id: int) -> list[str]:
        """Member names in name order ([] for an unknown room)."""

    async def list_roles(self, room_id: int) -> list[Member]:
        """Members with their roles, in name order ([] for an unknown room)."""

    async def ban(self, room_id: int, user: str, *, by: str, at_ms: int) -> bool:
        """Ban ``user`` from the room and end their membership, in one write; True if newly
        banned. ``NotFound`` for an unknown room or user."""

    async def unban(self, room_id: int, user: str) -> bool:
        """Lift ``user``'s ban; whether there was one. They are not made a member again."""

    async def list_bans(self, room_id: int, *, limit: int) -> list[str]:
        """Names banned from the room, in name order, at most ``limit``."""

    # -- cursors (delivered/read receipts) ----------------------------------------------------

    async def advance_cursors(self, cursors: Sequence[Cursor]) -> None:
        """Store many members' cursors in one write. A cursor only moves forward: each of
        ``delivered`` and ``read`` becomes the greater of the stored and the given value, and
        ``delivered`` at least ``read``. A (room, user) given twice counts as its greatest.
        Rooms and users are not checked (the node writes only cursors of members)."""

    async def room_cursors(self, room_id: int) -> list[Cursor]:
        """The cursors of the room's current members who have one, in name order."""

    async def user_cursors(self, user: str, room_ids: Sequence[int]) -> dict[int, Cursor]:
        """``user``'s cursors in ``room_ids`` (exact name), by room; rooms without one are
        missing."""


class BusHandler(Protocol):
    """Implemented by the node; the bus never reaches into node internals.

    ``deliver`` and ``resubscribed`` may raise ``Unavailable`` (filling a gap needs the room
    log); the bus then retries ``resubscribed`` with backoff until it succeeds, and never drops
    the handler's catch-up.
    """

    async def deliver(self, message: ChatMessage) -> None:
        """Called once per published message of each subscribed room, in offset order per
        room, from one task at a time. Must not wait on clients."""

    async def signal(self, room_id: int, event: RoomEvent) -> None:
        """An ephemeral room event (presence, typing): not logged, no offset."""

    async def resubscribed(self) -> None:
        """The bus lost and regained its subscriptions (a reconnect, or an overflowed inbox);
        messages may have been missed: catch up with ``read_log``."""


class Bus(Closeable, Protocol):
    """Room offsets, the recent room log, and fan-out to every node (memory/SQLite, Redis).

    ``publish`` is atomic: it assigns the next offset of the room, appends to the room log and
    to the archive feed, and fans out, all or nothing. Offsets are dense: 1, 2, 3, ...
    An implementation whose room log is the archive (SQLite) has no archive feed.

    **Offsets are never reused.** A bus whose backend can lose data (Redis restarted without
    it, a failover to a replica that lagged) continues a room above the highest offset this
    node has seen of it (published or delivered) when it finds the room's counter missing or
    behind. When it lost a room's offset and this node never saw the room, it raises
    :class:`~chatnode.core.errors.OffsetUnknown` and the node tells it where to continue
    (:meth:`restore`, from the archive).
    """

    async def publish(self, draft: Draft) -> ChatMessage:
        """Publish ``draft`` and return it with its offset. A draft with the ``client_id`` of
        a message the same user published in the room within the dedup window is not
        published again: the earlier message's offset and timestamp come back (with this
        draft's text). Raise ``Unavailable`` (``OffsetUnknown``: see the class docstring)."""

    async def signal(self, room_id: int, event: RoomEvent) -> None:
        """Fan out an ephemeral event to the room's subscribers (best effort); they get its
        bytes as its origin encoded them (``RoomEvent.data``)."""

    async def subscribe(self, room_id: int) -> None:
        """Return once every message published after this call returns will be delivered."""

    async def unsubscribe(self, room_id: int) -> None: ...

    async def last_offset(self, room_id: int) -> int | None:
        """The offset of the room's newest message, 0 if none; None if the bus lost it (the
        node then calls :meth:`restore`)."""

    async def restore(
        self,
        room_id: int,
        *,
        last_offset: int,
        messages: Sequence[ChatMessage] = (),
        seed: bool = False,
    ) -> int:
        """Tell the bus what this node knows of a room, after the bus lost data: the room's
        offset becomes at least ``last_offset`` and the room log gets those of ``messages``
        (ascending) that are newer than its newest entry. Return the room's offset.

        ``seed``: the node never saw the room and ``last_offset`` is the archive's newest:
        nodes that saw the room may still have to restore what they hold, so a bus that lost
        its data moments ago raises ``Unavailable`` (retry later) instead of starting the room
        there. A bus that never loses data does nothing."""

    async def read_log(self, room_id: int, *, after_offset: int, limit: int) -> list[ChatMessage]:
        """Messages with ``offset > after_offset`` still held by the recent log, ascending, at
        most ``limit``. The log may have dropped old messages: the first one returned can be
        later than ``after_offset + 1``; the archive holds those."""

    async def serve(self, handler: BusHandler, *, task_status: TaskStatus) -> None:
        """Run the receiving side until cancelled; ``started()`` once ready to subscribe."""

    def counters(self) -> Mapping[str, int]:
        """The implementation's own figures for ``/metrics``, by name (``chatnode_`` is
        prepended; a name ending in ``_total`` is a counter, any other a gauge)."""


class ArchiveFeed(Protocol):
    """The durable queue of messages waiting to be archived (the Redis archive stream).

    Every published message is handed out until acknowledged, to one consumer at a time: a
    consumer takes nothing while another reads. When the reading consumer died (nothing
    heard from it for ``claim_idle_ms``), gave its turn up (``keep_reading``) or released the
    feed, another one reads on and is handed every entry not acknowledged -- and possibly
    some acknowledged after an older one that was not: archiving is idempotent.
    """

    async def take(self, *, max_count: int, wait_ms: int) -> list[ArchiveEntry]: ...

    async def ack(self, entries: Sequence[ArchiveEntry]) -> None:
        """Acknowledge entries this consumer took and the archive stored. Once the consumer
        stopped reading (``keep_reading``), acknowledging what it took before changes nothing:
        the next reader is handed those entries again."""

    async def keep_reading(self) -> bool:
        """Keep this consumer's turn of reading current: renew it when due, or end it when the
        oldest entry it took waited ``claim_idle_ms`` for its acknowledgement (its archive
        cannot store it; another consumer reads on). Whether the turn in which ``take`` last
        handed out entries still lasts (False if it ended, even if another turn began since,
        or if the consumer never read). A consumer holding entries calls it at least every
        tenth of ``claim_idle_ms``, whatever else it waits for. Once a turn ended -- given up,
        or lost -- the entries taken in it are forgotten: the consumer stops archiving them,
        the next reader is handed them."""

    async def release(self) -> None:
        """Stop reading, so another consumer reads on at once (graceful stop: call it once
        everything taken was acknowledged)."""


class ArchiveRefused(Exception):
    """``Archive.store`` stored every document but those in ``refused``, which no retry would
    store: each :class:`~chatnode.core.models.Refusal` says why (its ``kind``) and, for a
    conflict, carries the document the archive holds under the same id."""

    def __init__(self, refused: Sequence[Refusal]) -> None:
        reasons = " | ".join(f"{r.kind.value} {r.document[:40]!r}: {r.reason}" for r in refused[:3])
        super().__init__(f"the archive refused {len(refused)} messages: {reasons}")
        self.refused = list(refused)


class Archive(Closeable, Protocol):
    """Every message of every room, searchable (SQLite FTS5, Elasticsearch)."""

    async def store(self, documents: Sequence[bytes]) -> None:
        """Durably store messages given as their archive documents (``ChatMessage.document``;
        the archiver hands them over as the feed holds them, never decoded); idempotent by
        ``(room_id, offset)``: a document the archive holds already, byte for byte or as the
        same message, counts as stored. Raises :class:`ArchiveRefused`, after storing the
        others, for documents the archive can never store (``UNINDEXABLE``: one that is not a
        message document, or that the archive's mapping refuses) and for documents whose id
        holds a different message (``CONFLICT``: the stored one stays, the refusal carries
        it)."""

    async def keep_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        """Durably keep refused documents for repair; keeping the same letter again (same
        kind, document and stored document) keeps it once."""

    async def dead_letters(self, *, limit: int) -> list[DeadLetter]:
        """The first ``limit`` letters kept, by ``kept_at_ms`` then ``digest``; everything
        kept so far is included."""

    async def refresh(self) -> None:
        """Make everything stored so far visible to ``read`` and ``search``."""

    async def read(
        self, room_id: int, *, after_offset: int, up_to_offset: int, limit: int
    ) -> list[ChatMessage]:
        """Messages with ``after_offset < offset <= up_to_offset``, ascending, the first
        ``limit`` of them."""

    async def tail(self, room_id: int, *, up_to_offset: int, limit: int) -> list[ChatMessage]:
        """The last ``limit`` messages with ``offset <= up_to_offset``, ascending."""

    async def last_offset(self, room_id: int) -> int:
        """The newest offset of the room stored so far (0 if none), as ``read`` sees it."""

    async def search(self, query: SearchQuery) -> list[SearchHit]:
        """Plain words, never a query syntax; every word must match (case-insensitive);
        filters exact, ``from_ms``/``to_ms`` inclusive, ``rooms`` (when not None) the only rooms
        searched (empty: none). Hits best first (higher ``score``), then newest first."""


class Presence(Closeable, Protocol):
    """Who is connected to which room, on which node (memory, Redis), and each user's
    presence (online, last seen) that follows from it.

    Entries live under a node heartbeat: a node that stops heartbeating (crashed) has its
    entries removed by ``reap`` once the heartbeat expired.
    """

    async def add(self, entry: PresenceEntry) -> None: ...

    async def remove(self, entry: PresenceEntry) -> None: ...

    async def online(self, room_id: int) -> list[str]:
        """Distinct users with at least one live connection in the room, in name order."""

    async def heartbeat(self, node_id: str, *, ttl_ms: int) -> None: ...

    async def reap(self) -> Reaped:
        """Remove entries of nodes whose heartbeat expired (or that never sent one); return
        how many were removed and which users that left with no entry (their ``last_seen``
        is the time of the reap)."""

    # -- user presence (online, last seen) ----------------------------------------------------

    async def users(self, names: Sequence[str]) -> dict[str, UserPresence]:
        """Each named user's presence. Rules: a user is online while any entry of theirs, in
        any room and on any node, is not removed or reaped; ``last_seen_ms`` is set (to the
        store's wall clock, never moving back) when an entry is added, when the user's last
        entry is removed, and when a reap removes it; never seen: offline, None."""


class Revocations(Protocol):
    """What ends tokens before their expiry, kept where a directory outage does not reach it
    and shared by every node: in Redis (cluster), in the SQLite file (embedded; also read by
    ``chatnode users`` commands), in process memory (tests). The node reads it when it checks
    a token it does not trust yet, and follows its ``changes`` to end what other nodes
    revoked (``core/auth.py`` ``UserChecks``).

    Rules: a recorded :class:`~chatnode.core.models.Revocation` is readable by every instance
    sharing the store (``lookup``) until its ``expires_at_ms`` at least; times only move
    forward (an older time recorded after a newer one changes nothing); every record is
    appended to the changes, which every node reads in the order recorded.
    """

    async def record(self, revocation: Revocation) -> None: ...

    async def lookup(self, *, account_id: int, token_id: str) -> RevocationState:
        """What is recorded about this token and its account, and the latest ``ALL``."""

    async def changes(self, cursor: str | None, *, limit: int = 1000) -> RevocationChanges:
        """Revocations recorded after ``cursor``, oldest first, at most ``limit``, and the
        cursor to read on from (``complete`` False if some were dropped unread). ``None``:
        start now (nothing returned; the cursor of the newest record)."""


class Tickets(Protocol):
    """Single-use tickets that stand for a token for a few seconds, so that browsers keep
    tokens out of WebSocket URLs: in Redis (cluster: a ticket is used once on any node), in
    process memory (embedded).

    Rules: ``redeem`` hands a ticket's token out once, to the first caller on any instance
    sharing the store, and never after its lifetime; an account is issued at most
    ``max_per_account`` tickets per window of one lifetime (the memory store's windows
    slide; Redis's start at the account's first ticket).
    """

    async def issue(
        self, ticket: str, token: str, *, account_id: int, ttl_ms: int, max_per_account: int
    ) -> bool:
        """Keep ``ticket`` for ``token`` for ``ttl_ms``; False (nothing kept) when the account
        already had ``max_per_account`` tickets in the window."""

    async def redeem(self, ticket: str) -> str | None:
        """The token of a live ticket, forgotten at once; None if unknown, used or expired."""


class RateLimits(Protocol):
    """Token buckets shared by every node of a deployment: the budgets of per-user and
    per-address rate limits (``node/ratelimit.py`` leases from them). In process memory
    (embedded), in Redis (cluster: every node takes from the same buckets).

    A bucket, named by ``key``, holds up to ``burst`` tokens, starts full and gains
    ``rate_per_s`` tokens a second; a bucket left alone until full is the same as one never
    used (an implementation may forget it). Each ``take`` is atomic: however many nodes take
    from a bucket at once, no more tokens are handed out in all than it held.
    """

    async def take(self, key: str, count: int, *, rate_per_s: float, burst: int) -> Grant:
        """Take up to ``count`` (>= 1) tokens from bucket ``key``: as many as it holds whole,
        up to ``count``. When it holds less than one, nothing is taken and ``retry_after_s``
        says when it will hold one. Every caller of a key passes the same rate and burst.
        Raise ``Unavailable`` if the store cannot be reached."""


class PushGate(Protocol):
    """The collapse windows of push notifications, one per (room, member), shared by every
    node of a deployment (``node/push.py`` rules): in process memory (embedded), in Redis
    (cluster). A window is held by the ``token`` that opened it until it is closed or, if its
    holder never closes it (a crashed node), until ``window_ms`` twice over has passed.

    Each call is atomic per window: of the callers that find a window not open, exactly one
    opens it.
    """

    async def open(
        self,
        room_id: int,
        users: Sequence[str],
        *,
        offset: int,
        note: bytes,
        token: str,
        window_ms: int,
    ) -> list[str]:
        """For each of ``users``: open their window in the room, held by ``token``, if none is
        open; else keep ``note`` as the window's pending notification, unless it keeps one of
        a greater ``offset``. Return the users whose window this call opened (the caller
        notifies them now)."""

    async def close(
        self, room_id: int, users: Sequence[str], *, token: str, window_ms: int
    ) -> list[bytes | None]:
        """For each of ``users``, a window ``token`` holds whose time is up: its pending note,
        taken, the window renewed for ``window_ms`` (the caller sends the note); or None, the
        window closed (nothing pending, or not held by ``token`` any more)."""


class Webhook(Protocol):
    """Where push notifications go: one HTTP(S) endpoint taking JSON POSTs."""

    async def post(self, body: bytes) -> int:
        """POST ``body`` (JSON) and return the answer's status. ``Unavailable`` when no answer
        came: refused, reset, not HTTP, or later than the adapter's timeout."""
