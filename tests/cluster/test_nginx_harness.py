"""nginx (rendered by nginx/render.py) in front of two real chatnode processes (embedded mode,
each its own data dir, insecure so joins use ``?user=``): the routing the deployment relies on."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import pytest
from trio_websocket import open_websocket_url

from tests.cluster.harness import (
    NGINX_BIN,
    free_port,
    http_get,
    nginx_available,
    nginx_test_config,
    render_module,
    render_nginx_config,
    running_nginx,
    running_node_process,
)

pytestmark = pytest.mark.skipif(
    not nginx_available(), reason=f"nginx not installed at {NGINX_BIN} (scripts/services install)"
)

REPO = Path(__file__).resolve().parents[2]
ROOM = 1


def node_env(data_dir: Path, node_id: str) -> dict[str, str]:
    return {
        "CHATNODE_DATA_DIR": str(data_dir),
        "CHATNODE_NODE_ID": node_id,
        "CHATNODE_INSECURE": "1",
        "CHATNODE_PASSWORD_COST_LOG2": "10",
        "CHATNODE_DRAIN_TIMEOUT_S": "2",
        "CHATNODE_LOG_LEVEL": "WARNING",
        "CHATNODE_SIGNUP_ADDRESS_BURST": "1000",  # 16 users from this test's one address
    }


@asynccontextmanager
async def two_nodes_behind_nginx(tmp_path: Path) -> AsyncIterator[tuple[list[int], int]]:
    async with AsyncExitStack() as stack:
        ports = [
            await stack.enter_async_context(
                running_node_process(node_env(tmp_path / f"node{i}", f"node{i}"))
            )
            for i in (1, 2)
        ]
        nginx_port = await stack.enter_async_context(
            running_nginx(ports, prefix_dir=tmp_path / "nginx")
        )
        yield ports, nginx_port


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


# -- the rendered config ------------------------------------------------------------------------


def test_rendered_config_passes_nginx_t_with_tls(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    conf = render_nginx_config(
        [free_port(), free_port(), free_port()],
        free_port(),
        tmp_path / "ngx",
        tls_cert=cert,
        tls_key=key,
        tls_port=free_port(),
    )
    nginx_test_config(conf)
    text = conf.read_text()
    assert "hash $chatnode_user consistent;" in text
    assert "least_conn;" in text
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in text
    assert "worker_processes 1;" in text
    assert not re.search(
        r"^\s*daemon ", text, re.M
    )  # the harness and scripts/cluster pass -g 'daemon off;'


def test_renderer_rejects_bad_options() -> None:
    Options, RenderError = render_module.Options, render_module.RenderError
    for options in (
        Options(nodes=()),
        Options(nodes=("127.0.0.1:8081", "127.0.0.1:8081")),
        Options(nodes=("127.0.0.1",)),
        Options(nodes=("127.0.0.1:8081",), tls_cert="/c.pem"),
        Options(nodes=("127.0.0.1:8081",), prefix="/tmp/a b"),
        Options(nodes=("127.0.0.1:8081",), worker_processes="0"),
    ):
        with pytest.raises(RenderError):
            render_module.render(options)


def test_compose_nginx_conf_is_rendered_from_the_template() -> None:
    """docker-compose.yml mounts nginx/compose/nginx.conf; it must be what the renderer makes
    (regenerate with `python3 nginx/render.py --compose -o nginx/compose/nginx.conf`)."""
    expected = render_module.render(render_module.compose_options())
    assert render_module.COMPOSE_OUTPUT.read_text() == expected
    # nodes through the shared socket volume: a re-created container binds the same path
    assert "server unix:/run/chatnode/node2.sock " in expected
    assert "resolver" not in expected


# -- through a running nginx ----------------------------------------------------------------------


async def test_api_and_nginx_health_through_nginx(tmp_path: Path) -> None:
    async with two_nodes_behind_nginx(tmp_path) as (node_ports, port):
        status, body = await http_get(port, "/nginx-health")
        assert (status, body) == (200, b"ok\n")

        seen = set()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for _ in range(8):  # least_conn over idle nodes takes turns
                r = await client.get("/healthz")
                assert r.status_code == 200, r.text
                seen.add(r.json()["node"])
            assert seen == {"node1", "node2"}

            r = await client.post("/v1/chatrooms/users", json={"name": "ann"})
            assert r.status_code == 201, r.text
            r = await client.post(
                "/v1/chatrooms/users",
                content=b"x" * (65 * 1024),
                headers={"Content-Type": "application/json"},
            )
            assert r.status_code == 413  # client_max_body_size, answered by nginx

        for node_port in node_ports:  # nginx did not break the nodes' own health check
            assert (await http_get(node_port, "/healthz"))[0] == 200


async def online_on(node_port: int, room: int) -> list[str]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node_port}", timeout=10) as c:
        r = await c.get(f"/v1/chatrooms/{room}/users")
        assert r.status_code == 200, r.text
        online: list[str] = r.json()["online"]
        return online


async def test_websocket_join_passes_through_nginx_hashed_by_user(tmp_path: Path) -> None:
    users = [f"user{i:02d}" for i in range(16)]
    async with two_nodes_behind_nginx(tmp_path) as (node_ports, port):
        # Two embedded nodes share nothing: give both the same users and room 1 directly.
        for node_port in node_ports:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node_port}", timeout=10) as c:
                for name in users:
                    assert (
                        await c.post("/v1/chatrooms/users", json={"name": name})
                    ).status_code == 201
                r = await c.post("/v1/chatrooms", json={"name": "lobby"})
                assert r.status_code == 201 and r.json()["id"] == ROOM

        url = f"ws://127.0.0.1:{port}/v1/chatrooms/{ROOM}/join?user="
        # chatnode.v1 through nginx: joined, live, send, ack, own message back.
        async with open_websocket_url(url + users[0], subprotocols=["chatnode.v1"]) as ws:
            assert ws.subprotocol == "chatnode.v1"
            frames = [json.loads(await ws.get_message())]
            while frames[-1]["type"] != "live":
                frames.append(json.loads(await ws.get_message()))
            assert frames[0]["type"] == "joined"
            await ws.send_message(
                json.dumps({"type": "send", "id": "m1", "message": "hello via nginx"})
            )
            got: dict[str, dict[str, object]] = {}
            while not {"ack", "message"} <= got.keys():
                frame = json.loads(await ws.get_message())
                got[frame["type"]] = frame
            assert got["ack"]["id"] == "m1"
            assert got["message"]["message"] == "hello via nginx"
            assert got["message"]["user"] == users[0]
            first_home = [p for p in node_ports if users[0] in await online_on(p, ROOM)]
            assert len(first_home) == 1

        # Every user's joins land on one node, the same one each time; users spread over both.
        async with AsyncExitStack() as stack:
            for name in users:
                ws = await stack.enter_async_context(open_websocket_url(url + name))  # seed dialect
                await ws.send_message(f"hi from {name}")
                while json.loads(await ws.get_message())["user"] != name:
                    pass  # history and others' messages come first
            online = {p: set(await online_on(p, ROOM)) for p in node_ports}
        assert online[node_ports[0]] | online[node_ports[1]] == set(users)
        assert not online[node_ports[0]] & online[node_ports[1]]
        assert online[node_ports[0]] and online[node_ports[1]], online
        assert users[0] in online[first_home[0]]


async def test_tls_listener_proxies_the_api(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    tls_port = free_port()
    async with (
        running_node_process(node_env(tmp_path / "node1", "node1")) as node_port,
        running_nginx(
            [node_port],
            prefix_dir=tmp_path / "nginx",
            tls_cert=cert,
            tls_key=key,
            tls_port=tls_port,
        ) as port,
    ):
        async with httpx.AsyncClient(verify=False, timeout=10) as client:
            r = await client.get(f"https://127.0.0.1:{tls_port}/healthz")
            assert r.status_code == 200 and r.json()["node"] == "node1"
            r = await client.get(f"https://127.0.0.1:{tls_port}/nginx-health")
            assert r.status_code == 200
        assert (await http_get(port, "/nginx-health"))[0] == 200


async def test_node_process_failure_is_reported(tmp_path: Path) -> None:
    from tests.cluster.harness import ProcessFailed

    with pytest.raises(ProcessFailed, match="CHATNODE_LOG_LEVEL"):
        async with running_node_process(
            {"CHATNODE_DATA_DIR": str(tmp_path), "CHATNODE_LOG_LEVEL": "LOUD"}
        ):
            pass  # pragma: no cover


async def test_nodes_on_unix_sockets_behind_nginx(tmp_path: Path) -> None:
    """The same-host deployment: nginx reaches the nodes only through their
    CHATNODE_UNIX_SOCKET (upstream `server unix:...`), REST and WebSocket both."""
    sockets = Path(tempfile.mkdtemp(prefix="cn-ngx-"))  # socket paths must stay short
    try:
        paths = [sockets / f"node{i}.sock" for i in (1, 2)]
        async with AsyncExitStack() as stack:
            node_ports = [
                await stack.enter_async_context(
                    running_node_process(
                        dict(
                            node_env(tmp_path / f"node{i}", f"node{i}"),
                            CHATNODE_UNIX_SOCKET=str(path),
                        )
                    )
                )
                for i, path in zip((1, 2), paths, strict=True)
            ]
            port = await stack.enter_async_context(
                running_nginx([f"unix:{p}" for p in paths], prefix_dir=tmp_path / "nginx")
            )
            conf = (tmp_path / "nginx" / "nginx.conf").read_text()
            assert (
                f"server unix:{paths[0]} " in conf
                and "127.0.0.1:" not in conf.split("upstream chatnode_api")[1].split("}")[0]
            )

            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
                seen = {(await c.get("/healthz")).json()["node"] for _ in range(8)}
                assert seen == {"node1", "node2"}
            for node_port in node_ports:
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{node_port}", timeout=10
                ) as c:
                    assert (
                        await c.post("/v1/chatrooms/users", json={"name": "ann"})
                    ).status_code == 201
                    assert (await c.post("/v1/chatrooms", json={"name": "lobby"})).json()[
                        "id"
                    ] == ROOM

            url = f"ws://127.0.0.1:{port}/v1/chatrooms/{ROOM}/join?user=ann"
            async with open_websocket_url(url, subprotocols=["chatnode.v1"]) as ws:
                frame = json.loads(await ws.get_message())
                while frame["type"] != "live":
                    frame = json.loads(await ws.get_message())
                await ws.send_message(
                    json.dumps({"type": "send", "id": "u1", "message": "via unix"})
                )
                while frame.get("type") != "message":
                    frame = json.loads(await ws.get_message())
                assert (frame["user"], frame["message"]) == ("ann", "via unix")
        assert not any(p.exists() for p in paths)  # each node removed its socket on stop
    finally:
        shutil.rmtree(sockets)
