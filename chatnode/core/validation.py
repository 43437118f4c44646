"""Input limits and validation. Pure functions; each raises a ``BadRequest`` subclass that says
what was wrong and what is allowed."""

from __future__ import annotations

import re

import attrs

from chatnode.core.errors import BadRequest, InvalidName, MessageTooLarge

USER_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")


@attrs.frozen
class Limits:
    """Documented defaults; every one is configurable (see README, Configuration)."""

    max_user_name_chars: int = 32
    max_room_name_chars: int = 100
    min_password_chars: int = 8
    max_password_chars: int = 256
    max_message_bytes: int = 4096
    max_room_members: int = 1000
    max_page: int = 500


def user_name(value: object, limits: Limits) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidName("user name must be a non-empty string")
    if len(value) > limits.max_user_name_chars:
        raise InvalidName(f"user name must be at most {limits.max_user_name_chars} characters")
    if not USER_NAME_RE.fullmatch(value):
        raise InvalidName("user name may contain only letters, digits, '_', '.' and '-'")
    return value


def room_name(value: object, limits: Limits) -> str:
    if not isinstance(value, str):
        raise InvalidName("room name must be a string")
    value = value.strip()
    if not value:
        raise InvalidName("room name must not be empty")
    if len(value) > limits.max_room_name_chars:
        raise InvalidName(f"room name must be at most {limits.max_room_name_chars} characters")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise InvalidName("room name must not contain control characters")
    return value


def password(value: object, limits: Limits) -> str:
    if not isinstance(value, str):
        raise BadRequest("password must be a string", code="invalid_password")
    if not limits.min_password_chars <= len(value) <= limits.max_password_chars:
        raise BadRequest(
            f"password must be {limits.min_password_chars} to "
            f"{limits.max_password_chars} characters",
            code="invalid_password",
        )
    return value


def message_text(value: object, limits: Limits) -> str:
    if not isinstance(value, str):
        raise BadRequest("message must be a string", code="invalid_message")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > limits.max_message_bytes:
        raise MessageTooLarge(
            f"message is {size} bytes; the limit is {limits.max_message_bytes} bytes (UTF-8)"
        )
    if not value.strip():
        raise BadRequest("message must not be empty", code="invalid_message")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("message is not valid Unicode", code="invalid_message") from None
    return value


def positive_int(value: str | None, name: str, *, default: int, maximum: int) -> int:
    """A query parameter that must be an integer in ``1..maximum``."""
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise BadRequest(f"{name} must be an integer", code="invalid_parameter") from None
    if not 1 <= number <= maximum:
        raise BadRequest(f"{name} must be between 1 and {maximum}", code="invalid_parameter")
    return number


def optional_int(value: str | None, name: str, *, minimum: int = 0) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise BadRequest(f"{name} must be an integer", code="invalid_parameter") from None
    if number < minimum:
        raise BadRequest(f"{name} must be at least {minimum}", code="invalid_parameter")
    return number
