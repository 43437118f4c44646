"""The systems under test and their peers: how each is started, fed users and rooms, and stopped.

Every server process is started here as a pinned subprocess (``common.Proc``) so its CPU can be
read from /proc. What counts as the system's "server CPU" is ``server_pids()`` (the nodes or
the peer's processes, every thread); nginx and Redis are reported apart as ``infra_pids()``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import (
    BENCH,
    BENCH_PY,
    CHATNODE_BIN,
    NGINX_BIN,
    ROOT,
    WORK,
    Http,
    Proc,
    http_status,
    port_open,
    wait_until,
)

HOST = "127.0.0.1"

# Fixed ports (loopback), away from scripts/cluster's 8080.. and the services' ports.
PORTS = {
    "redis": 16379,
    "chatnode-cluster": (18000, [18001, 18002]),  # nginx, nodes
    "websockets-ref": (18100, [18101, 18102]),
    "python-socketio": (18200, [18201, 18202]),
    "chatnode-single": (None, [18301]),
    "libwebsockets": (None, [18401]),
}


# How nginx reaches the processes behind it, the same for chatnode and the peers: "unix" (each
# process also listens on a Unix socket, nginx's upstream is `server unix:...`: the same-host
# deployment, about half the kernel cost per proxied frame) or "tcp" (loopback ports, as
# between containers). The processes keep their TCP ports either way (health checks, idle
# connections straight to a node).
UPSTREAM = os.environ.get("BENCH_UPSTREAM", "unix")
if UPSTREAM not in ("unix", "tcp"):
    raise SystemExit(f"BENCH_UPSTREAM must be unix or tcp, not {UPSTREAM!r}")
SOCKETS = Path(tempfile.gettempdir()) / f"chatnode-bench-{os.getuid()}"  # paths <= 107 bytes


def upstream_addresses(name: str, ports: list[int]) -> tuple[list[str], list[str | None]]:
    """(nginx's upstream addresses, each process's Unix socket path or None) for ``ports``."""
    if UPSTREAM == "tcp":
        return [f"{HOST}:{p}" for p in ports], [None for _ in ports]
    SOCKETS.mkdir(mode=0o700, exist_ok=True)
    paths = [str(SOCKETS / f"{name}-{i}.sock") for i in range(1, len(ports) + 1)]
    return [f"unix:{p}" for p in paths], list(paths)


def user_name(room_index: int, member: int) -> str:
    return f"b{room_index}m{member}"


# -- shared infrastructure ------------------------------------------------------------------


class Redis:
    """The benchmark's own Redis (pinned with the servers, no persistence), shared by chatnode's
    cluster and both Redis-backed peers, so none of them competes with other users of the
    project's service Redis."""

    def __init__(self, port: int = PORTS["redis"]) -> None:
        self.port = port
        self.url = f"redis://{HOST}:{port}/0"
        self.proc: Proc | None = None

    def start(self) -> None:
        if port_open(self.port):
            raise RuntimeError(f"port {self.port} is taken; is another bench running?")
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        d = WORK / "redis"
        d.mkdir(parents=True, exist_ok=True)
        self.proc = Proc(
            "redis",
            [
                binary,
                "--port",
                self.port,
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                d,
                "--maxclients",
                "10000",
                "--protected-mode",
                "yes",
            ],
        ).start()
        wait_until(lambda: self.cli("PING") == "PONG", 20, "redis", self.proc)

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            ["redis-cli", "-h", HOST, "-p", str(self.port), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return out.stdout.strip()

    def pids(self) -> list[int]:
        return self.proc.pids() if self.proc else []

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()


class Nginx:
    """nginx with the shipped config (nginx/chatnode.conf.template via nginx/render.py) in
    front of a system's processes. The peers get the same config: their endpoints live on the
    join route, so nginx treats all of them alike."""

    def __init__(self, name: str, listen: int, nodes: list[str]) -> None:
        self.name = name
        self.listen = listen
        self.nodes = nodes  # upstream addresses: host:port or unix:/path
        self.prefix = WORK / f"nginx-{name}"
        self.proc: Proc | None = None

    def start(self) -> None:
        if port_open(self.listen):
            raise RuntimeError(f"port {self.listen} is taken")
        self.prefix.mkdir(parents=True, exist_ok=True)
        conf = self.prefix / "nginx.conf"
        argv = ["python3", str(ROOT / "nginx" / "render.py")]
        for node in self.nodes:
            argv += ["--node", node]
        argv += [
            "--listen",
            f"{HOST}:{self.listen}",
            "--prefix",
            str(self.prefix),
            "--worker-processes",
            "2",
            # One load generator is one address: the shipped per-address limits would throttle
            # the measurement, not an attacker (docs/security.md, deployment).
            "--limit-conn",
            "0",
            "--limit-api",
            "off",
            "--limit-join",
            "off",
            "--limit-password",
            "off",
            "--create-dirs",
            "-o",
            str(conf),
        ]
        if os.getuid() == 0:
            argv += ["--user", "root"]
        subprocess.run(argv, check=True)
        self.proc = Proc(
            f"nginx-{self.name}",
            [NGINX_BIN, "-p", self.prefix, "-c", conf, "-g", "daemon off;"],
        ).start()
        wait_until(lambda: http_status(self.listen, "/nginx-health") == 200, 20, "nginx", self.proc)

    def pids(self) -> list[int]:
        return self.proc.pids() if self.proc else []

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()


# -- systems -------------------------------------------------------------------------------


class System:
    name = "?"
    kind = "plain"  # the load generator's framing
    nodes = 1
    behind_nginx = False

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self.nginx: Nginx | None = None
        self.redis: Redis | None = None

    # lifecycle
    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.nginx:
            self.nginx.stop()
        for p in self.procs:
            p.stop()
        self.procs = []

    def check_alive(self) -> None:
        for p in self.procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited\n{p.tail()}")

    # accounting
    def server_pids(self) -> list[int]:
        return [pid for p in self.procs for pid in p.pids()]

    def node_pid_groups(self) -> list[list[int]]:
        return [p.pids() for p in self.procs]

    def infra_pids(self) -> list[int]:
        out: list[int] = []
        if self.nginx:
            out += self.nginx.pids()
        if self.redis:
            out += self.redis.pids()
        return out

    @property
    def entry_port(self) -> int:
        return self.nginx.listen if self.nginx else self.node_ports[0]

    node_ports: list[int] = []

    # workload
    def prepare(self, rooms: int, members: int, senders: int) -> list[dict[str, Any]]:
        """Users and rooms for ``rooms`` x ``members``; the client specs for the load generator
        (the first ``senders`` members of each room send)."""
        raise NotImplementedError

    def idle_clients(self, per_node: int) -> list[list[dict[str, Any]]]:
        """Client specs for idle connections, one list per node process (direct to it)."""
        raise NotImplementedError


class Chatnode(System):
    """Shared by the cluster and the single node: REST setup and plain-dialect clients."""

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATNODE_")}
        env.update(
            CHATNODE_INSECURE="1",
            CHATNODE_LOG_LEVEL="WARNING",
            CHATNODE_HOST=HOST,
            # The fan-out workload stays far below the default 20/s per connection; the history
            # seeding of the extras sends faster from one connection.
            CHATNODE_RATE_MESSAGES_PER_S="100000",
            CHATNODE_RATE_BURST="100000",
            # The setup creates thousands of users from one address.
            CHATNODE_SIGNUP_ADDRESS_BURST="100000",
            CHATNODE_DRAIN_TIMEOUT_S="3",
        )
        return env

    def _start_node(
        self, i: int, port: int, env: dict[str, str], unix_socket: str | None = None
    ) -> Proc:
        tag = getattr(self, "tag", "")
        env = dict(
            env,
            CHATNODE_PORT=str(port),
            CHATNODE_NODE_ID=f"{self.name}{'-' + tag if tag else ''}-n{i}",
        )
        if unix_socket:
            env.update(CHATNODE_UNIX_SOCKET=unix_socket, CHATNODE_UNIX_SOCKET_MODE="600")
        proc = Proc(f"{self.name}-node{i}", [CHATNODE_BIN, "serve"], env=env).start()
        return proc

    def _wait_nodes(self) -> None:
        for proc, port in zip(self.procs, self.node_ports, strict=True):
            wait_until(lambda port=port: http_status(port, "/healthz") == 200, 60, proc.name, proc)

    def _users(self, names: list[str]) -> None:
        port = self.entry_port

        def create(chunk: list[str]) -> None:
            client = Http(HOST, port)
            for n in chunk:
                status, body = client.request("POST", "/v1/users", {"name": n})
                if status not in (201, 409):
                    raise RuntimeError(f"create user {n}: {status} {body}")
            client.close()

        chunks = [names[i::8] for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, chunks))

    def _rooms(self, count: int) -> list[int]:
        client = Http(HOST, self.entry_port)
        ids = []
        for i in range(count):
            status, body = client.request("POST", "/v1/chatrooms", {"name": f"bench-{i}"})
            if status != 201:
                raise RuntimeError(f"create room: {status} {body}")
            ids.append(int(body["id"]))
        client.close()
        return ids

    def prepare(self, rooms: int, members: int, senders: int) -> list[dict[str, Any]]:
        names = [user_name(r, m) for r in range(rooms) for m in range(members)]
        self._users(names)
        room_ids = self._rooms(rooms)
        port = self.entry_port
        return [
            {
                "url": f"ws://{HOST}:{port}/v1/chatrooms/{room_ids[r]}/join?user={user_name(r, m)}",
                "room": room_ids[r],
                "kind": "plain",
                "sender": m < senders,
            }
            for r in range(rooms)
            for m in range(members)
        ]

    def idle_clients(self, per_node: int) -> list[list[dict[str, Any]]]:
        names = [user_name(0, m) for m in range(100)]
        self._users(names)
        room_ids = self._rooms(10)
        out = []
        for port in self.node_ports:
            out.append(
                [
                    {
                        "url": f"ws://{HOST}:{port}/v1/chatrooms/{room_ids[i % 10]}/join"
                        f"?user={names[i % 100]}",
                        "room": room_ids[i % 10],
                        "kind": "plain",
                        "sender": False,
                    }
                    for i in range(per_node)
                ]
            )
        return out


