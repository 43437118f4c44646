"""Domain values. All are immutable (``@attrs.frozen``); times are epoch milliseconds.

A message has one **wire shape**, defined here and written the same everywhere (the archive
document, the v1 ``message`` frame and, without its offset, the plain one, the REST API,
the Elasticsearch document): the JSON object of :data:`MESSAGE_FIELDS` in that order,
``{"chatroom":R,"offset":O,"user":U,"message":T,"timestamp":TS}``
(:meth:`ChatMessage.fields`, :meth:`ChatMessage.from_fields`).

A **membership change** is a message of its room too, with its own offset, so that it is
ordered with the messages around it: ``user`` is the member concerned, ``message`` is empty,
and :data:`EVENT_FIELDS` follow, ``"event":E,"by":B`` (``E`` one of :data:`MEMBER_EVENTS`,
``B`` who made the change). Stores keep both kinds alike; clients of the v1 dialect get it as
a ``member`` frame, the plain dialect and search never see it.

A message also has a byte form, its **archive document** (:attr:`ChatMessage.document`): that
object compact, UTF-8, no newline. It is made once, when the message is published, and travels
as it is through the archive feed into the archive (Elasticsearch indexes the bytes), so the
archiver never decodes or re-encodes a message. :func:`document_key` reads the message's key
from the document's head; :meth:`ChatMessage.from_document` decodes and checks one.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from json.encoder import encode_basestring
from types import MappingProxyType
from typing import Any, Final, NamedTuple

import attrs

_LONE_SURROGATE: Final = re.compile("[\ud800-\udfff]")
_DOCUMENT_HEAD: Final = re.compile(rb'\{"chatroom":(0|[1-9][0-9]*),"offset":([1-9][0-9]*),"')
MESSAGE_FIELDS: Final = ("chatroom", "offset", "user", "message", "timestamp")
"""The keys of a message's wire shape, in order (module docstring)."""
EVENT_FIELDS: Final = ("event", "by")
"""The keys a membership change adds after :data:`MESSAGE_FIELDS` (module docstring)."""
_EVENT_SHAPE: Final = MESSAGE_FIELDS + EVENT_FIELDS

ADDED: Final = "added"
REMOVED: Final = "removed"
LEFT: Final = "left"
BANNED: Final = "banned"
MEMBER_EVENTS: Final = (ADDED, REMOVED, LEFT, BANNED)
"""What a membership change says happened to its ``user``: ``added`` by ``by``; ``removed``
by ``by``; ``left`` (``by`` is the user); ``banned`` by ``by`` (which ends the membership)."""
ENDINGS: Final = frozenset((REMOVED, LEFT, BANNED))
"""The membership changes after which the user receives nothing more of the room."""


def document_head(room_id: int) -> bytes:
    """The start of a document of room ``room_id``; its offset follows, then
    :func:`document_tail`. (The bus completes documents once it assigned the offset.)"""
    return b'{"chatroom":%d,"offset":' % room_id


def document_tail(
    user: str, text: str, timestamp_ms: int, event: str | None = None, by: str | None = None
) -> bytes:
    """The end of a document, after its offset (with ``event``: a membership change's). A
    lone surrogate (JSON allows ``"\\ud800"``, UTF-8 does not) becomes U+FFFD."""
    if event is None:
        tail = (
            f',"user":{encode_basestring(user)},"message":{encode_basestring(text)},'
            f'"timestamp":{timestamp_ms}}}'
        )
    else:
        tail = (
            f',"user":{encode_basestring(user)},"message":{encode_basestring(text)},'
            f'"timestamp":{timestamp_ms},"event":{encode_basestring(event)},'
            f'"by":{encode_basestring(by or "")}}}'
        )
    try:
        return tail.encode()
    except UnicodeEncodeError:  # rare (validation refuses them at the edge): clean only then
        return _LONE_SURROGATE.sub("\ufffd", tail).encode()


def document_key(document: bytes) -> bytes:
    """``b"R:O"``, the key of the message a document holds, read from its head; ``ValueError``
    if the document does not start as one made here."""
    head = _DOCUMENT_HEAD.match(document)
    if head is None:
        raise ValueError(f"not a message document: {document[:80]!r}")
    return head[1] + b":" + head[2]


