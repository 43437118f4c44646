"""``chatnode serve`` with umask 000, recording how it makes and changes files.

Usage: ``python tests/security/audited_serve.py EVENTS_FILE`` with the node's ``CHATNODE_*``
environment. Every file the process creates (an ``open`` with ``O_CREAT``), links, renames or
changes the mode of (``os.chmod``) under ``CHATNODE_DATA_DIR`` is appended to EVENTS_FILE as
one line, ``<event> <path> [<mode>]``, through Python's audit hooks (``sys.addaudithook``):
what the process really did, not what a test double says. SQLite's own file creation is C and
not audited; the database's mode is checked on the files themselves.

umask 000 is the worst an operator can run with: a file made with the open's default mode, or
a directory made with ``mkdir``'s, is then readable (and writable) by everyone, so only a mode
given at creation keeps it private.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def main() -> int:
    events = open(sys.argv[1], "a", buffering=1)  # noqa: SIM115 -- open for the process's life
    watched = os.path.realpath(os.environ["CHATNODE_DATA_DIR"])

    def ours(path: object) -> str | None:
        if isinstance(path, int | type(None)):
            return None
        text = os.path.realpath(os.fsdecode(path))  # type: ignore[arg-type]
        return text if text == watched or text.startswith(watched + os.sep) else None

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and isinstance(args[2], int) and args[2] & os.O_CREAT:
            path = ours(args[0])
            if path:
                events.write(f"create {path}\n")
        elif event == "os.chmod":
            path = ours(args[0])
            if path:
                events.write(f"chmod {path} {args[1]:o}\n")
        elif event in ("os.link", "os.rename"):
            path = ours(args[1])
            if path:
                events.write(f"{event.removeprefix('os.')} {path}\n")
        elif event == "os.mkdir":
            path = ours(args[0])
            if path:
                events.write(f"mkdir {path} {args[1]:o}\n")

    os.umask(0)
    sys.addaudithook(hook)
    from chatnode.cli import main as chatnode_main

    return chatnode_main(["serve"])


if __name__ == "__main__":
    raise SystemExit(main())
