"""bench/run --soak: k8s-sql under a long, steady Kubernetes churn, on each backend in turn.

For each backend in ``soak_backends`` a fresh k8s-sql serves a stock kube-apiserver
(``bench/kube/run.sh``, as W5) with a short ``--event-ttl``; kwok runs ``soak_nodes``
fake nodes (their Lease renewals are a steady write load of their own) and loadgen's
``-soak`` mode keeps ``soak_pods`` pods churning for ``soak_minutes``: pods created,
patched and deleted at fixed rates, an Event per create and delete, Events expiring
through their leases. Meanwhile this module samples k8s-sql's RSS and CPU (and the
database server's, the machine's load average and CPU use, SQLite's file size) from
/proc every ``soak_sample_seconds``; loadgen logs every request's latency and, every
``soak_window_seconds``, the apiserver's request and etcd-request duration histograms.

:func:`analyse` turns that into the numbers of the report: the first
``soak_warmup_minutes`` are excluded, the slope of RSS over the rest is a least-squares
fit in MB/hour, CPU and latency are compared between the first and the last third of
the rest, and per-window latency percentiles make the plot.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .procs import MIB, Group
from .servers import ROOT, Launcher, ServerProcess

# A latency third is "steady" when its p99 is at most this many times the first third's.
STEADY_P99_RATIO = 1.5
# RSS is "flat" when its fitted slope after warm-up is at most this many MB/hour.
FLAT_MB_PER_HOUR = 5.0
MUTATING = ("pod-create", "pod-update", "pod-delete", "event-create")


# -- sampling ------------------------------------------------------------------------------


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies over all cores since boot, from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return 0.0, 0.0
    v = [float(x) for x in fields[:8]]
    idle = v[3] + v[4]  # idle + iowait
    return sum(v) - idle, sum(v)


def file_mb(paths: Iterable[Path]) -> float:
    total = 0
    for p in paths:
        try:
            total += p.stat().st_size
        except OSError:
            pass
    return total / MIB


class SoakSampler:
    """Samples the server and database process trees, the machine's load and the SQLite
    files every ``interval`` seconds in a thread; one dict per sample."""

    def __init__(self, groups: dict[str, Group], interval: float, sqlite_files: list[Path]) -> None:
        self.groups = groups
        self.interval = interval
        self.sqlite_files = sqlite_files
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        s: dict[str, float] = {"t": time.time()}
        for name, g in self.groups.items():
            g.refresh()  # PostgreSQL forks a backend per connection
            s[f"{name}_cpu_s"] = g.cpu()
            s[f"{name}_rss_mb"] = sum(g.rss()) / MIB
        s["loadavg1"] = os.getloadavg()[0]
        s["machine_busy"], s["machine_total"] = machine_cpu()
        if self.sqlite_files:
            s["sqlite_mb"] = file_mb(self.sqlite_files)
        self.samples.append(s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> SoakSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# -- analysis ------------------------------------------------------------------------------


def percentile(sorted_ms: list[float], q: float) -> float | None:
    """Nearest-rank percentile, as the Go load generators report theirs."""
    if not sorted_ms:
        return None
    return sorted_ms[max(0, math.ceil(q * len(sorted_ms)) - 1)]


def lat_stats(ms: list[float], errors: int = 0) -> dict[str, Any]:
    xs = sorted(ms)
    p50, p99 = percentile(xs, 0.5), percentile(xs, 0.99)
    return {
        "count": len(xs),
        "errors": errors,
        "p50": None if p50 is None else round(p50, 2),
        "p99": None if p99 is None else round(p99, 2),
        "max": round(xs[-1], 2) if xs else None,
    }


def linear_fit(xs: list[float], ys: list[float]) -> dict[str, float] | None:
    """Least-squares line y = a + b·x: slope b, its standard error, intercept a, r²."""
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    b = sxy / sxx
    a = my - b * mx
    resid = [y - (a + b * x) for x, y in zip(xs, ys, strict=True)]
    sse = sum(r * r for r in resid)
    syy = sum((y - my) ** 2 for y in ys)
    se = math.sqrt(sse / (n - 2) / sxx) if n > 2 else float("nan")
    return {"slope": b, "stderr": se, "intercept": a, "r2": 1 - sse / syy if syy > 0 else 0.0, "n": n}


def hist_quantile(b: dict[str, float], q: float) -> float | None:
    """PromQL's histogram_quantile over cumulative buckets (le as text -> count), in ms."""
    pts = sorted((float(le), n) for le, n in b.items())
    if not pts or pts[-1][1] <= 0:
        return None
    rank = q * pts[-1][1]
    lower, below = 0.0, 0.0
    for le, n in pts:
        if n >= rank:
            if math.isinf(le):
                return round(lower * 1000, 2)
            v = lower + (le - lower) * (rank - below) / (n - below) if n > below else lower
            return round(v * 1000, 2)
        lower, below = le, n
    return None


