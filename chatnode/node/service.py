"""The node's operations, as the edge calls them: users, tokens, rooms, history, search, and
room connections. Everything here is transport-neutral; ``edge/`` maps it to HTTP/WebSocket.

Ownership: ``ChatNode.run`` owns the node's background tasks (bus receiver, archiver,
presence heartbeat and reaper) in its nursery; connections are owned by the edge and enter a
room through ``ChatNode.join``, an async context manager that leaves the room on exit, also on
cancellation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

from chatnode.core import auth, protocol, validation
from chatnode.core.errors import (
    Forbidden,
    NotFound,
    OffsetUnknown,
    RateLimited,
    Unauthorized,
    Unavailable,
)
from chatnode.core.models import (
    ChatMessage,
    Draft,
    PresenceEntry,
    Room,
    SearchHit,
    SearchQuery,
    User,
)
from chatnode.core.ports import Archive, ArchiveFeed, Bus, Directory, Presence, Revocations
from chatnode.node.archiver import Archiver
from chatnode.node.hub import Hub, Member, RoomSession, Seat
from chatnode.node.ratelimit import TokenBucket

log = logging.getLogger(__name__)


@attrs.frozen
class NodeSettings:
    """What the node needs of the configuration (built by app.py from Config)."""

    node_id: str
    jwt_secret: str
    token_ttl_s: float
    admins: frozenset[str]
    insecure: bool
    password_cost_log2: int
    history_on_join: int
    max_replay: int
    rate_messages_per_s: float
    rate_burst: int
    presence_ttl_s: float
    limits: validation.Limits = attrs.Factory(validation.Limits)
    archive_linger_s: float = 1.0
    replay_page_messages: int = 200


@attrs.frozen
class Backends:
    directory: Directory
    bus: Bus
    archive: Archive
    presence: Presence
    revocations: Revocations
    feed: ArchiveFeed | None = None


USER_CHECK_TTL_S = 5.0
USER_LOOKUP_RETRY_S = 1.0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class ChatNode:
    def __init__(self, settings: NodeSettings, backends: Backends) -> None:
        self.settings = settings
        self.backends = backends
        self.hub = Hub(
            backends.bus, backends.archive, cache_size=max(256, 2 * settings.history_on_join)
        )
        self.archiver = (
            Archiver(backends.feed, backends.archive, linger_s=settings.archive_linger_s)
            if backends.feed
            else None
        )
        self._conn_counter = 0
        # Unknown names are checked against this hash so that a wrong name costs the same
        # time as a wrong password (no user enumeration by timing).
        self._decoy_hash = auth.hash_password("decoy", cost_log2=settings.password_cost_log2)
        self._tokens = auth.TokenVerifier(settings.jwt_secret)
        self._users = auth.UserChecks(trust_s=USER_CHECK_TTL_S)
        self._lookups_resume_at = float("-inf")  # trio time
        # Rooms are never deleted or renamed, and memberships end only with their user: what
        # this node has seen once it need not ask the directory again (a rejoin, a reconnect
        # storm or a MySQL outage costs no directory query).
        self._rooms: dict[int, Room] = {}
        self._members: set[tuple[int, str]] = set()
        self._presence: set[PresenceEntry] = set()  # this node's live connections

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the node's background tasks until cancelled; ``started()`` once the bus is up."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.backends.bus.serve, self.hub)
            nursery.start_soon(self._presence_loop)
            if self.archiver is not None:
                await nursery.start(self.archiver.run)
            task_status.started()

    async def _presence_loop(self) -> None:
        """Heartbeat and reap every ``presence_ttl_s / 3``. A heartbeat that comes after a
        failed one, or later than ``presence_ttl_s`` after the last good one, may come after
        another node reaped this node's entries as a dead node's (a Redis outage longer than
        the TTL does that), so it is followed by writing every local entry again."""
        ttl_s = self.settings.presence_ttl_s
        last_ok: float | None = None
        failed = False
        while True:
            try:
                await self.backends.presence.heartbeat(
                    self.settings.node_id, ttl_ms=int(ttl_s * 1000)
                )
                now = trio.current_time()
                if failed or (last_ok is not None and now - last_ok >= ttl_s):
                    await self._restore_presence()
                last_ok, failed = now, False
                reaped = await self.backends.presence.reap()
                if reaped:
                    log.info("reaped %d presence entries of dead nodes", reaped)
            except Exception:
                failed = True
                log.warning("presence heartbeat failed; retrying", exc_info=True)
            await trio.sleep(ttl_s / 3)

    async def _restore_presence(self) -> None:
        """Write every local entry again (idempotent). An entry whose connection ended
        meanwhile is removed again afterwards, whatever order the two writes took."""
        entries = list(self._presence)
        for entry in entries:
            await self.backends.presence.add(entry)
        for entry in entries:
            if entry not in self._presence:
                await self.backends.presence.remove(entry)
        if entries:
            log.info("presence: wrote %d local entries again after a heartbeat gap", len(entries))

    def next_conn_id(self) -> str:
        self._conn_counter += 1
        return f"{self.settings.node_id}/{self._conn_counter}"

    # -- users and tokens -----------------------------------------------------------------------

    async def create_user(self, name: object, password: object) -> User:
        limits = self.settings.limits
        name = validation.user_name(name, limits)
        if password is None and self.settings.insecure:
            password_hash = "!"  # the seed's open mode: a user without a password
        else:
            secret = validation.password(password, limits)
            password_hash = await trio.to_thread.run_sync(
                lambda: auth.hash_password(secret, cost_log2=self.settings.password_cost_log2)
            )
        return await self.backends.directory.create_user(
            name, password_hash, created_at_ms=now_ms(), is_admin=name in self.settings.admins
        )

    async def issue_token(self, name: object, password: object) -> tuple[str, int]:
        if not isinstance(name, str) or not isinstance(password, str):
            raise Unauthorized("name and password are required", code="bad_credentials")
        user = await self.backends.directory.get_user(name)
        stored = user.password_hash if user else self._decoy_hash
        ok = await trio.to_thread.run_sync(auth.verify_password, password, stored)
        if user is None or not ok:
            raise Unauthorized("wrong user name or password", code="bad_credentials")
        now_s = int(time.time())
        ttl_s = int(self.settings.token_ttl_s)
        token = auth.issue_token(
            user.name,
            is_admin=user.is_admin or user.name in self.settings.admins,
            secret=self.settings.jwt_secret,
            now_s=now_s,
            ttl_s=ttl_s,
        )
        return token, now_s + ttl_s

    async def authenticate(
        self, token: str | None, *, user_param: str | None = None
    ) -> auth.Claims:
        """The caller's identity: a valid token, or in insecure mode ``?user=`` of an existing
        user (or an anonymous admin when neither is given)."""
        if token:
            claims = self._tokens.verify(token, now_s=int(time.time()))
            await self._check_user(claims)
            return claims
        if self.settings.insecure:
            if user_param:
                if await self.backends.directory.get_user(user_param) is None:
                    raise NotFound(
                        f"user {user_param!r} does not exist; create it first",
                        code="user_not_found",
                    )
                return auth.Claims(user=user_param, is_admin=True, expires_at_s=2**62)
            return auth.Claims(user="", is_admin=True, expires_at_s=2**62)
        raise Unauthorized(
            "a token is required: POST /v1/tokens, then send 'Authorization: Bearer <token>' "
            "or '?token=<token>'",
            code="token_required",
        )

    async def _check_user(self, claims: auth.Claims) -> None:
        """Raise ``Unauthorized`` (``token_invalid``) unless the verified token's user may act
        (``auth.UserChecks``' rules). A user the directory found is trusted for
        ``USER_CHECK_TTL_S``: a REST call with a known token costs no directory query. When
        the directory is unavailable the token is accepted unless its user is known deleted;
        the failed lookup is followed by a read of ``Revocations`` (another node's deletion),
        and the next lookup waits ``USER_LOOKUP_RETRY_S``, so that while the directory stays
        down no check waits for it more than once a second per node."""
        users = self._users
        if users.trusted(claims.user, trio.current_time()):
            return
        if trio.current_time() >= self._lookups_resume_at:
            try:
                user = await self.backends.directory.get_user(claims.user)
            except Unavailable:
                self._lookups_resume_at = trio.current_time() + USER_LOOKUP_RETRY_S
                await self._learn_revocations()
            else:
                if user is None:
                    users.not_found(claims.user, at_ms=now_ms())
                    raise Unauthorized("the token's user no longer exists", code="token_invalid")
                users.found(claims.user, trio.current_time())
                return
        if users.known_deleted(claims):
            raise Unauthorized("the token's user was deleted", code="token_invalid")

    async def _learn_revocations(self) -> None:
        try:
            at_ms = await self.backends.revocations.users_deleted_at()
        except Unavailable:
            log.warning(
                "user checks: neither the directory nor revocations answer; "
                "deciding from what this node knows",
                exc_info=True,
            )
            return
        self._users.learned_users_deleted(at_ms=at_ms)

    async def delete_all_users(self, claims: auth.Claims) -> int:
        """Delete every user and membership; then record the deletion's time, for this node's
        user checks and, through ``Revocations``, every node's while the directory is down.
        A deletion that failed is not recorded (it may not have happened)."""
        if not claims.is_admin:
            raise Forbidden("only an admin may delete users", code="admin_only")
        self._members.clear()
        deleted = await self.backends.directory.delete_all_users()
        at_ms = now_ms()
        self._users.users_deleted(at_ms=at_ms)
        try:
            await self.backends.revocations.record_users_deleted(at_ms)
        except Unavailable:
            log.warning(
                "users deleted but not recorded in revocations: during a directory "
                "outage other nodes will not know",
                exc_info=True,
            )
        return deleted

    # -- rooms --------------------------------------------------------------------------------

    async def create_room(self, name: object) -> Room:
        if name is None:
            name = "room"
        name = validation.room_name(name, self.settings.limits)
        room = await self.backends.directory.create_room(name, created_at_ms=now_ms())
        try:  # the room starts at offset 0 on the bus: its first message needs no archive read
            await self.backends.bus.restore(room.id, last_offset=0)
        except Unavailable as exc:
            log.info("room %d: offset not set on the bus yet (%s)", room.id, exc)
        return room

    async def list_rooms(self, *, after_id: int, limit: int) -> list[Room]:
        return await self.backends.directory.list_rooms(after_id=after_id, limit=limit)

    async def room(self, room_id: int) -> Room:
        room = self._rooms.get(room_id)
        if room is None:
            room = await self.backends.directory.get_room(room_id)
            if room is None:
                raise NotFound(f"chatroom {room_id} does not exist", code="room_not_found")
            if len(self._rooms) > 100_000:
                self._rooms.clear()
            self._rooms[room_id] = room
        return room

    async def _ensure_member(self, room_id: int, user: str) -> None:
        if (room_id, user) in self._members:
            return
        await self.backends.directory.add_member(
            room_id, user, max_members=self.settings.limits.max_room_members
        )
        if len(self._members) > 1_000_000:
            self._members.clear()
        self._members.add((room_id, user))

    async def room_users(self, room_id: int) -> tuple[list[str], list[str]]:
        """(members, online) of a room."""
        await self.room(room_id)
        members = await self.backends.directory.list_members(room_id)
        online = await self.backends.presence.online(room_id)
        return members, online

    async def history(self, room_id: int, *, before: int | None, limit: int) -> list[ChatMessage]:
        """Up to ``limit`` messages older than offset ``before`` (default: the newest), newest last."""
        await self.room(room_id)
        head = await self.hub.head(room_id)
        up_to = head if before is None else min(head, before - 1)
        after = max(0, up_to - limit)
        return await self.hub.load_range(room_id, after, up_to)

    async def search(self, query: SearchQuery) -> list[SearchHit]:
        return await self.backends.archive.search(query)

    # -- room connections ---------------------------------------------------------------------

    @asynccontextmanager
    async def join(
        self, room_id: int, member: Member, *, since: int | None = None
    ) -> AsyncIterator[RoomConnection]:
        """Enter a room: a seat, and the first page of its history, so that a refusal
        (unknown room, room full, history unavailable) comes before the caller answers the
        upgrade. The caller then runs ``RoomConnection.replay`` as the member can take it,
        and the seat goes live (hub Rules 3 and 5). Leaves on exit."""
        await self.room(room_id)
        await self._ensure_member(room_id, member.user)
        entry = PresenceEntry(room_id, member.user, self.settings.node_id, member.conn_id)
        session, seat = await self.hub.attach(room_id, member)
        try:
            self._presence.add(entry)
            await self.backends.presence.add(entry)
            connection = RoomConnection(self, session, seat, member)
            await connection.prepare(since)
            await self._signal(room_id, protocol.presence_event(room_id, member.user, "join"))
            yield connection
        finally:
            self._presence.discard(entry)
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self.hub.detach(room_id, member)
                try:
                    await self.backends.presence.remove(entry)
                    await self._signal(
                        room_id, protocol.presence_event(room_id, member.user, "leave")
                    )
                except Exception:
                    log.warning("presence cleanup failed for %s", entry, exc_info=True)

    async def _signal(self, room_id: int, event: dict[str, object]) -> None:
        try:
            await self.backends.bus.signal(room_id, event)
        except Exception:
            log.warning("room %d: event not sent", room_id, exc_info=True)

    async def check(self) -> dict[str, str]:
        """Readiness of every backend: name -> "ok" or the error."""
        result: dict[str, str] = {}
        for name, backend in (
            ("directory", self.backends.directory),
            ("bus", self.backends.bus),
            ("archive", self.backends.archive),
            ("presence", self.backends.presence),
        ):
            try:
                with trio.fail_after(2):
                    await backend.check()
                result[name] = "ok"
            except Exception as exc:
                result[name] = f"{type(exc).__name__}: {exc}"
        return result


class RoomConnection:
    """One member's presence in one room, owned by its connection task."""

    def __init__(self, node: ChatNode, session: RoomSession, seat: Seat, member: Member) -> None:
        self._node = node
        self._session = session
        self._seat = seat
        self._member = member
        self._bucket = TokenBucket(node.settings.rate_messages_per_s, node.settings.rate_burst)
        self.head = 0
        self._after = 0
        self._gap: tuple[int, int] | None = None
        self._first_page: list[ChatMessage] = []

    @property
    def room_id(self) -> int:
        return self._session.room_id

    @property
    def limits(self) -> validation.Limits:
        return self._node.settings.limits

    async def prepare(self, since: int | None) -> None:
        """Plan the replay and load its first page (``Unavailable`` if the history cannot be
        read: the join is refused before the upgrade). A ``since`` more than ``max_replay``
        behind gets the newest ``max_replay`` messages, after a ``gap`` frame naming what it
        skipped (v1; the plain dialect cannot say it)."""
        settings = self._node.settings
        head = self._session.last_offset
        if since is None:
            after = max(0, head - settings.history_on_join)
        else:
            after = min(max(0, since), head)
            if head - after > settings.max_replay:
                self._gap = (after + 1, head - settings.max_replay)
                after = head - settings.max_replay
        self._after, self.head = after, head
        self._first_page = await self._page(after, head)

    async def _page(self, after: int, up_to: int) -> list[ChatMessage]:
        end = min(up_to, after + self._node.settings.replay_page_messages)
        return await self._node.hub.history(self._session, after, end)

    async def replay(self) -> None:
        """Send the history planned by :meth:`prepare`, then go live (hub Rule 3), in pages
        of ``replay_page_messages`` read as the member takes them: after each
        ``member.replay_page_bytes`` of frames it waits for ``member.writable()``. So what
        a replay holds is a page and what the member queues, whatever its length. Returns
        early, the seat not live, if the member closes meanwhile; a page the backends cannot
        give raises ``Unavailable``."""
        member, hub, room_id = self._member, self._node.hub, self.room_id
        dialect = member.dialect
        head = self.head
        if dialect is protocol.Dialect.V1:
            member.send_nowait(
                protocol.ws_text_frame(
                    protocol.joined_frame(
                        room_id,
                        member.user,
                        head=head,
                        history=head - self._after,
                        node=self._node.settings.node_id,
                    )
                )
            )
            if self._gap is not None:
                member.send_nowait(protocol.ws_text_frame(protocol.gap_frame(room_id, *self._gap)))
        page, self._first_page = self._first_page, []
        if not await self._send_history(self._after, head, page):
            return
        if dialect is protocol.Dialect.V1:
            member.send_nowait(protocol.ws_text_frame(protocol.live_frame(room_id, head)))
        sent_up_to = head
        while True:
            if not await member.writable():
                return
            if hub.go_live(
                self._session, self._seat, sent_up_to=sent_up_to, max_bytes=member.replay_page_bytes
            ):
                return
            # the live messages that queued meanwhile were dropped (hub Rule 3): from history
            skipped_to = self._seat.skipped_to
            if not await self._send_history(sent_up_to, skipped_to, []):
                return
            sent_up_to = skipped_to

    async def _send_history(self, after: int, up_to: int, page: list[ChatMessage]) -> bool:
        """Send ``(after, up_to]``, ``page`` being its start if already loaded; False if the
        member closed meanwhile."""
        member = self._member
        dialect = member.dialect
        budget = member.replay_page_bytes
        queued = 0
        while after < up_to:
            if not page:
                page = await self._page(after, up_to)
            for message in page:
                frame = protocol.ws_text_frame(protocol.server_frame(message, dialect))
                member.send_nowait(frame)
                queued += len(frame)
                if queued >= budget:
                    queued = 0
                    if not await member.writable():
                        return False
            after = min(up_to, after + self._node.settings.replay_page_messages)
            page = []
        return True

    async def send(self, text: str, client_id: str | None = None) -> ChatMessage:
        """Publish a validated message text; raise ``RateLimited`` or ``Unavailable``. A
        ``client_id`` the member already sent in this room within the dedup window gets the
        earlier message back, nothing new is stored (the way to retry a send)."""
        wait_s = self._bucket.take(trio.current_time())
        if wait_s:
            raise RateLimited(
                f"too many messages; at most {self._node.settings.rate_messages_per_s:g}/s",
                retry_after_s=wait_s,
            )
        draft = Draft(self.room_id, self._member.user, text, now_ms(), client_id)
        bus = self._node.backends.bus
        try:
            return await bus.publish(draft)
        except OffsetUnknown:
            await self._node.hub.restore(self.room_id)
            return await bus.publish(draft)

    async def refresh(self, token: str, *, expires_at_s: int) -> auth.Claims:
        """The claims of ``token`` if it may replace the connection's token: valid, of the
        member's user, and expiring after ``expires_at_s`` (the connection's end now).
        Otherwise ``Unauthorized``: the connection keeps its token."""
        claims = await self._node.authenticate(token)
        if claims.user != self._member.user:
            raise Unauthorized(
                "a refresh token must be for the user the connection joined as",
                code="token_invalid",
            )
        if claims.expires_at_s <= expires_at_s:
            raise Unauthorized(
                "a refresh token must expire later than the connection's token",
                code="token_invalid",
            )
        return claims

    async def typing(self) -> None:
        await self._node._signal(
            self.room_id, protocol.typing_event(self.room_id, self._member.user)
        )
