"""Validation, passwords and tokens, configuration: pure functions."""

from __future__ import annotations

import pytest

from chatnode.config import ConfigError, load_config, markdown_table
from chatnode.core import auth, validation
from chatnode.core.errors import BadRequest, InvalidName, MessageTooLarge, Unauthorized

LIMITS = validation.Limits()


def test_user_names() -> None:
    assert validation.user_name("ann_1.b-c", LIMITS) == "ann_1.b-c"
    for bad in ("", "a b", "ann!", "x" * 33, None, 5, "émile"):
        with pytest.raises(InvalidName):
            validation.user_name(bad, LIMITS)


def test_room_names_are_stripped_and_bounded() -> None:
    assert validation.room_name("  lobby  ", LIMITS) == "lobby"
    for bad in ("", "   ", "a\x00b", "x" * 101, 3):
        with pytest.raises(InvalidName):
            validation.room_name(bad, LIMITS)


def test_message_size_is_counted_in_utf8_bytes() -> None:
    limits = validation.Limits(max_message_bytes=4)
    assert validation.message_text("éé", limits) == "éé"
    with pytest.raises(MessageTooLarge):
        validation.message_text("ééé", limits)
    with pytest.raises(BadRequest):
        validation.message_text("\ud800", limits)


def test_query_integers() -> None:
    assert validation.positive_int(None, "limit", default=5, maximum=10) == 5
    assert validation.positive_int("7", "limit", default=5, maximum=10) == 7
    for bad in ("0", "11", "x", "-1"):
        with pytest.raises(BadRequest):
            validation.positive_int(bad, "limit", default=5, maximum=10)


def test_password_hash_round_trip() -> None:
    stored = auth.hash_password("correct horse", cost_log2=10)
    assert auth.verify_password("correct horse", stored)
    assert not auth.verify_password("wrong horse", stored)
    assert not auth.verify_password("x", "garbage")


def test_tokens_expire_and_are_signed() -> None:
    claims = auth.Claims("ann", False, 1060, issued_at_ms=1_000_000, account_id=1, token_id="t1")
    token = auth.issue_token(claims, secret="s1-a-secret-of-thirty-two-bytes!!")
    assert (
        auth.verify_token(token, secret="s1-a-secret-of-thirty-two-bytes!!", now_s=1059).user
        == "ann"
    )
    with pytest.raises(Unauthorized) as expired:
        auth.verify_token(token, secret="s1-a-secret-of-thirty-two-bytes!!", now_s=1060)
    assert expired.value.code == "token_expired"
    with pytest.raises(Unauthorized) as forged:
        auth.verify_token(token, secret="other-secret-of-thirty-two-bytes!!", now_s=1000)
    assert forged.value.code == "token_invalid"


def test_config_from_environment_and_overrides() -> None:
    config = load_config({"CHATNODE_PORT": "9000", "CHATNODE_INSECURE": "yes"}, {"host": "0.0.0.0"})
    assert (config.port, config.insecure, config.host, config.embedded) == (
        9000,
        True,
        "0.0.0.0",
        True,
    )


def test_config_errors_name_the_variable() -> None:
    with pytest.raises(ConfigError, match="CHATNODE_PORT"):
        load_config({"CHATNODE_PORT": "eighty"})
    with pytest.raises(ConfigError, match="cluster mode needs all"):
        load_config({"CHATNODE_REDIS_URL": "redis://x"})
    with pytest.raises(ConfigError, match="CHATNODE_MYSQL_URL"):
        load_config({"CHATNODE_MYSQL_URL": "postgres://x"})
    with pytest.raises(ConfigError, match="CHATNODE_CACHE_LOCAL_TTL_S"):
        load_config({"CHATNODE_CACHE_TTL_S": "1", "CHATNODE_CACHE_LOCAL_TTL_S": "2"})
    with pytest.raises(ConfigError, match="CHATNODE_UNIX_SOCKET must be an absolute path"):
        load_config({"CHATNODE_UNIX_SOCKET": "run/node.sock"})
    for mode in ("rw", "999", "7777"):
        with pytest.raises(ConfigError, match="CHATNODE_UNIX_SOCKET_MODE"):
            load_config({"CHATNODE_UNIX_SOCKET_MODE": mode})
    assert load_config({"CHATNODE_UNIX_SOCKET_MODE": "0666"}).unix_socket_mode == "0666"


def test_config_file(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "chatnode.toml"
    path.write_text("port = 7000\nhistory_on_join = 5\n")
    config = load_config({"CHATNODE_CONFIG": str(path), "CHATNODE_PORT": "7001"})
    assert (config.port, config.history_on_join) == (7001, 5)
    path.write_text("bogus = 1\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config({"CHATNODE_CONFIG": str(path)})


def test_markdown_table_lists_every_setting() -> None:
    table = markdown_table()
    assert "`CHATNODE_REDIS_URL`" in table and "`--port`" in table


def test_readme_configuration_table_is_current() -> None:
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme.split("<!-- config-table -->\n")[1].split("<!-- /config-table -->")[0]
    assert table.strip() == markdown_table().strip(), "regenerate with: chatnode config --markdown"