class ChatnodeSingle(Chatnode):
    """One embedded node (SQLite directory and log, in-process bus), clients connect directly."""

    name = "chatnode-single"
    nodes = 1

    def __init__(self) -> None:
        super().__init__()
        self.node_ports = PORTS[self.name][1]

    def start(self) -> None:
        data = WORK / "chatnode-single-data"
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        env = self._env()
        env["CHATNODE_DATA_DIR"] = str(data)
        self.procs = [self._start_node(1, self.node_ports[0], env)]
        self._wait_nodes()


class ChatnodeCluster(Chatnode):
    """Two nodes in cluster mode (MySQL directory, Redis bus/presence/caches, Elasticsearch
    archive with the archiver on) behind nginx."""

    name = "chatnode-cluster"
    nodes = 2
    behind_nginx = True

    def __init__(
        self,
        redis: Redis,
        mysql_url: str,
        es_url: str,
        prefix: str,
        *,
        tag: str = "",
        claim_idle_s: float | None = None,
    ) -> None:
        super().__init__()
        self.tag = tag
        self.claim_idle_s = claim_idle_s
        self.redis = redis
        self.mysql_url = mysql_url
        self.es_url = es_url
        self.prefix = prefix
        listen, self.node_ports = PORTS[self.name]
        upstreams, self.unix_sockets = upstream_addresses(self.name, self.node_ports)
        self.nginx = Nginx(self.name, listen, upstreams)
        self.secret = secrets.token_urlsafe(32)

    def env(self) -> dict[str, str]:
        assert self.redis is not None
        env = self._env()
        env.update(
            CHATNODE_MYSQL_URL=self.mysql_url,
            CHATNODE_REDIS_URL=self.redis.url,
            CHATNODE_ELASTICSEARCH_URL=self.es_url,
            CHATNODE_JWT_SECRET=self.secret,
            CHATNODE_KEY_PREFIX=self.prefix,
        )
        if self.claim_idle_s is not None:
            env["CHATNODE_ARCHIVE_CLAIM_IDLE_S"] = str(self.claim_idle_s)
        return env

    def migrate(self) -> None:
        out = subprocess.run(
            [str(CHATNODE_BIN), "migrate"],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"chatnode migrate failed:\n{out.stdout}\n{out.stderr}")

    def start(self) -> None:
        env = self.env()
        for i, (port, unix) in enumerate(zip(self.node_ports, self.unix_sockets, strict=True), 1):
            data = WORK / f"{self.name}-node{i}"
            data.mkdir(parents=True, exist_ok=True)
            self.procs.append(
                self._start_node(i, port, dict(env, CHATNODE_DATA_DIR=str(data)), unix)
            )
        self._wait_nodes()
        assert self.nginx is not None
        self.nginx.start()


