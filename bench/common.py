"""Shared pieces of the benchmark: paths, pinned server processes, /proc accounting, HTTP."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
WORK = BENCH / ".work"  # logs, rendered configs, data dirs (gitignored)
RESULTS = BENCH / "results"
BENCH_PY = BENCH / ".venv" / "bin" / "python"
CHATNODE_BIN = Path(os.environ.get("CHATNODE_BIN", ROOT / ".venv" / "bin" / "chatnode"))
NGINX_BIN = os.environ.get("CHATNODE_NGINX_BIN", "/usr/sbin/nginx")

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

# Servers on one core, the load generator on the other (2-core machine). Overridable.
SERVER_CPUS = {int(c) for c in os.environ.get("BENCH_SERVER_CPUS", "0").split(",")}
LOADGEN_CPUS = {int(c) for c in os.environ.get("BENCH_LOADGEN_CPUS", "1").split(",")}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    want = min(want, 1 << 20)
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- /proc ------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # fields from 'state' (3rd) on


def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        kids.setdefault(int(fields[1]), []).append(int(entry))
    return kids


def tree(pids: Iterable[int]) -> list[int]:
    """The pids and all their live descendants."""
    kids = children_map()
    out: list[int] = []
    todo = list(pids)
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of every thread of these processes (from /proc/<pid>/stat)."""
    total = 0
    for p in pids:
        fields = _stat_fields(p)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def backend_pids() -> list[int]:
    """Elasticsearch and MariaDB of ``scripts/services`` (shared, not pinned): their CPU is
    reported beside chatnode's cluster figures, never inside them."""
    services = Path(os.environ.get("CHATNODE_SERVICES_RUN", ROOT / ".services"))
    pids = []
    for f in (
        services / "elasticsearch" / "run" / "elasticsearch.pid",
        services / "mariadb" / "mariadbd.pid",
    ):
        try:
            pid = int(f.read_text().strip())
        except (OSError, ValueError):
            continue
        if Path(f"/proc/{pid}").exists():
            pids.append(pid)
    return pids


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores; /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    vals = [int(v) for v in fields[:8]]
    idle = vals[3] + vals[4]  # idle + iowait
    return (sum(vals) - idle) / CLK_TCK


def rss_kib(pids: Iterable[int]) -> int:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            pass
    return total


# -- processes --------------------------------------------------------------------------------


class Proc:
    """A server process this benchmark started: pinned, own session, output to a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cpus: set[int] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.env = dict(os.environ if env is None else env)
        self.cpus = SERVER_CPUS if cpus is None else cpus
        self.cwd = cwd
        self.log_path = WORK / "logs" / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = self.log_path.open("ab")
        logf.write(f"--- {time.strftime('%F %T')} {' '.join(self.argv)}\n".encode())
        logf.flush()
        cpus = self.cpus
        self.popen = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        )
        logf.close()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def pids(self) -> list[int]:
        return tree([self.pid]) if self.alive() else []

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        pids = self.pids()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            for p in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            self.popen.wait(5)
        # leftover children of ours (e.g. nginx workers) by pid, never by name
        for p in pids[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def wait_until(pred: Any, timeout: float, what: str, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{what}: {proc.name} exited\n{proc.tail()}")
        with contextlib.suppress(Exception):
            if pred():
                return
        time.sleep(0.1)
    raise RuntimeError(
        f"{what}: not ready after {timeout:.0f}s" + (f"\n{proc.tail()}" if proc else "")
    )


# -- HTTP ---------------------------------------------------------------------------------


class Http:
    """A keep-alive HTTP/1.1 client for the REST calls of the setup (not for load)."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(
        self, method: str, path: str, body: Any = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        hdrs.update(headers or {})
        for attempt in range(3):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=data, headers=hdrs)
                resp = self.conn.getresponse()
                raw = resp.read()
                try:
                    parsed = json.loads(raw) if raw else None
                except ValueError:
                    parsed = raw.decode(errors="replace")
                return resp.status, parsed
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == 2:
                    raise
                time.sleep(0.2)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def http_status(port: int, path: str, host: str = "127.0.0.1") -> int:
    client = Http(host, port, timeout=3)
    try:
        return client.request("GET", path)[0]
    finally:
        client.close()


class LoadGenProc:
    """``bench/loadgen.py`` as a child pinned to the load generator's core; JSON lines."""

    def __init__(self) -> None:
        cpus = LOADGEN_CPUS
        self.log_path = WORK / "logs" / "loadgen.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            [str(BENCH_PY), str(BENCH / "loadgen.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        )

    def call(self, cmd: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.popen.stdin.write((json.dumps(cmd) + "\n").encode())
        self.popen.stdin.flush()
        import select

        ready, _, _ = select.select([self.popen.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"load generator did not answer {cmd.get('cmd')} in {timeout}s")
        line = self.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator exited; see {self.log_path}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    @property
    def pid(self) -> int:
        return self.popen.pid

    def close(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(Exception):
                self.call({"cmd": "close"}, timeout=30)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()
