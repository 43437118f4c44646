"""Processes for cluster end-to-end tests: nginx in front of chatnode nodes, each a real
subprocess, all on loopback.

- ``render_nginx_config(node_ports, listen_port, prefix_dir)`` writes ``<prefix>/nginx.conf``
  with ``nginx/render.py`` (the renderer the deployment uses) and returns its path. The
  harness turns nginx's per-address limits off (``HARNESS_NGINX_OPTIONS``): every test client
  comes from 127.0.0.1, and a reconnect storm is many clients. Any render option can be passed
  through (``render_nginx_config(..., limit_api="1r/m")``, ``running_nginx(..., **options)``).
- ``running_nginx(node_ports)`` starts ``nginx -p <prefix> -c <conf> -g 'daemon off;'`` on a free
  loopback port and yields the port once it accepts connections.
- ``running_node_process(env)`` starts ``python -m chatnode serve`` with ``env`` on a free
  loopback port and yields the port once ``/healthz`` answers 200.
- ``started_node_process(env)`` does the same and yields a :class:`NodeProcess` handle
  (``.port``, ``.pid``, ``.kill()`` = SIGKILL, ``.terminate()`` = SIGTERM, ``.wait()``) for
  tests that crash or stop a node on purpose.

Guarantees: the readiness waits are bounded (``START_TIMEOUT_S``) and fail with the tail of the
process's output when it dies or never becomes ready; on exit the process is stopped by its PID
(SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``) and reaped, also when the body raised or was
cancelled (cleanup is shielded and bounded). Nothing is started through a shell.

The nginx binary is ``$CHATNODE_NGINX_BIN`` (default ``/usr/sbin/nginx``; ``scripts/services
env`` prints it). Port 0 cannot be read back from outside a process, so a free port is chosen by
binding ``127.0.0.1:0`` and closing the socket before the process binds it (a tiny race that
loopback tests accept).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import attrs
import trio

REPO = Path(__file__).resolve().parents[2]
RENDER_PY = REPO / "nginx" / "render.py"
NGINX_BIN = os.environ.get("CHATNODE_NGINX_BIN", "/usr/sbin/nginx")

HARNESS_NGINX_OPTIONS: dict[str, Any] = {
    "limit_conn": 0,
    "limit_api": "off",
    "limit_join": "off",
    "limit_password": "off",
}
"""Render options the harness passes unless a test overrides them: no per-address limits."""

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0
POLL_INTERVAL_S = 0.05


class ProcessFailed(RuntimeError):
    """A harness process exited or never became ready; the message has its output's tail."""


def _load_renderer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chatnode_nginx_render", RENDER_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


render_module = _load_renderer()


def nginx_available() -> bool:
    return os.access(NGINX_BIN, os.X_OK)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def render_nginx_config(
    node_ports: Sequence[int | str],
    listen_port: int,
    prefix_dir: Path | str,
    *,
    tls_cert: Path | str | None = None,
    tls_key: Path | str | None = None,
    tls_port: int | None = None,
    worker_processes: str = "1",
    **options: Any,
) -> Path:
    """Write ``<prefix_dir>/nginx.conf`` for nodes on ``127.0.0.1:<port>`` (a ``str``: as is,
    e.g. ``unix:/path``) and return its path.
    Everything nginx writes stays under ``prefix_dir``; the worker user is root when we are
    root (so workers can read a private temporary directory), else unset. ``options`` are
    further render ``Options`` fields, over ``HARNESS_NGINX_OPTIONS``."""
    prefix = Path(prefix_dir).absolute()
    if (tls_cert is None) != (tls_port is None):
        raise ValueError("TLS needs tls_cert, tls_key and tls_port together")
    rendered = render_module.Options(
        nodes=tuple(p if isinstance(p, str) else f"127.0.0.1:{p}" for p in node_ports),
        listen=f"127.0.0.1:{listen_port}",
        prefix=str(prefix),
        tls_cert=str(tls_cert) if tls_cert is not None else None,
        tls_key=str(tls_key) if tls_key is not None else None,
        tls_listen=f"127.0.0.1:{tls_port}" if tls_port is not None else "443",
        worker_processes=worker_processes,
        worker_connections=1024,
        user="root" if os.geteuid() == 0 else None,
        **{**HARNESS_NGINX_OPTIONS, **options},
    )
    text = render_module.render(rendered)
    render_module.create_dirs(rendered)
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    return conf


