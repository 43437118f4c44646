"""The messenger workload's push variant (issue 17: "the webhook down does not slow chat").

The messenger workload (``messenger.py``: 2,000 users, 5,000 DMs, 200 private groups of 10)
on chatnode's cluster, with 20 % of the users never connected: user ``u`` stays offline when
``(u + u // 200) % 5 == 0`` (400 users; every group has 2 of its 10 members offline, a DM at
most one, 40 % of the DMs one). The 1,600 others connect (``/v1/connect``) and send from
every (user, room) pair as in the messenger workload, so every message to a room with an
offline member is a push candidate for that member (``chatnode/node/push.py``).

Four configurations, each on nodes (re)started with its env (``CHATNODE_PUSH_URL``, and
``CHATNODE_PUSH_COLLAPSE_S`` = the mode's ``collapse_s``, shorter than the 30 s default so
that several windows close within a step):

- ``off``: no URL (no notifier at all);
- ``up``: ``webhook.py`` on a free port, answering 200 at once and counting POSTs;
- ``down``: a free port nobody listens on (connection refused);
- ``hang``: ``webhook.py --hang``: accepts, reads, never answers (each POST waits for the
  nodes' ``CHATNODE_BACKEND_TIMEOUT_S``, 5 s).

Both receivers run for the whole run, pinned to the load generator's CPU; their CPU is
reported apart and counted neither as the servers' nor as "other". The configurations
alternate: round 1 off, up, down, hang; round 2 the other way round. Each (round,
configuration) restarts the nodes (and nginx), deletes the push windows left in Redis,
reconnects the 1,600 clients from a fresh load generator and runs a discarded warm-up (at
the first step's rate, long enough to warm the push path's lookups; then ``collapse_s`` for
its trailing notifications), then the steps. A step's window is its sends, its drain and a settle of ``collapse_s`` (the
trailing notifications of its windows land in it); CPU per message = utime+stime over the
window ÷ messages sent; counts (webhook POSTs received, the nodes' ``chatnode_push_*_total``
summed over both nodes) over the window ÷ the step's send + drain time.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

from common import (
    BENCH,
    BENCH_PY,
    LOADGEN_CPUS,
    Http,
    LoadGenProc,
    Proc,
    cpu_seconds,
    free_port,
    log,
    machine_busy_s,
    port_open,
    wait_until,
)
from messenger import MessengerCluster
from receipts import service_pid
from report import figure_row
from settings import MESSENGER_WORKLOAD, OVERLOAD_P99_MS
from stats import fmt, medians_by, ratio
from systems import HOST, Redis

CONFIGS = ("off", "up", "down", "hang")
METRICS = ("chatnode_push_sent_total", "chatnode_push_failed_total", "chatnode_push_dropped_total")


def offline(u: int) -> bool:
    """20 % of the users, 2 of each group of 10 (group g: users g, g+200, ...), never both
    members of a DM (the DMs pair users 1..3 apart)."""
    return (u + u // 200) % 5 == 0


class PushCluster(MessengerCluster):
    """The messenger's cluster with ``CHATNODE_PUSH_URL`` = ``push_url`` when set."""

    push_url = ""
    collapse_s = 5.0

    def _env(self) -> dict[str, str]:
        env = super()._env()
        if self.push_url:
            env.update(
                CHATNODE_PUSH_URL=self.push_url, CHATNODE_PUSH_COLLAPSE_S=f"{self.collapse_s:g}"
            )
        return env


class Receiver:
    """``webhook.py`` on ``port`` (``hang``: never answers), pinned off the servers' CPU."""

    def __init__(self, name: str, hang: bool) -> None:
        self.port = free_port()
        argv = [BENCH_PY, BENCH / "webhook.py", self.port] + (["--hang"] if hang else [])
        self.proc = Proc(name, argv, cpus=LOADGEN_CPUS)

    def start(self) -> Receiver:
        self.proc.start()
        wait_until(lambda: port_open(self.port), 20, self.proc.name, self.proc)
        return self

    def posts(self) -> int:
        client = Http(HOST, self.port, timeout=10)
        try:
            status, body = client.request("GET", "/count")
        finally:
            client.close()
        if status != 200:
            raise RuntimeError(f"{self.proc.name}: GET /count {status}")
        return int(body["posts"])

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/push"