def hist_sum(hs: Iterable[dict[str, float] | None]) -> dict[str, float]:
    out: dict[str, float] = {}
    for h in hs:
        for le, n in (h or {}).items():
            out[le] = out.get(le, 0.0) + n
    return out


def hist_stats(b: dict[str, float]) -> dict[str, Any]:
    count = max(b.values(), default=0.0)
    return {"count": int(count), "p50": hist_quantile(b, 0.5), "p99": hist_quantile(b, 0.99)}


def read_requests(path: Path) -> list[tuple[float, str, float, bool]]:
    """loadgen's -samples CSV: (seconds since the soak began, op, ms, ok)."""
    out = []
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    out.append((float(row["t"]), row["op"], float(row["ms"]), row["ok"] == "1"))
                except (KeyError, TypeError, ValueError):
                    continue  # a line cut short by an interrupted run
    except OSError:
        pass
    return out


def read_windows(path: Path) -> list[dict[str, Any]]:
    out = []
    try:
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    except OSError:
        pass
    return out


def _ops(op: str) -> list[str]:
    """The latency classes a request counts in: its own, and "mutating" for writes."""
    return [op, "mutating"] if op in MUTATING else [op]


def analyse(
    summary: dict[str, Any],
    samples: list[dict[str, float]],
    requests: list[tuple[float, str, float, bool]],
    windows: list[dict[str, Any]],
    warmup_s: float,
    window_s: float,
) -> dict[str, Any]:
    """Everything the report shows about one backend's soak, from the raw series."""
    t0 = float(summary.get("soak_start_unix") or 0.0)
    dur = float(summary.get("seconds") or 0.0)
    if t0 <= 0 or dur <= 0:
        raise ValueError("the soak did not start (no soak_start_unix in loadgen's summary)")
    warmup_s = min(warmup_s, dur / 2)  # a run cut short still gets an analysed half
    span = dur - warmup_s
    thirds = [(warmup_s + i * span / 3, warmup_s + (i + 1) * span / 3) for i in range(3)]

    # -- per-sample series (t relative to the soak's start; negative: setup)
    series: dict[str, list[float | None]] = {k: [] for k in ("t", "rss_mb", "cpu_pct", "loadavg1", "machine_busy_pct")}
    has_db = bool(samples) and "db_cpu_s" in samples[0]
    has_sqlite = bool(samples) and "sqlite_mb" in samples[0]
    if has_db:
        series["db_rss_mb"], series["db_cpu_pct"] = [], []
    if has_sqlite:
        series["sqlite_mb"] = []
    prev: dict[str, float] | None = None
    for s in samples:
        dt = s["t"] - prev["t"] if prev else 0.0
        series["t"].append(round(s["t"] - t0, 2))
        series["rss_mb"].append(round(s["server_rss_mb"], 2))
        series["loadavg1"].append(round(s["loadavg1"], 2))

        def pct(key: str, _prev: dict[str, float] | None = prev, _dt: float = dt, _s: dict[str, float] = s) -> Any:
            return round(100 * (_s[key] - _prev[key]) / _dt, 1) if _prev and _dt > 0 else None

        series["cpu_pct"].append(pct("server_cpu_s"))
        tot = s["machine_total"] - prev["machine_total"] if prev else 0.0
        series["machine_busy_pct"].append(
            round(100 * (s["machine_busy"] - prev["machine_busy"]) / tot, 1) if prev and tot > 0 else None
        )
        if has_db:
            series["db_rss_mb"].append(round(s["db_rss_mb"], 2))
            series["db_cpu_pct"].append(pct("db_cpu_s"))
        if has_sqlite:
            series["sqlite_mb"].append(round(s["sqlite_mb"], 2))
        prev = s

    def steady_idx(a: float = warmup_s, b: float = dur) -> list[int]:
        return [i for i, t in enumerate(series["t"]) if t is not None and a <= t <= b]

    def mean_of(key: str, idx: list[int]) -> float | None:
        vals = [v for v in (series[key][i] for i in idx) if v is not None]
        return round(sum(vals) / len(vals), 2) if vals else None

    def cpu_between(key: str, a: float, b: float) -> float | None:
        """Mean CPU % of one core between two instants, from the cumulative counters."""
        inside = [s for s in samples if a <= s["t"] - t0 <= b]
        if len(inside) < 2 or inside[-1]["t"] <= inside[0]["t"]:
            return None
        return round(100 * (inside[-1][key] - inside[0][key]) / (inside[-1]["t"] - inside[0]["t"]), 1)

    st = steady_idx()
    xs = [float(series["t"][i]) / 3600 for i in st]  # type: ignore[arg-type]
    ys = [float(series["rss_mb"][i]) for i in st]  # type: ignore[arg-type]
    fit = linear_fit(xs, ys)
    edge = min(60.0, span / 6)  # "at warm-up end" and "at the end" are means over this long
    rss: dict[str, Any] = {
        "warmup_end_mb": mean_of("rss_mb", steady_idx(warmup_s, warmup_s + edge)),
        "end_mb": mean_of("rss_mb", steady_idx(dur - edge, dur)),
        "min_mb": round(min(ys), 1) if ys else None,
        "max_mb": round(max(ys), 1) if ys else None,
        "peak_mb_whole_run": round(max((float(v) for v in series["rss_mb"] if v is not None), default=0.0), 1),
        "thirds_mean_mb": [mean_of("rss_mb", steady_idx(a, b)) for a, b in thirds],
        "samples": len(ys),
    }
    half = steady_idx(warmup_s / 2, dur)  # how much the warm-up's length matters
    fit_half = linear_fit(
        [float(series["t"][i]) / 3600 for i in half],  # type: ignore[arg-type]
        [float(series["rss_mb"][i]) for i in half],  # type: ignore[arg-type]
    )
    if fit_half:
        rss["slope_half_warmup_mb_per_h"] = round(fit_half["slope"], 2)
        rss["slope_half_warmup_ci95_mb_per_h"] = round(1.96 * fit_half["stderr"], 2)
    late = steady_idx(warmup_s + span / 2, dur)  # a step early on, or growth that goes on?
    fit_late = linear_fit(
        [float(series["t"][i]) / 3600 for i in late],  # type: ignore[arg-type]
        [float(series["rss_mb"][i]) for i in late],  # type: ignore[arg-type]
    )
    if fit_late:
        rss["slope_last_half_mb_per_h"] = round(fit_late["slope"], 2)
        rss["slope_last_half_ci95_mb_per_h"] = round(1.96 * fit_late["stderr"], 2)
    if fit:
        rss.update(
            slope_mb_per_h=round(fit["slope"], 2),
            slope_ci95_mb_per_h=round(1.96 * fit["stderr"], 2),
            fit_intercept_mb=round(fit["intercept"], 2),
            fit_r2=round(fit["r2"], 3),
            flat=abs(fit["slope"]) <= FLAT_MB_PER_HOUR,
        )
    cpu: dict[str, Any] = {
        "mean_pct": cpu_between("server_cpu_s", warmup_s, dur),
        "thirds_pct": [cpu_between("server_cpu_s", a, b) for a, b in thirds],
        "cpu_s_soak": round(samples[-1]["server_cpu_s"] - samples[0]["server_cpu_s"], 1) if samples else None,
    }
    if has_db:
        cpu["db_mean_pct"] = cpu_between("db_cpu_s", warmup_s, dur)
        cpu["db_thirds_pct"] = [cpu_between("db_cpu_s", a, b) for a, b in thirds]
    soak_idx = steady_idx(0, dur)
    machine = {
        "loadavg1_mean": mean_of("loadavg1", soak_idx),
        "loadavg1_max": max((float(series["loadavg1"][i]) for i in soak_idx), default=None),  # type: ignore[arg-type]
        "busy_pct_mean": mean_of("machine_busy_pct", soak_idx),
        "loadavg1_thirds": [mean_of("loadavg1", steady_idx(a, b)) for a, b in thirds],
    }

    # -- client latency per op, per window and per third
    by_op: dict[str, list[tuple[float, float, bool]]] = {}
    for t, op, ms, ok in requests:
        for k in _ops(op):
            by_op.setdefault(k, []).append((t, ms, ok))
    nwin = max(1, math.ceil(dur / window_s))
    lat_windows = []
    for n in range(nwin):
        a, b = n * window_s, min((n + 1) * window_s, dur)
        row: dict[str, Any] = {"t0": round(a, 1), "t1": round(b, 1)}
        for op, reqs in by_op.items():
            inside = [r for r in reqs if a <= r[0] < b]
            row[op] = lat_stats([ms for _, ms, ok in inside if ok], sum(1 for r in inside if not r[2]))
        lat_windows.append(row)
    client: dict[str, Any] = {}
    for op, reqs in sorted(by_op.items()):
        per = []
        for a, b in [(warmup_s, dur), *thirds]:
            inside = [r for r in reqs if a <= r[0] < b]
            per.append(lat_stats([ms for _, ms, ok in inside if ok], sum(1 for r in inside if not r[2])))
        whole, first, _, last = per
        ratio = last["p99"] / first["p99"] if first["p99"] and last["p99"] is not None else None
        client[op] = {
            "steady": whole,
            "first_third": first,
            "middle_third": per[2],
            "last_third": last,
            "p99_last_over_first": None if ratio is None else round(ratio, 2),
            "steady_verdict": None if ratio is None else ratio <= STEADY_P99_RATIO,
        }

    # -- the apiserver's own histograms (etcd_request_duration: its calls to k8s-sql)
    store_windows: list[dict[str, Any]] = []
    for w in windows:
        srow: dict[str, Any] = {
            "t0": w.get("t0"),
            "t1": w.get("t1"),
            "live_pods": w.get("live_pods"),
            "running_pods": w.get("running_pods"),
            "events_present": w.get("events_present"),
            "objects": w.get("objects") or {},
            "storage_size_bytes": w.get("storage_size_bytes"),
            "loadavg1": w.get("loadavg1"),
        }
        for k, h in (w.get("hist") or {}).items():
            srow[k] = hist_stats(h)
        store_windows.append(srow)
    store: dict[str, Any] = {}
    classes = sorted({k for w in windows for k in (w.get("hist") or {})})
    for k in classes:
        per = []
        for a, b in [(warmup_s, dur), *thirds]:
            # a window belongs to the third holding its midpoint
            hs = [
                w["hist"].get(k) for w in windows if a <= (float(w.get("t0", 0)) + float(w.get("t1", 0))) / 2 < b + 1e-6
            ]
            per.append(hist_stats(hist_sum(hs)))
        whole, first, _, last = per
        ratio = last["p99"] / first["p99"] if first["p99"] and last["p99"] is not None else None
        store[k] = {
            "steady": whole,
            "first_third": first,
            "last_third": last,
            "p99_last_over_first": None if ratio is None else round(ratio, 2),
            "steady_verdict": None if ratio is None else ratio <= STEADY_P99_RATIO,
        }

    # the store's size as k8s-sql reports it (Status dbSize -> apiserver_storage_size_bytes)
    sizes = [
        (float(w.get("t1") or 0), float(w["storage_size_bytes"]) / MIB)
        for w in windows
        if w.get("storage_size_bytes") is not None
    ]
    after = [mb for t, mb in sizes if t >= warmup_s]
    storage = {
        "warmup_end_mb": round(after[0], 1) if after else None,
        "end_mb": round(after[-1], 1) if after else None,
        "max_mb": round(max(mb for _, mb in sizes), 1) if sizes else None,
    }

    counts = summary.get("counts") or {}
    created = int(summary.get("events_created") or 0)
    present = summary.get("events_present_end")
    events = {
        "created": created,
        "present_end": present,
        "expired_or_gone": created - int(present) if present is not None and int(present) >= 0 else None,
        "present_max": max((int(w.get("events_present") or 0) for w in windows), default=None),
    }
    return {
        "warmup_s": round(warmup_s, 1),
        "window_s": window_s,
        "soak_s": round(dur, 1),
        "analysed_s": round(span, 1),
        "thirds_s": [[round(a, 1), round(b, 1)] for a, b in thirds],
        "rss": rss,
        "cpu": cpu,
        "machine": machine,
        "client": client,
        "store": store,
        "events": events,
        "storage": storage,
        "rates_per_s": {op: round(n / dur, 2) for op, n in sorted(counts.items())},
        "errors": summary.get("errors") or {},
        "dropped": summary.get("dropped") or {},
        "series": series,
        "latency_windows": lat_windows,
        "store_windows": store_windows,
        "criteria": {"steady_p99_ratio": STEADY_P99_RATIO, "flat_mb_per_h": FLAT_MB_PER_HOUR},
    }


