"""Fault tests print what they measure; this prints all of it once more at the end of the run."""

from __future__ import annotations

import pytest

from tests.faults.support import FIGURES, RESULTS_FILE


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("chatnode fault figures (measured on this machine)")
    for line in FIGURES:
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"(appended to {RESULTS_FILE})")
