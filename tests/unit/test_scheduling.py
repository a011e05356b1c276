"""tests/scheduling.py: which tests share a worker, and which go out first."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import scheduling


class FakeConfig:
    def __init__(self) -> None:
        self.option = SimpleNamespace(loadscopereorder=True)

    def getvalue(self, name: str) -> Any:
        return {"tx": ["3*popen"], "dist": "loadscope"}[name]


class FakeNode:
    def __init__(self, name: str) -> None:
        self.gateway = SimpleNamespace(id=name)
        self.shutting_down = False
        self.sent: list[list[int]] = []

    def send_runtest_some(self, indices: list[int]) -> None:
        self.sent.append(indices)

    def shutdown(self) -> None:
        self.shutting_down = True


def test_units_and_their_order(tmp_path: Path, monkeypatch) -> None:
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_shared.py").write_text('@pytest.fixture(scope="module")\ndef server(): ...\n')
    (tests / "test_alone.py").write_text("@pytest.fixture\ndef server(): ...\n")
    durations = tmp_path / "durations.json"
    seconds = {
        "tests/test_shared.py::test_a": 10.0,
        "tests/test_shared.py::test_b": 10.0,  # a unit of 20 s
        "tests/test_alone.py::test_long": 30.0,
        "tests/test_alone.py::test_short": 1.0,
        "tests/test_alone.py::test_mid[x]": 5.0,
    }
    durations.write_text(json.dumps(seconds))
    monkeypatch.setattr(scheduling, "DURATIONS", durations)
    monkeypatch.setattr(scheduling, "ROOT", tmp_path)

    collection = [*seconds, "tests/test_alone.py::test_unknown"]  # the median of the five: 10 s
    sched = scheduling.LongestFirst(FakeConfig())  # type: ignore[arg-type]
    sched.durations = scheduling.load_durations(durations)
    sched.default = 10.0
    nodes = [FakeNode("gw0"), FakeNode("gw1"), FakeNode("gw2")]
    for node in nodes:
        sched.add_node(node)  # type: ignore[arg-type]
        sched.add_node_collection(node, collection)  # type: ignore[arg-type]
    sched.schedule()

    # The module with a module-scoped fixture is one unit; every other test is its own.
    # Longest first: test_long (30 s), the shared module (20 s), then the unknown (10 s)
    # -- one unit to each worker -- and the rest as the workers ask for more.
    first = [[collection[i] for i in node.sent[0]] for node in nodes]
    assert first == [
        ["tests/test_alone.py::test_long"],
        ["tests/test_shared.py::test_a", "tests/test_shared.py::test_b"],
        ["tests/test_alone.py::test_unknown"],
    ]
    handed = [collection[i] for node in nodes for batch in node.sent for i in batch]
    assert sorted(handed) == sorted(collection)
    assert handed.index("tests/test_alone.py::test_mid[x]") < handed.index("tests/test_alone.py::test_short")


def test_stored_durations_merge(tmp_path: Path) -> None:
    path = tmp_path / "durations.json"
    path.write_text(json.dumps({"t::kept": 3.0, "t::updated": 9.0}))
    reports = [
        SimpleNamespace(nodeid="t::updated", when=when, duration=d) for when, d in (("setup", 1.0), ("call", 0.44))
    ]
    reporter = SimpleNamespace(stats={"passed": reports, "": [SimpleNamespace(nodeid="t::updated")]})
    assert scheduling.store_durations(reporter, path) == 1
    assert json.loads(path.read_text()) == {"t::kept": 3.0, "t::updated": 1.4}
