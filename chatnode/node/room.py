"""One member's presence in one room (``RoomConnection``): the join's replay in pages, then
what the member does there (send, refresh, ping, typing). Made by ``ChatNode.join``."""

from __future__ import annotations

from typing import Protocol

from chatnode.core import auth, validation
from chatnode.core.errors import (
    BadRequest,
    RateLimited,
    Unauthorized,
)
from chatnode.core.models import (
    ChatMessage,
    Draft,
    RoomEvent,
)
from chatnode.node.accounts import now_ms
from chatnode.node.hub import Hub, Member, RoomSession, Seat
from chatnode.node.push import Notifier
from chatnode.node.ratelimit import NodeLimits
from chatnode.node.receipts import Cursors
from chatnode.node.settings import Backends, NodeSettings
from chatnode.wire import frames


class RoomNode(Protocol):
    """What a room connection uses of its node (``ChatNode``), named here so this module
    does not import the service that imports it."""

    @property
    def settings(self) -> NodeSettings: ...
    @property
    def backends(self) -> Backends: ...
    @property
    def hub(self) -> Hub: ...
    @property
    def limits(self) -> NodeLimits: ...
    @property
    def cursors(self) -> Cursors: ...
    @property
    def push(self) -> Notifier | None: ...

    async def authenticate(
        self, token: str | None, *, user_param: str | None = None
    ) -> auth.Claims: ...

    async def signal(self, room_id: int, event: RoomEvent) -> None: ...


class RoomConnection:
    """One member's presence in one room, owned by its connection task. Its messages, pings
    and typing count against the user's limits, shared by all their connections on every
    node (``node/ratelimit.py``)."""

    def __init__(self, node: RoomNode, session: RoomSession, seat: Seat, member: Member) -> None:
        self._node = node
        self._session = session
        self._seat = seat
        self._member = member
        self._limits = node.limits
        self._typing_key = f"{session.room_id}:{member.user}"
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

    async def prepare(self, since: int | None, *, resume_from: int = 0) -> None:
        """Plan the replay and load its first page (``Unavailable`` if the history cannot be
        read: the join is refused before the upgrade). With no ``since``, a member resumes
        from ``resume_from`` (their ``delivered`` cursor; 0: none), else gets the newest
        ``history_on_join``. A resume more than ``max_replay`` behind gets the newest
        ``max_replay`` messages, after a ``gap`` frame naming what it skipped (v1; the plain
        dialect cannot say it, and does not resume from a cursor)."""
        settings = self._node.settings
        head = self._session.last_offset
        if since is None and resume_from > 0:
            since = resume_from
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
        head = self.head
        member.notify(
            frames.Joined(
                room_id, member.user, head, head - self._after, self._node.settings.node_id
            )
        )
        if self._gap is not None:
            member.notify(frames.Gap(room_id, *self._gap))
        page, self._first_page = self._first_page, []
        if not await self._send_history(self._after, head, page):
            return
        member.notify(frames.Live(room_id, head))
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
        budget = member.replay_page_bytes
        queued = 0
        while after < up_to:
            if not page:
                page = await self._page(after, up_to)
            for message in page:
                queued += member.deliver_history(message)
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
        wait_s = await self._limits.messages.take(self._member.user)
        if wait_s:
            raise RateLimited(
                f"too many messages; at most {self._node.settings.rate_messages_per_s:g}/s"
                " per user",
                retry_after_s=wait_s,
            )
        draft = Draft(self.room_id, self._member.user, text, now_ms(), client_id)
        message = await self._node.hub.publish(draft)
        if self._node.push is not None:
            self._node.push.published(message)  # no I/O, no wait (node/push.py rule 4)
        return message

    async def refresh(self, token: str, *, current: auth.Claims) -> auth.Claims:
        """:func:`refreshed_claims` of the member's connection."""
        return await refreshed_claims(self._node, token, current=current)

    async def ping(self) -> None:
        """:func:`allow_ping` of the member's user."""
        await allow_ping(self._node, self._member.user)

    async def mark(self, offset: int, *, read: bool) -> None:
        """A ``received`` (``read``: a ``read``) up to ``offset`` (``node/receipts.py``):
        memory only, written in batches. Beyond the room's last offset: ``BadRequest``
        (``invalid_parameter``), the cursor unchanged; behind the cursor: ignored."""
        room_id = self.room_id
        if offset > self._session.last_offset and offset > await self._node.hub.head(room_id):
            raise BadRequest(
                f"offset {offset} is beyond the last offset of chatroom {room_id}",
                code="invalid_parameter",
            )
        self._node.cursors.advance(
            room_id, self._member.user, delivered=offset, read=offset if read else 0
        )

    async def typing(self) -> None:
        """Tell the room the member is typing: at most once per ``typing_interval_s`` per
        user and room; the rest are dropped silently."""
        if await self._limits.typing.take(self._typing_key):
            return
        await self._node.signal(self.room_id, frames.typing_event(self.room_id, self._member.user))


async def refreshed_claims(node: RoomNode, token: str, *, current: auth.Claims) -> auth.Claims:
    """The claims of ``token`` if it may replace a connection's token (``current``): valid,
    of the same account, and expiring later. Otherwise ``Unauthorized``: the connection
    keeps its token."""
    claims = await node.authenticate(token)
    if claims.user != current.user or claims.account_id != current.account_id:
        raise Unauthorized(
            "a refresh token must be for the user the connection joined as",
            code="token_invalid",
        )
    if claims.expires_at_s <= current.expires_at_s:
        raise Unauthorized(
            "a refresh token must expire later than the connection's token",
            code="token_invalid",
        )
    return claims


async def allow_ping(node: RoomNode, user: str) -> None:
    """Allow a v1 ``ping``; raise ``RateLimited`` past the user's ping rate."""
    limiter = node.limits.pings
    wait_s = await limiter.take(user)
    if wait_s:
        raise RateLimited(
            f"too many pings; at most {limiter.rate.per_s:g}/s per user", retry_after_s=wait_s
        )


async def allow_subscription_change(node: RoomNode, user: str) -> None:
    """Allow a ``/v1/connect`` ``subscribe`` or ``unsubscribe``; raise ``RateLimited`` past
    the user's rate (each is a join or a leave of a room on this node)."""
    limiter = node.limits.subscriptions
    wait_s = await limiter.take(user)
    if wait_s:
        raise RateLimited(
            f"too many subscribe/unsubscribe frames; at most {limiter.rate.per_s:g}/s per user",
            retry_after_s=wait_s,
        )
