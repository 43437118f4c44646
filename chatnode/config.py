"""Configuration: one frozen ``Config``, built once at the edge of the process from
``CHATNODE_*`` environment variables, an optional TOML file (``CHATNODE_CONFIG``) and command
line flags, in increasing precedence. Nothing below ``app.py`` reads the environment.

Every setting is listed in ``SETTINGS`` with its variable, type, default and meaning; the
README's configuration table is generated from it (``chatnode config --markdown``).
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from chatnode.core.validation import Limits


def _setting(default: Any, help: str) -> Any:
    return attrs.field(default=default, metadata={"help": help})


@attrs.frozen
class Setting:
    field: str
    kind: type
    default: Any
    help: str

    @property
    def env(self) -> str:
        return "CHATNODE_" + self.field.upper()


def _settings() -> tuple[Setting, ...]:
    kinds = {"str": str, "int": int, "float": float, "bool": bool}
    return tuple(
        Setting(f.name, kinds[str(f.type)], f.default, f.metadata["help"])
        for f in attrs.fields(Config)
    )


class ConfigError(ValueError):
    """A setting has a value chatnode cannot use; the message names the variable."""


@attrs.frozen
class Config:
    host: str = _setting("127.0.0.1", "address to listen on")
    port: int = _setting(8080, "TCP port to listen on (0 picks a free one)")
    unix_socket: str = _setting(
        "",
        "also listen on this Unix socket path: nginx on the same host proxies through it at"
        " about half the kernel cost per frame of TCP loopback",
    )
    unix_socket_mode: str = _setting(
        "660", "permissions (octal) of the Unix socket; nginx's user needs write access"
    )
    data_dir: str = _setting(
        "./data", "embedded mode: where chatnode.sqlite3 and the token secret live"
    )
    insecure: bool = _setting(
        False, "seed's open mode: `?user=` joins without a token, admin calls need none"
    )
    node_id: str = _setting(
        "", "this node's id in presence and the archive stream's lease (default: host-pid)"
    )
    mysql_url: str = _setting(
        "", "mysql://user:pass@host:port/db — directory in MySQL instead of SQLite"
    )
    redis_url: str = _setting("", "redis://host:port/db — bus, presence and caches in Redis")
    elasticsearch_url: str = _setting("", "http://host:port — archive and search in Elasticsearch")
    key_prefix: str = _setting("chatnode", "prefix of every Redis key and Elasticsearch index")
    room_log_length: int = _setting(
        1000, "messages per room kept in the Redis room log (older ones come from the archive)"
    )
    cache_ttl_s: float = _setting(5.0, "lifetime of cached rooms lists and room users in Redis")
    cache_local_ttl_s: float = _setting(
        0.1, "how long a node reuses a cached rooms page or room users without asking Redis"
    )
    mysql_pool_size: int = _setting(8, "MySQL connections (and threads) per node")
    archive_linger_s: float = _setting(
        1.0, "light traffic: the archiver waits this long to fill a batch (one bulk a second)"
    )
    archive_claim_idle_s: float = _setting(
        10.0,
        "one node archives at a time: another takes over this long after it stopped or"
        " could not archive a batch (its lease)",
    )
    dedup_window_s: float = _setting(
        300.0,
        "a v1 send whose `id` the user already sent in the room this recently gets that"
        " message's ack again and stores nothing (retrying a send is safe)",
    )
    unarchived_keep_bytes: int = _setting(
        32 << 20,
        "cluster: each node keeps the messages it published until archived, to write them back"
        " if Redis loses them; at most this many bytes (oldest dropped first)",
    )
    redis_settle_s: float = _setting(
        10.0,
        "cluster: after Redis lost its data, a room no node has restored waits this long"
        " before it continues above the archive's newest offset",
    )
    jwt_secret: str = _setting(
        "", "HS256 secret for tokens (embedded default: generated into data_dir)"
    )
    token_ttl_s: float = _setting(24 * 3600.0, "token lifetime")
    password_cost_log2: int = _setting(14, "scrypt cost (log2 N) for password hashes")
    password_concurrency: int = _setting(
        2,
        "scrypt hashes and checks (sign-ups, sign-ins, password changes) a node runs at once;"
        " each holds 16 MiB (at cost 14) and a core",
    )
    password_queue: int = _setting(
        32,
        "sign-ups, sign-ins and password changes waiting for a turn; more get 503 `unavailable`"
        " with Retry-After",
    )
    min_password_chars: int = _setting(
        10, "shortest password accepted when one is set (also: 5 different characters, not common)"
    )
    ticket_ttl_s: float = _setting(
        30.0, "lifetime of a WebSocket ticket (`POST /v1/tickets`, used once with `?ticket=`)"
    )
    tickets_per_account: int = _setting(
        10, "WebSocket tickets an account may get per ticket lifetime (then 429)"
    )
    revocation_poll_s: float = _setting(
        1.0,
        "how often a node reads the revocations other nodes recorded (sign-outs, password"
        " changes, deletions) and closes the WebSockets they end (4501)",
    )
    history_on_join: int = _setting(100, "messages replayed when joining without `since`")
    max_replay: int = _setting(10_000, "most messages replayed on a `since` resume")
    max_message_bytes: int = _setting(4096, "largest chat message (UTF-8 bytes)")
    max_user_name_chars: int = _setting(32, "longest user name")
    max_room_name_chars: int = _setting(100, "longest room name")
    max_room_members: int = _setting(1000, "members a room may have")
    max_header_bytes: int = _setting(16 * 1024, "largest HTTP request head")
    max_body_bytes: int = _setting(64 * 1024, "largest HTTP request body")
    handshake_timeout_s: float = _setting(10.0, "time to send a whole request head")
    idle_timeout_s: float = _setting(60.0, "keep-alive HTTP connection idle limit")
    ws_ping_interval_s: float = _setting(30.0, "server ping interval on idle WebSockets")
    trusted_proxies: str = _setting(
        "127.0.0.1/8,::1",
        "addresses or networks (comma-separated) whose X-Real-IP / X-Forwarded-For name the"
        " client (nginx); Unix-socket peers always count; from others the headers are ignored",
    )
    send_backlog_bytes: int = _setting(
        1 << 20, "per-connection unsent bytes before slow-consumer disconnect"
    )
    rate_messages_per_s: float = _setting(20.0, "sustained messages per second per connection")
    rate_burst: int = _setting(40, "message burst allowed per connection")
    presence_ttl_s: float = _setting(
        15.0, "node heartbeat lifetime; a dead node's presence is reaped after it"
    )
    drain_timeout_s: float = _setting(10.0, "SIGTERM: time to close clients and flush the archiver")
    backend_timeout_s: float = _setting(
        5.0, "limit on one backend call (MySQL statements, Redis, ES)"
    )
    log_level: str = _setting("INFO", "DEBUG, INFO, WARNING, ERROR")

    @property
    def limits(self) -> Limits:
        return Limits(
            max_user_name_chars=self.max_user_name_chars,
            max_room_name_chars=self.max_room_name_chars,
            max_message_bytes=self.max_message_bytes,
            max_room_members=self.max_room_members,
            min_password_chars=self.min_password_chars,
        )

    @property
    def embedded(self) -> bool:
        return not (self.mysql_url or self.redis_url or self.elasticsearch_url)


REMOVED_SETTINGS: dict[str, str] = {
    "admins": "admin is a flag of the account in the directory, not a name anyone can"
    " register; unset it and run `chatnode users grant-admin NAME` for each admin",
}
"""Settings that are refused, with what to do instead (a node started with one refuses to
start rather than run with a meaning it no longer has)."""


def _convert(setting: Setting, raw: object, source: str) -> Any:
    try:
        if setting.kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if setting.kind is int and isinstance(raw, float):
            raise ValueError(raw)
        return setting.kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: expected {setting.kind.__name__}, got {raw!r}") from None


def load_config(environ: Mapping[str, str], overrides: Mapping[str, Any] | None = None) -> Config:
    """Environment, then the TOML file named by ``CHATNODE_CONFIG``, then ``overrides``
    (command line); validated. Raise ``ConfigError`` naming the bad setting."""
    by_field = {s.field: s for s in SETTINGS}
    values: dict[str, Any] = {}
    for field, replacement in REMOVED_SETTINGS.items():
        if environ.get("CHATNODE_" + field.upper(), "").strip():
            raise ConfigError(f"CHATNODE_{field.upper()} is no longer read: {replacement}")
    config_path = environ.get("CHATNODE_CONFIG")
    if config_path:
        try:
            table = tomllib.loads(Path(config_path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"CHATNODE_CONFIG={config_path}: {exc}") from None
        for key, raw in table.items():
            if key in REMOVED_SETTINGS:
                raise ConfigError(
                    f"{config_path}: {key!r} is no longer read: {REMOVED_SETTINGS[key]}"
                )
            if key not in by_field:
                raise ConfigError(f"{config_path}: unknown setting {key!r}")
            values[key] = _convert(by_field[key], raw, f"{config_path}: {key}")
    for setting in SETTINGS:
        if setting.env in environ:
            values[setting.field] = _convert(setting, environ[setting.env], setting.env)
    for key, raw in (overrides or {}).items():
        if raw is not None:
            values[key] = _convert(by_field[key], raw, "--" + key.replace("_", "-"))
    config = Config(**values)
    _validate(config)
    return config


def _networks_ok(text: str) -> bool:
    try:
        for part in text.split(","):
            if part.strip():
                ipaddress.ip_network(part.strip(), strict=False)
    except ValueError:
        return False
    return True


def _validate(config: Config) -> None:
    checks = [
        (0 <= config.port <= 65535, "CHATNODE_PORT must be 0..65535"),
        (config.history_on_join >= 0, "CHATNODE_HISTORY_ON_JOIN must be >= 0"),
        (config.max_message_bytes >= 1, "CHATNODE_MAX_MESSAGE_BYTES must be >= 1"),
        (config.max_room_members >= 1, "CHATNODE_MAX_ROOM_MEMBERS must be >= 1"),
        (config.send_backlog_bytes >= 1024, "CHATNODE_SEND_BACKLOG_BYTES must be >= 1024"),
        (config.rate_messages_per_s > 0, "CHATNODE_RATE_MESSAGES_PER_S must be > 0"),
        (config.rate_burst >= 1, "CHATNODE_RATE_BURST must be >= 1"),
        (0 <= config.archive_linger_s <= 10, "CHATNODE_ARCHIVE_LINGER_S must be 0..10"),
        (config.dedup_window_s >= 1, "CHATNODE_DEDUP_WINDOW_S must be >= 1"),
        (_networks_ok(config.trusted_proxies), "CHATNODE_TRUSTED_PROXIES: not IP networks"),
        (config.unarchived_keep_bytes >= 0, "CHATNODE_UNARCHIVED_KEEP_BYTES must be >= 0"),
        (config.redis_settle_s >= 0, "CHATNODE_REDIS_SETTLE_S must be >= 0"),
        (
            0 <= config.cache_local_ttl_s <= config.cache_ttl_s,
            "CHATNODE_CACHE_LOCAL_TTL_S must be 0..CHATNODE_CACHE_TTL_S",
        ),
        (10 <= config.password_cost_log2 <= 20, "CHATNODE_PASSWORD_COST_LOG2 must be 10..20"),
        (config.password_concurrency >= 1, "CHATNODE_PASSWORD_CONCURRENCY must be >= 1"),
        (config.password_queue >= 0, "CHATNODE_PASSWORD_QUEUE must be >= 0"),
        (
            8 <= config.min_password_chars <= 256,
            "CHATNODE_MIN_PASSWORD_CHARS must be 8..256",
        ),
        (1 <= config.ticket_ttl_s <= 300, "CHATNODE_TICKET_TTL_S must be 1..300"),
        (config.tickets_per_account >= 1, "CHATNODE_TICKETS_PER_ACCOUNT must be >= 1"),
        (0.05 <= config.revocation_poll_s <= 60, "CHATNODE_REVOCATION_POLL_S must be 0.05..60"),
        (
            config.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
            "CHATNODE_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if not re.fullmatch(r"0?[0-7]{3}", config.unix_socket_mode):
        raise ConfigError("CHATNODE_UNIX_SOCKET_MODE must be octal permissions, e.g. 660")
    if config.unix_socket and not config.unix_socket.startswith("/"):
        raise ConfigError("CHATNODE_UNIX_SOCKET must be an absolute path")
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", config.key_prefix):
        raise ConfigError("CHATNODE_KEY_PREFIX must be lowercase letters, digits, '_' or '-'")
    for url, name, schemes in (
        (config.mysql_url, "CHATNODE_MYSQL_URL", ("mysql://",)),
        (config.redis_url, "CHATNODE_REDIS_URL", ("redis://", "rediss://")),
        (config.elasticsearch_url, "CHATNODE_ELASTICSEARCH_URL", ("http://", "https://")),
    ):
        if url and not url.startswith(schemes):
            raise ConfigError(f"{name} must start with {' or '.join(schemes)}")
    if not config.embedded and not (
        config.mysql_url and config.redis_url and config.elasticsearch_url
    ):
        raise ConfigError(
            "cluster mode needs all of CHATNODE_MYSQL_URL, CHATNODE_REDIS_URL and "
            "CHATNODE_ELASTICSEARCH_URL (or none of them for the embedded default)"
        )
    if not config.embedded and not config.jwt_secret:
        raise ConfigError("cluster mode needs CHATNODE_JWT_SECRET shared by every node")
    if config.jwt_secret and len(config.jwt_secret) < 32:
        raise ConfigError("CHATNODE_JWT_SECRET must be at least 32 characters")


def resolve_secret(config: Config) -> str:
    """The token secret: configured, or generated once into ``data_dir`` (embedded mode)."""
    if config.jwt_secret:
        return config.jwt_secret
    path = Path(config.data_dir) / "jwt-secret"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    path.write_text(secret)
    path.chmod(0o600)
    return secret


def markdown_table() -> str:
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    flags = {"host", "port", "unix_socket", "data_dir", "insecure"}
    for s in SETTINGS:
        flag = f"`--{s.field.replace('_', '-')}`" if s.field in flags else ""
        default = f"`{s.default}`" if s.default != "" else "(unset)"
        rows.append(f"| `{s.env}` | {flag} | {default} | {s.help} |")
    return "\n".join(rows)


SETTINGS: tuple[Setting, ...] = _settings()