@attrs.frozen
class User:
    """An account. ``id`` is stable and never reused: a name registered again after its
    account was deleted is a new account with a new id (tokens name the id). ``name`` is as
    registered; names are unique by :func:`chatnode.core.validation.name_key`.
    ``revoked_before_ms``: every token of the account issued at or before this time is
    revoked (a password change, admin rights withdrawn); 0 if none."""

    name: str
    password_hash: str
    created_at_ms: int
    is_admin: bool = False
    id: int = 0
    revoked_before_ms: int = 0


PUBLIC: Final = "public"
PRIVATE: Final = "private"
DIRECT: Final = "direct"
VISIBILITIES: Final = (PUBLIC, PRIVATE, DIRECT)
"""A room's visibility, fixed at creation: ``public`` rooms are seen and joined by anyone;
``private`` (a group) and ``direct`` (two users, one room per pair) rooms only by members."""

OWNER: Final = "owner"
ADMIN: Final = "admin"
MEMBER: Final = "member"
ROLES: Final = (OWNER, ADMIN, MEMBER)
"""A member's role in a room: owners and admins manage members and bans."""


@attrs.frozen
class Room:
    """A room. Never deleted, renamed or made another visibility: a node keeps what it saw.
    ``created_by`` is the creator's name (None for rooms made before it was recorded)."""

    id: int
    name: str
    created_at_ms: int
    visibility: str = PUBLIC
    created_by: str | None = None

    @property
    def public(self) -> bool:
        return self.visibility == PUBLIC


@attrs.frozen
class Listed:
    """A room as ``GET /v1/chatrooms`` lists it: the room and its current member count."""

    room: Room
    member_count: int


@attrs.frozen
class Member:
    """A membership: ``user`` has ``role`` in the room since ``joined_at_ms``."""

    user: str
    role: str = MEMBER
    joined_at_ms: int = 0


@attrs.frozen
class Cursor:
    """How far ``user`` got in a room: ``delivered`` (their client received up to that
    offset) and ``read`` (they saw up to it); 0 is nothing. ``read <= delivered``."""

    room_id: int
    user: str
    delivered: int = 0
    read: int = 0


def coalesce_cursors(cursors: Iterable[Cursor]) -> list[Cursor]:
    """One cursor per (room, user): the greatest ``delivered`` and ``read`` given, with
    ``delivered >= read``; ordered by (room, user), the order a store locks rows in."""
    best: dict[tuple[int, str], tuple[int, int]] = {}
    for c in cursors:
        key = (c.room_id, c.user)
        delivered, read = best.get(key, (0, 0))
        read = max(read, c.read)
        best[key] = (max(delivered, c.delivered, read), read)
    return [Cursor(room, user, d, r) for (room, user), (d, r) in sorted(best.items())]


@attrs.frozen
class Draft:
    """A message as a member sent it, before the bus gives it a room offset.

    ``client_id`` is the sender's own id for it (the v1 ``send`` frame's ``id``): a draft with
    the client id of one the same user published in the same room within the bus's dedup
    window is that message again, not a new one (the way to retry a send safely)."""

    room_id: int
    user: str
    text: str
    timestamp_ms: int
    client_id: str | None = None
    event: str | None = None
    """A membership change (:data:`MEMBER_EVENTS`) of ``user``, made by :attr:`by`."""
    by: str | None = None

    @classmethod
    def membership(cls, room_id: int, user: str, event: str, *, by: str, at_ms: int) -> Draft:
        """The membership change ``event`` of ``user``, made by ``by``."""
        return cls(room_id, user, "", at_ms, event=event, by=by)


