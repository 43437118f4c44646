"""Shared test setup: the one hung-test stopper.

Every async test runs, with its trio fixtures, under a ``fail_after`` deadline: the whole
``trio.run`` of the test is bounded, so a hang in a fixture's setup or teardown fails the test
as a hang in its body does. The deadline is ``TEST_TIMEOUT_S`` unless the test (or a conftest,
for its directory) marks it ``@pytest.mark.deadline(seconds)``. pytest-trio runs a test with
the runner of its ``trio`` mark; the mark added here comes first, so it is the one used.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

TEST_TIMEOUT_S = 60.0


def run_with_deadline(
    seconds: float, async_fn: Callable[[], Awaitable[Any]], **run_kwargs: Any
) -> Any:
    """``trio.run(async_fn, **run_kwargs)``, failing with ``trio.TooSlowError`` after
    ``seconds`` (on the run's clock: a test's mock clock counts)."""

    async def bounded() -> Any:
        with trio.fail_after(seconds):
            return await async_fn()

    return trio.run(bounded, **run_kwargs)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "deadline(seconds): this async test's limit (default TEST_TIMEOUT_S)"
    )


@pytest.hookimpl(trylast=True)  # after every conftest had its say (``deadline`` marks)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
            mark = item.get_closest_marker("deadline")
            seconds = float(mark.args[0]) if mark else TEST_TIMEOUT_S
            run = functools.partial(run_with_deadline, seconds)
            item.add_marker(pytest.mark.trio(run=run), append=False)