def push_metrics(ports: list[int]) -> dict[str, float]:
    """The push counters of the nodes' ``/metrics``, summed (0 without a notifier)."""
    out = dict.fromkeys(METRICS, 0.0)
    for port in ports:
        status, body = Http(HOST, port, timeout=10).request("GET", "/metrics")
        if status != 200 or not isinstance(body, str):
            raise RuntimeError(f"GET /metrics on {port}: {status}")
        for line in body.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in out:
                out[name] += float(line.rsplit(" ", 1)[1])
    return out


def clear_windows(redis: Redis, prefix: str) -> int:
    """Delete the push windows a previous configuration's nodes left (``PREFIX:push:*``)."""
    out = subprocess.run(
        ["redis-cli", "-h", HOST, "-p", str(redis.port), "--scan", "--pattern", f"{prefix}:push:*"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    keys = out.stdout.split()
    for i in range(0, len(keys), 500):
        redis.cli("DEL", *keys[i : i + 500])
    return len(keys)


def _measure(
    system: PushCluster,
    redis: Redis,
    lg: LoadGenProc,
    receivers: list[Receiver],
    offered: int,
    mode: dict[str, Any],
    seed: int,
    config: str,
) -> dict[str, Any]:
    groups = system.node_pid_groups()
    pidsets = {
        "nginx": system.nginx.pids(),  # type: ignore[union-attr]
        "redis": redis.pids(),
        "mariadb": service_pid("mariadb/mariadbd.pid"),
        "es": service_pid("elasticsearch/run/elasticsearch.pid"),
        "lg": [lg.pid],
        "receivers": [p for r in receivers for p in r.proc.pids()],
    }
    c0 = {k: cpu_seconds(v) for k, v in pidsets.items()}
    n0 = [cpu_seconds(g) for g in groups]
    m0, p0 = push_metrics(system.node_ports), sum(r.posts() for r in receivers)
    all0, t0 = machine_busy_s(), time.monotonic()
    r = lg.call(
        {
            "cmd": "step",
            "rate_msgs": offered,
            "count": int(offered * mode["step_s"]),
            "drain_s": 5.0,
            "max_drain_s": 30.0,
            "shuffle": seed,
            "min_sleep_ms": 1.0,
        }
    )
    time.sleep(mode["collapse_s"])  # the trailing notifications of the step's windows
    window = time.monotonic() - t0
    d_all = machine_busy_s() - all0
    d = {k: cpu_seconds(v) - c0[k] for k, v in pidsets.items()}
    d_nodes = [cpu_seconds(g) - c for g, c in zip(groups, n0, strict=True)]
    m1, p1 = push_metrics(system.node_ports), sum(r.posts() for r in receivers)
    system.check_alive()
    sent, wall = max(1, r["sent"]), r["wall_s"]
    fanout = r["expected"] / sent if r["expected"] else 0.0
    st = {
        "offered": offered,
        "config": config,
        **{k: r[k] for k in ("sent", "expected", "received", "lost", "dups", "reorders")},
        "wrong_room": r["wrong_room"],
        "latency_ms": r["latency_ms"],
        "wall_s": wall,
        "window_s": window,
        "delivered_msgs_per_s": (r["received"] / fanout / wall) if fanout else 0.0,
        "node_cpu_us_per_msg": [x / sent * 1e6 for x in d_nodes],
        "server_cpu_us_per_msg": sum(d_nodes) / sent * 1e6,
        **{f"{k}_cpu_us_per_msg": v / sent * 1e6 for k, v in d.items() if k != "lg"},
        "webhook_posts_per_s": (p1 - p0) / wall,
        **{f"{k.removeprefix('chatnode_')}_per_s": (m1[k] - m0[k]) / wall for k in METRICS},
        **{k.removeprefix("chatnode_"): m1[k] - m0[k] for k in METRICS},
        "loadgen_cpu_util": d["lg"] / window,
        "foreign_util": max(0.0, d_all - sum(d_nodes) - sum(d.values())) / window,
    }
    st["clean"] = r["lost"] == 0 and r["dups"] == 0 and r["reorders"] == 0
    st["server_redis_cpu_us_per_msg"] = st["server_cpu_us_per_msg"] + st["redis_cpu_us_per_msg"]
    lat = r["latency_ms"]
    log(
        f"  push {config:4s} {offered:>5} msgs/s: delivered {st['delivered_msgs_per_s']:.0f}"
        f" p50 {fmt(lat['p50'])} p99 {fmt(lat['p99'])} ms; nodes"
        f" {st['server_cpu_us_per_msg']:.0f} us/msg ("
        + " + ".join(f"{x:.0f}" for x in st["node_cpu_us_per_msg"])
        + f"), redis {st['redis_cpu_us_per_msg']:.1f}, nginx {st['nginx_cpu_us_per_msg']:.0f},"
        f" mariadb {st['mariadb_cpu_us_per_msg']:.0f}; webhook POSTs"
        f" {st['webhook_posts_per_s']:.0f}/s; push sent {st['push_sent_total']:.0f} failed"
        f" {st['push_failed_total']:.0f} dropped {st['push_dropped_total']:.0f}; lost"
        f" {r['lost']} dup {r['dups']} reord {r['reorders']}; loadgen"
        f" {st['loadgen_cpu_util']:.0%} receivers {st['receivers_cpu_us_per_msg']:.0f} us/msg"
        f" other {st['foreign_util']:.0%}"
    )
    return st


def _segment(
    system: PushCluster,
    redis: Redis,
    specs: list[dict[str, Any]],
    receivers: list[Receiver],
    config: str,
    mode: dict[str, Any],
    rnd: int,
    seed: int,
) -> list[dict[str, Any]]:
    """One configuration's steps on connections of a fresh load generator."""
    lg = LoadGenProc()
    out: list[dict[str, Any]] = []
    try:
        conn = lg.call({"cmd": "connect", "clients": specs, "concurrency": 64, "timeout_s": 120})
        if conn["failed"]:
            raise RuntimeError(f"{conn['failed']} clients did not connect: {conn['errors']}")
        log(f"  push {config}: {conn['connected']} connected in {conn['elapsed_s']:.1f}s")
        lg.call(
            {
                "cmd": "step",
                "rate_msgs": mode["steps"][0],
                "count": int(mode["steps"][0] * mode["warmup_s"]),
                "drain_s": 3.0,
                "shuffle": 0,
                "min_sleep_ms": 1.0,
            }
        )
        time.sleep(mode["collapse_s"])  # the warm-up's trailing notifications, outside the steps
        skip = None
        for i, offered in enumerate(mode["steps"]):
            row = {"round": rnd, "offered": offered, "config": config}
            if skip:
                out.append({**row, "skipped": skip})
                continue
            st = _measure(system, redis, lg, receivers, offered, mode, seed + i, config)
            out.append({**row, **st})
            if (st["latency_ms"]["p99"] or 0) > OVERLOAD_P99_MS or st["lost"] > 0:
                skip = f"overloaded at {offered}/s ({config})"
    finally:
        lg.close()
    return out


def run_push(
    system: PushCluster, workload: dict[str, int], mode: dict[str, Any], redis: Redis
) -> dict[str, Any]:
    out: dict[str, Any] = {"system": system.name, "workload": workload, "steps": []}
    t0 = time.monotonic()
    system.collapse_s = mode["collapse_s"]
    receivers = [Receiver("webhook-up", False).start(), Receiver("webhook-hang", True).start()]
    down_port = free_port()  # nobody listens there
    urls = {
        "off": "",
        "up": receivers[0].url,
        "down": f"http://{HOST}:{down_port}/push",
        "hang": receivers[1].url,
    }
    out["urls"] = urls
    try:
        system.push_url = ""
        system.start()
        first = True
        specs, setup = system.prepare_messenger(workload)
        if len(specs) != workload["users"]:
            raise RuntimeError(f"{len(specs)} client specs for {workload['users']} users")
        online = [s for u, s in enumerate(specs) if not offline(u)]
        out["setup"] = setup
        out["online"], out["offline"] = len(online), len(specs) - len(online)
        log(
            f"  push: setup {setup['total_s']:.1f}s; {len(online)} users online,"
            f" {len(specs) - len(online)} offline"
        )
        seed = 0
        for rnd in range(1, mode["rounds"] + 1):
            order = CONFIGS if rnd % 2 else CONFIGS[::-1]
            for config in order:
                if port_open(down_port):
                    raise RuntimeError(f"port {down_port} (the webhook down) is taken")
                if not first:  # the first segment runs on the nodes of the setup (off)
                    t = time.monotonic()
                    system.stop()
                    cleared = clear_windows(redis, system.prefix)
                    system.push_url = urls[config]
                    system.start()
                    log(
                        f"  push {config}: nodes restarted in {time.monotonic() - t:.1f}s"
                        f" ({cleared} push keys deleted)"
                    )
                try:
                    first = False
                    out["steps"] += _segment(
                        system, redis, online, receivers, config, mode, rnd, seed
                    )
                except Exception as exc:
                    log(f"  push {config} round {rnd} FAILED: {exc}")
                    out.setdefault("errors", []).append(f"{config} round {rnd}: {exc}")
                seed += len(mode["steps"])
    finally:
        system.stop()
        for r in receivers:
            r.proc.stop()
    out["summary"] = summarize(out["steps"], mode["steps"])
    out["elapsed_s"] = time.monotonic() - t0
    return out


def summarize(steps: list[dict[str, Any]], offered: list[int]) -> dict[str, Any]:
    """Per offered load and configuration, medians over rounds; the ratios."""
    keys = (
        "server_cpu_us_per_msg",
        "server_redis_cpu_us_per_msg",
        "redis_cpu_us_per_msg",
        "delivered_msgs_per_s",
        "webhook_posts_per_s",
        "push_sent_total_per_s",
        "push_failed_total_per_s",
        "push_dropped_total_per_s",
    )
    out: dict[str, Any] = {}
    for o in offered:
        per: dict[str, Any] = medians_by(steps, o, "config", CONFIGS, keys)
        for a, b in (("down", "up"), ("up", "off"), ("hang", "up"), ("down", "off")):
            if a in per and b in per:
                per[f"{a}/{b}"] = {
                    "p99": ratio(per[a]["p99_ms"], per[b]["p99_ms"]),
                    "cpu": ratio(per[a]["server_cpu_us_per_msg"], per[b]["server_cpu_us_per_msg"]),
                    "cpu_redis": ratio(
                        per[a]["server_redis_cpu_us_per_msg"], per[b]["server_redis_cpu_us_per_msg"]
                    ),
                }
        out[str(o)] = per
    return out


def run_push_all(redis: Redis, make_cluster: Any, mode: dict[str, Any]) -> dict[str, Any]:
    log(
        f"messenger push: chatnode-cluster ({mode['steps']} msgs/s x {mode['rounds']} round(s),"
        f" {mode['step_s']}s each, configurations {CONFIGS}, collapse {mode['collapse_s']}s)"
    )
    res: dict[str, Any] = {"workload": MESSENGER_WORKLOAD, "mode": mode}
    try:
        cluster = make_cluster(messenger=True)
        system = PushCluster(cluster.redis, cluster.mysql_url, cluster.es_url, cluster.prefix)
        res["run"] = run_push(system, MESSENGER_WORKLOAD, mode, redis)
        if res["run"].get("errors"):
            res["error"] = "; ".join(res["run"]["errors"])
    except Exception as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
        log(f"messenger push FAILED: {exc}")
    return res


# -- report ----------------------------------------------------------------------------------


def _ratios(per: dict[str, Any]) -> str:
    return "; ".join(
        f"{k}: p99 {fmt(v['p99'], 2)}x, nodes CPU {fmt(v['cpu'], 2)}x"
        f" (+Redis {fmt(v['cpu_redis'], 2)}x)"
        for k, v in per.items()
        if "/" in k
    )


def push_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for o, per in res.get("run", {}).get("summary", {}).items():
        r = per.get("down/up", {})
        row = figure_row(
            f"messenger push: p99 and nodes' CPU per message, webhook down ÷ up at {o} msgs/s",
            "no target (issue 17: does not slow chat)",
            f"p99 {fmt(r.get('p99'), 2)}x, CPU {fmt(r.get('cpu'), 2)}x" if r else "-",
            None,
            _ratios(per),
        )
        if r:
            row["met"] = "no target"  # measured: not "not measured"
        rows.append(row)
    return rows or [figure_row("messenger push", "-", "-", None, str(res.get("error", "")))]


def push_markdown(res: dict[str, Any]) -> str:
    if "run" not in res:
        return f"Messenger push variant: failed: {res.get('error')}\n"
    run, mode = res["run"], res["mode"]
    lines = [
        f"Messenger push variant: {run['online']} users online, {run['offline']} offline;"
        f" {mode['step_s']:.0f} s per step, {mode['rounds']} round(s), collapse"
        f" {mode['collapse_s']:g} s; window = sends + drain + {mode['collapse_s']:g} s; CPU per"
        " message = utime+stime ÷ messages sent; POSTs and `chatnode_push_*_total` (both nodes)"
        " over the window ÷ send + drain time:",
        "",
        "| round | offered msgs/s | webhook | delivered msgs/s | p50 ms | p99 ms |"
        " nodes CPU µs/msg (n1 + n2) | Redis µs/msg | nginx µs/msg | MariaDB µs/msg |"
        " webhook POSTs/s | push sent / failed / dropped per s | lost / dup / reord |"
        " receivers µs/msg | load gen CPU | other CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for st in run["steps"]:
        head = f"| {st['round']} | {st['offered']} | {st['config']} |"
        if "skipped" in st:
            lines.append(head + f" {st['skipped']} |" + " - |" * 12)
            continue
        lat = st["latency_ms"]
        lines.append(
            head + f" {st['delivered_msgs_per_s']:.0f} | {fmt(lat['p50'])} | {fmt(lat['p99'])} |"
            f" {st['server_cpu_us_per_msg']:.0f} ("
            + " + ".join(f"{x:.0f}" for x in st["node_cpu_us_per_msg"])
            + f") | {st['redis_cpu_us_per_msg']:.1f} | {st['nginx_cpu_us_per_msg']:.0f} |"
            f" {st['mariadb_cpu_us_per_msg']:.0f} | {st['webhook_posts_per_s']:.0f} |"
            f" {st['push_sent_total_per_s']:.0f} / {st['push_failed_total_per_s']:.0f} /"
            f" {st['push_dropped_total_per_s']:.0f} |"
            f" {st['lost']} / {st['dups']} / {st['reorders']} |"
            f" {st['receivers_cpu_us_per_msg']:.0f} |"
            f" {st['loadgen_cpu_util'] * 100:.0f}% | {st['foreign_util'] * 100:.0f}% |"
        )
    lines.append("")
    for o, per in run["summary"].items():
        med = ", ".join(
            f"{c} p99 {fmt(per[c]['p99_ms'])} ms / {fmt(per[c]['server_cpu_us_per_msg'], 0)} µs"
            for c in CONFIGS
            if c in per
        )
        lines.append(f"- {o} msgs/s (medians): {med}. Ratios: {_ratios(per)}.")
    return "\n".join(lines) + "\n"
