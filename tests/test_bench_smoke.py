"""The benchmark script runs end to end with tiny sizes (its numbers are not judged here)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_baseline_benchmark_runs(peers_bin, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "TOTAL": "30",
        "CLIENTS": "1 4",
        "OUT": str(tmp_path / "out"),
        "K8S_SQL_PEERS_BIN": str(peers_bin),
    }
    res = subprocess.run(
        ["bash", str(ROOT / "bench/baseline.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if re.match(r"\| (k8s-sql|etcd) \|", line)]
    assert len(rows) == 8, res.stdout  # 2 servers x (put, range) x 2 client counts
    for row in rows:
        rps = int(row.split("|")[4])
        assert rps > 0, row
