"""Input limits and validation. Pure functions; each raises a ``BadRequest`` subclass that says
what was wrong and what is allowed.

Names (user and room) are normalised to Unicode NFKC before anything else, so that a name
has one form whatever the keyboard produced (full-width letters, ligatures, compatibility
characters). Characters that do not show, or that change how the text around them shows,
are refused: control and format characters (bidirectional overrides and isolates, zero-width
spaces and joiners, the byte-order mark), line and paragraph separators, surrogates,
private-use and unassigned code points, and the Hangul fillers. User names are then
ASCII letters, digits, ``_``, ``.`` and ``-`` (so no two of them look alike but for case), and
unique by :func:`name_key`: ``ann`` and ``ANN`` are one name.

Passwords are checked when they are set, never when they are used: at least
``min_password_chars`` characters, at least ``MIN_PASSWORD_DISTINCT_CHARS`` different ones,
not the user name, not one of ``COMMON_PASSWORDS``.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

import attrs

from chatnode.core.errors import BadRequest, InvalidName, MessageTooLarge

USER_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")

_INVISIBLE_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_FILLERS: Final = frozenset("\u034f\u115f\u1160\u180e\u2800\u3164\uffa0")
"""Letters or marks that render as nothing (combining grapheme joiner, Hangul fillers,
Mongolian vowel separator, blank Braille pattern)."""

MIN_PASSWORD_DISTINCT_CHARS: Final = 5

COMMON_PASSWORDS: Final = frozenset(
    {
        "0000000000",
        "0123456789",
        "0987654321",
        "1111111111",
        "1122334455",
        "1234567890",
        "12345678910",
        "123456789a",
        "123456789q",
        "1234554321",
        "1234567890q",
        "1234qwerty",
        "1q2w3e4r5t",
        "1q2w3e4r5t6y",
        "1qaz2wsx3edc",
        "a123456789",
        "abcd123456",
        "abcdefghij",
        "asdfghjkl1",
        "azertyuiop",
        "changeme123",
        "football123",
        "iloveyou12",
        "letmein123",
        "monkey1234",
        "password01",
        "password1!",
        "password12",
        "password123",
        "password1234",
        "password!1",
        "passw0rd123",
        "princess12",
        "q1w2e3r4t5",
        "qazwsxedc123",
        "qwe123qwe123",
        "qwerty1234",
        "qwerty12345",
        "qwerty123456",
        "qwertyuiop",
        "qwertyuiop1",
        "sunshine12",
        "superman123",
        "trustno1234",
        "welcome123",
        "zaq12wsxcde",
        "zxcvbnm123",
    }
)
"""The most common passwords of ten characters or more in public breach lists (compared
case-insensitively). Small on purpose: it refuses what a guesser tries first, nothing more."""


def name_key(name: str) -> str:
    """The form under which user names are unique and looked up: NFKC, case-folded, NFKC
    again (Unicode's caseless match for identifiers). For the names chatnode accepts (ASCII,
    after NFKC) it is the name in lower case."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


def invisible_character(value: str) -> str | None:
    """The first character of ``value`` that does not show or changes how text shows
    (module docstring), as ``U+XXXX``; None if there is none."""
    for ch in value:
        if ch in _FILLERS or unicodedata.category(ch) in _INVISIBLE_CATEGORIES:
            return f"U+{ord(ch):04X}"
    return None


@attrs.frozen
class Limits:
    """Documented defaults; every one is configurable (see README, Configuration)."""

    max_user_name_chars: int = 32
    max_room_name_chars: int = 100
    min_password_chars: int = 10
    max_password_chars: int = 256
    max_message_bytes: int = 4096
    max_room_members: int = 1000
    max_page: int = 500


def user_name(value: object, limits: Limits) -> str:
    """The name in NFKC (case kept: it is shown as registered)."""
    if not isinstance(value, str) or not value:
        raise InvalidName("user name must be a non-empty string")
    if len(value) > 4 * limits.max_user_name_chars:  # before normalising: bounded work
        raise InvalidName(f"user name must be at most {limits.max_user_name_chars} characters")
    value = unicodedata.normalize("NFKC", value)
    hidden = invisible_character(value)
    if hidden is not None:
        raise InvalidName(
            f"user name must not contain control, bidirectional or zero-width characters ({hidden})"
        )
    if len(value) > limits.max_user_name_chars:
        raise InvalidName(f"user name must be at most {limits.max_user_name_chars} characters")
    if not USER_NAME_RE.fullmatch(value):
        raise InvalidName("user name may contain only letters, digits, '_', '.' and '-'")
    return value


def room_name(value: object, limits: Limits) -> str:
    """The name in NFKC, without surrounding white space."""
    if not isinstance(value, str):
        raise InvalidName("room name must be a string")
    if len(value) > 4 * limits.max_room_name_chars:  # before normalising: bounded work
        raise InvalidName(f"room name must be at most {limits.max_room_name_chars} characters")
    value = unicodedata.normalize("NFKC", value).strip()
    if not value:
        raise InvalidName("room name must not be empty")
    if len(value) > limits.max_room_name_chars:
        raise InvalidName(f"room name must be at most {limits.max_room_name_chars} characters")
    hidden = invisible_character(value)
    if hidden is not None:
        raise InvalidName(
            f"room name must not contain control, bidirectional or zero-width characters ({hidden})"
        )
    return value


def password(value: object, limits: Limits) -> str:
    """A password as it is used (to sign in): a string of a bounded length, nothing more."""
    if not isinstance(value, str) or not value:
        raise BadRequest("password must be a non-empty string", code="invalid_password")
    if len(value) > limits.max_password_chars:
        raise BadRequest(
            f"password must be at most {limits.max_password_chars} characters",
            code="invalid_password",
        )
    return value


def new_password(value: object, limits: Limits, *, user: str) -> str:
    """A password being set for ``user``: strong enough (module docstring)."""
    value = password(value, limits)
    if len(value) < limits.min_password_chars:
        raise BadRequest(
            f"password must be {limits.min_password_chars} to "
            f"{limits.max_password_chars} characters",
            code="invalid_password",
        )
    if len(set(value)) < MIN_PASSWORD_DISTINCT_CHARS:
        raise BadRequest(
            f"password must use at least {MIN_PASSWORD_DISTINCT_CHARS} different characters",
            code="invalid_password",
        )
    folded = value.casefold()
    if folded in COMMON_PASSWORDS or folded == name_key(user):
        raise BadRequest(
            "password is too easy to guess (a common password, or the user name); choose another",
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
