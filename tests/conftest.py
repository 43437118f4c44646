"""Shared test setup: every async test runs under a ``fail_after`` guard so nothing hangs."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator

import pytest
import trio

TEST_TIMEOUT_S = 60


@pytest.fixture
async def _fail_after_guard() -> AsyncIterator[None]:
    with trio.fail_after(TEST_TIMEOUT_S):
        yield


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        function = getattr(item, "function", None)
        if function is not None and inspect.iscoroutinefunction(function):
            item.add_marker(pytest.mark.usefixtures("_fail_after_guard"))
