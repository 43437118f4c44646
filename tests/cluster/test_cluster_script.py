"""scripts/cluster's process management (up, resize, status, env, down) with nginx for real and
embedded nodes standing in for cluster nodes (a stub ``CHATNODE_BIN`` drops the backend URLs,
so this runs without MariaDB/Redis/Elasticsearch). The backends themselves are covered by the
cluster end-to-end tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.cluster.harness import NGINX_BIN, free_port, nginx_available, node_env

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "cluster"

pytestmark = pytest.mark.skipif(
    not nginx_available(), reason=f"nginx not installed at {NGINX_BIN} (scripts/services install)"
)

STUB = f"""#!/usr/bin/env bash
# scripts/cluster test stub: `migrate` is a no-op, `serve` runs an embedded node.
[[ $1 == migrate ]] && {{ echo "stub migrate: $CHATNODE_MYSQL_URL"; exit 0; }}
exec env -u CHATNODE_MYSQL_URL -u CHATNODE_REDIS_URL -u CHATNODE_ELASTICSEARCH_URL \\
    -u CHATNODE_JWT_SECRET {sys.executable} -m chatnode "$@"
"""


def consecutive_free_ports(count: int) -> int:
    for _ in range(50):
        base = free_port()
        try:
            for offset in range(1, count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        return base
    raise RuntimeError("no run of free ports")


def healthz_node(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
        node: str = json.load(r)["node"]
        return node


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in state


def test_up_resize_status_down(tmp_path: Path) -> None:
    stub = tmp_path / "chatnode-stub"
    stub.write_text(STUB)
    stub.chmod(0o755)
    cluster_dir = tmp_path / "cluster"
    nginx_port, node_port = free_port(), consecutive_free_ports(2)
    env = node_env(
        {
            "CHATNODE_BIN": str(stub),
            "CHATNODE_CLUSTER_DIR": str(cluster_dir),
            "CHATNODE_CLUSTER_PORT": str(nginx_port),
            "CHATNODE_CLUSTER_NODE_PORT": str(node_port),
            "CHATNODE_CLUSTER_NGINX_WORKERS": "1",
            "CHATNODE_CLUSTER_TIMEOUT": "30",
            "CHATNODE_NGINX_BIN": NGINX_BIN,
            "CHATNODE_MYSQL_URL": "mysql://stub@127.0.0.1:1/stub",
            "CHATNODE_REDIS_URL": "redis://127.0.0.1:1/0",
            "CHATNODE_ELASTICSEARCH_URL": "http://127.0.0.1:1",
            "CHATNODE_INSECURE": "1",
            "CHATNODE_PASSWORD_COST_LOG2": "10",
            "CHATNODE_DRAIN_TIMEOUT_S": "2",
        }
    )
    env["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")

    def cluster(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"scripts/cluster {' '.join(args)}: {result.returncode}\n{result.stderr}"
            )
        return result

    try:
        cluster("up", "--nodes", "2", "--no-services")
        assert cluster("status").returncode == 0
        secret = (cluster_dir / "jwt-secret").read_text()
        assert len(secret) >= 32 and (cluster_dir / "jwt-secret").stat().st_mode & 0o077 == 0
        assert {healthz_node(nginx_port) for _ in range(6)} == {"node1", "node2"}
        # nginx reaches the nodes through their Unix sockets (same host)
        conf = (cluster_dir / "nginx" / "nginx.conf").read_text()
        assert f"server unix:{cluster_dir}/node2.sock " in conf, conf
        assert (cluster_dir / "node1.sock").is_socket()
        exported = cluster("env").stdout
        assert f"CHATNODE_CLUSTER_URL='http://127.0.0.1:{nginx_port}'" in exported
        node2_pid = int((cluster_dir / "node2.pid").read_text())

        cluster("up", "--nodes", "1", "--no-services")  # shrink: nginx reloaded, node2 stopped
        assert {healthz_node(nginx_port) for _ in range(4)} == {"node1"}
        assert not pid_alive(node2_pid)
        assert (cluster_dir / "jwt-secret").read_text() == secret  # generated once

        cluster("up", "--no-services")  # idempotent, keeps the node count
        assert "node1: already running" in cluster("up", "--no-services").stderr
        nginx_pid = int((cluster_dir / "nginx.pid").read_text())
        node1_pid = int((cluster_dir / "node1.pid").read_text())
    finally:
        cluster("down", check=False)
    assert cluster("status", check=False).returncode == 3
    assert not pid_alive(nginx_pid) and not pid_alive(node1_pid)
    assert not list(cluster_dir.glob("*.sock"))  # each node removed its socket