# -- one backend ---------------------------------------------------------------------------


def build_loadgen(out_dir: Path) -> Path:
    """loadgen built from this tree into the run's directory: bench/kube/build.sh's bin dir is
    shared by every checkout on the machine, and another checkout's build (one without the soak
    mode) once replaced the binary between two backends of a soak run."""
    binary = out_dir / "bin" / "loadgen"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["go", "build", "-trimpath", "-buildvcs=false", "-ldflags=-s -w", "-o", str(binary), "."],
            cwd=ROOT / "bench/kube/loadgen",
            check=True,
            capture_output=True,
            timeout=900,
        )
    return binary


def run_soak(run: Any, launcher: Launcher, backend: str) -> None:
    """Soak k8s-sql on ``backend``: its record goes to ``run.results`` (``run`` is the
    harness' Run; typed loosely to keep this module free of a cycle with cli.py)."""
    s = run.sizes
    script = ROOT / "bench/kube/run.sh"
    print(f"== soak: k8s-sql on {backend}, {s.soak_minutes:g} minutes", flush=True)
    try:
        procs: list[ServerProcess] = launcher.launch("k8s-sql", backend, 1)
    except Exception as e:
        run.fail("k8s-sql", backend, "soak start", e)
        return
    try:
        run.n += 1
        stem = f"{run.n:03d}-k8s-sql-{backend}-soak"
        out, samples_csv, windows_jl, proc_json = (
            run.raw / f"{stem}{suffix}" for suffix in (".json", ".csv", "-windows.jsonl", "-proc.json")
        )
        minutes = float(s.soak_minutes)
        argv = [
            *(["taskset", "-c", "1"] if run.pinned else []),
            "bash",
            str(script),
            *("--etcd-servers", procs[0].url, "--out", str(out)),
            *("--nodes", str(s.soak_nodes), "--pods", str(s.soak_pods), "--concurrency", str(s.soak_concurrency)),
            *("--list-interval", s.soak_list_interval, "--timeout", "10m"),
            *("--label", f"k8s-sql/{backend}/soak"),
            f"--apiserver-arg=--event-ttl={s.soak_event_ttl}",
            f"--apiserver-arg=--etcd-compaction-interval={s.soak_compaction_interval}",
            f"--loadgen-arg=-soak={minutes * 60:g}s",
            f"--loadgen-arg=-churn-rate={s.soak_churn_rate:g}",
            f"--loadgen-arg=-update-rate={s.soak_update_rate:g}",
            f"--loadgen-arg=-window={s.soak_window_seconds:g}s",
            f"--loadgen-arg=-samples={samples_csv}",
            f"--loadgen-arg=-windows={windows_jl}",
        ]
        run.note_command(f"k8s-sql {backend} server (soak)", procs[0].argv)
        run.note_command(f"k8s-sql {backend} soak", argv)
        groups = run.groups(procs, backend)
        store = procs[0].cwd.parent
        sqlite = [store / f"state.db{x}" for x in ("", "-wal", "-shm")] if backend.startswith("sqlite") else []
        timeout = minutes * 60 + 900  # setup and shutdown besides the soak itself
        env = {**os.environ, "K8S_SQL_BENCH_LOADGEN": str(build_loadgen(run.out_dir))}
        with SoakSampler(groups, float(s.soak_sample_seconds), sqlite) as sampler:
            t_start = time.time()
            res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
            t_end = time.time()
        (run.raw / f"{stem}.log").write_text(res.stdout + res.stderr)
        proc_json.write_text(json.dumps(sampler.samples) + "\n")
        summary: dict[str, Any] = {}
        if out.exists():
            summary = json.loads(out.read_text())[0]
        problem = None
        if res.returncode != 0 or not summary:
            problem = f"bench/kube/run.sh failed ({res.returncode}):\n{(res.stdout + res.stderr)[-3000:]}"
        if not summary.get("soak_start_unix"):
            raise RuntimeError(problem or "loadgen wrote no soak start")
        analysis = analyse(
            summary,
            sampler.samples,
            read_requests(samples_csv),
            read_windows(windows_jl),
            float(s.soak_warmup_minutes) * 60,
            float(s.soak_window_seconds),
        )
        rec: dict[str, Any] = {
            "workload": "soak",
            "server": "k8s-sql",
            "backend": backend,
            "scenario": "single",
            "frontends": 1,
            "minutes_planned": minutes,
            "invocation_seconds": round(t_end - t_start, 1),
            "summary": {k: v for k, v in summary.items() if k != "client_ms"},
            "client_ms_whole_run": summary.get("client_ms"),
            "raw": {
                "samples": samples_csv.name,
                "windows": windows_jl.name,
                "summary": out.name,
                "proc": proc_json.name,
            },
            **analysis,
        }
        rec["server_cpu_s"] = analysis["cpu"]["cpu_s_soak"]
        rec["peak_rss_mb"] = analysis["rss"]["peak_mb_whole_run"]
        if problem:
            rec["error"] = problem
        run.record([rec])
        if problem:
            run.fail("k8s-sql", backend, "soak", RuntimeError(problem))
    except Exception as e:
        run.fail("k8s-sql", backend, "soak", e)
    finally:
        for p in procs:
            p.stop()


