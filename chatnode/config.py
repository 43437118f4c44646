"""Configuration: one frozen ``Config``, built once at the edge of the process from
``CHATNODE_*`` environment variables, an optional TOML file (``CHATNODE_CONFIG``) and command
line flags, in increasing precedence. Nothing below the composition root (``cli.py``,
``wiring.py``, ``app.py``) reads the environment: adapters take plain values.

Every setting is listed in ``SETTINGS`` with its variable, type, default and meaning; the
README's configuration table is generated from it (``chatnode config --markdown``).

Why one file of a little over 500 lines: most of it is that one table (a line or two per
setting) and the checks across settings, which read best beside it.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs

from chatnode import datadir
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
        "./data",
        "embedded mode: where chatnode.sqlite3 and the token secret live (made 0700, files 0600)",
    )
    insecure: bool = _setting(
        False, "insecure mode: `?user=` joins without a token, admin calls need none"
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
    replay_page_messages: int = _setting(
        200,
        "a join's replay is read from the backends this many messages at a time, the next page"
        " once the client has taken the last (memory per replaying connection)",
    )
    replay_timeout_s: float = _setting(
        60.0, "a join's replay not read by the client within this time closes it with 4001"
    )
    max_message_bytes: int = _setting(4096, "largest chat message (UTF-8 bytes)")
    max_user_name_chars: int = _setting(32, "longest user name")
    max_room_name_chars: int = _setting(100, "longest room name")
    max_room_members: int = _setting(1000, "members a public room may have")
    max_group_members: int = _setting(
        200, "members a private room (a group) may have, its owner included"
    )
    max_header_bytes: int = _setting(16 * 1024, "largest HTTP request head")
    max_body_bytes: int = _setting(64 * 1024, "largest HTTP request body")
    max_json_depth: int = _setting(
        32, "deepest nesting of a JSON body or v1 frame (deeper: 400 `invalid_json`)"
    )
    handshake_timeout_s: float = _setting(10.0, "time to send a whole request head")
    idle_timeout_s: float = _setting(60.0, "keep-alive HTTP connection idle limit")
    ws_ping_interval_s: float = _setting(30.0, "server ping interval on idle WebSockets")
    ws_idle_timeout_s: float = _setting(
        90.0,
        "a WebSocket from which nothing arrived for this long, not even the pong to a ping,"
        " is closed with 4003 (checked at each ping)",
    )
    max_connections: int = _setting(
        0,
        "client sockets (HTTP and WebSocket) a node holds at once; at the cap it stops"
        " accepting until one closes. 0: the process's RLIMIT_NOFILE less"
        " CHATNODE_FD_RESERVE",
    )
    fd_reserve: int = _setting(
        64, "descriptors kept for backends, files and listeners when deriving max_connections"
    )
    max_websockets: int = _setting(
        0,
        "WebSockets a node holds at once (over it: 503 `node_full`); 0: 90 % of"
        " max_connections, the rest kept for REST and /healthz",
    )
    max_websockets_per_user: int = _setting(
        100,
        "WebSockets one user may hold on one node (one per room joined; over it: 429"
        " `too_many_connections`)",
    )
    max_websockets_per_address: int = _setting(
        500,
        "WebSockets one client address may hold on one node (over it: 429"
        " `too_many_connections`); this host's own addresses are not counted",
    )
    allowed_origins: str = _setting(
        "",
        "origins (comma-separated `https://host[:port]`, or `*`) whose pages may open"
        " WebSockets besides the node's own host (others: 403 `origin_not_allowed`)",
    )
    trusted_proxies: str = _setting(
        "127.0.0.1/8,::1",
        "addresses or networks (comma-separated) whose X-Real-IP / X-Forwarded-For name the"
        " client (nginx); Unix-socket peers always count; from others the headers are ignored",
    )
    send_backlog_bytes: int = _setting(
        1 << 20, "per-connection unsent bytes before slow-consumer disconnect"
    )
    rate_messages_per_s: float = _setting(
        20.0,
        "sustained chat messages per second per user, all their connections and nodes together",
    )
    rate_burst: int = _setting(
        40,
        "chat messages a user may send at once (all connections and nodes together); v1 gets"
        " `rate_limited`, the plain dialect is slowed down",
    )
    rate_pings_per_s: float = _setting(1.0, "sustained v1 `ping` frames per second per user")
    rate_ping_burst: int = _setting(10, "v1 `ping` frames a user may send at once")
    rate_subscribes_per_s: float = _setting(
        2.0, "sustained `/v1/connect` `subscribe`/`unsubscribe` frames per second per user"
    )
    rate_subscribe_burst: int = _setting(
        50, "`/v1/connect` `subscribe`/`unsubscribe` frames a user may send at once"
    )
    max_connection_rooms: int = _setting(
        500, "rooms one `/v1/connect` connection may be subscribed to (`too_many_rooms` past it)"
    )
    typing_interval_s: float = _setting(
        2.0, "a user's `typing` is forwarded at most once per room in this time; the rest dropped"
    )
    room_create_burst: int = _setting(10, "rooms a user may create at once (admins: no limit)")
    room_create_interval_s: float = _setting(
        60.0, "then one more room per user every this many seconds"
    )
    member_change_burst: int = _setting(
        30,
        "membership changes (add, remove, ban, unban) a user may make at once (admins: no limit)",
    )
    member_change_interval_s: float = _setting(
        1.0, "then one more membership change per user every this many seconds"
    )
    login_address_burst: int = _setting(
        20, "`POST /v1/tokens` requests one client address may make at once"
    )
    login_address_interval_s: float = _setting(
        1.0, "then one more token request per address every this many seconds"
    )
    login_failures_burst: int = _setting(
        10,
        "wrong passwords one user may get at once, from all addresses; past them every attempt"
        " (even the right password) gets 429 until the next is due",
    )
    login_failures_interval_s: float = _setting(
        60.0, "then one more wrong password per user every this many seconds"
    )
    signup_address_burst: int = _setting(
        10, "users one client address may create at once (every `POST /v1/users` counts)"
    )
    signup_address_interval_s: float = _setting(
        60.0, "then one more user per address every this many seconds"
    )
    push_url: str = _setting(
        "",
        "http(s) URL that gets a JSON POST for each message to a member of a private or direct"
        ' room who is not connected (docs/protocol.md, "Push notifications"); unset: off',
    )
    push_collapse_s: float = _setting(
        30.0, "at most one push notification per member and room in this time (the latest)"
    )
    push_give_up_s: float = _setting(
        120.0,
        "a push notification the webhook has not taken this long after it was made is"
        " dropped (retried with backoff until then)",
    )
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
            max_group_members=self.max_group_members,
            max_json_depth=self.max_json_depth,
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


def _origins_ok(text: str) -> bool:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    return all(
        part == "*" or re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s]+/?", part.lower())
        for part in parts
    )


def _url_ok(url: str, schemes: tuple[str, ...]) -> bool:
    try:
        return url.startswith(schemes) and bool(urlsplit(url).hostname)
    except ValueError:
        return False


def _validate(config: Config) -> None:
    checks = [
        (0 <= config.port <= 65535, "CHATNODE_PORT must be 0..65535"),
        (config.history_on_join >= 0, "CHATNODE_HISTORY_ON_JOIN must be >= 0"),
        (config.max_message_bytes >= 1, "CHATNODE_MAX_MESSAGE_BYTES must be >= 1"),
        (config.max_room_members >= 1, "CHATNODE_MAX_ROOM_MEMBERS must be >= 1"),
        (config.max_group_members >= 2, "CHATNODE_MAX_GROUP_MEMBERS must be >= 2"),
        (config.member_change_burst >= 1, "CHATNODE_MEMBER_CHANGE_BURST must be >= 1"),
        (config.member_change_interval_s > 0, "CHATNODE_MEMBER_CHANGE_INTERVAL_S must be > 0"),
        (config.send_backlog_bytes >= 1024, "CHATNODE_SEND_BACKLOG_BYTES must be >= 1024"),
        (config.max_json_depth >= 1, "CHATNODE_MAX_JSON_DEPTH must be >= 1"),
        (config.replay_page_messages >= 1, "CHATNODE_REPLAY_PAGE_MESSAGES must be >= 1"),
        (config.replay_timeout_s > 0, "CHATNODE_REPLAY_TIMEOUT_S must be > 0"),
        (config.ws_ping_interval_s > 0, "CHATNODE_WS_PING_INTERVAL_S must be > 0"),
        (
            config.ws_idle_timeout_s >= config.ws_ping_interval_s,
            "CHATNODE_WS_IDLE_TIMEOUT_S must be >= CHATNODE_WS_PING_INTERVAL_S",
        ),
        (config.max_connections >= 0, "CHATNODE_MAX_CONNECTIONS must be >= 0 (0: derived)"),
        (config.fd_reserve >= 0, "CHATNODE_FD_RESERVE must be >= 0"),
        (config.max_websockets >= 0, "CHATNODE_MAX_WEBSOCKETS must be >= 0 (0: derived)"),
        (config.max_websockets_per_user >= 1, "CHATNODE_MAX_WEBSOCKETS_PER_USER must be >= 1"),
        (
            config.max_websockets_per_address >= 1,
            "CHATNODE_MAX_WEBSOCKETS_PER_ADDRESS must be >= 1",
        ),
        (
            _origins_ok(config.allowed_origins),
            "CHATNODE_ALLOWED_ORIGINS: comma-separated scheme://host[:port] origins, or *",
        ),
        (config.rate_messages_per_s > 0, "CHATNODE_RATE_MESSAGES_PER_S must be > 0"),
        (config.rate_burst >= 1, "CHATNODE_RATE_BURST must be >= 1"),
        (config.rate_pings_per_s > 0, "CHATNODE_RATE_PINGS_PER_S must be > 0"),
        (config.rate_ping_burst >= 1, "CHATNODE_RATE_PING_BURST must be >= 1"),
        (config.rate_subscribes_per_s > 0, "CHATNODE_RATE_SUBSCRIBES_PER_S must be > 0"),
        (config.rate_subscribe_burst >= 1, "CHATNODE_RATE_SUBSCRIBE_BURST must be >= 1"),
        (config.max_connection_rooms >= 1, "CHATNODE_MAX_CONNECTION_ROOMS must be >= 1"),
        (config.typing_interval_s > 0, "CHATNODE_TYPING_INTERVAL_S must be > 0"),
        (config.room_create_burst >= 1, "CHATNODE_ROOM_CREATE_BURST must be >= 1"),
        (config.room_create_interval_s > 0, "CHATNODE_ROOM_CREATE_INTERVAL_S must be > 0"),
        (config.login_address_burst >= 1, "CHATNODE_LOGIN_ADDRESS_BURST must be >= 1"),
        (config.login_address_interval_s > 0, "CHATNODE_LOGIN_ADDRESS_INTERVAL_S must be > 0"),
        (config.login_failures_burst >= 1, "CHATNODE_LOGIN_FAILURES_BURST must be >= 1"),
        (config.login_failures_interval_s > 0, "CHATNODE_LOGIN_FAILURES_INTERVAL_S must be > 0"),
        (config.signup_address_burst >= 1, "CHATNODE_SIGNUP_ADDRESS_BURST must be >= 1"),
        (config.signup_address_interval_s > 0, "CHATNODE_SIGNUP_ADDRESS_INTERVAL_S must be > 0"),
        (0 <= config.archive_linger_s <= 10, "CHATNODE_ARCHIVE_LINGER_S must be 0..10"),
        (config.dedup_window_s >= 1, "CHATNODE_DEDUP_WINDOW_S must be >= 1"),
        (_networks_ok(config.trusted_proxies), "CHATNODE_TRUSTED_PROXIES: not IP networks"),
        (config.unarchived_keep_bytes >= 0, "CHATNODE_UNARCHIVED_KEEP_BYTES must be >= 0"),
        (config.redis_settle_s >= 0, "CHATNODE_REDIS_SETTLE_S must be >= 0"),
        (config.push_collapse_s > 0, "CHATNODE_PUSH_COLLAPSE_S must be > 0"),
        (config.push_give_up_s > 0, "CHATNODE_PUSH_GIVE_UP_S must be > 0"),
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
        (config.push_url, "CHATNODE_PUSH_URL", ("http://", "https://")),
    ):
        if url and not _url_ok(url, schemes):
            raise ConfigError(f"{name} must start with {' or '.join(schemes)}")
    database = urlsplit(config.mysql_url).path.lstrip("/")
    if config.mysql_url and (not database or "/" in database):
        # Said here, without the URL: the adapter's own message would print its password.
        raise ConfigError("CHATNODE_MYSQL_URL must name one database: mysql://host/<database>")
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
    """The token secret: configured, or generated once into ``data_dir/jwt-secret`` (embedded
    mode), a file created 0600 in a directory created 0700 (``chatnode/datadir.py``). Raise
    ``ConfigError`` when that file cannot be made or read, or holds no usable secret."""
    if config.jwt_secret:
        return config.jwt_secret
    path = Path(config.data_dir) / "jwt-secret"
    try:
        datadir.make_private_dir(path.parent)
    except OSError as exc:
        raise ConfigError(f"CHATNODE_DATA_DIR={path.parent}: {exc.strerror}") from None
    try:
        if not path.exists():
            datadir.create_private_file(path, secrets.token_urlsafe(48).encode())
        datadir.narrow_file(path)
        secret = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise ConfigError(f"CHATNODE_DATA_DIR: the token secret {path}: {reason}") from None
    if len(secret) < 32:
        raise ConfigError(
            f"CHATNODE_DATA_DIR: the token secret {path} holds fewer than 32 characters:"
            " remove the file for a new secret (every token ends) or set CHATNODE_JWT_SECRET"
        )
    return secret


_SECRET_NAME = re.compile(r"secret|password|passwd|credential|private_key|api_key")
_SECRET_QUERY = re.compile(r"pass|secret|token|key|auth|credential", re.IGNORECASE)
MASK = "***"


def is_secret(setting: Setting) -> bool:
    """A setting whose whole value is a secret: its name says so (``jwt_secret``)."""
    return bool(_SECRET_NAME.search(setting.field))


def mask_url(text: str) -> str:
    """``text`` with the password of a URL's userinfo, and the values of query parameters
    named like a credential (``password``, ``token``, ``api_key``, ...), replaced by ``***``;
    anything that is not such a URL unchanged."""
    try:
        parts = urlsplit(text)
        has_password = parts.password is not None
    except ValueError:
        return text
    if not parts.scheme or not parts.netloc:
        return text
    netloc = parts.netloc
    if has_password:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:{MASK}@{hostport}"
    query = "&".join(
        f"{name}={MASK}" if _SECRET_QUERY.search(name) and sep else f"{name}{sep}{value}"
        for name, sep, value in (item.partition("=") for item in parts.query.split("&"))
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def shown_settings(config: Config) -> dict[str, Any]:
    """Every setting as ``chatnode config`` prints it: a secret setting (when set) as ``***``,
    URLs with their passwords and credential parameters masked (:func:`mask_url`)."""
    shown: dict[str, Any] = {}
    for setting in SETTINGS:
        value = getattr(config, setting.field)
        if is_secret(setting) and value:
            value = MASK
        elif isinstance(value, str):
            value = mask_url(value)
        shown[setting.field] = value
    return shown


def markdown_table() -> str:
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    flags = {"host", "port", "unix_socket", "data_dir", "insecure"}
    for s in SETTINGS:
        flag = f"`--{s.field.replace('_', '-')}`" if s.field in flags else ""
        default = f"`{s.default}`" if s.default != "" else "(unset)"
        rows.append(f"| `{s.env}` | {flag} | {default} | {s.help} |")
    return "\n".join(rows)


SETTINGS: tuple[Setting, ...] = _settings()
