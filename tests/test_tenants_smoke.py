"""Many control planes on one database (bench/run --tenants, bench/harness/tenants.py).

- ``test_tenants_section`` renders the report section from records whose verdicts are
  known, into a report that already has one: only that section is replaced.
- ``test_tenants_quick`` runs the harness end to end, small: 2 stock kube-apiservers
  with their own ``--etcd-prefix`` over 2 k8s-sql frontends sharing one SQLite file,
  ConfigMap writes at 10/s for 6 s with a watch per tenant. Every write must complete
  and every watch see every write; the numbers are not judged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import test_kubernetes_e2e as e2e
from conftest import missing

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from report import render_tenants  # noqa: E402

kube_bin = e2e.kube_bin  # the session fixture that builds (or finds) kube-apiserver


def _record(server: str, completed: int, failed: int, p99: float) -> dict[str, Any]:
    return {
        "server": server,
        "backend": "postgres",
        "tenants": 8,
        "frontends": 2,
        "offered_per_second": 160,
        "offered": 100,
        "completed": completed,
        "dropped": 0,
        "failed": failed,
        "write_ms": {"p50": 5.0, "p99": p99},
        "watch_events": 2 * completed,
        "watch_events_expected": 2 * completed,
        "cpu_s": {"frontends": 1.0, "database": 2.0, "apiservers": 3.0},
        "window_s": 60.0,
        "errors": {'tenant 3 update: Operation cannot be fulfilled on configmaps "a": modified': failed}
        if failed
        else {},
        "rpcs_per_write": {"Txn": 1.01},
    }


def test_tenants_section(tmp_path: Path) -> None:
    res = tmp_path / "tenants.json"
    res.write_text(json.dumps([_record("k8s-sql", 100, 0, 50.0), _record("kine", 90, 10, 20.0)]))
    report = tmp_path / "report.md"
    report.write_text("# Report\n\nbefore\n\n<!-- tenants:begin old -->\nold\n<!-- tenants:end -->\n\n## Failures\n")
    render_tenants([res], report)
    text = report.read_text()
    assert text.startswith("# Report\n\nbefore\n\n<!-- tenants:begin") and text.endswith("## Failures\n")
    assert "old\n" not in text and text.count("<!-- tenants:end -->") == 1
    rows = [line for line in text.splitlines() if line.startswith("| k8s-sql |") or line.startswith("| kine |")]
    assert rows[0].endswith("| met |") and rows[1].endswith("| **missed** |"), rows
    assert "kine on postgres, update: Operation cannot be fulfilled on configmaps X: modified: 10" in text


def test_tenants_quick(kube_bin: Path, tmp_path: Path) -> None:
    if shutil.which("go") is None:
        missing("Go is not installed, so loadgen cannot be built")
    out, report = tmp_path / "results", tmp_path / "report.md"
    argv = [
        "bash",
        str(ROOT / "bench/run"),
        "--tenants",
        "--tenants",
        "2",
        "--servers",
        "k8s-sql",
        "--backends",
        "sqlite-full",
        "--rates",
        "10",
        "--duration",
        "6",
        "--settle",
        "1",
        "--watchers",
        "1",
        "--out",
        str(out),
        "--report",
        str(report),
    ]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=900, env={**os.environ})
    assert res.returncode == 0, f"{res.stdout[-5000:]}\n{res.stderr[-5000:]}"
    [r] = json.loads((out / "tenants.json").read_text())
    assert (r["server"], r["backend"], r["tenants"]) == ("k8s-sql", "sqlite-full", 2)
    assert r["offered"] == 60 and r["completed"] == 60 and r["failed"] == r["dropped"] == 0, r
    assert r["watch_events"] == r["watch_events_expected"] == 60, r
    assert set(r["cpu_s"]) == {"frontends", "apiservers"} and r["cpu_s"]["apiservers"] > 0, r
    assert 1.0 <= r["rpcs_per_write"]["Txn"] < 2, r["rpcs_per_write"]
    assert "<!-- tenants:begin" in report.read_text() and "| k8s-sql | sqlite-full | 10 | 60 |" in report.read_text()
    assert not (out / "work").exists()  # the stores and certificates are removed