def describe(rec: dict[str, Any]) -> str:
    """One progress line for a soak record."""
    rss, cpu, cl = rec["rss"], rec["cpu"], rec["client"].get("mutating", {})
    first, last = cl.get("first_third", {}), cl.get("last_third", {})
    return (
        f"  k8s-sql  {rec['backend']:13} soak {rec['soak_s'] / 60:.1f} min (warm-up {rec['warmup_s'] / 60:.1f}): "
        f"RSS {rss.get('warmup_end_mb')} -> {rss.get('end_mb')} MB, slope {rss.get('slope_mb_per_h')} "
        f"± {rss.get('slope_ci95_mb_per_h')} MB/h; CPU {cpu.get('mean_pct')}% "
        f"(thirds {cpu.get('thirds_pct')}); mutating p50/p99 {first.get('p50')}/{first.get('p99')} -> "
        f"{last.get('p50')}/{last.get('p99')} ms; rates {rec['rates_per_s']}; "
        f"load avg {rec['machine']['loadavg1_mean']} (max {rec['machine']['loadavg1_max']})"
    )


def reanalyse(results: Path, warmup_minutes: float | None = None) -> None:
    """Recompute every soak record's analysis in ``results`` from the raw files next to it
    (after a change to :func:`analyse`), with the run's own sizes or another warm-up
    (which is then recorded in the run's sizes, so that the report states it)."""
    doc = json.loads(results.read_text())
    sizes = doc["meta"]["sizes"]
    if warmup_minutes is not None:
        sizes["soak_warmup_minutes"] = warmup_minutes
        doc["meta"]["reanalysed"] = f"re-analysed with a {warmup_minutes:g}-minute warm-up"
    raw = results.parent / "raw"
    for rec in doc["results"]:
        if rec.get("workload") != "soak":
            continue
        files = rec["raw"]
        summary = json.loads((raw / files["summary"]).read_text())[0]
        analysis = analyse(
            summary,
            json.loads((raw / files["proc"]).read_text()),
            read_requests(raw / files["samples"]),
            read_windows(raw / files["windows"]),
            float(sizes["soak_warmup_minutes"]) * 60,
            float(sizes["soak_window_seconds"]),
        )
        rec.update(analysis)
        print(describe(rec))
    results.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(
        prog="PYTHONPATH=src:bench python3 -m harness.soak",
        description="Re-analyse soak results (bench/results/<ts>/results.json) from their raw series, in place; "
        "then bench/report.py renders them.",
    )
    ap.add_argument("results", type=Path, nargs="+")
    ap.add_argument("--warmup-minutes", type=float, help="another warm-up than the run's soak_warmup_minutes")
    args = ap.parse_args()
    for path in args.results:
        reanalyse(path, args.warmup_minutes)