class Peer(System):
    """A peer with N processes behind the same nginx and Redis as chatnode's cluster."""

    script = ""

    def __init__(self, redis: Redis) -> None:
        super().__init__()
        self.redis = redis
        listen, self.node_ports = PORTS[self.name]
        upstreams, self.unix_sockets = upstream_addresses(self.name, self.node_ports)
        self.nginx = Nginx(self.name, listen, upstreams)
        self.nodes = len(self.node_ports)

    def start(self) -> None:
        assert self.redis is not None
        for i, (port, unix) in enumerate(zip(self.node_ports, self.unix_sockets, strict=True), 1):
            argv = [BENCH_PY, BENCH / "peers" / self.script, "--port", port]
            argv += ["--redis", self.redis.url] + (["--unix", unix] if unix else [])
            self.procs.append(Proc(f"{self.name}-{i}", argv).start())
        for proc, port, unix in zip(self.procs, self.node_ports, self.unix_sockets, strict=True):
            wait_until(
                lambda port=port, unix=unix: port_open(port) and (not unix or os.path.exists(unix)),
                30,
                proc.name,
                proc,
            )
        assert self.nginx is not None
        self.nginx.start()

    def url(self, port: int, room: int, user: str) -> str:
        raise NotImplementedError

    def prepare(self, rooms: int, members: int, senders: int) -> list[dict[str, Any]]:
        port = self.entry_port
        return [
            {
                "url": self.url(port, r + 1, user_name(r, m)),
                "room": r + 1,
                "kind": self.kind,
                "sender": m < senders,
            }
            for r in range(rooms)
            for m in range(members)
        ]

    def idle_clients(self, per_node: int) -> list[list[dict[str, Any]]]:
        return [
            [
                {
                    "url": self.url(port, i % 10 + 1, user_name(0, i % 100)),
                    "room": i % 10 + 1,
                    "kind": self.kind,
                    "sender": False,
                }
                for i in range(per_node)
            ]
            for port in self.node_ports
        ]


