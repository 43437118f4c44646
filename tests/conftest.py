"""Shared test setup: every async test runs under a ``fail_after`` guard so nothing hangs.

The guard wraps the test function itself: under pytest-trio a fixture runs in its own task, so
a ``fail_after`` in a fixture would not cover the test body.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

TEST_TIMEOUT_S = 60


def _with_deadline(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    @functools.wraps(test)
    async def guarded(*args: Any, **kwargs: Any) -> None:
        with trio.fail_after(TEST_TIMEOUT_S):
            await test(*args, **kwargs)

    return guarded


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
            item.obj = _with_deadline(item.obj)
