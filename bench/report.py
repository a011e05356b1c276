#!/usr/bin/env python3
"""Render benchmark results (bench/results/<ts>/results.json) as Markdown with PNG plots.

    bench/report.py RESULTS.json [--out docs/benchmarks.md]
    bench/report.py SOAK-RESULTS.json [MORE.json ...] [--out docs/benchmarks.md]
    bench/report.py TENANTS.json [MORE.json ...] [--out docs/benchmarks.md]

The plots go to a directory named after the report (docs/benchmarks.md ->
docs/benchmarks/). bench/run calls this at the end of every run.

The soak (bench/run --soak) has its own results; they render as one section of the
report, between the markers ``<!-- soak:begin`` and ``<!-- soak:end -->``, which
render_soak replaces (or adds, before "## Failures") leaving the rest of the file as
it is, and which render keeps when it regenerates the rest. Several soak results files
(e.g. one backend re-run) are merged, the later ones winning per backend. The many
control planes section (bench/run --tenants, its tenants.json) is kept and replaced the
same way, between ``<!-- tenants:begin`` and ``<!-- tenants:end -->``; so is every other
block marked ``<!-- NAME:begin`` ... ``<!-- NAME:end -->`` (tables measured by the
micro-benchmarks, which say how they were run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SQL_BACKENDS = ("sqlite-full", "sqlite-normal", "postgres", "mariadb")
DURABLE = ("sqlite-full", "postgres", "mariadb")
SERVER_ORDER = {"etcd": 0, "kine": 1, "k8s-sql": 2}
BACKEND_STYLE = {"sqlite-full": "-", "sqlite-normal": "-.", "postgres": "--", "mariadb": ":"}
QUICK_NOTE = " — **quick run (tiny sizes): the numbers mean nothing**"
NA = "\N{EN DASH}"  # an empty cell
COLORS = {"etcd": "#777777", "kine": "#d62728", "k8s-sql": "#1f77b4"}
TWO_CORES = "two-cores"  # bench/harness/cli.py's layout label, repeated: the report has no harness import
ENVOY = "envoy"  # the same for k8s-sql's records measured again with --transport envoy
SOAK_BEGIN = "<!-- soak:begin"
SOAK_END = "<!-- soak:end -->"
SOAK_PNG_PREFIX = "soak-"

Rec = dict[str, Any]


# -- helpers -------------------------------------------------------------------------------


def fmt(x: Any, digits: int = 1) -> str:
    """A number for a table: thousands separators above 100, ``digits`` decimals (one
    more below 1)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return NA
    if isinstance(x, int | float):
        v = float(x)
        if abs(v) >= 100 or digits == 0:
            return f"{v:,.0f}"
        return f"{v:.{digits + 1 if abs(v) < 1 else digits}f}"
    return str(x)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(r: float | None) -> str:
    return NA if r is None else f"{r:.2f}x"


def p(rec: Rec | None, q: str) -> float | None:
    if rec is None:
        return None
    v = rec.get("latency_ms", {}).get(q)
    return float(v) if v is not None else None


def tput(rec: Rec | None) -> float | None:
    return None if rec is None else float(rec.get("throughput") or 0.0)


class Results:
    """A run's records in its own layout (``recs``); ``two_cores`` holds the records of the
    second pass, with every server given both cores (bench/run's ``two_cores`` workloads),
    as a Results of its own (None when the run had none)."""

    def __init__(self, doc: dict[str, Any], layout: str = "") -> None:
        self.doc = doc
        self.meta: dict[str, Any] = doc.get("meta", {})
        every: list[Rec] = doc.get("results", [])
        self.recs: list[Rec] = [r for r in every if r.get("layout", "") == layout]
        self.failures: list[dict[str, str]] = doc.get("failures", [])
        self.cpu_budget: list[dict[str, Any]] = doc.get("cpu_budget") or []
        self.two_cores: Results | None = None
        if not layout and any(r.get("layout") == TWO_CORES for r in every):
            self.two_cores = Results(doc, TWO_CORES)
        # k8s-sql with --transport envoy beside this layout's kine and etcd: the same
        # targets, computed again for it
        self.envoy: Results | None = None
        if not layout and (any(r.get("layout") == ENVOY for r in every) or doc.get("cpu_budget_envoy")):
            self.envoy = Results(doc, ENVOY)
            self.envoy.recs += [r for r in self.recs if r.get("server") != "k8s-sql"]
            self.envoy.failures = [f for f in self.failures if f.get("server") != "k8s-sql"]
            self.envoy.cpu_budget = doc.get("cpu_budget_envoy") or []

    def find(self, server: str, backend: str | None, workload: str, scenario: str = "single", **kw: Any) -> Rec | None:
        for r in self.recs:
            if r.get("server") != server or r.get("workload") != workload or r.get("scenario", "single") != scenario:
                continue
            if server != "etcd" and backend is not None and r.get("backend") != backend:
                continue
            if all(r.get(k) == v for k, v in kw.items()):
                return r
        return None

    def backends(self) -> list[str]:
        present = {r["backend"] for r in self.recs if r.get("server") != "etcd"}
        present |= {f["backend"] for f in self.failures if f.get("server") != "etcd"}
        return [b for b in SQL_BACKENDS if b in present]

    def values(self, workload: str, key: str) -> list[Any]:
        return sorted({r.get(key) for r in self.recs if r.get("workload") == workload and r.get(key) is not None})


def _numeric(cell: str) -> bool:
    return cell in (NA, "") or cell.lstrip("≥≤ ").replace(",", "").replace(".", "").rstrip("xmsMB %").isdigit()


def table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    """A Markdown table; columns whose cells are all numbers are right-aligned."""
    body = list(rows)
    right = [bool(body) and all(_numeric(r[i]) for r in body) for i in range(len(header))]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return out


# -- targets -------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    where: str
    measured: float | None
    required: float
    higher_is_better: bool
    unit: str  # "x" for ratios, " ms", " MB"
    note: str = ""

    def status(self) -> tuple[str, str]:
        if self.measured is None:
            return "n/a", "no data" + (f" ({self.note})" if self.note else "")
        m, r = self.measured, self.required
        ok = m >= r if self.higher_is_better else m <= r
        extra = f" ({self.note})" if self.note else ""
        if ok:
            return "met", extra.strip(" ()")
        if self.higher_is_better:
            return "**missed**", f"{(1 - m / r) * 100:.0f}% short ({self.show(m)} of {self.show(r)}){extra}"
        return "**missed**", f"{self.show(m - r)} ({(m / r - 1) * 100:.0f}%) over{extra}"

    def show(self, v: float) -> str:
        if self.unit == "x":
            return f"{v:.2f}x"
        return f"{v:,.0f}{self.unit}" if abs(v) >= 10 else f"{v:.1f}{self.unit}"


def w1_combined(res: Results, server: str, backend: str | None, clients: int) -> float | None:
    """W1 throughput over its create and update phases together (txns / seconds)."""
    phases = [res.find(server, backend, f"w1-{op}", clients=clients) for op in ("create", "update")]
    if any(r is None for r in phases):
        return None
    seconds = sum(float(r["seconds"]) for r in phases if r is not None)
    return sum(int(r["ops"]) for r in phases if r is not None) / seconds if seconds > 0 else None


def skipped_w2(res: Results, backend: str, keys: int) -> bool:
    """True when the run left W2 at ``keys`` out on ``backend`` on purpose (sqlite-full above
    ``w2_sqlite_full_max_keys``: the large load runs on sqlite-normal only)."""
    limit = res.meta.get("sizes", {}).get("w2_sqlite_full_max_keys")
    return backend == "sqlite-full" and limit is not None and keys > int(limit)


def memory_target(res: Results, backend: str) -> Target:
    """k8s-sql's peak RSS while the processes that hold W1's and W2's keys serve W3's watchers
    (the W3 one-frontend run comes after W1 and W2 on the same processes)."""
    name = "k8s-sql peak RSS, 100k keys + 1000 watchers"
    k = res.find("k8s-sql", backend, "w3")
    if k is None:
        return Target(name, backend, None, 250.0, False, " MB")
    rss, watchers = k.get("peak_rss_mb"), int(k.get("watchers") or 0)
    if "store_keys" not in k:
        return Target(name, backend, None, 250.0, False, " MB", f"W3 peak {fmt(rss, 0)} MB; store size not recorded")
    held = int(k["store_keys"])
    loaded = ", ".join(f"{k} {int(n):,}" for k, n in (k.get("store_loaded_by") or {}).items()) or "none loaded"
    where = f"{backend}: W3 ({watchers} watches) on the process holding {held:,} keys ({loaded})"
    if held < 100000 or watchers < 1000:
        note = f"W3 peak {fmt(rss, 0)} MB, but the target is ≥ 100k keys and 1000 watchers"
        return Target(name, where, None, 250.0, False, " MB", note)
    return Target(name, where, rss, 250.0, False, " MB")


