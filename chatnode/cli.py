"""``chatnode serve | migrate | config | chat | dead-letters | users`` — the process edge:
reads the environment and flags once into a ``Config`` and hands it to ``app.py`` (``serve``)
or to ``wiring.py`` (the backends of ``migrate``, ``dead-letters`` and ``users``)."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
from typing import Any

import trio

from chatnode import __version__
from chatnode.config import ConfigError, load_config, markdown_table, shown_settings
from chatnode.core.models import DeadLetter


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatnode", description="A self-hosted chat backend on Trio."
    )
    parser.add_argument("--version", action="version", version=f"chatnode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="run a node (embedded SQLite unless backends are configured)"
    )
    serve.add_argument("--host", help="address to listen on (CHATNODE_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (CHATNODE_PORT)")
    serve.add_argument(
        "--unix-socket", help="also listen on this Unix socket path (CHATNODE_UNIX_SOCKET)"
    )
    serve.add_argument("--data-dir", help="embedded data directory (CHATNODE_DATA_DIR)")
    serve.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="insecure mode: anyone joins as any user with ?user=, admin needs no token;"
        " never expose it (CHATNODE_INSECURE)",
    )

    sub.add_parser(
        "migrate", help="apply database migrations (MySQL schema, Elasticsearch template)"
    )

    letters = sub.add_parser(
        "dead-letters",
        help="list the messages the archive refused or held another message for, kept for"
        " repair: one JSON object a line, oldest first",
    )
    letters.add_argument(
        "--limit", type=int, default=10_000, help="list at most this many (default 10000)"
    )

    users = sub.add_parser("users", help="manage accounts: admin rights")
    users_sub = users.add_subparsers(dest="users_command", required=True)
    for action, what in (
        ("grant-admin", "make the account an admin (its next tokens carry it)"),
        ("revoke-admin", "withdraw the account's admin rights and revoke its tokens"),
    ):
        users_sub.add_parser(action, help=what).add_argument("name", help="the user name")

    conf = sub.add_parser("config", help="print the effective configuration")
    conf.add_argument("--markdown", action="store_true", help="print the table of all settings")

    chat = sub.add_parser("chat", help="join a room from the terminal (lines you type are sent)")
    chat.add_argument("room", type=int)
    chat.add_argument("--url", default="ws://127.0.0.1:8080", help="node or nginx base URL")
    chat.add_argument("--user", help="user name (insecure mode)")
    chat.add_argument("--token", help="token from POST /v1/tokens")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.command == "serve":
        overrides = {
            "host": args.host,
            "port": args.port,
            "unix_socket": args.unix_socket,
            "data_dir": args.data_dir,
            "insecure": args.insecure,
        }
    try:
        config = load_config(os.environ, overrides)
    except ConfigError as exc:
        print(f"chatnode: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for chatty in ("httpx", "elastic_transport"):  # one INFO line per backend request
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
    if args.command == "config":
        if args.markdown:
            print(markdown_table())
        else:
            print(json.dumps(shown_settings(config), indent=2))
        return 0
    if args.command == "serve":
        try:
            return trio.run(_serve, config)
        except (ConfigError, BaseExceptionGroup) as exc:
            error = _only_config_error(exc)
            if error is None:
                raise
            print(f"chatnode: configuration error: {error}", file=sys.stderr)
            return 2
    if args.command == "migrate":
        if config.embedded:
            print(
                "embedded mode: the SQLite schema is migrated when the node starts; nothing to do"
            )
            return 0
        from chatnode.wiring import migrate

        migrated: int = trio.run(migrate, config)
        return migrated
    if args.command == "chat":
        from chatnode.client import chat

        return trio.run(chat, args.url, args.room, args.user, args.token)
    if args.command == "dead-letters":
        listed: int = trio.run(_dead_letters, config, args.limit)
        return listed
    if args.command == "users":
        done: int = trio.run(_set_admin, config, args.name, args.users_command == "grant-admin")
        return done
    return 2


def _only_config_error(exc: BaseException) -> ConfigError | None:
    """The ``ConfigError`` that stopped the node while it started, if that is all that did
    (one, perhaps inside its tasks' exception groups); else None."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, ConfigError) else None


def dead_letter_line(letter: DeadLetter) -> str:
    """One dead letter as a JSON line: ``kind``, ``key`` (``"R:O"`` or null), ``kept_at_ms``,
    ``reason``, ``document`` and ``stored`` (null unless a conflict) as text (bytes that are
    not UTF-8 backslash-escaped)."""
    refusal = letter.refusal
    stored = refusal.stored
    return json.dumps(
        {
            "kind": refusal.kind.value,
            "key": refusal.key,
            "kept_at_ms": letter.kept_at_ms,
            "reason": refusal.reason,
            "document": refusal.document.decode(errors="backslashreplace"),
            "stored": None if stored is None else stored.decode(errors="backslashreplace"),
        },
        ensure_ascii=False,
    )


async def _dead_letters(config: Any, limit: int) -> int:
    from chatnode.core.errors import Unavailable
    from chatnode.wiring import open_archive

    try:
        async with open_archive(config) as archive:
            letters = await archive.dead_letters(limit=limit)
    except Unavailable as exc:
        print(f"chatnode: the archive is unavailable: {exc}", file=sys.stderr)
        return 1
    for letter in letters:
        print(dead_letter_line(letter))
    return 0


async def _set_admin(config: Any, name: str, is_admin: bool) -> int:
    """``chatnode users grant-admin | revoke-admin NAME``: one line, exit code 0 or 1."""
    from chatnode.core.errors import Unavailable
    from chatnode.node.accounts import set_admin
    from chatnode.wiring import open_accounts

    failed: list[BaseException] = []
    user = None
    try:
        async with open_accounts(config) as (directory, revocations):
            await directory.check()  # a schema `chatnode migrate` did not bring up: one line
            user = await set_admin(
                directory, revocations, name, is_admin, token_ttl_s=config.token_ttl_s
            )
    except* Unavailable as group:  # (the Redis client's task group may wrap it)
        failed.extend(_leaves(group))
    if failed:
        print(f"chatnode: nothing changed or not everywhere, retry: {failed[0]}", file=sys.stderr)
        return 1
    if user is None:
        print(f"chatnode: there is no user {name!r}", file=sys.stderr)
        return 1
    if is_admin:
        print(f"{user.name} (account {user.id}) is an admin: tokens issued from now on say so")
    else:
        print(
            f"{user.name} (account {user.id}) is no longer an admin: every token issued until"
            " now is revoked"
        )
    return 0


def _leaves(error: BaseException) -> list[BaseException]:
    """The exceptions an exception group holds, however nested."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


GC_YOUNG_THRESHOLD = 10_000
"""Allocations between collections of the youngest generation (Python's default: 700).

A node's transient containers come in bursts: a 1,000-entry archive batch is ~2,000 lists
from the Redis reply (each entry and its fields), a fan-out or a join builds its own. At 700 a burst outlives several young
collections and is promoted to the older generations, whose collections then walk it again,
and with it the node's whole heap. Catching up an archive backlog (without Elasticsearch:
``bench/`` docs/benchmarks.md) the collector took ~1.0-1.3 µs of the node's ~3.5 µs per
message; with this threshold, and the objects of the started node frozen out of the
collector's walks (``gc.freeze()``), the node spent what it spends with the collector off.
Reference cycles are still collected, only after more allocations."""


async def _serve(config: Any) -> int:
    from chatnode.app import App

    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    app = App(config)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, app)
        async with trio.open_nursery() as running:
            await running.start(app.run)
            gc.freeze()  # modules, backends, caches: alive for the life of the process
        nursery.cancel_scope.cancel()
    return 0


async def _stop_on_signal(app: Any) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            logging.getLogger("chatnode").info("signal %s: stopping", signal.Signals(signum).name)
            app.request_stop()
            return
