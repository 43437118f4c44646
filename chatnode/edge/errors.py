"""The one place that maps the error tree (core/errors.py) to HTTP."""

from __future__ import annotations

import json
import math

from chatnode.core import errors

_STATUS: tuple[tuple[type[errors.ChatError], int], ...] = (
    (errors.PayloadTooLarge, 413),
    (errors.BadRequest, 400),
    (errors.Unauthorized, 401),
    (errors.Forbidden, 403),
    (errors.NotFound, 404),
    (errors.MethodNotAllowed, 405),
    (errors.Conflict, 409),
    (errors.RoomFull, 409),
    (errors.RateLimited, 429),
    (errors.Unavailable, 503),
)


def http_status(error: errors.ChatError) -> int:
    for cls, status in _STATUS:
        if isinstance(error, cls):
            return status
    return 500


def error_body(code: str, message: str, **extra: object) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, **extra}}).encode()


def error_response_parts(error: errors.ChatError) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, extra headers and JSON body for an error."""
    headers: list[tuple[str, str]] = []
    extra: dict[str, object] = {}
    if isinstance(error, errors.Unavailable | errors.RateLimited):
        retry = max(1, math.ceil(error.retry_after_s))
        headers.append(("Retry-After", str(retry)))
        extra["retry_after_s"] = retry
    if isinstance(error, errors.MethodNotAllowed) and error.allowed:
        headers.append(("Allow", ", ".join(error.allowed)))
    return http_status(error), headers, error_body(error.code, error.message, **extra)
