"""Issue 14, deployment: each attack on nginx, the compose file, the data directory and
``chatnode config``, tried for real, and what must hold against it.

- #12 an upstream fails: nginx's logs hold neither the join's ``?token=`` nor a ``?ticket=``;
- #13 files: the data directory is 0700, the database, -wal, -shm and secret 0600 from birth;
- #14 ``chatnode config`` and configuration errors print no backend password or secret;
- #16 nginx and compose: plain HTTP redirects, TLS is forward-secret only, per-address
  limits answer 429, ``/readyz`` and ``/metrics`` are internal, compose has no default password.

nginx runs for real (rendered by ``nginx/render.py``, in a temporary prefix, on loopback); in
front of it a stand-in upstream (:class:`Upstream`) answers with what it received, or fails on
purpose, so each test sees exactly what nginx passed on or refused.
"""

from __future__ import annotations

import functools
import json
import math
import os
import secrets
import shutil
import ssl
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from chatnode.config import SETTINGS
from tests.cluster.harness import (
    NGINX_BIN,
    REPO,
    START_TIMEOUT_S,
    free_port,
    nginx_available,
    nginx_test_config,
    render_module,
    running_nginx,
    started_node_process,
)

needs_nginx = pytest.mark.skipif(
    not nginx_available(), reason=f"nginx not installed at {NGINX_BIN} (scripts/services install)"
)

REQUEST_TIMEOUT_S = 10.0
OUTSIDER = "127.0.0.2"  # a loopback address that is not 127.0.0.1: a peer outside the allow list
WEBSOCKET_HEADERS = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


# -- a stand-in upstream and a raw client ---------------------------------------------------------


@attrs.define(eq=False)
class Upstream:
    """A node's stand-in behind nginx. ``mode="echo"``: answers every request 200 with its
    request line and headers as JSON (``seen`` keeps them); a path under ``/hold/`` is
    answered only after ``release`` is set, and reported on ``arrived`` when it comes in.
    ``mode="reset"``: reads the request head and closes the connection without an answer."""

    mode: str
    port: int = 0
    seen: list[dict[str, Any]] = attrs.field(factory=list)
    release: trio.Event = attrs.field(factory=trio.Event)
    arrived: trio.MemorySendChannel[str] = attrs.field(init=False)
    arrivals: trio.MemoryReceiveChannel[str] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.arrived, self.arrivals = trio.open_memory_channel[str](math.inf)

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            if self.mode == "reset":
                return
            head, _, body = data.partition(b"\r\n\r\n")
            line, *fields = head.decode("latin-1").split("\r\n")
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)
            }
            while len(body) < int(headers.get("content-length", "0")):
                body += await stream.receive_some(65536)
            request = {"line": line, "headers": headers}
            self.seen.append(request)
            path = line.split(" ")[1]
            if path.startswith("/hold/"):
                self.arrived.send_nowait(path)
                await self.release.wait()
            answer = json.dumps(request).encode()
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
            )


@asynccontextmanager
async def running_upstream(mode: str = "echo") -> AsyncIterator[Upstream]:
    upstream = Upstream(mode)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, upstream.handle, 0, host="127.0.0.1")
        )
        upstream.port = listeners[0].socket.getsockname()[1]
        yield upstream
        nursery.cancel_scope.cancel()


@attrs.frozen
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.body)
        return value


