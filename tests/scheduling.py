"""How pytest-xdist's workers share the suite (scripts/test: ``--dist loadscope``).

The suite is about 2,700 s of test time on three workers, and its wall time is what CI
waits for. pytest-xdist's own loadscope keeps each module on one worker and hands the
modules out largest test count first, so a module of one long test (the Kubernetes
storage suite, 275 s) could start last and run alone, and a module of many long tests
(resource bounds, 450 s) kept one worker busy for a third of the run. Measured at
0489df0: 1,133 s of wall time for 2,743 s of test time on three workers (914 s ideal).

So the scheduler here does two things (longest processing time first, the classic
list-scheduling rule, which ends within a third of the ideal's largest unit):

- **Units.** A module whose fixtures are module- or class-scoped stays one unit (its
  servers start once); every other test is a unit of its own, since all it shares with
  its neighbours are session fixtures that each worker starts once anyway.
- **Order.** Units go out longest first, by the durations in ``tests/durations.json``
  (seconds per test id, with setup and teardown), written by a run with
  ``--store-durations``. A test not listed there counts as the median listed test.
"""

from __future__ import annotations

import json
import statistics
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from xdist.scheduler import LoadScopeScheduling

DURATIONS = Path(__file__).resolve().parent / "durations.json"
ROOT = DURATIONS.parent.parent


def load_durations(path: Path = DURATIONS) -> dict[str, float]:
    try:
        return {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError):
        return {}


def shares_module_fixtures(source: str) -> bool:
    """True if a test module's source declares a module- or class-scoped fixture."""
    return any(f'scope="{s}"' in source or f"scope='{s}'" in source for s in ("module", "class", "package"))


class LongestFirst(LoadScopeScheduling):
    """Loadscope with finer units and the longest unit handed out first (see module doc)."""

    def __init__(self, config: pytest.Config, log: Any = None) -> None:
        super().__init__(config, log)
        self.durations = load_durations()
        self.default = statistics.median(self.durations.values()) if self.durations else 1.0
        self.whole: dict[str, bool] = {}
        self.ordered = False

    def _split_scope(self, nodeid: str) -> str:
        module = nodeid.split("::", 1)[0]
        if module not in self.whole:
            try:
                self.whole[module] = shares_module_fixtures((ROOT / module).read_text())
            except OSError:
                self.whole[module] = True
        return module if self.whole[module] else nodeid

    def seconds(self, nodeids: Iterable[str]) -> float:
        return sum(self.durations.get(n, self.default) for n in nodeids)

    def _assign_work_unit(self, node: Any) -> None:
        if not self.ordered:  # the first call: schedule() has just filled the queue
            self.ordered = True
            weight = {scope: self.seconds(ids) for scope, ids in self.workqueue.items()}
            self.workqueue = OrderedDict(sorted(self.workqueue.items(), key=lambda item: -weight[item[0]]))
        super()._assign_work_unit(node)


def store_durations(terminalreporter: Any, path: Path = DURATIONS) -> int:
    """Merge each test's seconds (setup, call and teardown) from this run's reports into
    ``path``: a run of a few tests updates theirs and keeps the others'."""
    seconds: dict[str, float] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            nodeid = getattr(report, "nodeid", None)
            duration = getattr(report, "duration", None)
            if nodeid and isinstance(duration, float) and getattr(report, "when", None):
                seconds[nodeid] = seconds.get(nodeid, 0.0) + duration
    merged = load_durations(path) | {k: round(v, 1) for k, v in seconds.items()}
    path.write_text(json.dumps(dict(sorted(merged.items())), indent=0) + "\n")
    return len(seconds)
