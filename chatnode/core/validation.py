"""Input limits and validation. Pure functions; each raises a ``BadRequest`` subclass that says
what was wrong and what is allowed.

Rules for everything a client sends (docs/security.md, "Connections and memory"):

1. Integers fit every backend: a query integer outside ``MIN_INT64..MAX_INT64`` (MySQL
   BIGINT, Elasticsearch long, SQLite INTEGER) is ``invalid_parameter``, as is anything but
   ASCII digits with an optional sign.
2. JSON (REST bodies, v1 frames) is UTF-8 text of one value nested at most ``max_json_depth``
   levels, with no lone surrogate in any string (``\\ud800`` escapes decode to one, which no
   backend stores and no encoder writes back): otherwise ``invalid_json``.
3. Names, passwords and messages are valid Unicode (no lone surrogate), whatever decoded them.

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

import json
import re
import unicodedata
from typing import Final

import attrs

from chatnode.core.errors import BadRequest, InvalidName, MessageTooLarge

USER_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")
DEFAULT_MAX_JSON_DEPTH = 32
MAX_INT64 = (1 << 63) - 1
MIN_INT64 = -(1 << 63)
_INTEGER_RE = re.compile(r"[+-]?[0-9]{1,19}")
_SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F]")

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
    max_group_members: int = 200
    max_page: int = 500
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH


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
    if not _is_unicode(value):
        raise BadRequest(
            "password is not valid Unicode (a lone surrogate)", code="invalid_password"
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
    number = _integer(value, name)
    if not 1 <= number <= maximum:
        raise BadRequest(f"{name} must be between 1 and {maximum}", code="invalid_parameter")
    return number


def optional_int(
    value: str | None, name: str, *, minimum: int = 0, maximum: int = MAX_INT64
) -> int | None:
    """A query parameter that may be absent (None) or an integer in ``minimum..maximum``
    (Rule 1: at most ``MAX_INT64`` whatever the caller asks)."""
    if value is None or value == "":
        return None
    number = _integer(value, name)
    if number < minimum:
        raise BadRequest(f"{name} must be at least {minimum}", code="invalid_parameter")
    if number > min(maximum, MAX_INT64):
        raise BadRequest(
            f"{name} must be at most {min(maximum, MAX_INT64)}", code="invalid_parameter"
        )
    return number


def _integer(value: str, name: str) -> int:
    """Rule 1: ASCII digits with an optional sign, within 64 bits."""
    if _INTEGER_RE.fullmatch(value) is None:
        raise BadRequest(f"{name} must be an integer", code="invalid_parameter")
    number = int(value)
    if not MIN_INT64 <= number <= MAX_INT64:
        raise BadRequest(f"{name} is out of range (64-bit integers only)", code="invalid_parameter")
    return number


def json_value(data: str | bytes, *, max_depth: int) -> object:
    """The JSON value of ``data`` (Rule 2), or ``BadRequest`` (``invalid_json``).

    The depth is counted only when the text has more brackets than ``max_depth`` (two
    ``str.count`` calls otherwise) and the strings are walked only when the text has a
    surrogate escape, so an ordinary v1 frame pays ~0.5 µs over ``json.loads`` for both."""
    if isinstance(data, bytes):
        try:
            data = data.decode()
        except UnicodeDecodeError:
            raise BadRequest("JSON must be UTF-8 text", code="invalid_json") from None
    try:
        value = json.loads(data)
    except RecursionError:
        raise _too_deep(max_depth) from None
    except ValueError:
        raise BadRequest("not valid JSON", code="invalid_json") from None
    if data.count("[") + data.count("{") > max_depth and _depth(value) > max_depth:
        raise _too_deep(max_depth)
    if "\\u" in data and _SURROGATE_ESCAPE_RE.search(data) and not _all_unicode(value):
        raise BadRequest(
            "JSON holds a lone surrogate (\\ud800-\\udfff not in a pair): not valid Unicode",
            code="invalid_json",
        )
    return value


def _too_deep(max_depth: int) -> BadRequest:
    return BadRequest(f"JSON is nested more than {max_depth} levels deep", code="invalid_json")


def _depth(value: object) -> int:
    """Nesting depth of a decoded JSON value (a scalar is 0, ``{}`` 1), without recursion."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in item)
    return deepest


def _all_unicode(value: object) -> bool:
    """Every string (keys too) of a decoded JSON value is valid Unicode."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not _is_unicode(item):
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _is_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