async def request(
    port: int,
    target: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    source: str = "127.0.0.1",
) -> Answer:
    """One request over a fresh connection from ``source`` to nginx on ``127.0.0.1:port``;
    the answer is read to its Content-Length, else to the end of the connection."""
    with trio.fail_after(REQUEST_TIMEOUT_S):
        sock = trio.socket.socket()
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
        lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if "Connection" not in (headers or {}):
            lines.append("Connection: close")
        if body or method == "POST":
            lines.append(f"Content-Length: {len(body)}")
        async with trio.SocketStream(sock) as stream:
            await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            raw = b""
            while b"\r\n\r\n" not in raw and (chunk := await stream.receive_some(65536)):
                raw += chunk
            head, _, content = raw.partition(b"\r\n\r\n")
            status_line, *fields = head.decode("latin-1").split("\r\n")
            answer_headers = {
                k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)
            }
            length = answer_headers.get("content-length")
            while (length is None or len(content) < int(length)) and (
                chunk := await stream.receive_some(65536)
            ):
                content += chunk
    return Answer(int(status_line.split()[1]), answer_headers, content)


def dev_cert(directory: Path) -> tuple[Path, Path]:
    """The dev certificate (``nginx/dev-cert``), as an operator trying TLS makes it."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    subprocess.run(
        [str(REPO / "nginx" / "dev-cert"), str(directory)], check=True, capture_output=True
    )
    return directory / "fullchain.pem", directory / "privkey.pem"


# -- #12: an upstream fails; the token and the ticket stay out of both logs ----------------------


@needs_nginx
@pytest.mark.parametrize("failure", ["refused", "reset"])
async def test_an_upstream_failure_logs_neither_token_nor_ticket(
    tmp_path: Path, failure: str
) -> None:
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbm4ifQ." + secrets.token_urlsafe(16)
    ticket = "tkt-" + secrets.token_urlsafe(16)
    prefix = tmp_path / "nginx"
    async with running_upstream("reset") as resetting:
        node = free_port() if failure == "refused" else resetting.port  # nothing listens there
        async with running_nginx([node], prefix_dir=prefix) as port:
            answers = [
                await request(
                    port, f"/v1/chatrooms/1/join?token={token}", headers=WEBSOCKET_HEADERS
                ),
                await request(
                    port, f"/v1/chatrooms/1/join?ticket={ticket}", headers=WEBSOCKET_HEADERS
                ),
                await request(
                    port,
                    f"/v1/chatrooms?token={token}",
                    headers={"Referer": f"https://chat.example/app?ticket={ticket}"},
                ),
            ]
    # nginx has stopped: every line it was going to log is in the files.
    assert [a.status for a in answers] == [502, 502, 502]
    logs = {p.name: p.read_text() for p in (prefix / "logs").iterdir()}
    assert {"error.log", "access.log"} <= logs.keys()
    for name, text in logs.items():
        assert token not in text, f"{name} holds the token:\n{text}"
        assert ticket not in text, f"{name} holds the ticket:\n{text}"
    # The failures stay visible: each request, its path without the query, the upstream's 502.
    failed = [line for line in logs["access.log"].splitlines() if '" 502 ' in line]
    assert len(failed) == 3, logs["access.log"]
    assert all("upstream_status=502" in line for line in failed), failed
    assert sum('"GET /v1/chatrooms/1/join HTTP/1.1"' in line for line in failed) == 2


# -- #13: the data directory, the database and the secret are private as created ------------------


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_data_files_are_created_private(tmp_path: Path) -> None:
    """Under umask 000, `chatnode serve` makes its data directory 0700 and the database, its
    -wal and -shm, and the token secret 0600, each with that mode from the start: the process
    changes no mode under the data directory (its audit events say so)."""
    data = tmp_path / "state" / "data"
    events = tmp_path / "file-events"
    async with started_node_process(
        {"CHATNODE_DATA_DIR": str(data), "CHATNODE_LOG_LEVEL": "INFO"},
        log_path=tmp_path / "node.log",
        command=[sys.executable, str(Path(__file__).with_name("audited_serve.py")), str(events)],
    ) as node:
        # While the node runs, SQLite keeps its -wal and -shm beside the database.
        database = data / "chatnode.sqlite3"
        files = [database, Path(f"{database}-wal"), Path(f"{database}-shm"), data / "jwt-secret"]
        modes = {p.name: mode_of(p) for p in files}
        assert mode_of(data) == 0o700, node.log_tail()
        assert modes == dict.fromkeys(modes, 0o600), modes
    made = events.read_text().splitlines()
    assert any(line.startswith("create ") for line in made), made  # the audit hook saw files made
    assert not [line for line in made if line.startswith("chmod ")], made
    assert "data directory" not in node.log_tail(400)  # nothing to warn about: made private


async def test_loose_files_are_narrowed_and_a_loose_directory_is_reported(
    tmp_path: Path,
) -> None:
    """A data directory from before (0755, files 0644): the files become 0600, the directory
    keeps its mode and the log says how to make it private."""
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    database = data / "chatnode.sqlite3"
    secret = data / "jwt-secret"
    for path in (database, Path(f"{database}-wal"), secret):
        path.touch()
    secret.write_text(secrets.token_urlsafe(48))
    for path in (database, Path(f"{database}-wal"), secret):
        path.chmod(0o644)
    log = tmp_path / "node.log"
    async with started_node_process({"CHATNODE_DATA_DIR": str(data)}, log_path=log):
        assert mode_of(database) == 0o600
        assert mode_of(secret) == 0o600
        assert mode_of(Path(f"{database}-shm")) == 0o600
    assert mode_of(data) == 0o755
    text = log.read_text()
    assert f"chmod 700 {data}" in text, text


@pytest.mark.parametrize("mistake", ["data dir is a file", "secret too short"])
async def test_a_data_dir_mistake_is_one_line(tmp_path: Path, mistake: str) -> None:
    data = tmp_path / "data"
    if mistake == "data dir is a file":
        data.write_text("not a directory")
    else:
        data.mkdir()
        (data / "jwt-secret").write_text("short")
    with trio.move_on_after(START_TIMEOUT_S) as waiting:  # a node that starts never exits
        result = await trio.run_process(
            [sys.executable, "-m", "chatnode", "serve", "--port", "0"],
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("CHATNODE_")},
                "CHATNODE_DATA_DIR": str(data),
            },
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert not waiting.cancelled_caught, f"the node started with the mistake ({mistake})"
    lines = [line for line in result.stderr.decode().splitlines() if "configuration" in line]
    assert result.returncode == 2, result.stderr.decode()
    assert len(lines) == 1 and "CHATNODE_DATA_DIR" in lines[0], result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()


# -- #14: `chatnode config` shows every setting, no secret ----------------------------------------


async def test_config_output_masks_every_secret() -> None:
    secrets_used = {
        "mysql": "my-Pa55:word",
        "redis": "redis-pass-9",
        "es": "es-pass-7",
        "es_key": "es-api-key-3",
        "jwt": secrets.token_urlsafe(40),
    }
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CHATNODE_")},
        "CHATNODE_MYSQL_URL": "mysql://chatnode:my-Pa55%3Aword@db.internal:3306/chatnode",
        "CHATNODE_REDIS_URL": "redis://default:redis-pass-9@redis.internal:6379/0",
        "CHATNODE_ELASTICSEARCH_URL": "https://elastic:es-pass-7@es.internal:9200/?api_key=es-api-key-3",
        "CHATNODE_JWT_SECRET": secrets_used["jwt"],
    }
    result = await trio.run_process(
        [sys.executable, "-m", "chatnode", "config"],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
    )
    out = result.stdout.decode() + result.stderr.decode()
    for what, secret in secrets_used.items():
        assert secret not in out, f"{what} secret printed:\n{out}"
    assert "my-Pa55%3Aword" not in out
    shown = json.loads(result.stdout)
    lines = result.stdout.decode().splitlines()
    assert len(lines) == len(SETTINGS) + 2  # `{`, one line per setting, `}`
    assert shown.keys() == {s.field for s in SETTINGS}
    # What is not secret is still there to check.
    assert shown["mysql_url"] == "mysql://chatnode:***@db.internal:3306/chatnode"
    assert shown["redis_url"] == "redis://default:***@redis.internal:6379/0"
    assert shown["elasticsearch_url"] == "https://elastic:***@es.internal:9200/?api_key=***"
    assert shown["jwt_secret"] == "***"


async def test_a_backend_url_mistake_is_one_line_without_its_password() -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CHATNODE_")},
        "CHATNODE_MYSQL_URL": "mysql://chatnode:hunter2-db@db.internal:3306",  # no database
        "CHATNODE_REDIS_URL": "redis://redis.internal:6379/0",
        "CHATNODE_ELASTICSEARCH_URL": "http://es.internal:9200",
        "CHATNODE_JWT_SECRET": secrets.token_urlsafe(40),
    }
    for command in ("config", "serve"):
        result = await trio.run_process(
            [sys.executable, "-m", "chatnode", command],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        out = (result.stdout + result.stderr).decode()
        assert result.returncode == 2, out
        assert "hunter2-db" not in out
        assert out.strip().splitlines() == [
            "chatnode: configuration error: CHATNODE_MYSQL_URL must name one database:"
            " mysql://host/<database>"
        ]


# -- #16: nginx -----------------------------------------------------------------------------------


@needs_nginx
def test_the_production_config_passes_nginx_t_with_its_limits(tmp_path: Path) -> None:
    """The defaults (what compose ships) with TLS: valid for nginx, and every defence in it."""
    cert, key = dev_cert(tmp_path / "certs")
    prefix = tmp_path / "ngx"
    defaults = render_module.Options(nodes=("unix:/run/chatnode/node1.sock",))
    options = render_module.Options(
        nodes=("unix:/run/chatnode/node1.sock", "unix:/run/chatnode/node2.sock"),
        listen="127.0.0.1:80",
        prefix=str(prefix),
        tls_cert=str(cert),
        tls_key=str(key),
        tls_listen="127.0.0.1:443",
        user="root" if os.geteuid() == 0 else None,
    )
    text = render_module.render(options)
    render_module.create_dirs(options)
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    nginx_test_config(conf)
    assert f"limit_conn chatnode_conn_addr {defaults.limit_conn};" in text
    for zone in ("api", "join", "password"):
        rate = getattr(defaults, f"limit_{zone}")
        burst = getattr(defaults, f"limit_{zone}_burst")
        assert f"zone=chatnode_req_{zone}:10m rate={rate};" in text
        assert f"limit_req zone=chatnode_req_{zone} burst={burst} nodelay;" in text
    assert "return 301 https://$host$request_uri;" in text
    assert 'add_header Strict-Transport-Security "max-age=31536000" always;' in text
    # The compose file is this render with the compose paths.
    compose = render_module.COMPOSE_OUTPUT.read_text()
    assert compose == render_module.render(render_module.compose_options())
    for line in ("limit_req zone=chatnode_req_password", "return 301 https://", "deny all;"):
        assert line in compose


async def handshake(port: int, ciphers: str, tls: ssl.TLSVersion) -> str | None:
    """The cipher nginx agreed to when offered only ``ciphers`` at version ``tls``, or None
    if it refused the handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = tls
    if tls is ssl.TLSVersion.TLSv1_2:
        context.set_ciphers(ciphers + ":@SECLEVEL=0")  # offer it even if OpenSSL dislikes it
    stream = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", port), context, server_hostname="localhost"
    )
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError:
        return None
    cipher = stream.cipher()
    await stream.aclose()
    return cipher[0] if cipher else None