def w1_cpu_us(res: Results, server: str, backend: str | None, clients: int, group: str = "server") -> float | None:
    """µs of CPU per W1 txn over its create and update phases: the server's own process
    (``group="server"``) or the database server's (``"db"``; none for SQLite and etcd)."""
    key = f"{group}_cpu_s"
    phases = [res.find(server, backend, f"w1-{op}", clients=clients) for op in ("create", "update")]
    if any(r is None or key not in r for r in phases):
        return None
    ops = sum(int(r["ops"]) for r in phases if r is not None)
    return sum(float(r[key]) for r in phases if r is not None) / ops * 1e6 if ops else None


def _clients(n: int) -> str:
    return "1 client" if n == 1 else f"{n} clients"


def kine_database_bound(res: Results, backend: str, clients: int) -> bool:
    """Issue #15's "where kine's database is its bottleneck": with more than one client,
    kine's database server spends more CPU per txn than kine itself (kine runs a
    transaction per request; SQLite is in kine's process, so never there)."""
    if clients <= 1:
        return False
    own, db = w1_cpu_us(res, "kine", backend, clients), w1_cpu_us(res, "kine", backend, clients, "db")
    return own is not None and db is not None and db > own


def per_core_targets(res: Results, tag: str = "") -> list[Target]:
    """The targets of k8s-sql's own work per request (W1 against kine and etcd on one
    pinned core, CPU per txn and per watch event, database CPU); ``tag`` names a
    variant of k8s-sql in each target's name."""
    out: list[Target] = []
    clients = res.values("w1-create", "clients") or [1, 16, 128]
    for backend in res.backends():
        durability = " (both durable)" if backend in DURABLE else " (both NORMAL)"
        for c in clients:
            mine, theirs = w1_combined(res, "k8s-sql", backend, c), w1_combined(res, "kine", backend, c)
            bound = kine_database_bound(res, backend, c)
            note = "kine's database does more of its work than kine" if bound else ""
            out.append(
                Target("W1 vs kine" + durability + tag, f"{backend}, {_clients(c)}", ratio(mine, theirs),
                       2.0 if bound else 1.0, True, "x", note)
            )  # fmt: skip
    for backend in res.backends():
        for c in clients:
            mine, etcd = w1_combined(res, "k8s-sql", backend, c), w1_combined(res, "etcd", None, c)
            out.append(
                Target(
                    "W1 vs etcd, one pinned core" + tag, f"{backend}, {_clients(c)}", ratio(mine, etcd), 0.35, True, "x"
                )
            )
    for backend in res.backends():
        for c in [c for c in clients if c > 1]:
            mine, theirs = w1_cpu_us(res, "k8s-sql", backend, c), w1_cpu_us(res, "kine", backend, c)
            out.append(Target("server CPU per W1 txn vs kine's" + tag, f"{backend}, {_clients(c)}", ratio(mine, theirs),
                              1.0, False, "x"))  # fmt: skip
        if backend == "sqlite-full" and 16 in clients:
            out.append(Target("server CPU per W1 txn" + tag, "sqlite-full, 16 clients",
                              w1_cpu_us(res, "k8s-sql", backend, 16), 500.0, False, " µs"))  # fmt: skip
    for backend in res.backends():
        if backend.startswith("sqlite"):
            continue  # SQLite's work is in the server's own process
        for c in clients:
            mine, theirs = w1_cpu_us(res, "k8s-sql", backend, c, "db"), w1_cpu_us(res, "kine", backend, c, "db")
            out.append(Target("database CPU per W1 txn vs kine's" + tag, f"{backend}, {_clients(c)}",
                              ratio(mine, theirs), 1.0, False, "x"))  # fmt: skip
    for row in res.cpu_budget:
        if row.get("operation") == "watch event delivered":
            out.append(Target("server CPU per watch event delivered" + tag, f"{row['backend']} (cpu workload)",
                              row.get("server_us"), 60.0, False, " µs"))  # fmt: skip
    return out


def targets(res: Results) -> list[Target]:
    """Issue #15's targets, each from this run's records."""
    out = per_core_targets(res)
    two = res.two_cores
    if two is not None:
        workers = (res.meta.get("two_cores") or {}).get("k8s_sql_workers", 2)
        for backend in two.backends():
            for c in two.values("w1-create", "clients"):
                mine, etcd = w1_combined(two, "k8s-sql", backend, c), w1_combined(two, "etcd", None, c)
                out.append(
                    Target(f"W1 vs etcd, two shared cores (k8s-sql --workers {workers})", f"{backend}, {_clients(c)}",
                           ratio(mine, etcd), 0.5, True, "x")
                )  # fmt: skip
    if res.envoy is not None:
        out += per_core_targets(res.envoy, ", k8s-sql --transport envoy")
    keys = max(res.values("w2-list", "keys") or [0])
    for backend in res.backends() if keys else []:
        if skipped_w2(res, backend, keys):
            continue  # said below the table
        for op, label in (("w2-list", "paged LIST"), ("w2-count", "count-only")):
            k = res.find("k8s-sql", backend, op, keys=keys)
            kine = res.find("kine", backend, op, keys=keys)
            e = res.find("etcd", None, op, keys=keys)
            note = "" if keys >= 100000 else f"run had {keys} keys, target is about 100k"
            where = f"{backend}, {label}, {keys:,} keys"
            out.append(Target("W2 vs kine", where, ratio(tput(k), tput(kine)), 5.0, True, "x", note))
            out.append(Target("W2 within 2x of etcd", where, ratio(tput(k), tput(e)), 0.5, True, "x", note))
    for backend in res.backends():
        k = res.find("k8s-sql", backend, "w3", "cross")
        out.append(Target("W3 cross-frontend p99", backend, p(k, "p99"), 50.0, False, " ms"))
    for backend in res.backends():
        k = res.find("k8s-sql", backend, "w5")
        slo = (k or {}).get("slo", {})
        out.append(
            Target(
                "W5 mutating p99 (SLO)",
                backend,
                (k or {}).get("mutating_ms", {}).get("p99"),
                float(slo.get("mutating_p99_ms", 1000)),
                False,
                " ms",
            )
        )
        out.append(
            Target(
                "W5 LIST p99 (SLO)",
                backend,
                (k or {}).get("list_ms", {}).get("p99"),
                float(slo.get("list_p99_ms", 30000)),
                False,
                " ms",
            )
        )
    for backend in res.backends():
        if not skipped_w2(res, backend, keys):
            out.append(memory_target(res, backend))
    return out


# -- plots ---------------------------------------------------------------------------------


