"""The messenger workload (issue 16, "Scale"): mostly small rooms, one connection per user.

2,000 users, each on ONE ``GET /v1/connect`` WebSocket (``chatnode.v1``, ``?rooms=all``, so
subscribed to every room of theirs), through the cluster behind nginx (``ChatnodeCluster``:
2 nodes, MySQL, Redis, Elasticsearch, archiver on). 5,000 direct rooms (``POST /v1/direct``)
and 200 private groups of 10 (``POST /v1/chatrooms`` with ``members``): each user has ~5
DMs and one group. Messages go to the rooms from every (user, room) pair in a random order,
open loop, at the offered steps (messages/s); the load generator (``loadgen.py``, kind
``v1connect``) checks that every message arrives once, in order per (room, sender), in the
right room, and records the latency from the scheduled send time.

The peer runs the same workload: the websockets reference in its multi-room mode
(``/v1/connect?user=&rooms=``, one Redis channel per room), 2 processes behind nginx.

Per step: offered and delivered msgs/s, deliveries/s, latency, lost/dup/reordered, the
servers' CPU per message (each node, /proc), Redis's CPU per message; once connected: the
pub/sub subscriptions of each process's Redis connection (``CLIENT LIST TYPE pubsub``) and
Redis's ``used_memory`` before and after the connections subscribed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import re
import secrets
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from common import Http, LoadGenProc, backend_pids, cpu_seconds, log, machine_busy_s
from settings import MESSENGER_WORKLOAD, OVERLOAD_P99_MS, P99_LIMIT_MS
from stats import fmt
from systems import HOST, ChatnodeCluster, Redis, System, WebsocketsRef

SUBPROTOCOL = [["Sec-WebSocket-Protocol", "chatnode.v1"]]


def messenger_user(i: int) -> str:
    return f"mu{i}"


def layout(users: int, dms: int, groups: int, size: int) -> list[list[int]]:
    """The rooms as lists of user indexes: ``dms`` pairs (user i with i+1, i+2, ... mod
    ``users``: each user in ~2*dms/users of them, no pair twice), then ``groups`` groups of
    ``size`` (group g: users g, g+groups, g+2*groups, ...; its first member is its owner)."""
    rooms: list[list[int]] = []
    d = 1
    while len(rooms) < dms:
        for i in range(users):
            if len(rooms) == dms:
                break
            rooms.append([i, (i + d) % users])
        d += 1
    for g in range(groups):
        rooms.append([(g + k * groups) % users for k in range(size)])
    return rooms


def client_specs(
    url_of: Any, users: int, rooms: list[list[int]], ids: list[int], kind: str = "v1connect"
) -> list[dict[str, Any]]:
    mine: list[list[int]] = [[] for _ in range(users)]
    for room_id, members in zip(ids, rooms, strict=True):
        for u in members:
            mine[u].append(room_id)
    return [
        {
            "url": url_of(u, sorted(mine[u])),
            "room": min(mine[u]),
            "rooms": sorted(mine[u]),
            "send_rooms": sorted(mine[u]),
            "kind": kind,
            "sender": True,
            "headers": SUBPROTOCOL,
        }
        for u in range(users)
        if mine[u]
    ]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def mint_token(secret: str, account_id: int, name: str) -> str:
    """An HS256 token as ``POST /v1/tokens`` issues it (chatnode/core/auth.py): the users are
    made without passwords (insecure mode), so the setup signs their tokens with the cluster's
    ``CHATNODE_JWT_SECRET`` instead of hashing 2,000 passwords twice."""
    now_ms = int(time.time() * 1000)
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(
        json.dumps(
            {
                "sub": str(account_id),
                "name": name,
                "adm": False,
                "jti": secrets.token_hex(8),
                "iat": now_ms // 1000,
                "ims": now_ms,
                "exp": now_ms // 1000 + 6 * 3600,
            }
        ).encode()
    )
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def parallel(port: int, tasks: list[Any], fn: Any, workers: int = 16) -> list[Any]:
    """``fn(http, task)`` for every task on ``workers`` threads, each with its own keep-alive
    connection to ``port``; results in order."""
    local = threading.local()

    def run(task: Any) -> Any:
        client = getattr(local, "http", None)
        if client is None:
            client = local.http = Http(HOST, port)
        return fn(client, task)

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(run, tasks))


class MessengerCluster(ChatnodeCluster):
    """chatnode's cluster for the messenger: the same system as the fan-out's, with the
    per-user limits of the setup lifted (each user creates <= 4 rooms, below the default
    burst of 10, but the setup must not depend on it) and a connection's room cap left at
    its default (500; a user here has ~6 rooms)."""

    def _env(self) -> dict[str, str]:
        env = super()._env()
        env.update(
            CHATNODE_ROOM_CREATE_BURST="100000",
            CHATNODE_MEMBER_CHANGE_BURST="100000",
        )
        return env

    def account_ids(self, names: list[str]) -> dict[str, int]:
        """The users' account ids, from the directory (MySQL) with the mariadb client."""
        u = urlsplit(self.mysql_url)
        out = subprocess.run(
            [
                "mariadb",
                "--no-defaults",
                f"-h{u.hostname}",
                f"-P{u.port or 3306}",
                f"-u{u.username}",
                f"-p{u.password}",
                "-N",
                "-B",
                u.path.lstrip("/"),
                "-e",
                "SELECT id, name FROM users WHERE name LIKE 'mu%'",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        ids = {}
        for line in out.stdout.splitlines():
            i, name = line.split("\t")
            ids[name] = int(i)
        missing = [n for n in names if n not in ids]
        if missing:
            raise RuntimeError(f"{len(missing)} users not in the directory, e.g. {missing[:3]}")
        return ids

    def prepare_messenger(self, w: dict[str, int]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        port = self.entry_port
        timing: dict[str, Any] = {}
        t0 = time.monotonic()
        status, body = Http(HOST, self.entry_port).request("DELETE", "/v1/users")
        if status != 200:
            raise RuntimeError(f"DELETE /v1/users: {status} {body}")
        timing["delete_users_s"] = time.monotonic() - t0
        names = [messenger_user(i) for i in range(w["users"])]

        def create_user(http: Http, name: str) -> None:
            status, body = http.request("POST", "/v1/users", {"name": name})
            if status != 201:
                raise RuntimeError(f"create user {name}: {status} {body}")

        t = time.monotonic()
        parallel(port, names, create_user)
        timing["users_s"] = time.monotonic() - t
        t = time.monotonic()
        time.sleep(0.01)  # tokens issued after the DELETE's millisecond
        ids = self.account_ids(names)
        tokens = {n: mint_token(self.secret, ids[n], n) for n in names}
        timing["tokens_s"] = time.monotonic() - t
        rooms = layout(w["users"], w["dms"], w["groups"], w["group_size"])

        def create_room(http: Http, members: list[int]) -> int:
            owner = names[members[0]]
            auth = {"Authorization": f"Bearer {tokens[owner]}"}
            if len(members) == 2:
                status, body = http.request("POST", "/v1/direct", {"user": names[members[1]]}, auth)
            else:
                status, body = http.request(
                    "POST",
                    "/v1/chatrooms",
                    {
                        "name": f"group-{members[0]}",
                        "visibility": "private",
                        "members": [names[m] for m in members[1:]],
                    },
                    auth,
                )
            if status not in (200, 201):
                raise RuntimeError(f"create room {members[:3]}: {status} {body}")
            return int(body["id"])

        t = time.monotonic()
        room_ids = parallel(port, rooms, create_room)
        timing["rooms_s"] = time.monotonic() - t
        timing["total_s"] = time.monotonic() - t0
        timing["requests"] = 1 + len(names) + len(rooms)
        if len(set(room_ids)) != len(rooms):
            raise RuntimeError(f"{len(rooms)} rooms made, {len(set(room_ids))} distinct ids")
        specs = client_specs(
            lambda u, _rooms: f"ws://{HOST}:{port}/v1/connect?user={names[u]}",
            w["users"],
            rooms,
            room_ids,
        )
        return specs, timing


class MessengerPeer(WebsocketsRef):
    """The websockets reference in its multi-room mode; the rooms are numbered 1..N (the peer
    has no directory: nothing to set up)."""

    def prepare_messenger(self, w: dict[str, int]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        rooms = layout(w["users"], w["dms"], w["groups"], w["group_size"])
        port = self.entry_port
        specs = client_specs(
            lambda u, ids: (
                f"ws://{HOST}:{port}/v1/connect?user={messenger_user(u)}"
                f"&rooms={','.join(map(str, ids))}"
            ),
            w["users"],
            rooms,
            list(range(1, len(rooms) + 1)),
        )
        return specs, {"total_s": 0.0, "requests": 0}


# -- Redis figures ---------------------------------------------------------------------------


def redis_memory(redis: Redis) -> dict[str, int]:
    """``used_memory``, ``used_memory_dataset`` (keys and values; the rest is overhead: the
    pub/sub tables, clients, key dictionaries) and the key count."""
    out: dict[str, int] = {}
    for line in redis.cli("INFO", "memory").splitlines():
        k, _, v = line.partition(":")
        if k in ("used_memory", "used_memory_dataset"):
            out[k] = int(v)
    out["keys"] = int(redis.cli("DBSIZE") or 0)
    return out


def redis_keys(redis: Redis) -> set[str]:
    out = subprocess.run(
        ["redis-cli", "-h", HOST, "-p", str(redis.port), "--scan"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return set(out.stdout.split())


def keys_memory(redis: Redis, keys: set[str], sample: int = 300) -> dict[str, Any]:
    """``MEMORY USAGE`` of up to ``sample`` of ``keys`` (one redis-cli, commands on stdin),
    extrapolated to all of them, and the key families (digits as N)."""
    chosen = random.Random(0).sample(sorted(keys), min(sample, len(keys)))
    out = subprocess.run(
        ["redis-cli", "-h", HOST, "-p", str(redis.port)],
        input="".join(f"MEMORY USAGE {k}\n" for k in chosen),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    sizes = [int(x) for x in out.stdout.split() if x.isdigit()]
    families: dict[str, int] = {}
    for k in keys:
        fam = re.sub(r"[0-9a-f]*[0-9][0-9a-f]*", "N", k)  # ids, hashes
        families[fam] = families.get(fam, 0) + 1
    mean = sum(sizes) / len(sizes) if sizes else 0.0
    return {
        "count": len(keys),
        "sampled": len(sizes),
        "mean_bytes": mean,
        "estimated_bytes": mean * len(keys),
        "families": dict(sorted(families.items(), key=lambda kv: -kv[1])[:8]),
    }


def redis_pubsub(redis: Redis) -> dict[str, Any]:
    """Each pub/sub connection (its client name, address, channels ``sub=``, patterns
    ``psub=``) and the channel count Redis holds (``PUBSUB CHANNELS``)."""
    clients = []
    for line in redis.cli("CLIENT", "LIST", "TYPE", "pubsub").splitlines():
        f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        clients.append(
            {
                "name": f.get("name", ""),
                "addr": f.get("addr", ""),
                "sub": int(f.get("sub", 0)),
                "psub": int(f.get("psub", 0)),
                "omem": int(f.get("omem", 0)),
                "tot_mem": int(f.get("tot-mem", 0)),
            }
        )
    channels = redis.cli("PUBSUB", "CHANNELS")
    return {
        "clients": sorted(clients, key=lambda c: c["name"]),
        "subscriptions": sum(c["sub"] for c in clients),
        "channels": len([c for c in channels.splitlines() if c]),
    }


# -- the run ---------------------------------------------------------------------------------


def run_messenger(
    system: System, workload: dict[str, int], mode: dict[str, Any], redis: Redis
) -> dict[str, Any]:
    out: dict[str, Any] = {"system": system.name, "workload": workload, "steps": []}
    t0 = time.monotonic()
    system.start()
    lg: LoadGenProc | None = None
    try:
        mem0 = redis_memory(redis)
        specs, setup = system.prepare_messenger(workload)  # type: ignore[attr-defined]
        out["setup"] = setup
        log(
            f"  {system.name}: setup {setup['total_s']:.1f}s ({setup['requests']} requests),"
            f" {len(specs)} connections to open"
        )
        time.sleep(1.0)
        mem1 = redis_memory(redis)
        keys1 = redis_keys(redis)
        lg = LoadGenProc()
        conn = lg.call({"cmd": "connect", "clients": specs, "concurrency": 64, "timeout_s": 120})
        out["connect"] = conn
        if conn["failed"]:
            raise RuntimeError(
                f"{conn['failed']} of {len(specs)} clients did not connect: {conn['errors']}"
            )
        time.sleep(2.0)
        mem2 = redis_memory(redis)
        ps = redis_pubsub(redis)
        new_keys = keys_memory(redis, redis_keys(redis) - keys1)
        subs = ps["subscriptions"]
        grown = mem2["used_memory"] - mem1["used_memory"]
        grown_data = mem2["used_memory_dataset"] - mem1["used_memory_dataset"]
        out["redis"] = {
            "before_setup": mem0,
            "before_connect": mem1,
            "after_connect": mem2,
            "pubsub": ps,
            # all of used_memory's growth on connecting, per subscription (chatnode also
            # writes presence keys then), and the growth outside the dataset alone
            "bytes_per_subscription": grown / subs if subs else None,
            "overhead_bytes_per_subscription": (grown - grown_data) / subs if subs else None,
            # the keys the connections wrote (chatnode: presence, directory caches), their
            # MEMORY USAGE sampled; what is left of the growth is the pub/sub tables'
            "new_keys": new_keys,
            "pubsub_bytes_per_subscription": (grown - new_keys["estimated_bytes"]) / subs
            if subs
            else None,
        }
        log(
            f"  {system.name}: {conn['connected']} connected in {conn['elapsed_s']:.1f}s;"
            f" Redis pub/sub "
            + ", ".join(f"{c['name'] or c['addr']} sub={c['sub']}" for c in ps["clients"])
            + f"; used_memory +{grown} B (dataset +{grown_data} B, keys"
            f" {mem1['keys']} -> {mem2['keys']}) = {fmt(out['redis']['bytes_per_subscription'], 0)}"
            f" B per subscription ({fmt(out['redis']['overhead_bytes_per_subscription'], 0)}"
            f" outside the dataset); new keys {new_keys['count']}"
            f" ~{new_keys['estimated_bytes'] / 2**20:.1f} MiB {new_keys['families']}, the rest"
            f" {fmt(out['redis']['pubsub_bytes_per_subscription'], 0)} B per subscription"
        )
        # what the servers burn with everyone connected and nothing sent (pings, presence,
        # timers): per step it is spread over the messages, most at the lowest step
        servers = system.server_pids()
        c_idle0, t_idle = cpu_seconds(servers), time.monotonic()
        time.sleep(3.0)
        out["idle_cores"] = (cpu_seconds(servers) - c_idle0) / (time.monotonic() - t_idle)
        log(f"  {system.name}: idle, everyone connected: {out['idle_cores']:.1%} of a core")
        out["warmup"] = lg.call(
            {
                "cmd": "step",
                "rate_msgs": mode["steps"][0],
                "count": int(mode["steps"][0] * mode["warmup_s"]),
                "drain_s": 3.0,
                "shuffle": 0,
                "min_sleep_ms": 1.0,
            }
        )
        skip_reason = None
        for n, offered in enumerate(mode["steps"], 1):
            if skip_reason:
                out["steps"].append({"offered": offered, "skipped": skip_reason})
                continue
            out["steps"].append(_step(system, redis, lg, offered, mode["step_s"], seed=n))
            st = out["steps"][-1]
            if (st["latency_ms"]["p99"] or 0) > OVERLOAD_P99_MS or st["lost"] > 0:
                skip_reason = (
                    f"overloaded at {offered}/s (p99 {fmt(st['latency_ms']['p99'])} ms,"
                    f" lost {st['lost']})"
                )
        out["redis"]["used_memory_after_steps"] = redis_memory(redis)
    finally:
        if lg is not None:
            lg.close()
        system.stop()
    out["knee"] = knee(out["steps"])
    out["elapsed_s"] = time.monotonic() - t0
    return out


def _step(
    system: System, redis: Redis, lg: LoadGenProc, offered: int, step_s: float, seed: int
) -> dict[str, Any]:
    servers, nginx, rpids = system.server_pids(), system.nginx.pids(), redis.pids()  # type: ignore[union-attr]
    groups = system.node_pid_groups()
    backends = backend_pids() if system.name == "chatnode-cluster" else []
    c_srv, c_ngx, c_red = cpu_seconds(servers), cpu_seconds(nginx), cpu_seconds(rpids)
    c_be = cpu_seconds(backends)
    c_nodes = [cpu_seconds(g) for g in groups]
    c_lg, c_all = cpu_seconds([lg.pid]), machine_busy_s()
    count = int(offered * step_s)
    r = lg.call(
        {
            "cmd": "step",
            "rate_msgs": offered,
            "count": count,
            "drain_s": 5.0,
            "max_drain_s": 60.0,
            "shuffle": seed,
            "min_sleep_ms": 1.0,
        }
    )
    d_srv, d_ngx = cpu_seconds(servers) - c_srv, cpu_seconds(nginx) - c_ngx
    d_red = cpu_seconds(rpids) - c_red
    d_be = cpu_seconds(backends) - c_be
    d_nodes = [cpu_seconds(g) - c for g, c in zip(groups, c_nodes, strict=True)]
    d_lg, d_all = cpu_seconds([lg.pid]) - c_lg, machine_busy_s() - c_all
    system.check_alive()
    sent = max(1, r["sent"])
    wall = r["wall_s"]
    fanout = r["expected"] / sent if r["expected"] else 0.0
    step = {
        "offered": offered,
        **r,
        "sent_msgs_per_s": r["sent"] / r["send_window_s"] if r["send_window_s"] else None,
        "delivered_msgs_per_s": (r["received"] / fanout / wall) if fanout else 0.0,
        "deliveries_per_s": r["received"] / wall,
        "deliveries_per_message": fanout,
        "server_cpu_us_per_msg": d_srv / sent * 1e6,
        "node_cpu_us_per_msg": [d / sent * 1e6 for d in d_nodes],
        "redis_cpu_us_per_msg": d_red / sent * 1e6,
        "nginx_cpu_us_per_msg": d_ngx / sent * 1e6,
        # Elasticsearch + MariaDB (shared services, unpinned; chatnode only)
        "backend_cpu_us_per_msg": d_be / sent * 1e6,
        "server_cpu_us_per_delivery": d_srv / max(1, r["received"]) * 1e6,
        "server_util": d_srv / wall,
        "foreign_util": max(0.0, d_all - d_srv - d_ngx - d_red - d_lg - d_be) / wall,
    }
    step["clean"] = r["lost"] == 0 and r["dups"] == 0 and r["reorders"] == 0
    lat = r["latency_ms"]
    log(
        f"  {system.name:17s} {offered:>5} msgs/s: delivered {step['delivered_msgs_per_s']:.0f}"
        f" msgs/s ({step['deliveries_per_s']:.0f} deliveries/s) p50 {fmt(lat['p50'])}"
        f" p99 {fmt(lat['p99'])} ms; cpu {step['server_cpu_us_per_msg']:.0f} us/msg (nodes "
        + " + ".join(f"{x:.0f}" for x in step["node_cpu_us_per_msg"])
        + f"), redis {step['redis_cpu_us_per_msg']:.1f}, es+mariadb"
        f" {step['backend_cpu_us_per_msg']:.0f}, nginx"
        f" {step['nginx_cpu_us_per_msg']:.0f}; lost {r['lost']} dup {r['dups']} reord"
        f" {r['reorders']} wrong-room {r['wrong_room']}; loadgen {r['loadgen_cpu_util']:.0%}"
        f" other {step['foreign_util']:.0%}"
    )
    return step


def knee(steps: list[dict[str, Any]]) -> int:
    """The highest offered msgs/s with p99 <= the limit and nothing lost, duplicated or
    reordered, every lower step likewise."""
    best = 0
    for st in steps:
        if (
            "skipped" in st
            or not st["clean"]
            or st.get("wrong_room")
            or st["latency_ms"]["p99"] is None
            or st["latency_ms"]["p99"] > P99_LIMIT_MS
        ):
            break
        best = st["offered"]
    return best


def busy_room_reference(
    fanout_agg: dict[str, Any], make_cluster: Any, mode: dict[str, Any], step: int
) -> dict[str, Any]:
    """Today's per-message cost in a busy room: the nodes' CPU per delivery at ``step``
    deliveries/s of the fan-out (10 rooms x 100 members, the same cluster) times the members.
    Taken from this run's fan-out if it ran chatnode's cluster at that step, else measured
    now: one short fan-out run with that step alone."""
    from fanout import aggregate, run_fanout
    from settings import CLUSTER_WORKLOAD

    members = CLUSTER_WORKLOAD["members"]
    st = fanout_agg.get("chatnode-cluster", {}).get("steps", {}).get(step, {})
    source = "this run's fan-out"
    if not st.get("rounds"):
        log(f"messenger: busy-room reference (fan-out, chatnode-cluster, {step} deliveries/s)")
        run = run_fanout(
            make_cluster(),
            CLUSTER_WORKLOAD,
            {"steps": [step], "step_s": mode["step_s"], "warmup_s": mode["warmup_s"]},
        )
        st = aggregate([run], [step])["steps"][step]
        source = "a fan-out step run for it"
    per_delivery = st.get("cpu_us_per_delivery")
    return {
        "source": source,
        "offered_deliveries_per_s": step,
        "members": members,
        "cpu_us_per_delivery": per_delivery,
        "cpu_us_per_message": per_delivery * members if per_delivery is not None else None,
        "p99_ms": st.get("p99_ms"),
    }


def run_messenger_all(
    redis: Redis,
    make_cluster: Any,
    mode: dict[str, Any],
    fanout_agg: dict[str, Any],
) -> dict[str, Any]:
    """chatnode's cluster, then the websockets peer, then (if needed) the busy-room step."""
    from settings import MESSENGER_BUSY_ROOM_STEP

    res: dict[str, Any] = {"workload": MESSENGER_WORKLOAD, "mode": mode, "systems": {}}
    for system in (make_cluster(messenger=True), MessengerPeer(redis)):
        log(f"messenger: {system.name} ({mode['steps']} msgs/s, {mode['step_s']}s each)")
        try:
            res["systems"][system.name] = run_messenger(system, MESSENGER_WORKLOAD, mode, redis)
        except Exception as exc:
            res["systems"][system.name] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"messenger: {system.name} FAILED: {exc}")
    try:
        res["busy_room"] = busy_room_reference(
            fanout_agg, make_cluster, mode, MESSENGER_BUSY_ROOM_STEP
        )
    except Exception as exc:
        res["busy_room"] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"messenger: busy-room reference FAILED: {exc}")
    return res