@needs_nginx
async def test_tls_accepts_only_forward_secret_ciphers(tmp_path: Path) -> None:
    cert, key = dev_cert(tmp_path / "certs")
    tls_port = free_port()
    async with (
        running_upstream() as upstream,
        running_nginx(
            [upstream.port],
            prefix_dir=tmp_path / "nginx",
            tls_cert=cert,
            tls_key=key,
            tls_port=tls_port,
        ),
    ):
        v12, v13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
        assert await handshake(tls_port, "AES128-SHA", v12) is None  # RSA key exchange
        assert await handshake(tls_port, "AES256-GCM-SHA384", v12) is None
        assert await handshake(tls_port, "ECDHE-RSA-AES128-SHA", v12) is None  # no AEAD
        ecdhe = "ECDHE-RSA-AES128-GCM-SHA256"
        assert await handshake(tls_port, ecdhe, v12) == ecdhe
        assert await handshake(tls_port, "", v13) is not None


@needs_nginx
async def test_plain_http_redirects_to_https_which_sends_hsts(tmp_path: Path) -> None:
    cert, key = dev_cert(tmp_path / "certs")
    tls_port = free_port()
    async with (
        running_upstream() as upstream,
        running_nginx(
            [upstream.port],
            prefix_dir=tmp_path / "nginx",
            tls_cert=cert,
            tls_key=key,
            tls_port=tls_port,
        ) as port,
    ):
        for method, target in (("GET", "/v1/chatrooms?after=3"), ("POST", "/v1/tokens")):
            answer = await request(port, target, method=method)
            assert answer.status == 301, answer
            assert answer.headers["location"] == f"https://127.0.0.1:{tls_port}{target}"
        assert not upstream.seen  # nothing went to a node in cleartext
        assert (await request(port, "/nginx-health")).status == 200  # plain probes still work
        async with httpx.AsyncClient(verify=False, timeout=10) as client:
            for path in ("/v1/chatrooms", "/nginx-health", "/metrics"):
                r = await client.get(f"https://127.0.0.1:{tls_port}{path}")
                assert r.status_code == 200
                assert r.headers["strict-transport-security"] == "max-age=31536000"