class WebsocketsRef(Peer):
    name = "websockets-ref"
    script = "websockets_server.py"
    behind_nginx = True

    def url(self, port: int, room: int, user: str) -> str:
        return f"ws://{HOST}:{port}/v1/chatrooms/{room}/join?user={user}"


class SocketIO(Peer):
    name = "python-socketio"
    kind = "socketio"
    script = "socketio_server.py"
    behind_nginx = True

    def url(self, port: int, room: int, user: str) -> str:
        return (
            f"ws://{HOST}:{port}/v1/chatrooms/0/join?EIO=4&transport=websocket"
            f"&room={room}&user={user}"
        )


class Libwebsockets(System):
    """libwebsockets-test-server (C) on one process; its lws-mirror-protocol broadcasts every
    message to every client of the same mirror instance (``?mirror=<room>``), sender
    included: the room."""

    name = "libwebsockets"
    kind = "raw"
    nodes = 1

    def __init__(self) -> None:
        super().__init__()
        self.node_ports = PORTS[self.name][1]

    def start(self) -> None:
        binary = shutil.which("libwebsockets-test-server") or "/usr/bin/libwebsockets-test-server"
        port = self.node_ports[0]
        if port_open(port):
            raise RuntimeError(f"port {port} is taken")
        self.procs = [
            Proc(self.name, [binary, f"--port={port}", "--interface=lo"], cwd=Path("/tmp")).start()
        ]
        wait_until(lambda: port_open(port), 20, self.name, self.procs[0])

    def _spec(self, port: int, room: int, sender: bool) -> dict[str, Any]:
        return {
            "url": f"ws://{HOST}:{port}/?mirror=room{room}",
            "room": room,
            "kind": "raw",
            "sender": sender,
            "headers": [["Sec-WebSocket-Protocol", "lws-mirror-protocol"]],
        }

    def prepare(self, rooms: int, members: int, senders: int) -> list[dict[str, Any]]:
        port = self.node_ports[0]
        return [self._spec(port, r + 1, m < senders) for r in range(rooms) for m in range(members)]

    def idle_clients(self, per_node: int) -> list[list[dict[str, Any]]]:
        port = self.node_ports[0]
        return [[self._spec(port, i % 10 + 1, False) for i in range(per_node)]]
