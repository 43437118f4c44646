#!/usr/bin/env python3
"""Render ``nginx/chatnode.conf.template`` into a complete nginx config for N chatnode nodes.

Standard library only (it runs on a host with nothing but Debian's python3 and nginx)::

    python3 nginx/render.py --node 127.0.0.1:8081 --node 127.0.0.1:8082 \\
        --listen 127.0.0.1:8080 --prefix /tmp/ngx --create-dirs -o /tmp/ngx/nginx.conf
    nginx -t -p /tmp/ngx -c /tmp/ngx/nginx.conf
    nginx -p /tmp/ngx -c /tmp/ngx/nginx.conf -g 'daemon off;'

    python3 nginx/render.py --node unix:/run/chatnode/node1.sock \\
        --node unix:/run/chatnode/node2.sock -o /etc/nginx/chatnode.conf  # nodes on this host
    python3 nginx/render.py --compose -o nginx/compose/nginx.conf   # what docker-compose.yml mounts
    python3 nginx/render.py --compose --compose-nodes 3 -o ...      # after adding a node3 service

Every path nginx writes (pid file, logs, ``*_temp`` dirs) is derived from ``--prefix`` unless
given explicitly, so a test can run its own nginx in a temporary directory. The rendered config has
no ``daemon`` directive: pass ``-g 'daemon off;'`` to keep nginx in the foreground.

The defaults are the production ones (docs/security.md, "Deployment"): limits per client
address, ``/readyz`` and ``/metrics`` from loopback only, and with TLS a redirect from plain
HTTP, HSTS and forward-secret ciphers. A load test or a test harness that sends more than one
client's worth from one address turns the limits off explicitly::

    python3 nginx/render.py ... --limit-conn 0 --limit-api off --limit-join off \
        --limit-password off

Template syntax (deliberately tiny): ``{{name}}`` is replaced by a value; lines between
``{{#name}}`` and ``{{/name}}`` are kept only when ``name`` is truthy, between ``{{^name}}`` and
``{{/name}}`` only when it is falsy. A name the renderer does not know is an error, so the
template and this file cannot drift apart silently.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "chatnode.conf.template"
COMPOSE_OUTPUT = HERE / "compose" / "nginx.conf"


ERROR_LOG_LEVELS = ("debug", "info", "notice", "warn", "error", "crit", "alert", "emerg")


class RenderError(ValueError):
    """The options or the template cannot produce a valid config; the message says which."""


@dataclass(frozen=True)
class Options:
    """What varies between deployments. Paths left ``None`` are derived from ``prefix``."""

    nodes: Sequence[str]
    listen: str = "8080"
    prefix: str = "/var/lib/chatnode-nginx"
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_listen: str = "443"
    worker_processes: str = "auto"
    worker_connections: int = 8192
    user: str | None = None
    pid: str | None = None
    error_log: str | None = None
    access_log: str | None = None  # None: <prefix>/logs/access.log; "off": no access log
    server_args: str = "max_fails=1 fail_timeout=10s"
    # DNS server for node names (docker: 127.0.0.11). Set: node names are re-resolved while
    # nginx runs (`server ... resolve`, open-source nginx >= 1.27.3), so a recreated container
    # with a new address is followed and an absent one does not stop nginx from starting.
    resolver: str | None = None
    # Messages about a request print its request line (a join's `?token=`, `?ticket=`): logged
    # only from this level up. Upstream failures, limit rejections and denials are `error`, and
    # the access log records them without the query string.
    request_error_log_level: str = "crit"
    # Limits per client address; past one nginx answers 429. 0 / "off" turns one off.
    limit_conn: int = 256  # requests in progress (a WebSocket: one per joined room)
    limit_api: str = "20r/s"  # REST requests, sustained ...
    limit_api_burst: int = 50  # ... and served at once above it
    limit_join: str = "5r/s"  # WebSocket joins (one per room)
    limit_join_burst: int = 50
    limit_password: str = "30r/m"  # /v1/tokens, /v1/users, /v1/chatrooms/users: scrypt each
    limit_password_burst: int = 10
    # Peers that may read /readyz and /metrics through nginx (addresses or networks).
    internal_networks: Sequence[str] = ("127.0.0.1", "::1")
    # With TLS: Strict-Transport-Security max-age, and the port the redirect from plain HTTP
    # names (None: the TLS listener's; set it when a port mapping publishes another one).
    hsts_max_age: int = 365 * 24 * 3600
    https_port: int | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def prefix_path(self) -> Path:
        return Path(self.prefix)

    @property
    def pid_path(self) -> str:
        return self.pid or str(self.prefix_path / "nginx.pid")

    @property
    def error_log_path(self) -> str:
        return self.error_log or str(self.prefix_path / "logs" / "error.log")

    @property
    def access_log_path(self) -> str:
        if self.access_log == "off":
            return ""
        return self.access_log or str(self.prefix_path / "logs" / "access.log")

    @property
    def temp_dir(self) -> str:
        # The prefix itself, which must exist: nginx creates `<dir>/proxy_temp` and the others
        # but not their parent. The names are the official image's (/var/cache/nginx/*_temp).
        return str(self.prefix_path)


_ADDRESS = re.compile(r"^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$")
_LISTEN = re.compile(r"^(?:(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):)?([0-9]{1,5})$")
_SAFE_VALUE = re.compile(r"^[^\s;{}'\"#$]+$")
_RATE = re.compile(r"^[1-9][0-9]{0,8}r/[sm]$")


def _check_port(text: str, what: str, pattern: re.Pattern[str]) -> str:
    match = pattern.match(text)
    if not match or not 1 <= int(match.group(1)) <= 65535:
        raise RenderError(
            f"{what} {text!r}: expected host:port (or [ipv6]:port) with a port 1..65535"
        )
    return text


def _check_unix(node: str) -> str:
    path = node.removeprefix("unix:")
    if not path.startswith("/") or not _SAFE_VALUE.match(path):
        raise RenderError(
            f"node {node!r}: expected unix:/absolute/path (no spaces, quotes, ';', '{{', '}}',"
            " '#' or '$')"
        )
    return node


def _check_path(text: str, what: str) -> str:
    if not _SAFE_VALUE.match(text):
        raise RenderError(
            f"{what} {text!r}: no spaces, quotes, ';', '{{', '}}', '#' or '$' allowed"
        )
    return text


def validate(options: Options) -> None:
    if not options.nodes:
        raise RenderError("at least one node (--node host:port or unix:/path) is needed")
    seen: set[str] = set()
    for node in options.nodes:
        if node.startswith("unix:"):
            _check_unix(node)
        else:
            _check_port(node, "node", _ADDRESS)
        if node in seen:
            raise RenderError(f"node {node!r} is listed twice")
        seen.add(node)
    _check_port(options.listen, "listen", _LISTEN)
    if (options.tls_cert is None) != (options.tls_key is None):
        raise RenderError("TLS needs both --tls-cert and --tls-key")
    if options.tls_cert is not None:
        _check_port(options.tls_listen, "tls listen", _LISTEN)
        if options.tls_listen == options.listen:
            raise RenderError("--tls-listen must differ from --listen")
    if options.worker_processes != "auto" and not (
        options.worker_processes.isdigit() and int(options.worker_processes) >= 1
    ):
        raise RenderError(
            f"worker_processes {options.worker_processes!r}: expected 'auto' or a positive integer"
        )
    if options.worker_connections < 64:
        raise RenderError("worker_connections must be >= 64")
    if options.request_error_log_level not in ERROR_LOG_LEVELS:
        raise RenderError(
            f"request error log level {options.request_error_log_level!r}: expected one of"
            f" {', '.join(ERROR_LOG_LEVELS)}"
        )
    if options.limit_conn < 0:
        raise RenderError("limit_conn must be >= 0 (0: no limit)")
    for rate, burst, what in (
        (options.limit_api, options.limit_api_burst, "api"),
        (options.limit_join, options.limit_join_burst, "join"),
        (options.limit_password, options.limit_password_burst, "password"),
    ):
        if rate != "off" and not _RATE.match(rate):
            raise RenderError(
                f"limit {what} rate {rate!r}: expected requests per second or minute"
                " (e.g. 20r/s, 30r/m) or 'off'"
            )
        if burst < 0:
            raise RenderError(f"limit {what} burst must be >= 0")
    _internal_networks(options)
    if options.hsts_max_age < 0:
        raise RenderError("hsts max-age must be >= 0 seconds")
    if options.https_port is not None and not 1 <= options.https_port <= 65535:
        raise RenderError(f"https port {options.https_port}: expected 1..65535")
    for value, what in (
        (options.prefix, "prefix"),
        (options.tls_cert, "tls cert"),
        (options.tls_key, "tls key"),
        (options.user, "user"),
        (options.pid, "pid"),
        (options.error_log, "error log"),
        (options.access_log, "access log"),
        (options.resolver, "resolver"),
    ):
        if value is not None:
            _check_path(value, what)


def _internal_networks(options: Options) -> list[str]:
    networks = []
    given = options.internal_networks
    for text in given.split(",") if isinstance(given, str) else given:
        try:
            network = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise RenderError(
                f"internal network {text!r}: expected an IP address or network (10.0.0.0/8)"
            ) from None
        one_address = network.prefixlen == network.max_prefixlen
        networks.append(str(network.network_address if one_address else network))
    return networks


def _internal_allow(options: Options) -> str:
    lines = [f"            allow {network};" for network in _internal_networks(options)]
    return "\n".join(lines) or "            # no internal network: denied to every peer"


def _https_port_suffix(options: Options) -> str:
    port = options.https_port
    if port is None:
        match = _LISTEN.match(options.tls_listen)
        port = int(match.group(1)) if match else 443
    return "" if port == 443 else f":{port}"


def _rate(rate: str) -> str:
    return "" if rate == "off" else rate


def _servers(options: Options) -> str:
    args = " resolve" if options.resolver else ""
    args += f" {options.server_args}" if options.server_args else ""
    return "\n".join(f"        server {node}{args};" for node in options.nodes)


def values(options: Options) -> dict[str, str]:
    """Template values for ``options`` (validated)."""
    validate(options)
    tls = options.tls_cert is not None
    return {
        "user": options.user or "",
        "worker_processes": options.worker_processes,
        # Each proxied connection uses two descriptors (client side, node side).
        "worker_rlimit_nofile": str(2 * options.worker_connections + 64),
        "worker_connections": str(options.worker_connections),
        "pid": options.pid_path,
        "error_log": options.error_log_path,
        "access_log": options.access_log_path,
        "temp_dir": options.temp_dir,
        "join_servers": _servers(options),
        "api_servers": _servers(options),
        "listen": options.listen,
        "resolver": options.resolver or "",
        "tls": "1" if tls else "",
        "tls_listen": options.tls_listen if tls else "",
        "tls_cert": options.tls_cert or "",
        "tls_key": options.tls_key or "",
        "hsts_max_age": str(options.hsts_max_age),
        "https_port_suffix": _https_port_suffix(options) if tls else "",
        "request_error_log_level": options.request_error_log_level,
        "limit_conn": str(options.limit_conn) if options.limit_conn else "",
        "limit_api": _rate(options.limit_api),
        "limit_api_burst": str(options.limit_api_burst),
        "limit_join": _rate(options.limit_join),
        "limit_join_burst": str(options.limit_join_burst),
        "limit_password": _rate(options.limit_password),
        "limit_password_burst": str(options.limit_password_burst),
        "internal_allow": _internal_allow(options),
        **options.extra,
    }


_SECTION = re.compile(r"^\s*\{\{([#^/])([a-z_]+)\}\}\s*$")
_PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\}\}")


def render_template(template: str, context: Mapping[str, str]) -> str:
    """Expand sections and placeholders; unknown names and unbalanced sections are errors."""
    out: list[str] = []
    stack: list[tuple[str, bool]] = []  # (name, keep)
    for number, line in enumerate(template.splitlines(), start=1):
        section = _SECTION.match(line)
        if section:
            kind, name = section.groups()
            if name not in context:
                raise RenderError(f"template line {number}: unknown section {name!r}")
            if kind == "/":
                if not stack or stack[-1][0] != name:
                    raise RenderError(f"template line {number}: {{{{/{name}}}}} closes nothing")
                stack.pop()
            else:
                stack.append((name, bool(context[name]) == (kind == "#")))
            continue
        if not all(keep for _, keep in stack):
            continue

        def substitute(match: re.Match[str], number: int = number) -> str:
            name = match.group(1)
            if name not in context:
                raise RenderError(f"template line {number}: unknown placeholder {name!r}")
            return context[name]

        expanded = _PLACEHOLDER.sub(substitute, line)
        if "{{" in expanded:
            raise RenderError(f"template line {number}: malformed placeholder in {line.strip()!r}")
        out.append(expanded)
    if stack:
        raise RenderError(f"template: section {stack[-1][0]!r} is never closed")
    return "\n".join(out) + "\n"


def render(options: Options, template: str | None = None) -> str:
    """The complete nginx config text for ``options``."""
    text = TEMPLATE.read_text() if template is None else template
    return render_template(text, values(options))


def create_dirs(options: Options) -> None:
    """Create the directories nginx expects to exist: the prefix (parent of the temp
    directories, which nginx creates itself) and the directories of the log files."""
    options.prefix_path.mkdir(parents=True, exist_ok=True)
    for log in (options.error_log_path, options.access_log_path):
        if log.startswith("/") and not log.startswith("/dev/"):
            Path(log).parent.mkdir(parents=True, exist_ok=True)


def compose_options(node_count: int = 2) -> Options:
    """The docker-compose deployment: nodes ``node1``..``nodeN`` on their Unix sockets
    ``/run/chatnode/nodeI.sock`` (the ``node-sockets`` volume nginx shares with them), HTTP on
    80, TLS on 443 with the certificate mounted at /etc/nginx/certs, logs to the container's
    output, the official image's ``nginx`` user and its /var/cache/nginx for pid and temp
    files; the production limits, /readyz and /metrics from the container's loopback only
    (Prometheus scrapes the nodes on the backend network)."""
    return Options(
        nodes=tuple(f"unix:/run/chatnode/node{i}.sock" for i in range(1, node_count + 1)),
        listen="80",
        prefix="/var/cache/nginx",
        tls_cert="/etc/nginx/certs/fullchain.pem",
        tls_key="/etc/nginx/certs/privkey.pem",
        tls_listen="443",
        worker_processes="auto",
        user="nginx",
        error_log="stderr",
        access_log="/dev/stdout",
    )


def _split_list(raw: Iterable[str]) -> list[str]:
    return [part.strip() for item in raw for part in item.split(",") if part.strip()]


def _parser() -> argparse.ArgumentParser:
    defaults = Options(nodes=())
    p = argparse.ArgumentParser(
        prog="nginx/render.py",
        description="Render the chatnode nginx config (nginx/chatnode.conf.template).",
    )
    p.add_argument(
        "--compose",
        action="store_true",
        help="render the docker-compose config (node1..N on /run/chatnode/nodeI.sock; 80 and 443);"
        " other options are ignored",
    )
    p.add_argument(
        "--compose-nodes",
        type=int,
        default=2,
        metavar="N",
        help="with --compose: how many nodeI services docker-compose.yml has (default 2)",
    )
    p.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="HOST:PORT|unix:/PATH",
        help="a chatnode node (unix:/path: its CHATNODE_UNIX_SOCKET, nginx on the same host);"
        " repeat it or give a comma-separated list",
    )
    p.add_argument(
        "--listen", default="8080", metavar="[ADDR:]PORT", help="plain HTTP listen (default 8080)"
    )
    p.add_argument(
        "--prefix",
        default="/var/lib/chatnode-nginx",
        metavar="DIR",
        help="directory for the pid file, logs/ and *_temp/ (default /var/lib/chatnode-nginx)",
    )
    p.add_argument(
        "--tls-cert", metavar="PATH", help="certificate chain (PEM); enables the TLS listener"
    )
    p.add_argument("--tls-key", metavar="PATH", help="private key (PEM)")
    p.add_argument(
        "--tls-listen", default="443", metavar="[ADDR:]PORT", help="TLS listen (default 443)"
    )
    p.add_argument("--worker-processes", default="auto", help="'auto' (default) or a number")
    p.add_argument(
        "--worker-connections",
        type=int,
        default=8192,
        help="per worker; each WebSocket uses two (default 8192)",
    )
    p.add_argument(
        "--resolver",
        metavar="ADDRESS",
        help="DNS server: re-resolve node names while running (nginx >= 1.27.3)",
    )
    p.add_argument("--user", help="worker user (only meaningful when nginx starts as root)")
    p.add_argument("--pid", metavar="PATH", help="pid file (default <prefix>/nginx.pid)")
    p.add_argument(
        "--error-log",
        metavar="PATH",
        help="error log, or 'stderr' (default <prefix>/logs/error.log)",
    )
    p.add_argument(
        "--access-log",
        metavar="PATH",
        help="access log, or 'off' (default <prefix>/logs/access.log)",
    )
    p.add_argument(
        "--request-error-log-level",
        default=defaults.request_error_log_level,
        metavar="LEVEL",
        help="log messages about requests from this level up (default crit). Below crit they"
        " print the request line, a join's ?token= included",
    )
    limits = p.add_argument_group("limits per client address (past one: 429; docs/security.md)")
    limits.add_argument(
        "--limit-conn",
        type=int,
        default=defaults.limit_conn,
        metavar="N",
        help="concurrent requests, a WebSocket for its whole life (default"
        f" {defaults.limit_conn}; 0: off)",
    )
    for name, what in (
        ("api", "REST requests"),
        ("join", "WebSocket joins"),
        ("password", "requests to /v1/tokens, /v1/users, /v1/chatrooms/users"),
    ):
        rate = getattr(defaults, f"limit_{name}")
        burst = getattr(defaults, f"limit_{name}_burst")
        limits.add_argument(
            f"--limit-{name}",
            default=rate,
            metavar="RATE",
            help=f"{what}: sustained rate, e.g. 20r/s or 30r/m (default {rate}; off: no limit)",
        )
        limits.add_argument(
            f"--limit-{name}-burst",
            type=int,
            default=burst,
            metavar="N",
            help=f"{what}: served at once above the rate (default {burst})",
        )
    p.add_argument(
        "--internal-network",
        action="append",
        default=[],
        metavar="CIDR",
        help="peers that may read /readyz and /metrics (repeat, or a comma list; default"
        " 127.0.0.1 and ::1)",
    )
    p.add_argument(
        "--hsts-max-age",
        type=int,
        default=defaults.hsts_max_age,
        metavar="SECONDS",
        help=f"with TLS: Strict-Transport-Security max-age (default {defaults.hsts_max_age})",
    )
    p.add_argument(
        "--https-port",
        type=int,
        metavar="PORT",
        help="with TLS: the port plain HTTP redirects to (default: the --tls-listen port)",
    )
    p.add_argument(
        "--create-dirs", action="store_true", help="create the prefix and log directories"
    )
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.compose:
        options = compose_options(args.compose_nodes)
    else:
        options = Options(
            nodes=tuple(_split_list(args.node)),
            listen=args.listen,
            prefix=str(Path(args.prefix).absolute()),
            tls_cert=str(Path(args.tls_cert).absolute()) if args.tls_cert else None,
            tls_key=str(Path(args.tls_key).absolute()) if args.tls_key else None,
            tls_listen=args.tls_listen,
            worker_processes=args.worker_processes,
            worker_connections=args.worker_connections,
            user=args.user,
            pid=args.pid,
            error_log=args.error_log,
            access_log=args.access_log,
            resolver=args.resolver,
            request_error_log_level=args.request_error_log_level,
            limit_conn=args.limit_conn,
            limit_api=args.limit_api,
            limit_api_burst=args.limit_api_burst,
            limit_join=args.limit_join,
            limit_join_burst=args.limit_join_burst,
            limit_password=args.limit_password,
            limit_password_burst=args.limit_password_burst,
            internal_networks=tuple(_split_list(args.internal_network))
            or Options(nodes=()).internal_networks,
            hsts_max_age=args.hsts_max_age,
            https_port=args.https_port,
        )
    try:
        text = render(options)
    except RenderError as exc:
        print(f"render.py: {exc}", file=sys.stderr)
        return 2
    if args.create_dirs and not args.compose:
        create_dirs(options)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
