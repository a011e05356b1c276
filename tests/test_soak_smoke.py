"""The soak mode of the benchmark harness (bench/run --soak, bench/harness/soak.py).

- ``test_soak_analysis`` checks the analysis and the report section on synthetic series
  whose answers are known (an RSS that grows 20 MB/h, CPU at 30 %, latency that doubles),
  and that rendering the section into an existing report replaces only that section.
- ``test_soak_quick`` runs ``bench/run --soak --quick`` end to end: one minute of
  kube-apiserver + kwok churn against k8s-sql on SQLite (about two minutes once
  kube-apiserver, kwok and loadgen are built), and checks that pods were created, patched,
  deleted and made Running, that Events were created and expired through their leases,
  that RSS/CPU samples and latency windows were taken and the RSS slope computed, and
  that the report section and its plot were rendered. Its numbers are not judged.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import test_kubernetes_e2e as e2e
from conftest import missing

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from harness.soak import analyse  # noqa: E402
from report import SOAK_BEGIN, SOAK_END, render_soak  # noqa: E402

kube_bin = e2e.kube_bin  # the session fixture that builds (or finds) kube-apiserver


def _synthetic() -> tuple[dict[str, Any], list[dict[str, float]], list[tuple[float, str, float, bool]], list[Any]]:
    t0, dur = 1_700_000_000.0, 1200.0
    samples = []
    for i in range(-10, 241):  # every 5 s from 50 s before the churn to its end
        t = i * 5.0
        samples.append(
            {
                "t": t0 + t,
                "server_cpu_s": 0.3 * (t + 50),  # 30 % of a core
                "server_rss_mb": 100.0 + 20.0 * t / 3600,  # +20 MB/h
                "loadavg1": 2.5,
                "machine_busy": 100.0 * (t + 50),
                "machine_total": 200.0 * (t + 50),
            }
        )
    requests = []
    for i in range(12000):
        t = dur * i / 12000
        ms = 10.0 if t < 600 else 20.0  # latency doubles halfway
        requests.append((t, ("pod-create", "pod-update", "event-create")[i % 3], ms, True))
    hist = {"0.005": 10.0, "0.025": 90.0, "0.05": 100.0, "+Inf": 100.0}
    windows = [{"t0": k * 60.0, "t1": (k + 1) * 60.0, "hist": {"etcd all": hist}} for k in range(20)]
    summary = {
        "soak_start_unix": t0,
        "seconds": dur,
        "counts": {"pod-create": 4000},
        "events_created": 8000,
        "events_present_end": 700,
    }
    return summary, samples, requests, windows


def test_soak_analysis(tmp_path: Path) -> None:
    summary, samples, requests, windows = _synthetic()
    a = analyse(summary, samples, requests, windows, warmup_s=300, window_s=60)
    assert a["warmup_s"] == 300 and a["analysed_s"] == 900
    assert a["rss"]["slope_mb_per_h"] == pytest.approx(20.0, abs=0.01)
    assert a["rss"]["slope_ci95_mb_per_h"] == pytest.approx(0.0, abs=0.01)
    assert a["rss"]["flat"] is False and a["rss"]["samples"] == 181
    assert a["cpu"]["mean_pct"] == pytest.approx(30.0) and a["cpu"]["thirds_pct"] == [30.0, 30.0, 30.0]
    assert a["machine"]["busy_pct_mean"] == pytest.approx(50.0) and a["machine"]["loadavg1_mean"] == 2.5
    mu = a["client"]["mutating"]
    assert mu["first_third"]["p99"] == 10.0 and mu["last_third"]["p99"] == 20.0
    assert mu["p99_last_over_first"] == 2.0 and mu["steady_verdict"] is False
    st = a["store"]["etcd all"]
    assert st["steady"]["count"] == 1500 and st["p99_last_over_first"] == 1.0 and st["steady_verdict"] is True
    assert a["events"]["expired_or_gone"] == 7300
    assert len(a["latency_windows"]) == 20 and a["latency_windows"][0]["mutating"]["p50"] == 10.0
    assert a["series"]["t"][0] == -50.0 and len(a["series"]["rss_mb"]) == 251

    # the section is added before "## Failures", then replaced in place; the rest is untouched
    rec = {"workload": "soak", "server": "k8s-sql", "backend": "sqlite-full", "summary": summary, **a}
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"meta": {"mode": "soak", "sizes": {}}, "results": [rec], "failures": []}))
    md = tmp_path / "report.md"
    before, after = "# Report\n\n## W5\n\ntext\n", "## Failures\n\n- none\n"
    md.write_text(before + "\n" + after)
    for _ in range(2):
        render_soak([results], md)
        text = md.read_text()
        assert text.startswith(before) and text.endswith(after) and text.count(SOAK_BEGIN) == 1, text
        section = text[text.index(SOAK_BEGIN) : text.index(SOAK_END)]
        assert "| sqlite-full |" in section and "+20.0 ± 0.0" in section and "**growing**" in section
        assert "**not steady**" in section
    assert (tmp_path / "report" / "soak-sqlite-full.png").stat().st_size > 1000


@pytest.mark.timeout(1800)
def test_soak_quick(kube_bin: Path, tmp_path: Path) -> None:
    if shutil.which("go") is None:
        missing("Go is not installed, so kwok and loadgen cannot be built (bench/kube/build.sh)")
    out, report = tmp_path / "results", tmp_path / "report.md"
    argv = ["bash", str(ROOT / "bench/run"), "--soak", "--quick", "--out", str(out), "--report", str(report)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=1700, env={**os.environ})
    doc = json.loads((out / "results.json").read_text())
    assert res.returncode == 0 and not doc["failures"], f"{doc['failures']}\n{res.stdout[-5000:]}\n{res.stderr[-5000:]}"
    check_quick(out, report)


def check_quick(out: Path, report: Path) -> None:
    """The checks of a ``bench/run --soak --quick --out OUT --report REPORT`` run."""
    doc = json.loads((out / "results.json").read_text())
    assert doc["meta"]["mode"] == "soak" and doc["meta"]["machine"]["cores"] > 0
    sizes = doc["meta"]["sizes"]
    [r] = doc["results"]
    assert (r["workload"], r["server"], r["backend"]) == ("soak", "k8s-sql", "sqlite-full")
    su = r["summary"]
    seconds = float(su["seconds"])
    assert seconds >= 0.95 * sizes["soak_minutes"] * 60, su
    # the churn happened at about its rates, without errors
    churn, updates = sizes["soak_churn_rate"] * seconds, sizes["soak_update_rate"] * seconds
    c = su["counts"]
    assert c["pod-create"] >= 0.5 * churn and c["pod-delete"] >= 0.5 * churn, c
    assert c["pod-update"] >= 0.5 * updates and c["pod-list"] >= 2, c
    assert c["event-create"] >= c["pod-create"] + c["pod-delete"] - 5, c
    assert not su["errors"], su["errors"]
    # kwok made the new pods Running and finished the deletions
    assert su["pods_seen_running"] >= sizes["soak_pods"] + 0.5 * c["pod-create"], su
    assert su["pods_seen_deleted"] >= 0.5 * c["pod-delete"], su
    # Events expired through their leases (TTL 15 s in the quick run)
    ev = r["events"]
    assert ev["created"] == c["event-create"] and 0 < ev["present_end"] < ev["created"], ev
    assert ev["expired_or_gone"] >= 0.3 * ev["created"], ev
    # RSS and CPU were sampled about every second, the slope was computed from them
    ser = r["series"]
    assert len(ser["t"]) >= 0.8 * seconds / sizes["soak_sample_seconds"], len(ser["t"])
    assert min(ser["rss_mb"]) > 10 and max(x or 0 for x in ser["cpu_pct"]) > 0, ser
    rss = r["rss"]
    assert rss["samples"] >= 30 and math.isfinite(rss["slope_mb_per_h"]), rss
    assert math.isfinite(rss["slope_ci95_mb_per_h"]) and rss["end_mb"] > 10, rss
    assert r["cpu"]["mean_pct"] > 0 and all(x is not None for x in r["cpu"]["thirds_pct"]), r["cpu"]
    assert r["machine"]["loadavg1_mean"] is not None, r["machine"]
    # latency over time: client-side per window and per third, the apiserver's histograms per window
    mu = r["client"]["mutating"]
    assert mu["steady"]["count"] > 100 and 0 < mu["steady"]["p50"] <= mu["steady"]["p99"], mu
    assert mu["first_third"]["count"] > 0 and mu["last_third"]["count"] > 0 and mu["p99_last_over_first"] > 0, mu
    assert len(r["latency_windows"]) >= 5, r["latency_windows"]
    assert len(r["store_windows"]) >= 5, r["store_windows"]
    st = r["store"]["etcd all"]
    assert st["steady"]["count"] > 100 and st["steady"]["p99"] is not None, st
    last = r["store_windows"][-1]
    assert last["live_pods"] >= sizes["soak_pods"] and last["running_pods"] >= 0.8 * sizes["soak_pods"], last
    assert last["storage_size_bytes"] > 0, last
    # the raw series are kept
    for name in r["raw"].values():
        assert (out / "raw" / name).stat().st_size > 0, name

    text = report.read_text()
    assert SOAK_BEGIN in text and SOAK_END in text and "## Soak" in text
    assert "| sqlite-full |" in text and "quick run" in text
    png = report.with_suffix("") / "soak-sqlite-full.png"
    assert png.stat().st_size > 1000 and "](report/soak-sqlite-full.png)" in text