@attrs.frozen(eq=False)
class RoomEvent:
    """An ephemeral room event (``presence``, ``typing``; between nodes ``user_room_added``):
    its fields and its JSON object, encoded once where the event happens.

    The bus carries :attr:`data`; a receiving node decodes it once, to route it by its
    ``type``, and members are handed the same bytes as their frame's payload, so an event is
    never encoded again on its way to a client. Neither part can change after it is made
    (the fields are a read-only view), so one event is safely handed to every handler.
    """

    fields: Mapping[str, Any]
    data: bytes

    @classmethod
    def of(cls, **fields: Any) -> RoomEvent:
        """A new event; ``ValueError`` if a field cannot be JSON."""
        try:
            data = json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()
        except TypeError as exc:
            raise ValueError(f"a room event must be JSON: {exc}") from None
        return cls(MappingProxyType(fields), data)

    @classmethod
    def decode(cls, data: bytes) -> RoomEvent:
        """An event as the bus carried it; ``ValueError`` if it is not a JSON object."""
        fields = json.loads(data)
        if not isinstance(fields, dict):
            raise ValueError("a room event must be a JSON object")
        return cls(MappingProxyType(fields), bytes(data))

    @property
    def kind(self) -> str:
        """Its ``type``."""
        return str(self.fields.get("type"))


@attrs.frozen
class ChatMessage:
    """A message of a room. ``offset`` is assigned by the bus: strictly increasing per room,
    starting at 1, the same on every node. ``(room_id, offset)`` identifies it everywhere.
    With ``event`` set it is a membership change (module docstring)."""

    room_id: int
    offset: int
    user: str
    text: str
    timestamp_ms: int
    event: str | None = None
    by: str | None = None

    @property
    def ends_membership(self) -> bool:
        """A membership change after which ``user`` gets nothing more of the room."""
        return self.event in ENDINGS

    @property
    def key(self) -> str:
        """The archive document id: idempotent re-indexing."""
        return f"{self.room_id}:{self.offset}"

    def fields(self) -> dict[str, Any]:
        """The message's wire shape: :data:`MESSAGE_FIELDS` in order, then
        :data:`EVENT_FIELDS` for a membership change (module docstring)."""
        fields: dict[str, Any] = {
            "chatroom": self.room_id,
            "offset": self.offset,
            "user": self.user,
            "message": self.text,
            "timestamp": self.timestamp_ms,
        }
        if self.event is not None:
            fields["event"] = self.event
            fields["by"] = self.by or ""
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> ChatMessage:
        """The message a wire-shaped mapping holds (``KeyError``, ``ValueError`` if not)."""
        event = fields.get("event")
        return cls(
            int(fields["chatroom"]),
            int(fields["offset"]),
            str(fields["user"]),
            str(fields["message"]),
            int(fields["timestamp"]),
            None if event is None else str(event),
            None if event is None else str(fields.get("by") or ""),
        )

    @property
    def document(self) -> bytes:
        """The message as its archive document (module docstring)."""
        return (
            document_head(self.room_id)
            + b"%d" % self.offset
            + document_tail(self.user, self.text, self.timestamp_ms, self.event, self.by)
        )

    @classmethod
    def from_document(cls, document: bytes) -> ChatMessage:
        """The message an archive document holds; ``ValueError`` if it is not one (its keys in
        order, each value of its type, the room and offset as in its head)."""
        document_key(document)
        try:
            fields = json.loads(document)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a message document: {exc}") from None
        if not isinstance(fields, dict) or tuple(fields) not in (MESSAGE_FIELDS, _EVENT_SHAPE):
            raise ValueError(f"not a message document: {document[:80]!r}")
        if len(fields) == 5:  # a chat message: the path of every message a node receives
            room_id, offset, user, text, timestamp_ms = fields.values()
            event = by = None
        else:
            room_id, offset, user, text, timestamp_ms, event, by = fields.values()
            if event not in MEMBER_EVENTS or not isinstance(by, str):
                raise ValueError(f"not a message document: {document[:80]!r}")
        if not (
            type(room_id) is int
            and type(offset) is int
            and isinstance(user, str)
            and isinstance(text, str)
            and type(timestamp_ms) is int
        ):
            raise ValueError(f"not a message document: {document[:80]!r}")
        if event is None:
            return cls(room_id, offset, user, text, timestamp_ms)
        return cls(room_id, offset, user, text, timestamp_ms, event, by)


class ArchiveEntry(NamedTuple):
    """A message waiting in the archive feed, as its archive document; ``ack_id`` is the feed's
    own id for it. (A tuple: a feed makes one per message, and an attrs class costs ~0.5 µs.)"""

    ack_id: str
    document: bytes

    @property
    def message(self) -> ChatMessage:
        """The message, decoded (``ValueError`` if the document is not one)."""
        return ChatMessage.from_document(self.document)