@needs_nginx
async def test_readyz_and_metrics_only_from_internal_networks(tmp_path: Path) -> None:
    async with running_upstream() as upstream:
        async with running_nginx([upstream.port], prefix_dir=tmp_path / "default") as port:
            for target in ("/readyz", "/metrics", "/readyz?verbose=1", "//metrics", "/%6detrics"):
                answer = await request(port, target, source=OUTSIDER)
                assert answer.status == 403, (target, answer)
            assert not upstream.seen
            for target in ("/readyz", "/metrics"):  # the host itself (default: loopback)
                assert (await request(port, target)).status == 200
            assert (await request(port, "/healthz", source=OUTSIDER)).status == 200
        async with running_nginx(
            [upstream.port],
            prefix_dir=tmp_path / "private-net",
            internal_networks=("10.0.0.0/8", "fd00::/8"),
        ) as port:
            for target in ("/readyz", "/metrics"):
                assert (await request(port, target)).status == 403


@needs_nginx
async def test_every_proxied_location_names_the_client_in_x_real_ip(tmp_path: Path) -> None:
    """A client's own X-Real-IP never reaches a node, which would trust it from nginx."""
    forged = {"X-Real-IP": "203.0.113.9", "X-Forwarded-For": "203.0.113.9"}
    targets = [
        ("GET", "/v1/chatrooms", {}),
        ("GET", "/v1/chatrooms/1/join", WEBSOCKET_HEADERS),
        ("GET", "/readyz", {}),
        ("GET", "/metrics", {}),
        ("POST", "/v1/tokens", {}),
        ("POST", "/v1/users", {}),
        ("POST", "/v1/chatrooms/users", {}),
    ]
    async with (
        running_upstream() as upstream,
        running_nginx([upstream.port], prefix_dir=tmp_path / "nginx") as port,
    ):
        for method, target, headers in targets:
            answer = await request(port, target, method=method, headers={**headers, **forged})
            assert answer.status == 200, (target, answer)
            assert answer.json()["headers"]["x-real-ip"] == "127.0.0.1", target


