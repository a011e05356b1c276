"""The benchmark harness (bench/run) runs end to end with tiny sizes: every server, backend
and workload produces sane results and the report renders. Its numbers are not judged
here; benchmarks are not part of CI's pass/fail."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import missing
from databases import MariaDBServer, PostgresServer

ROOT = Path(__file__).resolve().parent.parent


def _backends() -> list[str]:
    out = ["sqlite-full", "sqlite-normal"]
    for name, server in (("postgres", PostgresServer), ("mariadb", MariaDBServer)):
        reason = server.available()
        if reason:
            missing(reason)  # fails in strict mode (CI); a laptop without it skips
        out.append(name)
    return out


@pytest.mark.timeout(1800)
def test_bench_harness_quick(peers_bin: Path, tmp_path: Path) -> None:
    if shutil.which("go") is None:
        missing("Go is not installed, so kine and bench-driver cannot be built (bench/build.sh)")
    backends = _backends()
    out, report = tmp_path / "results", tmp_path / "report.md"
    argv = ["bash", str(ROOT / "bench/run"), "--quick", "--out", str(out), "--report", str(report)]
    argv += ["--peers-bin", str(peers_bin), "--only", ",".join(["etcd", "kine", "k8s-sql", *backends])]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=1700, env={**os.environ})
    doc = json.loads((out / "results.json").read_text())
    assert res.returncode == 0 and not doc["failures"], f"{doc['failures']}\n{res.stdout[-5000:]}\n{res.stderr[-5000:]}"

    sizes = doc["meta"]["sizes"]
    w5 = [r for r in doc["results"] if r["workload"] == "w5"]
    recs = [r for r in doc["results"] if r["workload"] != "w5"]
    # W5 (kube-apiserver + kwok) runs for k8s-sql on SQLite in the quick run
    assert [(r["server"], r["backend"]) for r in w5] == [("k8s-sql", "sqlite-full")], w5
    assert w5[0]["pods_running"] == w5[0]["pods"] > 0 and w5[0]["mutating_ms"]["p99"] > 0, w5
    assert w5[0]["server_cpu_s"] > 0 and w5[0]["peak_rss_mb"] > 1, w5
    targets = [("etcd", "bbolt")] + [(s, b) for b in backends for s in ("k8s-sql", "kine")]
    for server, backend in targets:
        mine = [r for r in recs if r["server"] == server and r["backend"] == backend]
        have = {(r["workload"], r["scenario"], r["clients"]) for r in mine}
        expected = {(f"w1-{op}", "single", c) for op in ("create", "update") for c in sizes["w1_clients"]}
        expected |= {("w2-list", "single", 1), ("w2-count", "single", 1), ("w3", "single", sizes["w3_clients"])}
        if server != "etcd" and not (server == "kine" and backend.startswith("sqlite")):
            expected.add(("w3", "cross", sizes["w3_clients"]))
        assert expected <= have, f"{server}/{backend} lacks {expected - have}"
        workloads = {r["workload"] for r in mine}
        assert {"w2-get", "w4-grant", "w4-attach", "w4-expiry"} <= workloads, (server, backend, workloads)
        for r in mine:
            what = f"{server}/{backend}/{r['workload']}/{r['scenario']}/{r['clients']}"
            assert r["ops"] > 0 and r["errors"] == 0, what
            assert r["throughput"] > 0 and r["seconds"] > 0, what
            lat = r["latency_ms"]
            assert 0 <= lat["p50"] <= lat["p99"] <= lat["max"], (what, lat)
            assert r["cdf"] and r["cdf"][-1][1] == pytest.approx(1.0), what
            assert r["server_cpu_s"] >= 0 and r["peak_rss_mb"] > 1, what
            assert (r.get("db_cpu_s") is not None) == (backend in ("postgres", "mariadb")), what
            if r["workload"] == "w3":
                assert r["deliveries"] > 0 and r["missed"] == 0, (what, r)
            if r["workload"] == "w4-expiry":
                assert r["expired"] > 0, (what, r)
    # CPU was measured: over a whole run every server used some
    for server, backend in targets:
        assert sum(r["server_cpu_s"] for r in recs if (r["server"], r["backend"]) == (server, backend)) > 0

    text = report.read_text()
    for heading in ("## Targets", "## Machine", "## W1", "## W2", "## W3", "## W4", "## W5", "## Exact commands"):
        assert heading in text, heading
    assert "| k8s-sql | sqlite-full |" in text
    for png in ("w1-throughput.png", "w1-latency-cdf.png", "w3-latency-cdf.png", "w5-latency-cdf.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000, png
        assert f"](report/{png})" in text, png