class RefusalKind(enum.Enum):
    """Why the archive did not store a document (no retry would)."""

    UNINDEXABLE = "unindexable"
    """The archive can never index it: not a message document, or its mapping refuses it."""
    CONFLICT = "conflict"
    """Its id (room, offset) holds a different message, which stays stored."""


@attrs.frozen
class Refusal:
    """A document the archive did not store, why, and for a conflict what it holds instead."""

    kind: RefusalKind
    document: bytes
    reason: str
    stored: bytes | None = None
    """``CONFLICT``: the document stored under the same id; None otherwise."""

    @property
    def key(self) -> str | None:
        """``"R:O"`` read from the document's head; None if it does not start as one."""
        try:
            return document_key(self.document).decode()
        except ValueError:
            return None


@attrs.frozen
class DeadLetter:
    """A refused document kept for repair (``Archive.keep_dead_letters``)."""

    refusal: Refusal
    kept_at_ms: int

    @property
    def digest(self) -> str:
        """The letter's identity: kind, document and stored document (hex SHA-256), so
        keeping a letter again -- its batch retried, or archived again by the next reader --
        keeps it once."""
        refusal = self.refusal
        digest = hashlib.sha256(b"%b\n%d\n" % (refusal.kind.value.encode(), len(refusal.document)))
        digest.update(refusal.document)
        digest.update(b"-" if refusal.stored is None else b"+" + refusal.stored)
        return digest.hexdigest()


@attrs.frozen
class SearchQuery:
    text: str
    room_id: int | None = None
    user: str | None = None
    from_ms: int | None = None
    to_ms: int | None = None
    limit: int = 20
    rooms: tuple[int, ...] | None = None
    """Only messages of these rooms (the rooms the caller may read); None: every room."""


@attrs.frozen
class SearchHit:
    message: ChatMessage
    score: float


@attrs.frozen
class PresenceEntry:
    """One live connection of ``user`` in ``room_id`` on node ``node_id``."""

    room_id: int
    user: str
    node_id: str
    conn_id: str


@attrs.frozen
class UserPresence:
    """A user's presence: ``online`` while any entry of theirs (a room's connection, or a
    ``/v1/connect`` connection: room 0) is not reaped; ``last_seen_ms`` the wall time (epoch
    ms) of their latest connect or disconnect (or of the reap that ended their last entry),
    None if never seen. It only moves forward."""

    online: bool
    last_seen_ms: int | None


@attrs.frozen
class Reaped:
    """What a reap removed: ``entries``, and the users it left with no entry (now offline)."""

    entries: int
    offline: tuple[str, ...] = ()


class RevocationKind(enum.Enum):
    """What a :class:`Revocation` ends."""

    TOKEN = "token"
    """One token, by its id (a sign-out)."""
    ACCOUNT = "account"
    """Every token of one account issued at or before ``at_ms`` (a password change, admin
    rights withdrawn)."""
    ALL = "all"
    """Every token issued at or before ``at_ms``: every account then existing was deleted."""


@attrs.frozen
class Revocation:
    """Tokens that end before their expiry (``ports.Revocations``). ``expires_at_ms``: when
    the last token it ends has expired anyway, so it may be forgotten (``ALL``: never)."""

    kind: RevocationKind
    at_ms: int
    expires_at_ms: int
    account_id: int = 0
    token_id: str = ""


@attrs.frozen
class RevocationState:
    """What the revocation store holds about one token: whether its id is revoked, and the
    times at or before which its account's tokens (``account_before_ms``) and every token
    (``all_before_ms``) are revoked (0: none)."""

    token_revoked: bool = False
    account_before_ms: int = 0
    all_before_ms: int = 0


@attrs.frozen
class RevocationChanges:
    """Revocations recorded after a cursor, oldest first, and the cursor to read on from.
    ``complete`` is False when some recorded after the cursor were dropped unread (the log
    is bounded): whoever follows the changes must then check again whatever they hold."""

    revocations: tuple[Revocation, ...]
    cursor: str
    complete: bool = True


@attrs.frozen
class Grant:
    """What a shared token bucket gave (``ports.RateLimits.take``): ``tokens`` taken (0 or
    more), and when none was, the seconds until one will be there."""

    tokens: int
    retry_after_s: float = 0.0