LIMITED = {"limit_api": "1r/m", "limit_join": "1r/m", "limit_password": "1r/m"}
BURST = {"limit_api_burst": 2, "limit_join_burst": 2, "limit_password_burst": 2}


@needs_nginx
@pytest.mark.parametrize(
    ("zone", "targets"),
    [
        ("api", ["/v1/chatrooms", "/v1/messages/search?q=a", "/healthz"]),
        ("join", ["/v1/chatrooms/1/join", "/v1/chatrooms/2/join", "/v1/chatrooms/1/join"]),
        ("password", ["/v1/tokens", "/v1/users", "/v1/chatrooms/users"]),
    ],
)
async def test_limit_req_answers_429_past_the_rate(
    tmp_path: Path, zone: str, targets: Sequence[str]
) -> None:
    """Rate 1 a minute, burst 2: three requests of a zone pass at once, the fourth is refused
    before it reaches a node; the other zones are counted apart."""
    others = {"api": "/v1/chatrooms", "join": "/v1/chatrooms/3/join", "password": "/v1/tokens"}
    async with (
        running_upstream() as upstream,
        running_nginx([upstream.port], prefix_dir=tmp_path / "nginx", **LIMITED, **BURST) as port,
    ):
        assert [(await request(port, t)).status for t in targets] == [200, 200, 200]
        refused = await request(port, targets[0])
        assert refused.status == 429
        assert len(upstream.seen) == 3
        for other, target in others.items():
            if other != zone:
                assert (await request(port, target)).status == 200, other
        assert (await request(port, targets[1], source=OUTSIDER)).status == 200  # per address


