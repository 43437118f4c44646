"""The wheel carries what ``chatnode migrate`` needs: ``pip install .`` alone is enough.

The wheel is built from a copy of the package's sources (``pyproject.toml``, ``README.md``,
``chatnode/``) in a temporary directory, so the build leaves nothing in the tree; then it is
unpacked and run from there, not from the source tree: the schema must be found as package
data through ``importlib.resources``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DIRS = ("chatnode/adapters/mysql/schema", "chatnode/adapters/elasticsearch/schema")
BUILD_TIMEOUT_S = 300  # a hung build fails the test instead of the suite


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "chatnode", source / "chatnode", ignore=shutil.ignore_patterns("__pycache__")
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-q", "-w", str(tmp / "dist")],
        cwd=source,
        check=True,
        capture_output=True,
        timeout=BUILD_TIMEOUT_S,
    )
    (built,) = (tmp / "dist").glob("chatnode-*.whl")
    return built


def test_the_wheel_holds_every_schema_file(wheel: Path) -> None:
    shipped = {
        path.relative_to(ROOT).as_posix()
        for directory in SCHEMA_DIRS
        for path in (ROOT / directory).iterdir()
        if path.is_file()
    }
    assert any(name.endswith(".sql") for name in shipped)
    assert any(name.endswith(".json") for name in shipped)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert shipped <= names
    assert "chatnode/py.typed" in names


def test_the_installed_package_reads_its_schema_and_offers_migrate(
    wheel: Path, tmp_path: Path
) -> None:
    pytest.importorskip("MySQLdb", reason="needs the cluster extra: pip install -e '.[cluster]'")
    pytest.importorskip("elasticsearch", reason="needs the cluster extra")
    installed = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(installed)
    env = {**os.environ, "PYTHONPATH": str(installed), "PYTHONSAFEPATH": "1"}
    probe = (
        "import chatnode\n"
        "from chatnode.adapters.mysql.migrations import mysql_migrations\n"
        "from chatnode.adapters.elasticsearch.migrations import "
        "dead_letters_template, messages_template\n"
        "print(chatnode.__file__)\n"
        "print(len(mysql_migrations()))\n"
        "print(messages_template('acme')['index_patterns'], "
        "dead_letters_template('acme')['index_patterns'])\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    where, count, patterns = run.stdout.splitlines()
    assert Path(where).is_relative_to(installed)
    assert int(count) == len(list((ROOT / SCHEMA_DIRS[0]).glob("*.sql")))
    assert "acme-messages" in patterns and "acme-dead-letters" in patterns

    helped = subprocess.run(
        [sys.executable, "-m", "chatnode", "migrate", "--help"],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert "usage: chatnode migrate" in helped.stdout
