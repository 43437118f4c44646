"""One error tree with stable codes.

Every error a client can see derives from :class:`ChatError` and carries a stable ``code``
(documented in docs/protocol.md). Each transport maps the tree to its own signal in one place:
HTTP status in ``edge/errors.py``, WebSocket close code in ``wire/frames.py``.

::

    ChatError
    ├── BadRequest            400  malformed input: bad JSON, missing field, bad value
    │   ├── InvalidName
    │   └── MessageTooLarge
    ├── Unauthorized          401  missing, bad or expired token; wrong password
    ├── Forbidden             403  authenticated but not allowed (admin only)
    ├── NotFound              404  unknown room, user or route
    ├── MethodNotAllowed      405
    ├── Conflict              409  name already taken
    ├── PayloadTooLarge       413  request body over the limit
    ├── RoomFull              409  room reached its member limit
    ├── RateLimited           429  too many messages; retry later
    │   └── TooManyConnections     too many WebSockets of one user or client address
    └── Unavailable           503  a backend is down; retry later (``retry_after_s``)
        └── OffsetUnknown          the bus lost a room's offset (Redis lost its data): the
                                   node starts it again above what it and the archive know
"""

from __future__ import annotations


class ChatError(Exception):
    """Base of every client-visible error; ``code`` is stable, ``message`` is for people."""

    code = "internal"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadRequest(ChatError):
    code = "bad_request"


class InvalidName(BadRequest):
    code = "invalid_name"


class MessageTooLarge(BadRequest):
    code = "message_too_large"


class Unauthorized(ChatError):
    code = "unauthorized"


class Forbidden(ChatError):
    code = "forbidden"


class NotFound(ChatError):
    code = "not_found"


class MethodNotAllowed(ChatError):
    code = "method_not_allowed"

    def __init__(self, message: str, *, allowed: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.allowed = allowed


class Conflict(ChatError):
    code = "conflict"


class RoomFull(ChatError):
    code = "room_full"


class PayloadTooLarge(ChatError):
    code = "payload_too_large"


class RateLimited(ChatError):
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooManyConnections(RateLimited):
    """A WebSocket over a cap of its user or client address (``edge/admission.py``)."""

    code = "too_many_connections"


class Unavailable(ChatError):
    """A backend (database, bus, archive) cannot be reached; the operation may be retried."""

    code = "unavailable"

    def __init__(
        self, message: str, *, retry_after_s: float = 1.0, code: str | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class OffsetUnknown(Unavailable):
    """The bus no longer knows a room's newest offset (Redis restarted without its data, or
    evicted it) and the caller must tell it where to continue (``Bus.restore``). A node that
    meets it outside that path answers 503 like any ``Unavailable``."""
