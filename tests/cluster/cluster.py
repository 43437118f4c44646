"""A real cluster for tests: N ``chatnode serve`` processes on the real MySQL, Redis and
Elasticsearch (started by scripts/services), behind nginx. Each cluster gets its own MySQL
database and key/index prefix, removed afterwards.

``Cluster.env`` is the cluster's settings with the real service URLs (what migrations, clean-up
and a test's own checks use); ``node_env`` / ``per_node_env`` change only what the node
processes get (e.g. a fault-injecting proxy in front of a service), and ``Cluster.nodes`` are
the processes (``kill()``, ``terminate()``, ``pid``) for tests that crash or stop one."""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest

from chatnode.config import Config
from tests.cluster.harness import NodeProcess, running_nginx, started_node_process

SERVICES = ("CHATNODE_TEST_MYSQL_URL", "CHATNODE_TEST_REDIS_URL", "CHATNODE_TEST_ES_URL")


def require_services() -> dict[str, str]:
    missing = [name for name in SERVICES if not os.environ.get(name)]
    if missing:
        if os.environ.get("CI") or os.environ.get("CHATNODE_REQUIRE_SERVICES"):
            pytest.fail(
                f"cluster tests need {', '.join(missing)} (scripts/services up; eval $(scripts/services env))"
            )
        pytest.skip(f"needs {', '.join(missing)}: scripts/services up")
    return {name: os.environ[name] for name in SERVICES}


@attrs.define
class Cluster:
    env: dict[str, str]
    node_ports: list[int]
    nginx_port: int
    prefix: str
    nodes: list[NodeProcess] = attrs.Factory(list)
    tmp: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.nginx_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.nginx_port}"

    def node_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.node_ports[i]}"

    async def grant_admin(self, name: str) -> None:
        """``chatnode users grant-admin NAME`` as an operator runs it against the cluster."""
        import trio

        from tests.e2e.harness import chatnode_cli

        with trio.fail_after(30):
            await chatnode_cli("users", "grant-admin", name, env=self.env)


def cluster_env(**overrides: Any) -> dict[str, str]:
    urls = require_services()
    prefix = f"t{secrets.token_hex(5)}"
    mysql = urls["CHATNODE_TEST_MYSQL_URL"].rsplit("/", 1)[0] + f"/chatnode_test_{prefix}"
    env = {
        "CHATNODE_MYSQL_URL": mysql,
        "CHATNODE_REDIS_URL": urls["CHATNODE_TEST_REDIS_URL"],
        "CHATNODE_ELASTICSEARCH_URL": urls["CHATNODE_TEST_ES_URL"],
        "CHATNODE_KEY_PREFIX": prefix,
        "CHATNODE_JWT_SECRET": secrets.token_urlsafe(40),
        "CHATNODE_PASSWORD_COST_LOG2": "10",
        "CHATNODE_RATE_MESSAGES_PER_S": "100000",
        "CHATNODE_RATE_BURST": "100000",
        # Tests make many users, tokens and rooms from one address (tests/security/ sets these
        # limits back to what they try to exceed).
        "CHATNODE_SIGNUP_ADDRESS_BURST": "100000",
        "CHATNODE_LOGIN_ADDRESS_BURST": "100000",
        "CHATNODE_LOGIN_FAILURES_BURST": "100000",
        "CHATNODE_ROOM_CREATE_BURST": "100000",
        "CHATNODE_LOG_LEVEL": "INFO",
    }
    env.update({f"CHATNODE_{k.upper()}": str(v) for k, v in overrides.items()})
    return env


async def migrate_env(env: dict[str, str]) -> None:
    from chatnode.config import load_config
    from chatnode.wiring import migrate

    config: Config = load_config(env)
    assert await migrate(config) == 0


async def drop_env(env: dict[str, str]) -> None:
    """Remove the cluster's database, index and keys: each of them even when another could
    not be (a test's own Redis may be gone already), and even when the test was cancelled
    (shielded, bounded by 60 s), so no index or template is left in the shared services."""
    import trio

    failures: list[BaseException] = []
    with trio.CancelScope(shield=True), trio.fail_after(60):
        for drop in (_drop_database, _drop_index, _drop_keys):
            try:
                await drop(env)
            except Exception as exc:
                failures.append(exc)
    if failures:
        raise failures[0]


async def _drop_database(env: dict[str, str]) -> None:
    import MySQLdb
    import trio

    from chatnode.adapters.mysql import MysqlUrl

    url = MysqlUrl.parse(env["CHATNODE_MYSQL_URL"])

    def drop_db() -> None:
        conn = MySQLdb.connect(host=url.host, port=url.port, user=url.user, password=url.password)
        try:
            conn.cursor().execute(f"DROP DATABASE IF EXISTS `{url.database}`")
        finally:
            conn.close()

    await trio.to_thread.run_sync(drop_db)


async def _drop_index(env: dict[str, str]) -> None:
    from tests.es_cleanup import drop_es_prefix

    await drop_es_prefix(env["CHATNODE_ELASTICSEARCH_URL"], env["CHATNODE_KEY_PREFIX"])


async def _drop_keys(env: dict[str, str]) -> None:
    from tests.redis_support import RedisAdmin

    async with RedisAdmin.from_url(env["CHATNODE_REDIS_URL"]) as redis:
        await redis.delete_prefix(env["CHATNODE_KEY_PREFIX"])


@asynccontextmanager
async def running_cluster(
    nodes: int = 2,
    *,
    node_env: Mapping[str, str] | Callable[[dict[str, str]], Mapping[str, str]] | None = None,
    per_node_env: Sequence[Mapping[str, str]] = (),
    **overrides: Any,
) -> AsyncIterator[Cluster]:
    """``nodes`` node processes behind nginx. ``overrides`` are settings of the whole cluster
    (``room_log_length=10`` -> ``CHATNODE_ROOM_LOG_LENGTH``); ``node_env`` (every node) and
    ``per_node_env[i]`` (node i) are extra environment of the node processes only;
    ``node_env`` may be a function of the cluster's settings (e.g. to point the nodes at a
    proxy in front of the cluster's own MySQL database)."""
    env = cluster_env(**overrides)
    extra = node_env(dict(env)) if callable(node_env) else (node_env or {})
    await migrate_env(env)
    try:
        async with AsyncExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chatnode-cluster-")))
            processes = []
            for i in range(nodes):
                process_env = {
                    **env,
                    "CHATNODE_NODE_ID": f"node{i + 1}",
                    "CHATNODE_DATA_DIR": str(tmp / f"node{i + 1}"),
                    **extra,
                    **(per_node_env[i] if i < len(per_node_env) else {}),
                }
                (tmp / f"node{i + 1}").mkdir()
                processes.append(await stack.enter_async_context(started_node_process(process_env)))
            ports = [p.port for p in processes]
            nginx_port = await stack.enter_async_context(
                running_nginx(ports, prefix_dir=tmp / "nginx")
            )
            yield Cluster(env, ports, nginx_port, env["CHATNODE_KEY_PREFIX"], processes, tmp)
    finally:
        await drop_env(env)