def nginx_test_config(conf: Path) -> None:
    """``nginx -t`` on ``conf`` (prefix = its directory); raise ``ProcessFailed`` with nginx's
    message when it is not valid."""
    result = subprocess.run(
        [NGINX_BIN, "-t", "-q", "-p", str(conf.parent), "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        raise ProcessFailed(f"nginx -t failed for {conf}:\n{result.stderr}{result.stdout}")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no output: {path} missing)"
    return "\n".join(text.splitlines()[-lines:]) or f"(no output in {path})"


async def _accepts(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return False
    await stream.aclose()
    return True


async def http_get(port: int, path: str, *, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """One ``GET`` over a fresh connection (``Connection: close``): (status, body). Small on
    purpose: readiness polls must not depend on a client library's connection pool."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        chunks = []
        while chunk := await stream.receive_some(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise ProcessFailed(f"not an HTTP response from port {port}: {raw[:200]!r}")
    return int(status_line[1]), body


async def _wait_ready(process: trio.Process, what: str, log: Path, ready: Any) -> None:
    """Poll ``ready()`` until it returns True; bounded by START_TIMEOUT_S; fail fast if the
    process exits."""
    try:
        with trio.fail_after(START_TIMEOUT_S):
            while True:
                if process.returncode is not None:
                    raise ProcessFailed(
                        f"{what} exited with {process.returncode} before it was ready:\n{_tail(log)}"
                    )
                if await ready():
                    return
                await trio.sleep(POLL_INTERVAL_S)
    except trio.TooSlowError:
        raise ProcessFailed(
            f"{what} not ready after {START_TIMEOUT_S:.0f}s:\n{_tail(log)}"
        ) from None


async def _stop(process: trio.Process, stop_signal: int = signal.SIGTERM) -> None:
    """Signal by PID, wait (bounded), then SIGKILL; always reaps. Shielded: runs to the end even
    when the surrounding scope is cancelled."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            with suppress(ProcessLookupError):
                process.send_signal(stop_signal)
            with trio.move_on_after(STOP_TIMEOUT_S):
                await process.wait()
            if process.returncode is None:
                process.kill()
                with trio.move_on_after(STOP_TIMEOUT_S):
                    await process.wait()


async def _open_logged_process(
    command: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> trio.Process:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file: IO[bytes] = log_path.open("ab")
    try:
        return await trio.lowlevel.open_process(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            env=dict(env) if env is not None else None,
            cwd=str(cwd) if cwd is not None else None,
        )
    finally:
        log_file.close()  # the child has its own descriptor


@asynccontextmanager
async def running_nginx(
    node_ports: Sequence[int | str],
    *,
    prefix_dir: Path | str | None = None,
    tls_cert: Path | str | None = None,
    tls_key: Path | str | None = None,
    tls_port: int | None = None,
    **options: Any,
) -> AsyncIterator[int]:
    """nginx in front of nodes on ``127.0.0.1:<node_ports>``; yields its plain-HTTP port.
    ``prefix_dir`` (default: a fresh temporary directory, removed afterwards) receives the
    config, pid file, logs (``logs/error.log``, ``logs/access.log``, ``logs/stdio.log``) and
    temp files. With ``tls_cert``/``tls_key``/``tls_port`` it also serves TLS on that port
    (and plain HTTP only redirects to it). ``options``: render options
    (:func:`render_nginx_config`)."""
    if not nginx_available():
        raise ProcessFailed(f"nginx not found at {NGINX_BIN} (set CHATNODE_NGINX_BIN)")
    cleanup: tempfile.TemporaryDirectory[str] | None = None
    if prefix_dir is None:
        cleanup = tempfile.TemporaryDirectory(prefix="chatnode-nginx-")
        prefix_dir = cleanup.name
    try:
        port = free_port()
        conf = render_nginx_config(
            node_ports,
            port,
            prefix_dir,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_port=tls_port,
            **options,
        )
        log = conf.parent / "logs" / "stdio.log"
        process = await _open_logged_process(
            [NGINX_BIN, "-p", str(conf.parent), "-c", str(conf), "-g", "daemon off;"], log
        )
        try:
            error_log = conf.parent / "logs" / "error.log"

            async def ready() -> bool:
                return await _accepts(port) and (tls_port is None or await _accepts(tls_port))

            try:
                await _wait_ready(process, "nginx", log, ready)
            except ProcessFailed as exc:
                raise ProcessFailed(f"{exc}\nerror.log:\n{_tail(error_log)}") from None
            yield port
        finally:
            await _stop(process, signal.SIGTERM)  # TERM: fast shutdown; QUIT would wait for tunnels
    finally:
        if cleanup is not None:
            cleanup.cleanup()


def node_env(env: Mapping[str, str]) -> dict[str, str]:
    """The child's environment: ours without any ``CHATNODE_*`` (a developer's shell may export
    cluster URLs), plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHATNODE_")}
    base["PYTHONUNBUFFERED"] = "1"
    base.update(env)
    return base


@attrs.define(eq=False)
class NodeProcess:
    """A running ``chatnode serve`` process (see :func:`started_node_process`)."""

    process: trio.Process
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL by PID: a crash (no drain, nothing flushed)."""
        with suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM by PID: the node drains and exits (``CHATNODE_DRAIN_TIMEOUT_S``)."""
        with suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)

    async def wait(self) -> int:
        """Wait until the process exited (and reap it); its return code."""
        return await self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log, lines)


@asynccontextmanager
async def started_node_process(
    env: Mapping[str, str],
    *,
    log_path: Path | str | None = None,
    command: Sequence[str] | None = None,
) -> AsyncIterator[NodeProcess]:
    """``python -m chatnode serve`` (or ``command``, run the same way) with ``env``
    (``CHATNODE_*`` settings) on a free loopback port; yields its :class:`NodeProcess` once
    ``GET /healthz`` answers 200. Output goes to ``log_path`` (default:
    ``<CHATNODE_DATA_DIR>/node.log``, else a temporary file). On exit:
    SIGTERM (the node drains), bounded wait, SIGKILL if it is still running; a process the test
    already killed or stopped is just reaped."""
    port = free_port()
    child_env = node_env(env)
    child_env["CHATNODE_HOST"] = "127.0.0.1"
    child_env["CHATNODE_PORT"] = str(port)
    cleanup: tempfile.TemporaryDirectory[str] | None = None
    if log_path is None:
        if "CHATNODE_DATA_DIR" in env:
            log_path = Path(env["CHATNODE_DATA_DIR"]) / "node.log"
        else:
            cleanup = tempfile.TemporaryDirectory(prefix="chatnode-node-")
            log_path = Path(cleanup.name) / "node.log"
    log = Path(log_path)
    try:
        process = await _open_logged_process(
            command or [sys.executable, "-m", "chatnode", "serve"], log, env=child_env, cwd=REPO
        )
        try:

            async def ready() -> bool:
                try:
                    status, _ = await http_get(port, "/healthz")
                except (OSError, trio.BrokenResourceError, ProcessFailed):
                    return False
                return status == 200

            await _wait_ready(process, f"chatnode node on port {port}", log, ready)
            yield NodeProcess(process, port, log)
        finally:
            await _stop(process, signal.SIGTERM)
    finally:
        if cleanup is not None:
            cleanup.cleanup()


@asynccontextmanager
async def running_node_process(
    env: Mapping[str, str], *, log_path: Path | str | None = None
) -> AsyncIterator[int]:
    """``python -m chatnode serve`` with ``env`` (``CHATNODE_*`` settings) on a free loopback
    port; yields the port once ``GET /healthz`` answers 200 (:func:`started_node_process`,
    for callers that need only the port)."""
    async with started_node_process(env, log_path=log_path) as node:
        yield node.port