@needs_nginx
async def test_limit_conn_answers_429_past_the_concurrent_requests(tmp_path: Path) -> None:
    async with (
        running_upstream() as upstream,
        running_nginx([upstream.port], prefix_dir=tmp_path / "nginx", limit_conn=2) as port,
        trio.open_nursery() as nursery,
    ):
        held: list[int] = []

        async def hold(target: str) -> None:
            held.append((await request(port, target)).status)

        for i in range(2):
            nursery.start_soon(hold, f"/hold/{i}")
            await upstream.arrivals.receive()  # in flight at the node: counted by nginx
        assert (await request(port, "/v1/chatrooms")).status == 429
        assert (await request(port, "/v1/chatrooms", source=OUTSIDER)).status == 200
        upstream.release.set()
    assert held == [200, 200]


def test_render_mistakes_are_one_line() -> None:
    for args in (
        ["--limit-api", "20"],
        ["--limit-join-burst", "-1"],
        ["--internal-network", "10.0.0.0/33"],
        ["--request-error-log-level", "loud"],
    ):
        result = subprocess.run(
            [sys.executable, str(REPO / "nginx" / "render.py"), "--node", "127.0.0.1:1", *args],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 2, args
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# -- #16: compose ---------------------------------------------------------------------------------


def test_compose_refuses_to_start_without_its_passwords(tmp_path: Path) -> None:
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not installed (scripts/check-compose installs it)")
    empty_env = tmp_path / "empty.env"
    empty_env.write_text("")
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHATNODE_")}
    passwords = {
        "CHATNODE_JWT_SECRET": "a-secret-of-at-least-thirty-two-characters",
        "CHATNODE_DB_PASSWORD": "a-db-password",
    }

    command = [compose, "--project-directory", str(REPO), "-f", str(REPO / "docker-compose.yml")]
    command += ["--env-file", str(empty_env), "config"]

    def config(env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command,
            env={**base, **env},
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    ok = config(passwords)
    assert ok.returncode == 0, ok.stderr
    assert ":chatnode@" not in ok.stdout  # no default password in any URL
    for name in passwords:
        for value in (None, ""):
            env = {k: v for k, v in passwords.items() if k != name}
            if value is not None:
                env[name] = value
            refused = config(env)
            assert refused.returncode != 0, f"compose started with {name}={value!r}"
            assert name in refused.stderr
