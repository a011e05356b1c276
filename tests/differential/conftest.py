"""Print the differential totals at the end of the run, whatever pytest captured."""

from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from .test_differential import TOTALS

    if TOTALS.runs:
        terminalreporter.write_sep("=", "differential against etcd")
        terminalreporter.write_line(TOTALS.line())
