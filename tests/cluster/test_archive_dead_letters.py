"""A running node on the real MySQL, Redis and Elasticsearch meets an archive id that holds
another message (offsets reused after a Redis data loss): the message is not counted as
archived, it is logged whole with the stored one, counted in ``/metrics`` and readable from the
dead letters (``chatnode dead-letters``); the same message stored twice stays fine."""

from __future__ import annotations

import json
import sys
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from chatnode.adapters.elasticsearch import es_client, messages_index
from chatnode.core.models import ChatMessage
from tests.cluster.cluster import Cluster, running_cluster
from tests.cluster.harness import REPO, nginx_available, node_env
from tests.cluster.test_cluster_e2e import chat_messages, read_until_live, token_for
from tests.faults.support import node_metric
from tests.redis_support import RedisAdmin

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not nginx_available(), reason="nginx not installed (scripts/services install)"
    ),
]

METRICS = ("archived", "archive_conflicts", "archive_refused")


async def archive_counts(port: int) -> tuple[int, ...]:
    return tuple([int(await node_metric(port, f"chatnode_{name}_total")) for name in METRICS])


async def wait_counts(port: int, done: int) -> tuple[int, ...]:
    """Bounded polling of ``/metrics`` (the archiver signals nothing to a client) until
    ``done`` messages went through the archiver, archived or not."""
    with trio.fail_after(15):
        while sum(counts := await archive_counts(port)) < done:  # noqa: ASYNC110
            await trio.sleep(0.05)
    return counts


async def dead_letters_cli(cluster: Cluster) -> list[dict[str, Any]]:
    """``chatnode dead-letters`` with the cluster's settings: one JSON object per line."""
    result = await trio.run_process(
        [sys.executable, "-m", "chatnode", "dead-letters"],
        env=node_env(cluster.env),
        cwd=REPO,
        capture_stdout=True,
    )
    return [json.loads(line) for line in result.stdout.decode().splitlines()]


async def test_a_message_whose_id_holds_another_is_kept_logged_and_counted_never_archived() -> None:
    async with (
        running_cluster(nodes=1, archive_linger_s=0.05) as cluster,
        httpx.AsyncClient(base_url=cluster.url) as api,
    ):
        token = await token_for(api, "alice")
        r = await api.post("/v1/chatrooms", headers={"Authorization": f"Bearer {token}"})
        room = r.json()["id"]
        # Stored before Redis lost its data; the room's offsets start again at 1.
        ghost = ChatMessage(room, 2, "ghost", "from before the data loss", 1_700_000_000_000)
        es = es_client(cluster.env["CHATNODE_ELASTICSEARCH_URL"])
        index = messages_index(cluster.prefix)
        try:
            await es.create(index=index, id=f"{room}:2", document=json.loads(ghost.document))
        finally:
            await es.close()

        url = f"{cluster.ws_url}/v1/chatrooms/{room}/join?token={token}"
        async with open_websocket_url(url, subprotocols=["chatnode.v1"]) as ws:
            await read_until_live(ws)
            for n in range(3):
                await ws.send_message(json.dumps({"type": "send", "message": f"hello {n}"}))
            frames = await chat_messages(ws, 3)
        sent = [
            ChatMessage(room, f["offset"], f["user"], f["message"], f["timestamp"]) for f in frames
        ]
        port = cluster.node_ports[0]

        assert await wait_counts(port, 3) == (2, 1, 0)  # archived, conflicts, refused
        log = cluster.nodes[0].log.read_text()
        (conflict_line,) = [line for line in log.splitlines() if "archive conflict" in line]
        assert " ERROR " in conflict_line
        assert sent[1].document.decode() in conflict_line
        assert ghost.document.decode() in conflict_line
        (letter,) = await dead_letters_cli(cluster)
        assert letter["kind"] == "conflict" and letter["key"] == f"{room}:2"
        assert letter["document"] == sent[1].document.decode()
        assert json.loads(letter["stored"]) == json.loads(ghost.document)

        # The same message archived again (a takeover reads it twice): stored, nothing kept.
        async with RedisAdmin.from_url(cluster.env["CHATNODE_REDIS_URL"]) as redis:
            await redis.xadd(f"{cluster.prefix}:archive", {"d": sent[2].document})
        assert await wait_counts(port, 4) == (3, 1, 0)
        assert len(await dead_letters_cli(cluster)) == 1
