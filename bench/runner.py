#!/usr/bin/env python3
"""The fan-out benchmark (issue 5): chatnode against the peers people would pick.

Run it with ``bench/run [--quick|--full]`` (which prepares bench/.venv and the services and
then runs this file with bench/.venv's Python). What it does, in order:

1. Fan-out: for each round, each system in turn (the order rotates per round: ours and the
   peers interleaved) is started, gets its users and rooms, the load generator connects every
   member, runs a discarded warm-up, then the offered-load steps. Per step it reads the
   servers' CPU from /proc before and after, and the generator reports latency, loss,
   duplication and reordering per connection.
   - cluster comparison, 10 rooms x 100 members through nginx with Redis: chatnode (2 nodes,
     MySQL, Redis, Elasticsearch, archiver on), the websockets reference (2 processes), and
     python-socketio (2 processes);
   - single-node comparison, direct: chatnode embedded (1 node) and libwebsockets-test-server.
     3 rooms x 100 members: lws-mirror-protocol serves at most 3 mirror instances (rooms).
2. Extras on chatnode's cluster: archiver catch-up rate vs Elasticsearch's raw bulk rate, join
   latency with 100 messages of history (Redis room log, then Elasticsearch), search through
   the API vs straight to Elasticsearch, memory per idle connection, ``GET /v1/chatrooms``
   through nginx vs nginx's own ``return 200``.
3. With ``--messenger``: the messenger workload (issue 16, ``messenger.py``): 2,000 users on
   one ``/v1/connect`` each, 5,000 DMs and 200 groups of 10, on chatnode's cluster and the
   websockets reference's multi-room mode, and a busy-room reference step.
4. Figures against the targets of issue 5 (``settings.py``, and nowhere else), a table on
   stdout and in ``bench/results/latest.md``, everything in ``bench/results/latest.json`` and
   the p99 plot in ``bench/results/latest.png``.

This file is the driver: the command line, the rounds, the extras in order, the results
files. Each scenario is a module of its own: ``fanout.py``, ``history.py`` (the history room,
then ``archiver.py``, ``joins.py``, ``search.py``), ``idle.py``, ``rest.py``; ``report.py``
turns the results into figures, the table and the plot; ``systems.py`` starts and stops each
system, ``common.py`` pins processes and reads /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import LOADGEN_CPUS, RESULTS, WORK, log, raise_nofile
from fanout import aggregate, run_fanout
from history import history_extras
from idle import idle_memory, idle_peers
from messenger import MessengerCluster, run_messenger_all
from messenger_report import messenger_markdown, messenger_rows
from push import push_markdown, push_rows, run_push_all
from receipts import receipts_markdown, receipts_rows, run_receipts_all
from report import code_state, figures, integrity_row, machine, markdown, plot
from rest import rest_throughput
from settings import (
    CLUSTER_WORKLOAD,
    EXTRAS,
    MESSENGER_MODES,
    MODES,
    P99_LIMIT_MS,
    PUSH_MODES,
    RECEIPTS_MODES,
    SINGLE_WORKLOAD,
    TARGETS,
)
from systems import (
    UPSTREAM,
    ChatnodeCluster,
    ChatnodeSingle,
    Libwebsockets,
    Redis,
    SocketIO,
    System,
    WebsocketsRef,
)


def run_extras(
    redis: Redis,
    mysql_url: str,
    es_url: str,
    prefix: str,
    mode: dict[str, Any],
    only: frozenset[str] = frozenset(EXTRAS),
) -> dict[str, Any]:
    extras: dict[str, Any] = {}
    if only & {"archiver", "join", "search"}:
        extras.update(history_extras(redis, mysql_url, es_url, prefix, mode, only))
    if only & {"idle", "rest"}:
        cluster = ChatnodeCluster(redis, mysql_url, es_url, prefix)
        cluster.start()
        try:
            if "idle" in only:
                # 5. Memory per idle connection (direct to each node).
                log(f"extras: idle connections ({mode['idle_per_node']} per node)")
                extras["idle"] = idle_memory(cluster, mode["idle_per_node"])
            if "rest" in only:
                # 6. GET /v1/chatrooms through nginx vs nginx's own return 200.
                log("extras: REST throughput (wrk)")
                extras["rest"] = rest_throughput(cluster, mode["rest_s"])
        finally:
            cluster.stop()
    if "peers" in only:
        extras["idle_peers"] = idle_peers(redis, mode)
    return extras


# -- main -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="1k and 5k deliveries/s, 1 round (default)")
    g.add_argument("--full", action="store_true", help="1k..40k deliveries/s, 3 rounds")
    parser.add_argument(
        "--systems",
        help="comma list (default: all): chatnode-cluster, "
        "websockets-ref, python-socketio, chatnode-single, libwebsockets",
    )
    parser.add_argument("--no-extras", action="store_true", help="fan-out only")
    parser.add_argument(
        "--extras",
        help=f"comma list of the extras to run (default: all): {', '.join(EXTRAS)}",
    )
    parser.add_argument("--rounds", type=int, help="override the mode's rounds")
    parser.add_argument(
        "--steps", help="override the mode's offered loads: comma list of deliveries/s"
    )
    parser.add_argument(
        "--messenger",
        action="store_true",
        help="the messenger workload (issue 16): 2,000 users on /v1/connect, 5,000 DMs, 200"
        " groups of 10, 200..2,000 msgs/s, chatnode's cluster and the websockets peer; alone"
        " unless --systems / --extras ask for more",
    )
    parser.add_argument(
        "--messenger-receipts",
        action="store_true",
        help="the messenger workload's receipts variant (issue 17, receipts.py): chatnode's"
        " cluster without and with receipts, alternating; alone unless other options ask",
    )
    parser.add_argument(
        "--messenger-push",
        action="store_true",
        help="the messenger workload's push variant (issue 17, push.py): 20 %% of the users"
        " offline, the webhook off / up / down / hanging, alternating; alone unless other"
        " options ask",
    )
    parser.add_argument(
        "--messenger-steps", help="override the messenger's offered loads: comma list of msgs/s"
    )
    parser.add_argument("--replot", metavar="JSON", help="only redraw the PNG of a results JSON")
    parser.add_argument(
        "--mysql-url",
        default=os.environ.get(
            "BENCH_MYSQL_URL", "mysql://chatnode:chatnode@127.0.0.1:33061/chatnode_bench"
        ),
    )
    parser.add_argument(
        "--es-url", default=os.environ.get("BENCH_ES_URL", "http://127.0.0.1:19200")
    )
    parser.add_argument("--prefix", default="chatnodebench")
    parser.add_argument(
        "--output", default=str(RESULTS / "latest"), help="path stem of the .json/.md/.png results"
    )
    args = parser.parse_args()
    if args.replot:
        src = Path(args.replot)
        plot(json.loads(src.read_text()), src.with_suffix(".png"))
        return 0
    mode_name = "full" if args.full else "quick"
    mode = dict(MODES[mode_name])
    if args.rounds:
        mode["rounds"] = args.rounds
    if args.steps:
        mode["steps"] = [int(x) for x in args.steps.split(",")]
    m_mode = dict(MESSENGER_MODES[mode_name])
    r_mode = dict(RECEIPTS_MODES[mode_name])
    p_mode = dict(PUSH_MODES[mode_name])
    if args.messenger_steps:
        m_mode["steps"] = [int(x) for x in args.messenger_steps.split(",")]
        r_mode["steps"] = p_mode["steps"] = m_mode["steps"]
    if args.rounds:
        r_mode["rounds"] = p_mode["rounds"] = args.rounds
    messengers = args.messenger or args.messenger_receipts or args.messenger_push
    if messengers and not args.systems:
        args.systems = "none"  # --messenger alone: the messenger workload only
    if messengers and not args.extras:
        args.no_extras = True
    only = frozenset(args.extras.split(",")) if args.extras else frozenset(EXTRAS)
    if only - set(EXTRAS):
        raise SystemExit(f"unknown extras: {sorted(only - set(EXTRAS))}")
    wanted = (
        [s for s in args.systems.split(",") if s != "none"]
        if args.systems
        else [
            "chatnode-cluster",
            "websockets-ref",
            "python-socketio",
            "chatnode-single",
            "libwebsockets",
        ]
    )

    os.sched_setaffinity(0, LOADGEN_CPUS)  # the orchestrator stays off the servers' core
    nofile = raise_nofile()
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    log(
        f"mode {mode_name}: steps {mode['steps']}, {mode['rounds']} round(s), systems {wanted}; "
        f"nofile {nofile}"
    )

    code_at_start = code_state()
    redis = Redis()
    redis.start()
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in wanted}
    errors: dict[str, str] = {}
    extras: dict[str, Any] = {}
    messenger: dict[str, Any] = {}
    receipts: dict[str, Any] = {}
    push: dict[str, Any] = {}
    try:
        cluster_probe = ChatnodeCluster(redis, args.mysql_url, args.es_url, args.prefix)
        if "chatnode-cluster" in wanted or not args.no_extras or messengers:
            cluster_probe.migrate()

        def make(name: str) -> tuple[System, dict[str, int]]:
            if name == "chatnode-cluster":
                return ChatnodeCluster(
                    redis, args.mysql_url, args.es_url, args.prefix
                ), CLUSTER_WORKLOAD
            if name == "websockets-ref":
                return WebsocketsRef(redis), CLUSTER_WORKLOAD
            if name == "python-socketio":
                return SocketIO(redis), CLUSTER_WORKLOAD
            if name == "chatnode-single":
                return ChatnodeSingle(), SINGLE_WORKLOAD
            if name == "libwebsockets":
                return Libwebsockets(), SINGLE_WORKLOAD
            raise SystemExit(f"unknown system {name}")

        for rnd in range(mode["rounds"] if wanted else 0):
            order = wanted[rnd % len(wanted) :] + wanted[: rnd % len(wanted)]
            log(f"round {rnd + 1}/{mode['rounds']}: {order}")
            for name in order:
                system, workload = make(name)
                try:
                    runs[name].append(run_fanout(system, workload, mode))
                except Exception as exc:
                    errors[f"{name} round {rnd + 1}"] = f"{type(exc).__name__}: {exc}"
                    log(f"{name}: FAILED: {exc}")
                    traceback.print_exc()
        if not args.no_extras:
            try:
                extras = run_extras(redis, args.mysql_url, args.es_url, args.prefix, mode, only)
            except Exception as exc:
                extras["error"] = f"{type(exc).__name__}: {exc}"
                log(f"extras FAILED: {exc}")
                traceback.print_exc()

        def make_cluster(messenger: bool = False) -> ChatnodeCluster:
            cls = MessengerCluster if messenger else ChatnodeCluster
            return cls(redis, args.mysql_url, args.es_url, args.prefix)

        if args.messenger:
            agg_so_far = {n: aggregate(r, mode["steps"]) for n, r in runs.items() if r}
            try:
                messenger = run_messenger_all(redis, make_cluster, m_mode, agg_so_far)
            except Exception as exc:
                messenger = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"messenger FAILED: {exc}")
                traceback.print_exc()
            for name, run in messenger.get("systems", {}).items():
                if "error" in run:
                    errors[f"messenger {name}"] = run["error"]
            if "error" in messenger.get("busy_room", {}):
                errors["messenger busy room"] = messenger["busy_room"]["error"]
        if args.messenger_receipts:
            receipts = run_receipts_all(redis, make_cluster, r_mode)
            if "error" in receipts:
                errors["messenger receipts"] = receipts["error"]
        if args.messenger_push:
            push = run_push_all(redis, make_cluster, p_mode)
            if "error" in push:
                errors["messenger push"] = push["error"]
    finally:
        redis.stop()

    code_at_end = code_state()
    if {k: v for k, v in code_at_end.items() if k != "head"} != {
        k: v for k, v in code_at_start.items() if k != "head"
    }:
        errors["code changed"] = (
            f"chatnode's code changed during the run ({code_at_start} -> "
            f"{code_at_end}): the figures mix versions; run again"
        )
    agg = {n: aggregate(r, mode["steps"]) for n, r in runs.items() if r}
    rows = figures(agg, extras, mode_name, mode["steps"])
    rows.insert(3, integrity_row(agg))
    if args.messenger and "systems" in messenger:
        if not agg and not extras:  # the messenger alone: its figures only
            rows = []
        rows += messenger_rows(messenger)
    if args.messenger_receipts:
        if not agg and not extras and not args.messenger:
            rows = []
        rows += receipts_rows(receipts)
    if args.messenger_push:
        if not agg and not extras and not args.messenger and not args.messenger_receipts:
            rows = []
        rows += push_rows(push)
    missing = [r["figure"] for r in rows if r["met"] == "not measured"]
    result = {
        "mode": mode_name,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "machine": machine(),
        "code": code_at_end,
        "settings": {
            **mode,
            "cluster_workload": CLUSTER_WORKLOAD,
            "single_workload": SINGLE_WORKLOAD,
            "p99_limit_ms": P99_LIMIT_MS,
            "message_bytes": 64,
            "upstream": UPSTREAM,
            "targets": TARGETS,
        },
        "figures": rows,
        "fanout": agg,
        "extras": extras,
        "messenger": messenger,
        "receipts": receipts,
        "push": push,
        "errors": errors,
        "missing": missing,
        "raw_runs": runs,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(out.with_suffix(".json"))
    md = markdown(result)
    if messenger.get("systems"):
        md += "\n" + messenger_markdown(messenger)
    if receipts:
        md += "\n" + receipts_markdown(receipts)
    if push:
        md += "\n" + push_markdown(push)
    out.with_suffix(".md").write_text(md)
    try:
        if agg:  # the plot is the fan-out's (none for the messenger alone)
            plot(result, out.with_suffix(".png"))
    except Exception as exc:
        log(f"plot failed: {exc}")
    print(md)
    if errors:
        print("Errors:", json.dumps(errors, indent=1))
    log(
        f"done in {result['elapsed_s']:.0f}s: {out.with_suffix('.json')}, .md"
        + (", .png" if agg else "")
    )
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