def plots(res: Results, out_dir: Path, rel: str) -> dict[str, str]:
    """Draw the PNGs; returns Markdown image lines by name."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {"note": "(matplotlib is not installed: `pip install -e '.[bench]'` to draw the plots)"}
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        if not old.name.startswith(SOAK_PNG_PREFIX):  # the soak's section is rendered from its own run
            old.unlink()
    images: dict[str, str] = {}
    backends = res.backends()

    def save(fig: Any, name: str, alt: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)
        images[name] = f"![{alt}]({rel}/{name})"

    def grid(n: int) -> tuple[Any, list[Any]]:
        cols = min(n, 2)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.8 * rows), squeeze=False)
        flat = [a for row in axes for a in row]
        for a in flat[n:]:
            a.set_visible(False)
        return fig, flat

    def cdf_line(ax: Any, rec: Rec | None, key: str, label: str, color: str, style: str = "-") -> None:
        pts = (rec or {}).get(key) or []
        if pts:
            xs = [max(float(x), 1e-3) for x, _ in pts]
            ax.step(xs, [float(y) for _, y in pts], where="post", label=label, color=color, linestyle=style)

    clients = res.values("w1-create", "clients")
    if backends and clients:
        fig, axes = grid(len(backends))
        for ax, backend in zip(axes, backends, strict=False):
            for server in ("etcd", "kine", "k8s-sql"):
                for op, style in (("create", "-"), ("update", ":")):
                    recs = [res.find(server, backend, f"w1-{op}", clients=c) for c in clients]
                    pts = [(c, tput(r)) for c, r in zip(clients, recs, strict=True) if r is not None]
                    if pts:
                        ax.plot(
                            [x for x, _ in pts],
                            [y for _, y in pts],
                            style,
                            marker="o",
                            color=COLORS[server],
                            label=f"{server} {op}",
                        )
            ax.set_xscale("log", base=2)
            ax.set_xticks(clients, [str(c) for c in clients])
            ax.set_title(f"W1 throughput, {backend} (etcd: its own bbolt)")
            ax.set_xlabel("clients")
            ax.set_ylabel("txn/s")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        save(fig, "w1-throughput.png", "W1 throughput vs clients")

        c = 16 if 16 in clients else clients[-1]
        fig, axes = grid(len(backends))
        for ax, backend in zip(axes, backends, strict=False):
            for server in ("etcd", "kine", "k8s-sql"):
                cdf_line(ax, res.find(server, backend, "w1-create", clients=c), "cdf", server, COLORS[server])
            ax.set_xscale("log")
            ax.set_title(f"W1 create latency CDF, {c} clients, {backend}")
            ax.set_xlabel("ms")
            ax.set_ylabel("fraction")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        save(fig, "w1-latency-cdf.png", f"W1 create latency CDF at {c} clients")

    if backends and any(r.get("workload") == "w3" for r in res.recs):
        fig, axes = grid(len(backends))
        for ax, backend in zip(axes, backends, strict=False):
            for server in ("etcd", "kine", "k8s-sql"):
                cdf_line(ax, res.find(server, backend, "w3"), "cdf", f"{server} one frontend", COLORS[server])
                cross = res.find(server, backend, "w3", "cross")
                cdf_line(ax, cross, "cdf", f"{server} two frontends", COLORS[server], "--")
            ax.set_xscale("log")
            ax.set_title(f"W3 commit-to-delivery latency CDF, {backend}")
            ax.set_xlabel("ms")
            ax.set_ylabel("fraction")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        save(fig, "w3-latency-cdf.png", "W3 watch delivery latency CDF")

    w5 = [r for r in res.recs if r.get("workload") == "w5"]
    if w5:
        fig, axes = grid(2)
        for ax, key, title in ((axes[0], "mutating_cdf", "mutating"), (axes[1], "list_cdf", "LIST")):
            for r in w5:
                style = BACKEND_STYLE.get(r["backend"], "-")
                cdf_line(ax, r, key, f"{r['server']} {r['backend']}", COLORS.get(r["server"], "black"), style)
            ax.set_xscale("log")
            ax.set_title(f"W5 kube-apiserver {title} request latency CDF")
            ax.set_xlabel("ms")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        save(fig, "w5-latency-cdf.png", "W5 kube-apiserver latency CDFs")
    return images


# -- sections ------------------------------------------------------------------------------


def rows_for(
    res: Results,
    workload: str,
    key_cols: list[tuple[str, Callable[[Rec], str]]],
    group_keys: list[str],
    ratio_of: Callable[[Rec | None], float | None] = tput,
    scenario: str = "single",
) -> list[list[str]]:
    """One row per record, etcd's first, then each backend's kine and k8s-sql, with ratio
    columns on the k8s-sql rows (of ``ratio_of``: throughput unless said otherwise)."""
    recs = [r for r in res.recs if r.get("workload") == workload and r.get("scenario", "single") == scenario]
    backend_rank = {b: i for i, b in enumerate(["bbolt", *SQL_BACKENDS])}
    recs.sort(
        key=lambda r: (
            backend_rank.get(r.get("backend", ""), 99),
            *[r.get(k) or 0 for k in group_keys],
            SERVER_ORDER.get(r.get("server", ""), 9),
        )
    )
    rows = []
    for r in recs:
        rk = rk_e = NA
        if r["server"] == "k8s-sql":
            sel = {k: r.get(k) for k in group_keys}
            rk = fmt_ratio(ratio(ratio_of(r), ratio_of(res.find("kine", r["backend"], workload, scenario, **sel))))
            rk_e = fmt_ratio(ratio(ratio_of(r), ratio_of(res.find("etcd", None, workload, scenario, **sel))))
        rows.append(
            [
                r["server"],
                r.get("backend", ""),
                *[f(r) for _, f in key_cols],
                fmt(tput(r)),
                fmt(p(r, "p50"), 2),
                fmt(p(r, "p99"), 2),
                fmt(r.get("server_cpu_s"), 1),
                fmt(r.get("db_cpu_s"), 1) if "db_cpu_s" in r else NA,
                fmt(r.get("peak_rss_mb"), 0),
                f"{r.get('errors', 0)}",
                rk,
                rk_e,
            ]
        )
    return rows


def common_header(keys: list[str], tput_name: str, lower: bool = False) -> list[str]:
    rname = "p99 ratio" if lower else "ratio"
    return [
        "server",
        "backend",
        *keys,
        tput_name,
        "p50 ms",
        "p99 ms",
        "server CPU s",
        "DB CPU s",
        "peak RSS MB",
        "errors",
        f"k8s-sql/kine {rname}",
        f"k8s-sql/etcd {rname}",
    ]


def render(results_path: Path, out_md: Path) -> None:
    doc = json.loads(Path(results_path).read_text())
    res = Results(doc)
    meta = res.meta
    plot_dir = out_md.with_suffix("")
    images = plots(res, plot_dir, plot_dir.name)
    lines: list[str] = ["# Benchmarks: k8s-sql vs kine vs etcd", ""]
    try:
        src = os.path.relpath(Path(results_path).resolve(), ROOT)
    except ValueError:
        src = str(results_path)
    lines += [
        f"<!-- Generated by bench/report.py from {src}; do not edit by hand: edit bench/methodology.md "
        "or bench/report.py and rerun bench/run (or bench/report.py RESULTS.json). -->",
        "",
        f"Run {meta.get('started', '?')} ({fmt((meta.get('wall_seconds') or 0) / 60, 0)} minutes): "
        f"`{meta.get('command', 'bench/run')}`" + (QUICK_NOTE if meta.get("quick") else ""),
        "",
    ]
    m = meta.get("machine", {})
    try:
        load = float(str(m.get("load_avg_at_start", "0")).split()[0])
    except (ValueError, IndexError):
        load = 0.0
    if load > float(m.get("cores") or 1):
        lines += [
            f"**The machine was busy during this run** (load average {load:.1f} on {m.get('cores')} cores at its "
            "start, from other work): every server's numbers are depressed and noisy; ratios between servers "
            "measured minutes apart are only indicative.",
            "",
        ]
    ts = targets(res)
    lines += ["## Targets", ""]
    lines += table(
        ["target", "where", "measured", "required", "status", "by how much"],
        (
            [
                t.name,
                t.where,
                NA if t.measured is None else t.show(t.measured),
                ("≥ " if t.higher_is_better else "≤ ") + t.show(t.required),
                *t.status(),
            ]
            for t in ts
        ),
    )
    met = sum(t.status()[0] == "met" for t in ts)
    missed = sum(t.status()[0] != "met" and t.measured is not None for t in ts)
    lines += ["", f"{met} met, {missed} missed, {len(ts) - met - missed} without data.", ""]
    keys = max(res.values("w2-list", "keys") or [0])
    if any(skipped_w2(res, b, keys) for b in res.backends()):
        lines += [
            f"sqlite-full has no W2 {keys:,}-key or memory rows: W2 with {keys:,} keys runs on SQLite only "
            "with `synchronous=NORMAL` (reads do not depend on it, and the load takes minutes per server on "
            "SQLite), so sqlite-normal's rows stand for SQLite there.",
            "",
        ]
    mem = [r for r in res.recs if r.get("server") == "k8s-sql" and r.get("workload") == "w3" and "store_keys" in r]
    if mem:
        lines += [
            "The memory target is the peak RSS (sampled every 100 ms) of the one k8s-sql process during its "
            "one-frontend W3 run, which comes after W1 and W2 on the same process: it holds every key W1 and W2 "
            "loaded (the count is in the row) while it serves W3's watchers and writers.",
            "",
        ]

    limits = HERE / "limits.md"
    if limits.exists():
        lines += [limits.read_text().rstrip(), ""]

    lines += ["## Machine", ""]
    lines += table(
        ["", ""],
        [
            ["CPU", f"{m.get('cpu_model', '?')}, {m.get('cores', '?')} cores"],
            ["RAM", f"{m.get('ram_gib', '?')} GiB"],
            ["OS / kernel", f"{m.get('os', '?')} / {m.get('kernel', '?')}"],
            ["load average at start", str(m.get("load_avg_at_start", "?"))],
            ["Python", str(m.get("python", "?"))],
            ["Go", str(m.get("go", "?"))],
            ["etcd", str(m.get("etcd", NA)).replace("\n", " ")],
            ["kine", str(m.get("kine", NA))],
            ["bench-driver", str(m.get("bench-driver etcd client", NA))],
            ["PostgreSQL", str(m.get("postgres", NA))],
            ["MariaDB", str(m.get("mariadb", NA))],
            ["k8s-sql", f"commit {meta.get('k8s_sql_commit', '?')}"],
            ["CPU pinning", str(meta.get("pinning", "?"))],
        ],
    )
    lines += [
        "",
        "Client and servers share this machine's cores; other work on the machine during the run "
        "shows up as noise (load average above).",
        "",
        "## Reproduce",
        "",
        "```sh",
        "pip install -e '.[bench]'      # matplotlib for the plots, py-spy for the cpu workload's split by layer",
        f"{meta.get('command', 'bench/run')}",
        f"bench/report.py {src} --out docs/benchmarks.md   # re-render from saved results",
        "```",
        "",
        "`bench/run --help` lists the options: `--quick` (tiny sizes), `--only k8s-sql,postgres,w1` "
        "(a slice), `--set w3_duration=30s` (sizes), `--no-pin`.",
        "",
    ]
    intro = HERE / "methodology.md"
    if intro.exists():
        lines += [intro.read_text().rstrip(), ""]
    sizes = meta.get("sizes", {})
    if sizes:
        lines += ["Sizes of this run: " + ", ".join(f"`{k}={v}`" for k, v in sizes.items()) + ".", ""]
    dur = meta.get("durability", {})
    if dur:
        lines += ["### Durability", ""]
        lines += table(["server / backend", "setting"], ([k, v] for k, v in dur.items()))
        lines += [""]

    # W1
    lines += ["## W1: Kubernetes-shaped create and update txns, 1 KiB values", ""]
    if "note" in images:
        lines += [images["note"], ""]
    for name in ("w1-throughput.png", "w1-latency-cdf.png"):
        if name in images:
            lines += [images[name], ""]
    for op in ("create", "update"):
        rows = rows_for(res, f"w1-{op}", [("clients", lambda r: str(r.get("clients")))], ["clients"])
        if rows:
            lines += [f"**{op}**", ""]
            lines += table(common_header(["clients"], "txn/s"), rows)
            lines += [""]
    lines += w1_cpu_section(res)
    generated: set[str] = set()  # the names of kept blocks this run measured anew
    if res.two_cores is not None:
        lines += two_cores_section(res, res.two_cores)
        generated.add("two-cores")
    if res.cpu_budget:
        lines += cpu_budget_section(res.cpu_budget, meta.get("cpu_budget_from", ""))
        generated.add("cpu-budget")
    if res.envoy is not None:
        lines += envoy_section(res, res.envoy, meta.get("envoy_from", ""), meta.get("cpu_budget_from", ""))

    # W2
    lines += ["## W2: paged LIST, count-only, single-key gets", ""]
    for op, title, unit in (
        ("w2-list", "full paged LIST (one op = every page)", "LISTs/s"),
        ("w2-count", "count-only range", "counts/s"),
        ("w2-get", "single-key gets, 16 clients", "gets/s"),
    ):
        rows = rows_for(res, op, [("keys", lambda r: f"{r.get('keys', 0):,}")], ["keys"])
        if rows:
            lines += [f"**{title}**", ""]
            lines += table(common_header(["keys"], unit), rows)
            lines += [""]
    lines += [
        "Ratios are of throughput, i.e. how many times faster k8s-sql is (a LIST's time is 1/throughput).",
        "",
    ]

    # W3
    lines += ["## W3: watch delivery latency while writes run", ""]
    if "w3-latency-cdf.png" in images:
        lines += [images["w3-latency-cdf.png"], ""]
    for scenario, title in (("single", "writers and watchers on one frontend"), ("cross", "across two frontends")):
        rows = rows_for(
            res,
            "w3",
            [
                ("watchers", lambda r: str(r.get("watchers", "?"))),
                ("deliveries", lambda r: f"{r.get('deliveries', 0):,}"),
                ("missed", lambda r: str(r.get("missed", "?"))),
            ],
            [],
            ratio_of=lambda r: p(r, "p99"),
            scenario=scenario,
        )
        if rows:
            lines += [f"**{title}**" + (" (etcd: single node, n/a)" if scenario == "cross" else ""), ""]
            lines += table(common_header(["watchers", "deliveries", "missed"], "writes/s", lower=True), rows)
            lines += [""]
    w3 = [r for r in res.recs if r.get("workload") == "w3"]
    prefixes = sorted({int(r["prefixes"]) for r in w3 if r.get("prefixes")})
    if prefixes:
        rates = sorted({float(r.get("rate") or 0) for r in w3})
        watchers = sorted({int(r.get("watchers") or 0) for r in w3})
        writers = sorted({int(r.get("clients") or 0) for r in w3})
        cap = " / ".join("unthrottled" if x == 0 else f"capped at {x:,.0f} writes/s in total" for x in rates)
        each = " / ".join(f"{w / pr:g}" for w in watchers for pr in prefixes)
        lines += [
            f"{'/'.join(map(str, watchers))} watches over {'/'.join(map(str, prefixes))} prefixes (watch *i* on "
            f"prefix *i* mod P, as Kubernetes watches one resource type each); {'/'.join(map(str, writers))} "
            f"writers spread their keys over the prefixes round-robin, {cap}, so each write is delivered to "
            f"{each} watches. The cap is meant to leave the servers headroom, so that this is delivery latency "
            "rather than saturation: a server whose writes/s falls clearly below the cap could not keep up, and "
            "its latencies include that queueing. Latency is commit (write acknowledged) to delivery on the "
            "watch; writes/s is what the writers achieved. missed = the deliveries due "
            "(each write once per watch of its prefix) that did not arrive within the drain time. "
            "The ratio columns here are of p99 delivery latency: below 1 is better for k8s-sql.",
            "",
        ]
    else:
        lines += [
            "Latency is commit (write acknowledged) to delivery on the watcher; writes/s is what the "
            "16 unthrottled writers achieved meanwhile (each write is one delivery per watcher). "
            "The ratio columns here are of p99 delivery latency: below 1 is better for k8s-sql.",
            "",
        ]

    # W4
    lines += ["## W4: lease churn", ""]
    for op, title, unit in (
        ("w4-grant", "grant", "grants/s"),
        ("w4-attach", "attach keys", "puts/s"),
        ("w4-expiry", "expiry (latency: deadline to delete event)", "expiries/s"),
    ):
        rows = rows_for(res, op, [("clients", lambda r: str(r.get("clients")))], ["clients"])
        if rows:
            lines += [f"**{title}**", ""]
            lines += table(common_header(["clients"], unit), rows)
            lines += [""]

    # W5
    w5 = [r for r in res.recs if r.get("workload") == "w5"]
    lines += ["## W5: kube-apiserver + kwok", ""]
    if w5:
        if "w5-latency-cdf.png" in images:
            lines += [images["w5-latency-cdf.png"], ""]
        rows = []
        for r in sorted(w5, key=lambda r: (r.get("backend", ""), SERVER_ORDER.get(r.get("server", ""), 9))):
            mu, li = r.get("mutating_ms", {}), r.get("list_ms", {})
            rows.append(
                [
                    r["server"],
                    r.get("backend", ""),
                    f"{r.get('nodes')}/{r.get('pods')}",
                    str(r.get("pods_running")),
                    fmt(r.get("seconds_to_all_running")),
                    fmt(mu.get("p50"), 1),
                    fmt(mu.get("p99"), 1),
                    fmt(li.get("p50"), 1),
                    fmt(li.get("p99"), 1),
                    "met" if r.get("slo", {}).get("met") else "**missed**",
                    fmt(r.get("server_cpu_s")),
                    fmt(r.get("db_cpu_s")) if "db_cpu_s" in r else NA,
                    fmt(r.get("peak_rss_mb"), 0),
                ]
            )
        lines += table(
            [
                "server",
                "backend",
                "nodes/pods",
                "running",
                "s to all running",
                "mutating p50 ms",
                "mutating p99 ms",
                "LIST p50 ms",
                "LIST p99 ms",
                "SLOs",
                "server CPU s",
                "DB CPU s",
                "peak RSS MB",
            ],
            rows,
        )
        lines += ["", "SLOs: mutating API calls p99 ≤ 1 s, LIST p99 ≤ 30 s (client-side latencies).", ""]
    else:
        lines += ["Not run.", ""]

    # Sections measured by runs of their own -- the soak (render_soak), many control planes
    # (render_tenants), the micro-benchmarks' hand-kept tables -- are kept as they are.
    for old in kept_blocks(out_md.read_text()) if out_md.exists() else []:
        named = _KEPT.match(old)
        if named is None or named.group(1) not in generated:
            lines += [old, ""]

    if res.failures:
        lines += ["## Failures", ""]
        for f in res.failures:
            err = f.get("error", "").strip().splitlines()
            lines += [f"- {f.get('server')} / {f.get('backend')} / {f.get('workload')}: `{(err or ['?'])[0][:300]}`"]
        lines += [""]

    cmds = doc.get("commands", [])
    if cmds:
        lines += [
            "## Exact commands",
            "",
            "Every server and driver command line of this run, in order (`$WORK`: the run's scratch "
            "directory; `$BENCH_BIN`, `$PEERS_BIN`: the bin directories printed by `bench/build.sh` and "
            "`peers/build.sh`; database names and ports were fresh per run).",
            "",
            "<details><summary>commands</summary>",
            "",
            "```",
            *[f"# {c['what']}\n{c['argv']}" for c in cmds],
            "```",
            "",
            "</details>",
            "",
        ]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines).rstrip() + "\n")


def w1_cpu_section(res: Results) -> list[str]:
    """CPU per W1 txn and create p50, k8s-sql beside kine (and etcd), per backend and clients."""
    clients = res.values("w1-create", "clients")
    rows = []
    for backend in res.backends():
        for c in clients:
            k = res.find("k8s-sql", backend, "w1-create", clients=c)
            if k is None:
                continue
            kine = res.find("kine", backend, "w1-create", clients=c)
            db = not backend.startswith("sqlite")
            rows.append(
                [
                    backend,
                    str(c),
                    fmt(w1_cpu_us(res, "k8s-sql", backend, c), 0),
                    fmt(w1_cpu_us(res, "kine", backend, c), 0),
                    fmt(w1_cpu_us(res, "k8s-sql", backend, c, "db"), 0) if db else "in-process",
                    fmt(w1_cpu_us(res, "kine", backend, c, "db"), 0) if db else "in-process",
                    fmt(p(k, "p50"), 2),
                    fmt(p(kine, "p50"), 2),
                ]
            )
    if not rows:
        return []
    etcd_us = {c: w1_cpu_us(res, "etcd", None, c) for c in clients}
    etcd = [f"{_clients(c)} {fmt(us, 0)} µs" for c, us in etcd_us.items() if us]
    out = ["**CPU per txn** (create and update phases together; server: the frontend's process, database: the "
           "database server's process tree, from /proc over the same window; SQLite's work is in the server's "
           "own process)", ""]  # fmt: skip
    out += table(
        ["backend", "clients", "k8s-sql server µs/txn", "kine server µs/txn", "k8s-sql database µs/txn",
         "kine database µs/txn", "k8s-sql create p50 ms", "kine create p50 ms"],
        rows,
    )  # fmt: skip
    if etcd:
        out += ["", "etcd, for scale (its own bbolt, in process): " + ", ".join(etcd) + "."]
    return [*out, ""]


def two_cores_section(res: Results, two: Results) -> list[str]:
    """W1 in the run's own layout (one pinned core each) beside the second pass's (every
    server given the same two cores, nothing pinned)."""
    workers = (res.meta.get("two_cores") or {}).get("k8s_sql_workers", 2)
    clients = two.values("w1-create", "clients")
    rows = []
    for backend in two.backends():
        for c in clients:
            rows.append(
                [backend, str(c)]
                + [fmt(w1_combined(r, srv, backend, c), 0) for srv in ("k8s-sql", "kine", "etcd") for r in (res, two)]
            )
    out = [
        "## W1 on one pinned core and on two shared cores",
        "",
        "The tables above give every server one pinned core. A host gives a server all its cores, and k8s-sql "
        "uses them with `--workers` (one process per core, one store), so this run also ran W1 with every "
        f"server given the same two cores and nothing pinned: etcd with its default GOMAXPROCS, kine (one "
        f"process), k8s-sql with `--workers {workers}`, the databases and the driver sharing the same cores. "
        "W1 txn/s, creates and updates together:",
        "",
    ]
    out += table(
        ["backend", "clients", "k8s-sql, 1 pinned core", f"k8s-sql `--workers {workers}`, 2 shared cores",
         "kine, 1 pinned core", "kine, 2 shared cores", "etcd, 1 pinned core", "etcd, 2 shared cores"],
        rows,
    )  # fmt: skip
    return [*out, ""]


ENVOY_TEXT = """\
`--transport envoy` serves the same frontend through Envoy's HTTP/2 (pyvoy): Envoy
owns the sockets, TLS and HTTP/2 in C++ and hands the frontend's Python whole
requests, where grpc.aio spends about 200 µs of CPU per call before any k8s-sql code
runs (bench/limits.md). It is opt-in (`pip install '.[envoy]'`); the tables above are
grpc.aio's. Here k8s-sql runs W1 again with it, pinned exactly as above, beside the
same run's kine and etcd. txn/s over creates and updates together; µs: the server's
CPU per txn (for k8s-sql on Envoy, Envoy's threads are in the same process and
counted)."""


def envoy_section(res: Results, env: Results, source: str = "", cpu_source: str = "") -> list[str]:
    """k8s-sql on --transport envoy beside k8s-sql on grpc.aio, kine and etcd (``cpu_source``:
    where its cpu workload's rows come from when a run of their own measured them)."""
    clients = env.values("w1-create", "clients")
    rows = []
    for backend in env.backends():
        for c in clients:
            grpcio, envoy = w1_combined(res, "k8s-sql", backend, c), w1_combined(env, "k8s-sql", backend, c)
            kine, etcd = w1_combined(res, "kine", backend, c), w1_combined(res, "etcd", None, c)
            rows.append(
                [
                    backend,
                    str(c),
                    fmt(grpcio, 0),
                    fmt(envoy, 0),
                    fmt(kine, 0),
                    fmt(etcd, 0),
                    fmt_ratio(ratio(envoy, kine)),
                    fmt_ratio(ratio(envoy, etcd)),
                    fmt(w1_cpu_us(res, "k8s-sql", backend, c), 0),
                    fmt(w1_cpu_us(env, "k8s-sql", backend, c), 0),
                    fmt(w1_cpu_us(res, "kine", backend, c), 0),
                    fmt(p(env.find("k8s-sql", backend, "w1-create", clients=c), "p50"), 2),
                ]
            )
    out = ["## W1 with `--transport envoy`", "", ENVOY_TEXT, ""]
    if source:
        out += [f"These measurements: {source}.", ""]
    if rows:
        out += table(
            ["backend", "clients", "k8s-sql grpc.aio txn/s", "k8s-sql envoy txn/s", "kine txn/s", "etcd txn/s",
             "envoy vs kine", "envoy vs etcd", "grpc.aio µs/txn", "envoy µs/txn", "kine µs/txn",
             "envoy create p50 ms"],
            rows,
        )  # fmt: skip
        out += [""]
    if env.cpu_budget:
        out += ["The cpu workload with `--transport envoy` (columns as in the per-layer table; py-spy samples "
                "Python frames only, so Envoy's own CPU is in the µs but in no layer):", ""]  # fmt: skip
        if cpu_source:
            out += [f"These rows: {cpu_source}.", ""]
        out += [*cpu_budget_table(env.cpu_budget), ""]
    return out


CPU_BUDGET_TEXT = """\
`bench/micro/cpu_budget.py` (bench/run's `cpu` workload): one frontend in its default
configuration pinned to CPU 0, the client on CPU 1. µs server CPU are the frontend's
CPU seconds from /proc over the operations completed. SQL statements are the
frontend's own count (`k8s_sql_sql_statement_duration_seconds`) over the same
operations: the plans' statements, without BEGIN and COMMIT, and including what runs
meanwhile in the background (the follower's look at the head, health probes). µs
database CPU is the database server's process tree over the same operations (the test
servers run with `fsync=off` / without binary logs: CPU, not the disk; SQLite's work is
inside the frontend). The layer split is py-spy's samples of the frontend's Python
frames, each put in the layer of its innermost recognised frame (native code -- grpc
core, upb -- is charged to the Python frame that called it, so "transport" includes
grpc.aio's Cython and C core and the client-port relay, and protobuf decoding inside
grpc's deserializer).

Requests and statements per write batch are from the frontend's
`k8s_sql_write_batch_requests` (group commit) over the same operations; "-" where the
operation makes no batches. Statements are counted as the plans issue them, a pipeline
as one. On MySQL that is a round trip (the BEGIN goes with the first pipeline, the
COMMIT with the last). A W1 batch that starts from what this frontend's last commit
left (every W1 batch of one frontend) is 1 round trip: BEGIN, the revision lock, a
guard that fails the pipeline if the revision moved or a key assumed absent exists
(the batch then runs again the locked way), the rows, the revision and COMMIT; other
batches, and every batch on Galera, are 2: the revision lock with the keys, then the
rows, the revision and COMMIT. On PostgreSQL a batch of single-key
requests (every W1 batch) runs without a transaction around it: one call that takes
the revision lock, checks that what the batch started from still holds and writes the
rows and the revision -- 1 round trip when the batch starts from what this frontend's
last commit left (every W1 batch of one frontend), 2 with a read of its keys before
(docs/architecture.md); other batches hold the lock from the start and are 5: BEGIN,
the lock, the keys, the rows and revision in one call, COMMIT. SQLite's are calls into
the library in process."""


def cpu_budget_section(rows: list[dict[str, Any]], source: str = "") -> list[str]:
    out = ["## Server CPU per request, by layer", "", CPU_BUDGET_TEXT, ""]
    if source:  # the rows were measured by a run of their own, merged into this one's results
        out += [f"These rows: {source}.", ""]
    return [*out, *cpu_budget_table(rows), ""]


def cpu_budget_table(rows: list[dict[str, Any]]) -> list[str]:
    # (a layer no sample fell in on any row -- protobuf's Python code, as its decoding is
    # upb's, charged to the caller -- gets no column)
    layers = [name for name in ("transport", "protobuf", "api", "watch", "store", "SQL")
              if any(float((r.get("layers") or {}).get(name, 0)) > 0 for r in rows)]  # fmt: skip
    body = []
    for r in rows:
        got = r.get("layers") or {}
        body.append(
            [
                str(r["backend"]),
                str(r["operation"]),
                fmt(r.get("server_us"), 0),
                fmt(r.get("ops_per_s"), 0),
                fmt(r.get("statements"), 2),
                fmt(r.get("db_us"), 0),
                fmt(r.get("requests_per_batch"), 2),
                fmt(r.get("statements_per_batch"), 2),
                *[f"{float(got.get(name, 0)) * 100:.0f}%" for name in layers],
            ]
        )
    return table(
        ["backend", "operation", "µs server CPU / op", "ops/s", "SQL statements / op", "µs database CPU / op",
         "requests / write batch", "SQL statements / write batch", *layers],
        body,
    )  # fmt: skip


# -- sections of their own (kept when the rest is regenerated) -------------------------------


_KEPT = re.compile(r"<!-- ([a-z0-9-]+):begin.*?<!-- \1:end -->", re.DOTALL)


def kept_blocks(text: str) -> list[str]:
    """Every ``<!-- NAME:begin ... -->`` ... ``<!-- NAME:end -->`` block of a report, in
    order: sections that other runs than bench/run's workloads write, which a
    regenerated report keeps."""
    return [m.group(0) for m in _KEPT.finditer(text)]


def replace_block(out_md: Path, name: str, block: str, title: str) -> None:
    """Put ``block`` (markers included) in place of ``out_md``'s block ``name``, or add it
    before "## Failures"/"## Exact commands" (a new file with ``title`` if none)."""
    text = out_md.read_text() if out_md.exists() else ""
    m = re.search(rf"<!-- {name}:begin.*?<!-- {name}:end -->", text, re.DOTALL)
    if m:
        text = text[: m.start()] + block + text[m.end() :]
    elif text:
        cut = [i for i in (text.find("\n## Failures"), text.find("\n## Exact commands")) if i >= 0]
        at = min(cut) + 1 if cut else len(text)
        text = text[:at].rstrip("\n") + "\n\n" + block + "\n\n" + text[at:]
    else:
        text = f"# {title}\n\n" + block + "\n"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(text.rstrip() + "\n")


# -- many control planes (bench/run --tenants) -----------------------------------------------


def tenants_section(docs: list[tuple[str, list[dict[str, Any]]]]) -> list[str]:
    """The many-control-planes section from bench/run --tenants records."""
    latest: dict[tuple[Any, ...], dict[str, Any]] = {}  # a later file wins per server, backend and rate
    for _, rs in docs:
        for r in rs:
            latest[(r["server"], r["backend"], r["offered_per_second"], r.get("tenants"))] = r
    recs = list(latest.values())
    srcs = ", ".join(src for src, _ in docs)
    first = recs[0] if recs else {}
    lines = [
        f"<!-- tenants:begin generated by bench/report.py from {srcs}; "
        "bench/run --tenants regenerates this section -->",
        "## Many control planes on one database",
        "",
        f"`bench/run --tenants` (bench/harness/tenants.py): {first.get('tenants', '?')} stock kube-apiservers, each "
        f"with its own `--etcd-prefix`, over {first.get('frontends', '?')} datastore processes (tenant i on "
        "process i mod 2) on one database -- the Kamaji / k0smotron layout. After the apiservers are ready and "
        "idle for a while, loadgen's `-tenants` mode offers ConfigMap writes open-loop on a fixed schedule, "
        "round-robin over the tenants: each tenant cycles 50 ConfigMaps (512-byte values) through create, "
        "guarded update (the resourceVersion the create returned) and delete with that resourceVersion as "
        "precondition, while each tenant has two ConfigMap watches open. A write whose ConfigMap still has a "
        "request in flight is dropped; a failed one is counted and its ConfigMap read again. CPU-s are the "
        "processes' user+system time over the load window; the machine's 2 cores are shared by everything. "
        f"Target (issue #15): at 8 tenants and 160 writes/s every write completes, p99 ≤ "
        f"{fmt(TENANTS_P99_MS, 0)} ms.",
        "",
        "| server | backend | offered/s | completed | dropped | failed | p50 ms | p99 ms | watch events | "
        "frontends CPU-s | database CPU-s | apiservers CPU-s | window s | target |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    order = {"k8s-sql": 0, "kine": 1}
    for r in sorted(recs, key=lambda r: (r["backend"], r["offered_per_second"], order.get(r["server"], 9))):
        cpu = r.get("cpu_s", {})
        ok = r["completed"] == r["offered"] and not r["failed"] and r["write_ms"]["p99"] <= TENANTS_P99_MS
        lines.append(
            f"| {r['server']} | {r['backend']} | {fmt(r['offered_per_second'], 0)} | {r['completed']:,} | "
            f"{r['dropped']:,} | {r['failed']:,} | {fmt(r['write_ms']['p50'], 1)} | {fmt(r['write_ms']['p99'], 1)} | "
            f"{r['watch_events']:,} of {r['watch_events_expected']:,} | {fmt(cpu.get('frontends'), 1)} | "
            f"{fmt(cpu.get('database'), 1)} | {fmt(cpu.get('apiservers'), 1)} | {fmt(r['window_s'], 0)} | "
            f"{'met' if ok else '**missed**'} |"
        )
    errs: dict[str, int] = {}
    for r in recs:
        for msg, n in (r.get("errors") or {}).items():
            where, _, what = msg.partition(": ")  # "tenant N op: message"
            kind = re.sub(r'"[^"]*"', "X", what).split(";")[0]  # without the object's name
            key = f"{r['server']} on {r['backend']}, {where.split(' ', 2)[-1]}: {kind}"
            errs[key] = errs.get(key, 0) + n
    if errs:
        lines += ["", "Failed writes, by kind:", ""]
        lines += [f"- {k}: {n:,}" for k, n in sorted(errs.items())]
    rpcs = [r for r in recs if r.get("rpcs_per_write")]
    if rpcs:
        lines += ["", "etcd RPCs per completed write (k8s-sql's `grpc_server_handled_total`, both frontends), "
                  "and its write batches (`k8s_sql_write_batch_requests_count`, "
                  "`k8s_sql_write_batch_rerun_total`):", ""]  # fmt: skip
        for r in rpcs:
            per = ", ".join(f"{m} {v:g}" for m, v in r["rpcs_per_write"].items())
            lines.append(f"- {r['backend']}, {fmt(r['offered_per_second'], 0)}/s: {per}")
    lines += ["<!-- tenants:end -->"]
    return lines


TENANTS_P99_MS = 100.0


def _load(results_paths: list[Path]) -> list[tuple[str, Any]]:
    """Each results file's contents, with its path relative to the repository (as the
    section names its sources)."""
    docs = []
    for path in results_paths:
        try:
            src = os.path.relpath(Path(path).resolve(), ROOT)
        except ValueError:
            src = str(path)
        docs.append((src, json.loads(Path(path).read_text())))
    return docs


def render_tenants(results_paths: list[Path], out_md: Path) -> None:
    """Render bench/run --tenants results (merged, later files winning) into ``out_md``'s
    tenants section."""
    section = tenants_section(_load(results_paths))
    replace_block(out_md, "tenants", "\n".join(section), "Many control planes on one database")


# -- the soak ------------------------------------------------------------------------------


def _arrow(a: Any, b: Any, digits: int = 1) -> str:
    return f"{fmt(a, digits)} → {fmt(b, digits)}"


def _mins(seconds: Any) -> str:
    return fmt(float(seconds or 0) / 60, 1)


def soak_plots(recs: list[Rec], out_dir: Path, rel: str) -> dict[str, str]:
    """One PNG per backend: RSS (with the fitted line), CPU and machine load, latency per window."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {"note": "(matplotlib is not installed: `pip install -e '.[bench]'` to draw the plots)"}
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(f"{SOAK_PNG_PREFIX}*.png"):
        old.unlink()
    images: dict[str, str] = {}
    for r in recs:
        backend = r["backend"]
        ser = r.get("series") or {}
        ts = [None if t is None else float(t) / 60 for t in ser.get("t", [])]
        warm, dur = float(r.get("warmup_s", 0)) / 60, float(r.get("soak_s", 0)) / 60
        fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(10, 9.5), sharex=True)

        def pts(key: str, _ts: list[float | None] = ts, _ser: dict[str, Any] = ser) -> tuple[list[float], list[float]]:
            xy = [(t, v) for t, v in zip(_ts, _ser.get(key, []), strict=False) if t is not None and v is not None]
            return [x for x, _ in xy], [float(y) for _, y in xy]

        for ax in (ax1, ax2, ax3):
            ax.axvspan(min([0.0, *[t for t in ts if t is not None]]), 0, color="#eeeeee", lw=0)
            ax.axvspan(0, warm, color="#fff1d6", lw=0)
            ax.grid(alpha=0.3)
        x, y = pts("rss_mb")
        ax1.plot(x, y, color=COLORS["k8s-sql"], lw=1.2, label="k8s-sql RSS")
        rss = r.get("rss") or {}
        if rss.get("slope_mb_per_h") is not None:
            a, b = float(rss["fit_intercept_mb"]), float(rss["slope_mb_per_h"])
            ax1.plot(
                [warm, dur],
                [a + b * warm / 60, a + b * dur / 60],
                color="black",
                ls="--",
                lw=1,
                label=f"fit after warm-up: {b:+.1f} ± {float(rss['slope_ci95_mb_per_h']):.1f} MB/h",
            )
        ax1.set_ylabel("RSS MB")
        lo, hi = (min(y), max(y)) if y else (0.0, 1.0)
        pad = max(5.0, 0.1 * hi, 0.25 * (hi - lo))  # small wiggles do not fill the panel
        ax1.set_ylim(max(0.0, lo - pad), hi + pad)
        sw = r.get("store_windows") or []
        xy = [(float(w["t1"]) / 60, float(w["storage_size_bytes"]) / 2**20) for w in sw if w.get("storage_size_bytes")]
        if xy:
            ax1b = ax1.twinx()
            ax1b.plot(
                [a for a, _ in xy],
                [b for _, b in xy],
                color="#8c564b",
                lw=0.8,
                ls=":",
                marker=".",
                ms=3,
                label="store size (Status dbSize)",
            )
            ax1b.set_ylabel("store MB")
            ax1b.set_ylim(bottom=0)
            h2, l2 = ax1b.get_legend_handles_labels()
        else:
            h2, l2 = [], []
        h1, l1 = ax1.get_legend_handles_labels()
        ax1.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower right")
        ax1.set_title(
            f"Soak: k8s-sql on {backend}, {dur:.0f} min (grey: setup; shaded: warm-up, excluded from the fit)",
            fontsize=10,
        )
        x, y = pts("cpu_pct")
        ax2.plot(x, y, color=COLORS["k8s-sql"], lw=0.8, label="k8s-sql CPU % of a core")
        if "db_cpu_pct" in ser:
            x, y = pts("db_cpu_pct")
            ax2.plot(x, y, color="#2ca02c", lw=0.8, label=f"{backend} server CPU %")
        x, y = pts("machine_busy_pct")
        ax2.plot(x, y, color="#999999", lw=0.6, label="machine busy % (all cores)")
        ax2.set_ylabel("CPU %")
        ax2b = ax2.twinx()
        x, y = pts("loadavg1")
        ax2b.plot(x, y, color="#d62728", lw=0.8, ls=":", label="machine load avg (1 min)")
        ax2b.set_ylabel("load avg")
        ax2b.set_ylim(bottom=0)
        h1, l1 = ax2.get_legend_handles_labels()
        h2, l2 = ax2b.get_legend_handles_labels()
        ax2.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right", ncol=2)
        wins = r.get("latency_windows") or []
        mid = [(float(w["t0"]) + float(w["t1"])) / 120 for w in wins]
        client = (("mutating", COLORS["k8s-sql"], "client mutating"), ("pod-list", "#9467bd", "client pod LIST"))
        for key, color, label in client:
            for q, style in (("p50", "-"), ("p99", "--")):
                got = [(m, w.get(key, {}).get(q)) for m, w in zip(mid, wins, strict=True)]
                got = [(m, v) for m, v in got if v is not None]
                if got:
                    ax3.plot([a for a, _ in got], [b for _, b in got], style, color=color, lw=1, label=f"{label} {q}")
        for q, style in (("p50", "-"), ("p99", "--")):
            got = [((float(w["t0"]) + float(w["t1"])) / 120, (w.get("etcd all") or {}).get(q)) for w in sw]
            got = [(a, b) for a, b in got if b is not None]
            if got:
                xs_, ys_ = [a for a, _ in got], [b for _, b in got]
                ax3.plot(xs_, ys_, style, color="#ff7f0e", lw=1, label=f"apiserver→store {q}")
        ax3.set_yscale("log")
        ax3.set_ylabel(f"ms per {float(r.get('window_s') or 60):g} s window")
        ax3.set_xlabel("minutes since the churn started")
        ax3.legend(fontsize=7, ncol=3, loc="upper right")
        fig.tight_layout()
        name = f"{SOAK_PNG_PREFIX}{backend}.png"
        fig.savefig(out_dir / name, dpi=80)
        plt.close(fig)
        images[backend] = f"![Soak on {backend}: RSS, CPU and latency over time]({rel}/{name})"
    return images


def soak_section(docs: list[tuple[str, dict[str, Any]]], plot_dir: Path) -> list[str]:
    """The soak section's lines, markers included, from (source path, results doc) pairs."""
    by_backend: dict[str, tuple[Rec, dict[str, Any]]] = {}
    failures: list[dict[str, str]] = []
    for _, doc in docs:
        for r in doc.get("results", []):
            if r.get("workload") == "soak":
                by_backend[r["backend"]] = (r, doc.get("meta", {}))
        failures += doc.get("failures", [])
    recs = [by_backend[b][0] for b in SQL_BACKENDS if b in by_backend]
    metas = [by_backend[b][1] for b in SQL_BACKENDS if b in by_backend] or [docs[0][1].get("meta", {})]
    meta = metas[0]
    sizes = meta.get("sizes", {})
    srcs = ", ".join(src for src, _ in docs)
    lines = [
        f"{SOAK_BEGIN} generated by bench/report.py from {srcs}; bench/run --soak regenerates this section -->",
        "## Soak: k8s-sql under long kube-apiserver churn",
        "",
    ]
    runs = sorted(
        {
            (
                m.get("started", "?"),
                m.get("command", "bench/run --soak"),
                bool(m.get("quick")),
                m.get("reanalysed"),
                m.get("k8s_sql_commit", "?"),
                ", ".join(r.get("backend", "?") for r in recs if by_backend[r["backend"]][1] is m),
            )
            for m in metas
        }
    )
    for started, command, quick, again, commit, which in runs:
        lines += [
            f"Run {started} ({which or 'no soak record'}; k8s-sql commit {commit}): `{command}`"
            + (f" ({again})" if again else "")
            + (QUICK_NOTE if quick else ""),
            "",
        ]
    m = meta.get("machine", {})
    lines += [
        f"Machine: {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, {m.get('ram_gib', '?')} GiB; "
        f"{m.get('postgres', '')}; {m.get('mariadb', '')}".rstrip("; "),
        f"CPU pinning: {meta.get('pinning', '?')}.",
        "",
    ]
    loads = [(r["backend"], r.get("machine", {})) for r in recs]
    busy = [x for x in loads if float(x[1].get("loadavg1_mean") or 0) > float(m.get("cores") or 1)]
    if loads:
        lines += [
            (
                "**The machine was shared during these soaks**: other work (test suites of other sessions) ran "
                "on the same cores, so CPU percentages and latencies carry that contention; "
                if busy
                else "Machine load during the soaks: "
            )
            + "; ".join(
                f"{b}: load average {fmt(x.get('loadavg1_mean'))} mean, {fmt(x.get('loadavg1_max'))} max, "
                f"{fmt(x.get('busy_pct_mean'))}% of all cores busy"
                for b, x in loads
            )
            + ". The plots show the machine's load next to k8s-sql's CPU.",
            "",
        ]
    lines += [
        f"**What runs.** For each backend in turn, a fresh k8s-sql (one process, the backend's durable "
        f"settings as in W1 to W5) serves a stock kube-apiserver v1.37.2 with "
        f"`--event-ttl={sizes.get('soak_event_ttl')}` "
        f"and `--etcd-compaction-interval={sizes.get('soak_compaction_interval')}`. kwok runs "
        f"{sizes.get('soak_nodes')} fake nodes, each renewing its Lease every ~10 s, and makes pods Running "
        f"and finishes their deletion as a kubelet would. bench/kube/loadgen's `-soak` mode fills "
        f"{sizes.get('soak_pods')} pods, then for {fmt(sizes.get('soak_minutes'))} minutes keeps them churning "
        f"at fixed rates: {fmt(sizes.get('soak_churn_rate'))} pods created and as many of the oldest deleted "
        f"(gracefully) per second, each with an Event (as the scheduler and kubelet post them), and "
        f"{fmt(sizes.get('soak_update_rate'))} metadata patches of random live pods per second; a cluster-wide "
        f"paged LIST of pods every {sizes.get('soak_list_interval')}. Requests are open-loop (a tick that finds "
        f"{sizes.get('soak_concurrency')} requests of its kind in flight is dropped and counted). Events expire "
        "through their etcd leases after the TTL, so the store sees lease grants, attachments and expiry "
        "deletes throughout, besides the pods' creates, guarded updates, deletes and kwok's status and lease "
        "writes.",
        "",
        f"**What is measured.** k8s-sql's RSS and CPU (its process tree, from `/proc`; the database "
        f"server's too) every {fmt(sizes.get('soak_sample_seconds'))} s; every request's client-side latency "
        f"(loadgen); and every {fmt(sizes.get('soak_window_seconds'), 0)} s the apiserver's "
        "`etcd_request_duration_seconds` (its calls to k8s-sql, all resources: the store's latency as "
        "kube-apiserver sees it) and `apiserver_request_duration_seconds` histograms. The first "
        f"{fmt(sizes.get('soak_warmup_minutes'))} minutes of churn are warm-up and are left out: two "
        "compaction intervals, as kube-apiserver compacts to the revision it saw one interval earlier, so "
        "the history the store keeps (and its size, see the plots) grows for about two intervals before it "
        "levels off; the Event population is steady after one TTL. The slope with half that warm-up is "
        "shown too, to show how much the choice matters. The RSS slope is a "
        "least-squares line through the samples after warm-up (± is 1.96 standard errors, which treats "
        "samples as independent, so it is optimistic), and CPU and latency are compared between the first "
        f"and the last third of the rest. Memory counts as flat when the slope is within ±{fmt(FLAT_SOAK)} "
        f"MB/h, latency as steady when the last third's p99 is at most {STEADY_SOAK}x the first third's.",
        "",
    ]
    lines += [
        "```sh",
        f"{meta.get('command', 'bench/run --soak')}   # about 35 minutes per backend",
        f"bench/report.py {' '.join(src for src, _ in docs)} --out docs/benchmarks.md   # re-render this section",
        "PYTHONPATH=src:bench python3 -m harness.soak RESULTS.json   # re-analyse from the raw series",
        "```",
        "",
    ]
    if not recs:
        lines += ["No soak has run.", ""]
    else:
        rows = []
        for r in recs:
            su, rss, cpu, ev = r.get("summary", {}), r.get("rss", {}), r.get("cpu", {}), r.get("events", {})
            c = su.get("counts", {})
            errs = sum((r.get("errors") or {}).values())
            drops = sum((r.get("dropped") or {}).values())
            slope = rss.get("slope_mb_per_h")
            rows.append(
                [
                    r["backend"],
                    f"{_mins(r.get('soak_s'))} ({_mins(r.get('analysed_s'))})",
                    f"{c.get('pod-create', 0):,} / {c.get('pod-delete', 0):,} / {c.get('pod-update', 0):,}",
                    f"{ev.get('created', 0):,} / {fmt(ev.get('present_end'), 0)}",
                    f"{errs} / {drops}",
                    _arrow(rss.get("warmup_end_mb"), rss.get("end_mb"), 0),
                    _arrow((r.get("storage") or {}).get("warmup_end_mb"), (r.get("storage") or {}).get("end_mb")),
                    NA if slope is None else f"{slope:+.1f} ± {float(rss.get('slope_ci95_mb_per_h') or 0):.1f}",
                    NA if slope is None else ("flat" if rss.get("flat") else "**growing**"),
                    NA
                    if rss.get("slope_half_warmup_mb_per_h") is None
                    else f"{float(rss['slope_half_warmup_mb_per_h']):+.1f} ± "
                    f"{float(rss.get('slope_half_warmup_ci95_mb_per_h') or 0):.1f}",
                    " → ".join(fmt(x) for x in (cpu.get("thirds_pct") or [])),
                    " → ".join(fmt(x) for x in (cpu.get("db_thirds_pct") or [])) or NA,
                ]
            )
        lines += ["**Memory and CPU** (after warm-up)", ""]
        lines += [
            "RSS at warm-up end and at the end are means over a minute (a sixth of the analysed time in "
            "shorter runs); store MB is the database size k8s-sql reports in Status (`dbSize`, as "
            "`apiserver_storage_size_bytes`): history is compacted by kube-apiserver every "
            f"{sizes.get('soak_compaction_interval')}, so it levels off when compaction keeps pace.",
            "",
        ]
        lines += table(
            [
                "backend",
                "minutes (analysed)",
                "pods created / deleted / patched",
                "events created / present at end",
                "errors / dropped",
                "RSS MB warm-up end → end",
                "store MB warm-up end → end",
                "RSS slope MB/h",
                "memory",
                f"RSS slope MB/h, {fmt(float(sizes.get('soak_warmup_minutes') or 0) / 2)}-min warm-up",
                "k8s-sql CPU % by third",
                "DB CPU % by third",
            ],
            rows,
        )
        lines += [""]
        for r in recs:
            rss = r.get("rss") or {}
            if rss.get("flat") is False and rss.get("slope_last_half_mb_per_h") is not None:
                lines += [
                    f"On {r['backend']} the fit over the analysed {_mins(r.get('analysed_s'))} minutes is "
                    f"{float(rss['slope_mb_per_h']):+.1f} ± {float(rss['slope_ci95_mb_per_h']):.1f} MB/h; over "
                    f"its last half alone it is {float(rss['slope_last_half_mb_per_h']):+.1f} ± "
                    f"{float(rss['slope_last_half_ci95_mb_per_h']):.1f} MB/h (RSS by third: "
                    + " → ".join(fmt(x) for x in (rss.get("thirds_mean_mb") or []))
                    + " MB).",
                    "",
                ]
        rows = []
        for r in recs:
            cl, st = r.get("client", {}), r.get("store", {})
            mu, li, et = cl.get("mutating", {}), cl.get("pod-list", {}), st.get("etcd all", {})
            verdicts = [x.get("steady_verdict") for x in (mu, et) if x.get("steady_verdict") is not None]

            def pair(x: dict[str, Any], q: str) -> str:
                return _arrow(x.get("first_third", {}).get(q), x.get("last_third", {}).get(q))

            rows.append(
                [
                    r["backend"],
                    pair(mu, "p50"),
                    pair(mu, "p99"),
                    pair(et, "p50"),
                    pair(et, "p99"),
                    pair(li, "p99"),
                    fmt_ratio(mu.get("p99_last_over_first")),
                    fmt_ratio(et.get("p99_last_over_first")),
                    NA if not verdicts else ("steady" if all(verdicts) else "**not steady**"),
                    " → ".join(fmt(x) for x in ((r.get("machine") or {}).get("loadavg1_thirds") or [])) or NA,
                ]
            )
        lines += ["**Latency, first third → last third** (after warm-up)", ""]
        lines += table(
            [
                "backend",
                "client mutating p50 ms",
                "client mutating p99 ms",
                "apiserver→store p50 ms",
                "apiserver→store p99 ms",
                "client pod LIST p99 ms",
                "mutating p99 ratio",
                "store p99 ratio",
                "latency",
                "machine load avg by third",
            ],
            rows,
        )
        for r in recs:
            third = [float(x) for x in ((r.get("machine") or {}).get("loadavg1_thirds") or []) if x is not None]
            if len(third) == 3 and max(third) > 1.5 * max(min(third), 0.5):
                mu = (r.get("client") or {}).get("mutating") or {}
                came_down = third[-1] < third[0] and mu.get("steady_verdict")
                lines += [
                    "",
                    f"On {r['backend']} the machine's load average went {' → '.join(fmt(x) for x in third)} over "
                    "the thirds (other work on the machine), and latencies follow the machine's load (see the "
                    "plot): the ratio between thirds measures the machine as much as k8s-sql"
                    + (
                        "; what it does show is that latency came back down when the load did, i.e. no "
                        "degradation accumulated over the run."
                        if came_down
                        else "."
                    ),
                ]
        lines += [
            "",
            "Client mutating: every pod create, patch and delete and every Event create loadgen made (each "
            "request's latency as the client saw it, including kube-apiserver and the machine's contention). "
            "apiserver→store: kube-apiserver's `etcd_request_duration_seconds` over all its calls to "
            "k8s-sql (interpolated inside the histogram's buckets, which are 5, 25, 50, 100, 200 ms … wide, "
            "so small values are coarse).",
            "",
        ]
        ops = ["pod-create", "pod-update", "pod-delete", "event-create", "pod-list"]
        rows = []
        for r in recs:
            cl = r.get("client", {})
            rows.append(
                [r["backend"]]
                + [
                    f"{fmt((cl.get(op) or {}).get('steady', {}).get('p50'))} / "
                    f"{fmt((cl.get(op) or {}).get('steady', {}).get('p99'))}"
                    for op in ops
                ]
                + [", ".join(f"{k} {v:g}" for k, v in (r.get("rates_per_s") or {}).items())]
            )
        lines += ["**Client latency by request, p50 / p99 ms over the whole analysed period**", ""]
        lines += table(["backend", *ops, "successful requests/s"], rows)
        lines += [""]
        images = soak_plots(recs, plot_dir, plot_dir.name)
        if "note" in images:
            lines += [images["note"], ""]
        for r in recs:
            if r["backend"] in images:
                lines += [images[r["backend"]], ""]
    # a backend that failed in one run and was soaked again in another shows its soak only
    soak_fail = [f for f in failures if "soak" in f.get("workload", "") and f.get("backend") not in by_backend]
    if soak_fail:
        lines += ["**Soak failures**", ""]
        for f in soak_fail:
            err = f.get("error", "").strip().splitlines()
            lines += [f"- {f.get('backend')}: `{(err or ['?'])[0][:300]}`"]
        lines += [""]
    lines += [SOAK_END]
    return lines


FLAT_SOAK = 5.0  # MB/h; the harness' FLAT_MB_PER_HOUR, repeated here as the report has no harness import
STEADY_SOAK = 1.5


def render_soak(results_paths: list[Path], out_md: Path) -> None:
    """Render soak results into ``out_md``'s soak section (replaced, or added before
    "## Failures"/"## Exact commands"; a new file if there is none)."""
    block = "\n".join(soak_section(_load(results_paths), out_md.with_suffix("")))
    replace_block(out_md, "soak", block, "Soak: k8s-sql under kube-apiserver churn")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("results", type=Path, nargs="+", help="results.json (several: soak or tenants results only)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks.md")
    args = ap.parse_args()
    loaded = [json.loads(p.read_text()) for p in args.results]
    modes = {"tenants" if isinstance(d, list) else d.get("meta", {}).get("mode") for d in loaded}
    if modes == {"tenants"}:  # bench/run --tenants' tenants.json: a list of records
        render_tenants(args.results, args.out)
    elif modes == {"soak"}:
        render_soak(args.results, args.out)
    elif len(args.results) == 1:
        render(args.results[0], args.out)
    else:
        raise SystemExit("several results files: only soak or tenants results can be merged")
    print(args.out)


if __name__ == "__main__":
    main()
