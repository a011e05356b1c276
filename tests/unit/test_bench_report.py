"""bench/report.py renders issue #15's targets, the CPU-per-txn table, the two-core layout
and the per-request CPU table from a results document, and replaces the hand-kept
sections those now generate (keeping the others)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from report import Results, render, targets  # noqa: E402


def _w1(
    server: str, backend: str, clients: int, tps: float, cpu_us: float, db_us: float | None, layout: str = ""
) -> list[dict[str, Any]]:
    out = []
    for op in ("create", "update"):
        ops = 1000
        rec: dict[str, Any] = {
            "server": server,
            "backend": backend,
            "workload": f"w1-{op}",
            "scenario": "single",
            "clients": clients,
            "ops": ops,
            "errors": 0,
            "seconds": ops / tps,
            "throughput": tps,
            "latency_ms": {"p50": 1.0, "p99": 2.0, "max": 3.0},
            "cdf": [[1.0, 0.5], [2.0, 1.0]],
            "server_cpu_s": ops * cpu_us / 1e6,
            "peak_rss_mb": 50.0,
        }
        if db_us is not None:
            rec["db_cpu_s"] = ops * db_us / 1e6
        if layout:
            rec["layout"] = layout
        out.append(rec)
    return out


def _doc() -> dict[str, Any]:
    recs: list[dict[str, Any]] = []
    for c, e in ((1, 1800.0), (16, 6000.0)):
        recs += _w1("etcd", "bbolt", c, e, 100.0, None)
        recs += _w1("etcd", "bbolt", c, e * 0.9, 110.0, None, "two-cores")
    # SQLite: kine's database is in its process; PostgreSQL at 16 clients: kine's database
    # spends more per txn than kine (so 2x is required), not at 1 client.
    recs += _w1("k8s-sql", "sqlite-full", 1, 700.0, 1200.0, None) + _w1("kine", "sqlite-full", 1, 1300.0, 600.0, None)
    recs += _w1("k8s-sql", "sqlite-full", 16, 1600.0, 450.0, None) + _w1("kine", "sqlite-full", 16, 1300.0, 560.0, None)
    recs += _w1("k8s-sql", "postgres", 1, 560.0, 1000.0, 520.0) + _w1("kine", "postgres", 1, 970.0, 430.0, 400.0)
    recs += _w1("k8s-sql", "postgres", 16, 1865.0, 400.0, 130.0) + _w1("kine", "postgres", 16, 740.0, 260.0, 1050.0)
    for backend in ("sqlite-full", "postgres"):
        for c in (1, 16):
            recs += _w1("k8s-sql", backend, c, 900.0, 500.0, None, "two-cores")
            recs += _w1("kine", backend, c, 800.0, 500.0, None, "two-cores")
    cpu = [
        {"backend": "sqlite", "operation": "Put", "server_us": 510.0, "ops_per_s": 1900.0, "statements": 0.7,
         "db_us": None, "requests_per_batch": 3.3, "statements_per_batch": 2.6,
         "layers": {"transport": 0.68, "protobuf": 0.0, "api": 0.03, "watch": 0.01, "store": 0.05, "SQL": 0.23}},
        {"backend": "postgres", "operation": "watch event delivered", "server_us": 75.0, "ops_per_s": None,
         "statements": None, "db_us": None, "requests_per_batch": None, "statements_per_batch": None,
         "layers": {"transport": 0.75, "watch": 0.18}},
    ]  # fmt: skip
    meta = {"started": "2026-11-30T00:00:00Z", "command": "bench/run", "two_cores": {"k8s_sql_workers": 2}}
    return {"meta": meta, "results": recs, "cpu_budget": cpu, "failures": [], "commands": []}


def test_issue_15_targets_from_a_results_document() -> None:
    ts = {(t.name, t.where): t for t in targets(Results(_doc()))}
    assert ts[("W1 vs kine (both durable)", "postgres, 16 clients")].required == 2.0  # kine's database bound
    assert ts[("W1 vs kine (both durable)", "postgres, 1 client")].required == 1.0
    assert ts[("W1 vs kine (both durable)", "sqlite-full, 16 clients")].required == 1.0
    assert ts[("W1 vs kine (both durable)", "sqlite-full, 16 clients")].status()[0] == "met"
    assert ts[("W1 vs kine (both durable)", "sqlite-full, 1 client")].status()[0] == "**missed**"
    cpu = ts[("server CPU per W1 txn vs kine's", "sqlite-full, 16 clients")]
    assert round(cpu.measured or 0, 2) == round(450 / 560, 2) and cpu.status()[0] == "met"
    assert ts[("server CPU per W1 txn", "sqlite-full, 16 clients")].measured == 450.0
    db = ts[("database CPU per W1 txn vs kine's", "postgres, 16 clients")]
    assert round(db.measured or 0, 3) == round(130 / 1050, 3)
    two = ts[("W1 vs etcd, two shared cores (k8s-sql --workers 2)", "postgres, 16 clients")]
    assert round(two.measured or 0, 3) == round(900 / 5400, 3)  # the two-core records, not the pinned ones
    pinned = ts[("W1 vs etcd, one pinned core", "postgres, 16 clients")]
    assert round(pinned.measured or 0, 3) == round(1865 / 6000, 3)
    watch = ts[("server CPU per watch event delivered", "postgres (cpu workload)")]
    assert watch.status()[0] == "**missed**" and "15 µs" in watch.status()[1]


def test_generated_sections_replace_their_hand_kept_blocks(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    import json

    results.write_text(json.dumps(_doc()))
    out = tmp_path / "benchmarks.md"
    out.write_text(
        "old\n<!-- two-cores:begin by hand -->\n## W1 on one pinned core and on two shared cores\nold table\n"
        "<!-- two-cores:end -->\n<!-- batching:begin by hand -->\n## Batching\nkept\n<!-- batching:end -->\n"
    )
    render(results, out)
    text = out.read_text()
    assert text.count("## W1 on one pinned core and on two shared cores") == 1
    assert "old table" not in text
    assert "## Batching\nkept" in text  # a block nothing generates is kept
    assert "## Server CPU per request, by layer" in text
    assert "| sqlite | Put | 510 | 1,900 |" in text
    assert (
        "protobuf" not in text.split("## Server CPU per request, by layer")[1].split("## W2")[0].split("| backend")[1]
    )
    cpu_table = text.split("**CPU per txn**")[1].split("\n## ")[0]  # (bench/limits.md has such rows too)
    row = next(line for line in cpu_table.splitlines() if line.startswith("| postgres | 16 |"))
    assert row.split(" | ")[2:6] == ["400", "260", "130", "1,050"]  # server and database µs per txn


def test_envoy_records_get_their_own_targets_against_the_same_kine_and_etcd(tmp_path: Path) -> None:
    """k8s-sql measured again with --transport envoy (layout "envoy") is judged against
    the first pass's kine and etcd, in targets of its own; the grpc.aio targets and
    tables keep the grpc.aio records."""
    import json

    doc = _doc()
    doc["results"] += _w1("k8s-sql", "sqlite-full", 16, 3100.0, 300.0, None, "envoy")
    doc["results"] += _w1("k8s-sql", "postgres", 16, 2700.0, 270.0, 90.0, "envoy")
    doc["cpu_budget_envoy"] = [
        {"backend": "sqlite", "operation": "Put", "server_us": 230.0, "ops_per_s": 3900.0, "statements": 0.5,
         "db_us": None, "requests_per_batch": 6.0, "statements_per_batch": 3.0, "layers": {"transport": 0.2}},
    ]  # fmt: skip
    res = Results(doc)
    ts = {(t.name, t.where): t for t in targets(res)}
    grpcio = ts[("W1 vs kine (both durable)", "sqlite-full, 16 clients")]
    envoy = ts[("W1 vs kine (both durable), k8s-sql --transport envoy", "sqlite-full, 16 clients")]
    assert round(grpcio.measured or 0, 3) == round(1600 / 1300, 3)
    assert round(envoy.measured or 0, 3) == round(3100 / 1300, 3)
    assert ts[("server CPU per W1 txn, k8s-sql --transport envoy", "sqlite-full, 16 clients")].measured == 300.0
    etcd = ts[("W1 vs etcd, one pinned core, k8s-sql --transport envoy", "postgres, 16 clients")]
    assert round(etcd.measured or 0, 3) == round(2700 / 6000, 3)
    assert ("W1 vs kine (both durable), k8s-sql --transport envoy", "postgres, 1 client") in ts  # no data: n/a
    results = tmp_path / "results.json"
    results.write_text(json.dumps(doc))
    out = tmp_path / "benchmarks.md"
    render(results, out)
    section = out.read_text().split("## W1 with `--transport envoy`")[1].split("\n## ")[0]
    row = next(line for line in section.splitlines() if line.startswith("| sqlite-full | 16 |"))
    assert row.split(" | ")[2:6] == ["1,600", "3,100", "1,300", "6,000"]
    assert "| sqlite | Put | 230 | 3,900 |" in section
