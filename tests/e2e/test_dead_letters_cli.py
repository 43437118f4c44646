"""``chatnode dead-letters`` on the embedded node's database: one JSON object a line, oldest
first, bytes that are not UTF-8 shown escaped; an archive it cannot open is exit code 1."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

from chatnode.adapters.sqlite import SqliteArchive, SqliteDatabase
from chatnode.core.models import ChatMessage, DeadLetter, Refusal, RefusalKind

T0 = 1_700_000_000_000
REPO = Path(__file__).resolve().parents[2]


async def keep(path: Path, letters: list[DeadLetter]) -> None:
    async with await SqliteDatabase.open(path) as db:
        await SqliteArchive(db).keep_dead_letters(letters)


async def dead_letters_cli(data_dir: Path) -> trio.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "chatnode", "dead-letters"],
        env={"CHATNODE_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin"},
        cwd=REPO,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_dead_letters_are_listed_one_json_line_each(tmp_path: Path) -> None:
    ours, stored = ChatMessage(3, 7, "bob", "é new", T0), ChatMessage(3, 7, "ann", "old", T0)
    conflict = DeadLetter(
        Refusal(RefusalKind.CONFLICT, ours.document, "a different message", stored.document),
        T0 + 2,
    )
    garbage = DeadLetter(Refusal(RefusalKind.UNINDEXABLE, b"\xffnot json", "not sent"), T0 + 1)
    await keep(tmp_path / "chatnode.sqlite3", [conflict, garbage])

    with trio.fail_after(30):
        result = await dead_letters_cli(tmp_path)

    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.decode().splitlines()] == [
        {
            "kind": "unindexable",
            "key": None,
            "kept_at_ms": T0 + 1,
            "reason": "not sent",
            "document": "\\xffnot json",
            "stored": None,
        },
        {
            "kind": "conflict",
            "key": "3:7",
            "kept_at_ms": T0 + 2,
            "reason": "a different message",
            "document": ours.document.decode(),
            "stored": stored.document.decode(),
        },
    ]


async def test_an_archive_that_cannot_be_opened_is_exit_code_1(tmp_path: Path) -> None:
    with trio.fail_after(30):
        result = await dead_letters_cli(tmp_path / "missing" / "dir")

    assert result.returncode == 1
    assert b"the archive is unavailable" in result.stderr
