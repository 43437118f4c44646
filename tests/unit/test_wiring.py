"""The composition root builds the embedded set on one private SQLite file, and the CLI's
smaller sets on the same file; everything it opened is closed when its context exits."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio

from chatnode import wiring
from chatnode.adapters.memory import MemoryPresence, MemoryRateLimits, MemoryTickets
from chatnode.adapters.sqlite import (
    SqliteArchive,
    SqliteBus,
    SqliteDirectory,
    SqliteRevocations,
)
from chatnode.config import Config, ConfigError
from chatnode.core import errors
from chatnode.core.models import Draft

T0 = 1_700_000_000_000


async def test_the_embedded_set_shares_one_private_file(tmp_path: Path) -> None:
    config = Config(data_dir=str(tmp_path / "data"))
    with trio.fail_after(10):
        async with wiring.open_backends(config, "node-1") as backends:
            assert isinstance(backends.directory, SqliteDirectory)
            assert isinstance(backends.bus, SqliteBus)
            assert isinstance(backends.archive, SqliteArchive)
            assert isinstance(backends.revocations, SqliteRevocations)
            assert isinstance(backends.presence, MemoryPresence)
            assert isinstance(backends.tickets, MemoryTickets)
            assert isinstance(backends.rate_limits, MemoryRateLimits)
            assert backends.feed is None  # the room log is the archive
            await backends.directory.create_user("ann", "h", created_at_ms=T0)
            published = await backends.bus.publish(Draft(1, "ann", "kept", T0))
            directory = backends.directory

        with pytest.raises(errors.Unavailable):  # closed on exit
            await directory.get_user("ann")

        async with wiring.open_archive(config) as archive:
            assert await archive.read(1, after_offset=0, up_to_offset=9, limit=9) == [published]
        async with wiring.open_accounts(config) as (accounts, _):
            assert await accounts.get_user("ann") is not None

    assert stat.S_IMODE(os.stat(config.data_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(wiring.sqlite_path(config)).st_mode) == 0o600


async def test_a_data_dir_that_cannot_be_made_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="CHATNODE_DATA_DIR"):
        async with wiring.open_backends(Config(data_dir=str(blocker / "data")), "node-1"):
            pass


async def test_migrate_has_nothing_to_do_when_embedded() -> None:
    assert await wiring.migrate(Config()) == 0


async def test_push_notifications_are_built_only_with_a_url(tmp_path: Path) -> None:
    from chatnode.adapters.memory import MemoryPushGate
    from chatnode.adapters.webhook import HttpWebhook

    config = Config(data_dir=str(tmp_path / "data"))
    async with wiring.open_backends(config, "node-1") as backends:
        assert backends.webhook is None and backends.push_gate is None
    config = Config(data_dir=str(tmp_path / "data"), push_url="https://push.example.com/hook")
    async with wiring.open_backends(config, "node-1") as backends:
        assert isinstance(backends.webhook, HttpWebhook)
        assert isinstance(backends.push_gate, MemoryPushGate)
