"""The edge's input rules and connection caps as pure functions: JSON depth and surrogates,
64-bit integers, the ``refresh`` frame, Origin matching, the caps and their counting, and the
settings that configure them."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatnode.config import ConfigError, load_config
from chatnode.core import errors, validation
from chatnode.edge.admission import Admission, Caps, check_origin, parse_origins, same_origin
from chatnode.wire import frames
from chatnode.wire.frames import Dialect

LIMITS = validation.Limits()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_json_depth_is_bounded_and_counted_exactly() -> None:
    assert validation.json_value(nested(32), max_depth=32) == json.loads(nested(32))
    assert validation.json_value('{"a": "[[[[[[[[[["}', max_depth=1) == {"a": "[" * 10}
    for text in (nested(33), nested(30_000), '{"a":' * 40 + "1" + "}" * 40):
        with pytest.raises(errors.BadRequest) as refused:
            validation.json_value(text, max_depth=32)
        assert refused.value.code == "invalid_json"


def test_json_lone_surrogates_are_refused_and_pairs_kept() -> None:
    assert validation.json_value('"\\ud83d\\ude00"', max_depth=4) == "\U0001f600"
    for text in ('"\\ud800"', '{"\\udfff": 1}', '["ok", {"a": "x\\uDBFFy"}]'):
        with pytest.raises(errors.BadRequest):
            validation.json_value(text, max_depth=4)
    for data in (b'"\xed\xa0\x80"', b"\xff", b'{"a": "\xc3"}'):  # not UTF-8
        with pytest.raises(errors.BadRequest):
            validation.json_value(data, max_depth=4)


@given(
    st.recursive(
        st.none() | st.integers() | st.text(), lambda c: st.lists(c) | st.dictionaries(st.text(), c)
    )
)
def test_json_value_never_raises_anything_but_bad_request(value: object) -> None:
    text = json.dumps(value)
    try:
        assert validation.json_value(text, max_depth=3) == value
    except errors.BadRequest as exc:
        assert exc.code == "invalid_json"


def test_query_integers_fit_64_bits() -> None:
    top = (1 << 63) - 1
    assert validation.optional_int(str(top), "after") == top
    assert validation.optional_int(str(-top - 1), "x", minimum=-(1 << 63)) == -top - 1
    for bad in (str(top + 1), str(1 << 64), "9" * 5000, " 1", "1_0", "0x1", "\u0661", "1.0"):
        with pytest.raises(errors.BadRequest) as refused:
            validation.optional_int(bad, "after")
        assert refused.value.code == "invalid_parameter"
    with pytest.raises(errors.BadRequest):
        validation.positive_int(str(1 << 63), "limit", default=5, maximum=10)


def test_names_and_passwords_must_be_valid_unicode() -> None:
    with pytest.raises(errors.InvalidName):
        validation.room_name("lobby \ud800", LIMITS)
    with pytest.raises(errors.BadRequest) as refused:
        validation.password("\udc00" * 10, LIMITS)
    assert refused.value.code == "invalid_password"


def test_refresh_frames() -> None:
    frame = frames.parse_client_frame(
        '{"type": "refresh", "token": "abc", "id": "r"}', Dialect.V1, LIMITS
    )
    assert frame == frames.Refresh("abc", "r")
    for bad in ('{"type": "refresh"}', '{"type": "refresh", "token": 1}',
                json.dumps({"type": "refresh", "token": "t" * 5000})):  # fmt: skip
        rejected = frames.parse_client_frame(bad, Dialect.V1, LIMITS)
        assert isinstance(rejected, frames.Rejected) and rejected.error.code == "invalid_frame"
    deep = frames.parse_client_frame(nested(12_000), Dialect.V1, LIMITS)
    assert isinstance(deep, frames.Rejected) and deep.error.code == "invalid_json"


@pytest.mark.parametrize(
    ("origin", "host", "same"),
    [
        ("http://chat.example", "chat.example", True),
        ("https://chat.example", "chat.example:443", True),
        ("http://chat.example", "chat.example:80", True),
        ("https://chat.example:8443", "chat.example", True),  # nginx's $host has no port
        ("https://chat.example:8443", "chat.example:8443", True),
        ("http://CHAT.example", "chat.EXAMPLE", True),
        ("http://[::1]:8080", "[::1]:8080", True),
        ("https://chat.example:8443", "chat.example:9443", False),
        ("http://chat.example", "chat.example:8080", False),
        ("http://evil.example", "chat.example", False),
        ("http://chat.example.evil.example", "chat.example", False),
        ("null", "chat.example", False),
        ("file://", "chat.example", False),
        ("ftp://chat.example", "chat.example", False),
        ("http://chat.example:99999", "chat.example", False),
        ("http://chat.example", "", False),
    ],
)
def test_same_origin(origin: str, host: str, same: bool) -> None:
    assert same_origin(origin, host) is same


def test_origins_allowed_by_setting() -> None:
    allowed = parse_origins(" https://app.example/ , http://other.example:8080")
    check_origin({"origin": "https://APP.example", "host": "chat.example"}, allowed)
    check_origin({"host": "chat.example"}, allowed)  # no Origin: not a browser
    with pytest.raises(errors.Forbidden) as refused:
        check_origin({"origin": "http://other.example", "host": "chat.example"}, allowed)
    assert refused.value.code == "origin_not_allowed"
    check_origin({"origin": "http://anything"}, parse_origins("*"))


def test_caps_derive_from_the_descriptor_limit() -> None:
    caps = Caps.derive(
        max_connections=0, fd_reserve=64, max_websockets=0, per_user=1, per_address=1
    )
    assert 1 <= caps.max_websockets < caps.max_connections
    caps = Caps.derive(
        max_connections=192, fd_reserve=0, max_websockets=0, per_user=1, per_address=1
    )
    assert (caps.max_connections, caps.max_websockets) == (192, 173)
    caps = Caps.derive(
        max_connections=10, fd_reserve=0, max_websockets=50, per_user=1, per_address=1
    )
    assert caps.max_websockets == 10


def test_admission_counts_per_user_address_and_node() -> None:
    admission = Admission(Caps(max_connections=10, max_websockets=4, per_user=2, per_address=3))
    admission.admit("ann", "192.0.2.1")
    admission.admit("ann", "192.0.2.1")
    with pytest.raises(errors.TooManyConnections):
        admission.admit("ann", "192.0.2.2")
    admission.admit("bob", "192.0.2.1")
    with pytest.raises(errors.TooManyConnections):
        admission.admit("eve", "192.0.2.1")  # the address holds its 3 already
    admission.admit("eve", "127.0.0.1")  # this host's addresses are not capped per address
    with pytest.raises(errors.Unavailable) as full:
        admission.admit("zed", "unix")
    assert full.value.code == "node_full" and admission.refused == 3
    admission.release("ann", "192.0.2.1")
    admission.admit("ann", "192.0.2.9")
    for user, address in [("ann", "192.0.2.1"), ("ann", "192.0.2.9"), ("bob", "192.0.2.1"),
                          ("eve", "127.0.0.1")]:  # fmt: skip
        admission.release(user, address)
    assert admission.websockets == 0 and not admission._users and not admission._addresses


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CHATNODE_MAX_JSON_DEPTH": "0"}, "MAX_JSON_DEPTH"),
        ({"CHATNODE_WS_IDLE_TIMEOUT_S": "1", "CHATNODE_WS_PING_INTERVAL_S": "5"}, "IDLE"),
        ({"CHATNODE_MAX_WEBSOCKETS_PER_USER": "0"}, "PER_USER"),
        ({"CHATNODE_MAX_CONNECTIONS": "-1"}, "MAX_CONNECTIONS"),
        ({"CHATNODE_ALLOWED_ORIGINS": "chat.example"}, "ALLOWED_ORIGINS"),
        ({"CHATNODE_REPLAY_TIMEOUT_S": "0"}, "REPLAY_TIMEOUT"),
    ],
)
def test_edge_settings_are_checked(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(env)


def test_edge_settings_defaults() -> None:
    config = load_config({"CHATNODE_ALLOWED_ORIGINS": "https://a.example, *"})
    assert config.limits.max_json_depth == 32
    assert (config.max_websockets_per_user, config.max_websockets_per_address) == (100, 500)
    assert (config.ws_idle_timeout_s, config.replay_timeout_s) == (90.0, 60.0)
