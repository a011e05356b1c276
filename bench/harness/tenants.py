"""bench/run --tenants: many control planes on one database (the Kamaji / k0smotron layout).

For each server (k8s-sql, kine) and backend, two datastore frontends share one fresh
database; ``--tenants`` stock kube-apiservers, each with its own ``--etcd-prefix``, use them
alternately (tenant i on frontend i mod 2). After every apiserver is ready and an idle
``--settle`` has passed, loadgen's ``-tenants`` mode offers ConfigMap create / guarded
update / delete at each ``--rate`` (writes per second over all tenants, open-loop) for
``--duration`` seconds, with ``-watchers`` ConfigMap watches per tenant. Meanwhile the CPU
of the frontends, of the database server and of the apiservers is read from /proc.

A rate passes when every offered write completed (none dropped for having its previous
request still in flight, none failed) with write p99 <= ``P99_TARGET_MS``.

    bench/run --tenants                                   # 8 tenants, 40 and 160 writes/s, PG + MariaDB
    bench/run --tenants --servers k8s-sql --backends postgres --rates 160 --duration 30
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from .procs import Group, Sampler
from .servers import ROOT, Databases, Launcher, ServerProcess, free_port
from .soak import build_loadgen

P99_TARGET_MS = 100.0  # issue #15: at 8 tenants and 160 writes/s, p99 <= 100 ms


def _last_line(argv: list[str]) -> str:
    res = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=True)
    return res.stdout.strip().splitlines()[-1]


class Apiservers:
    """``n`` kube-apiservers, tenant i on ``endpoints[i % len(endpoints)]`` with
    ``--etcd-prefix=/tenant-i``; one service-account key and one admin token for all."""

    def __init__(self, kube_bin: Path, work: Path, endpoints: list[str], n: int) -> None:
        self.kube_bin, self.work, self.endpoints, self.n = kube_bin, work, endpoints, n
        self.token = f"tenants-{os.getpid()}-{time.time_ns()}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.urls: list[str] = []

    def start(self, timeout: float = 300.0) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        sa_key, sa_pub = self.work / "sa.key", self.work / "sa.pub"
        subprocess.run(["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True, capture_output=True)
        subprocess.run(
            ["openssl", "rsa", "-in", str(sa_key), "-pubout", "-out", str(sa_pub)], check=True, capture_output=True
        )
        (self.work / "tokens.csv").write_text(f'{self.token},admin,admin,"system:masters"\n')
        for i in range(self.n):
            port = free_port()
            d = self.work / f"tenant-{i}"
            d.mkdir()
            argv = [
                str(self.kube_bin / "kube-apiserver"),
                f"--etcd-servers={self.endpoints[i % len(self.endpoints)]}",
                f"--etcd-prefix=/tenant-{i}",
                f"--cert-dir={d / 'certs'}",
                f"--secure-port={port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--service-cluster-ip-range=10.96.0.0/24",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-signing-key-file={sa_key}",
                f"--service-account-key-file={sa_pub}",
                f"--token-auth-file={self.work / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                "--endpoint-reconciler-type=none",
                "--v=1",
            ]
            with open(d / "kube-apiserver.log", "wb") as log:  # the child keeps its own descriptor
                self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
            self.urls.append(f"https://127.0.0.1:{port}")
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        deadline = time.monotonic() + timeout
        for i, url in enumerate(self.urls):
            while True:
                if self.procs[i].poll() is not None:
                    raise RuntimeError(f"kube-apiserver of tenant {i} exited; log in {self.work}/tenant-{i}")
                try:
                    req = urllib.request.Request(url + "/readyz", headers={"Authorization": f"Bearer {self.token}"})
                    with urllib.request.urlopen(req, context=ctx, timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"kube-apiserver of tenant {i} not ready after {timeout:g}s")
                time.sleep(0.5)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# Write-batch counters read beside the RPCs, under these names: how many batches the
# writes took, and how many ran again because another frontend wrote in between.
BATCH_COUNTERS = {
    "k8s_sql_write_batch_requests_count": "write batches",
    'k8s_sql_write_batch_rerun_total{started="known"}': "batches run again after starting from known rows",
    'k8s_sql_write_batch_rerun_total{started="read"}': "batches run again after a read",
}


def rpc_counts(endpoints: list[str]) -> dict[str, float]:
    """``grpc_server_handled_total`` summed over k8s-sql frontends, by method, and the
    BATCH_COUNTERS ({} for kine, which serves no /metrics on its client port)."""
    out: dict[str, float] = {}
    for ep in endpoints:
        try:
            with urllib.request.urlopen(f"http://{ep}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            continue
        for line in text.splitlines():
            labels, _, value = line.rpartition(" ")
            if labels.startswith("grpc_server_handled_total{"):
                method = labels.split('grpc_method="', 1)[1].split('"', 1)[0]
                out[method] = out.get(method, 0.0) + float(value)
            elif (name := BATCH_COUNTERS.get(labels)) is not None:
                out[name] = out.get(name, 0.0) + float(value)
    return out


def run_one(
    launcher: Launcher,
    dbs: Databases,
    kube_bin: Path,
    loadgen: Path,
    server: str,
    backend: str,
    args: argparse.Namespace,
    out_dir: Path,
) -> list[dict[str, Any]]:
    """Every rate of ``args.rates`` against one fresh store of ``server`` on ``backend``."""
    print(
        f"== tenants: {server} on {backend}, {args.tenants} kube-apiservers over {args.frontends} frontends", flush=True
    )
    procs: list[ServerProcess] = launcher.launch(server, backend, args.frontends)
    apis = Apiservers(
        kube_bin, out_dir / "work" / f"{server}-{backend}", [f"http://{p.endpoint}" for p in procs], args.tenants
    )
    recs: list[dict[str, Any]] = []
    try:
        t0 = time.monotonic()
        apis.start()
        print(
            f"   {args.tenants} apiservers ready in {time.monotonic() - t0:.0f}s; settling {args.settle:g}s", flush=True
        )
        groups = {
            "frontends": Group([p.proc.pid for p in procs if p.proc is not None]),
            "apiservers": Group([p.pid for p in apis.procs]),
        }
        db_pid = dbs.db_pid(backend)
        if db_pid is not None:
            groups["database"] = Group([db_pid])
        with Sampler(groups, interval=0.5) as idle:
            time.sleep(args.settle)
        idle_s = idle.end - idle.start
        for rate in args.rates:
            out = out_dir / f"tenants-{server}-{backend}-{rate:g}.json"
            argv = [
                str(loadgen),
                "-tenants=" + ",".join(apis.urls),
                f"-token={apis.token}",
                f"-out={out}",
                f"-label={server}-{backend}",
                f"-rate={rate:g}",
                f"-duration={args.duration:g}s",
                f"-watchers={args.watchers}",
            ]
            endpoints = [p.endpoint for p in procs]
            rpcs0 = rpc_counts(endpoints)
            with Sampler(groups, interval=0.5) as s:
                res = subprocess.run(argv, capture_output=True, text=True, timeout=args.duration + 300)
            rpcs1 = rpc_counts(endpoints)
            if not out.exists():
                raise RuntimeError(f"loadgen failed ({res.returncode}): {res.stderr.strip()[-500:]}")
            rec: dict[str, Any] = json.loads(out.read_text())[0]
            win = s.end - s.start
            rec.update(
                server=server,
                backend=backend,
                frontends=args.frontends,
                window_s=round(win, 1),
                cpu_s={name: round(s.window(name).cpu_s, 1) for name in groups},
                idle_cpu_per_s={name: round(idle.window(name).cpu_s / idle_s, 3) for name in groups},
                loadgen_rc=res.returncode,
                rpcs_per_write={
                    m: round((rpcs1[m] - rpcs0.get(m, 0.0)) / max(1, rec["completed"]), 2)
                    for m in sorted(rpcs1)
                    if rpcs1[m] > rpcs0.get(m, 0.0)
                },
            )
            rec["passed"] = (
                rec["completed"] == rec["offered"] and rec["failed"] == 0 and rec["write_ms"]["p99"] <= P99_TARGET_MS
            )
            recs.append(rec)
            print(describe(rec), flush=True)
    finally:
        apis.stop()
        for p in procs:
            p.stop()
    return recs


def describe(r: dict[str, Any]) -> str:
    cpu = ", ".join(f"{k} {v:g}" for k, v in r["cpu_s"].items())
    return (
        f"   {r['server']:8} {r['backend']:9} {r['offered_per_second']:>5g}/s offered: "
        f"{r['completed']}/{r['offered']} completed ({r['dropped']} dropped, {r['failed']} failed), "
        f"p50 {r['write_ms']['p50']:.1f} p99 {r['write_ms']['p99']:.1f} ms, "
        f"watch {r['watch_events']}/{r['watch_events_expected']}; CPU-s over {r['window_s']:g}s: {cpu}"
        f" -> {'pass' if r['passed'] else 'MISS'}"
    )


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run --tenants", description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default="k8s-sql,kine", help="comma-separated: k8s-sql, kine")
    p.add_argument("--backends", default="postgres,mariadb", help="comma-separated: sqlite-full, postgres, mariadb")
    p.add_argument("--tenants", type=int, default=8, help="kube-apiservers, each with its own --etcd-prefix")
    p.add_argument("--frontends", type=int, default=2, help="datastore processes on the one database")
    p.add_argument("--rates", default="40,160", help="comma-separated writes/s offered over all tenants")
    p.add_argument("--duration", type=float, default=60.0, help="seconds each rate is offered")
    p.add_argument("--settle", type=float, default=20.0, help="idle seconds after the apiservers are ready")
    p.add_argument("--watchers", type=int, default=2, help="ConfigMap watches per tenant")
    p.add_argument("--k8s-sql-workers", type=int, default=1, help="--workers of each k8s-sql frontend")
    p.add_argument("--out", help="results directory (default bench/results/<UTC timestamp>-tenants)")
    p.add_argument(
        "--report",
        help="Markdown file whose tenants section is written (default: docs/benchmarks.md for a run of the "
        "defaults, else report.md in the results directory); 'none' to skip",
    )
    args = p.parse_args(argv)
    args.rates = [float(x) for x in args.rates.split(",") if x]
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # also when started in the background: every apiserver, frontend and database is stopped
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out_dir = Path(args.out or ROOT / "bench/results" / f"{stamp}-tenants").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    kube_bin = Path(_last_line(["bash", str(ROOT / "conformance/build.sh")]))
    bench_bin = Path(_last_line(["bash", str(ROOT / "bench/build.sh")]))
    loadgen = build_loadgen(out_dir)
    dbs = Databases(None)
    launcher = Launcher(
        work=out_dir / "work" / "stores",
        dbs=dbs,
        peers_bin=None,
        kine_bin=bench_bin,
        server_cores=None,
        log_dir=out_dir / "logs",
        k8s_sql_workers=args.k8s_sql_workers,
    )
    (out_dir / "logs").mkdir(exist_ok=True)
    recs: list[dict[str, Any]] = []
    failures = 0
    try:
        for backend in args.backends.split(","):
            for server in args.servers.split(","):
                try:
                    recs += run_one(launcher, dbs, kube_bin, loadgen, server, backend, args, out_dir)
                except Exception as e:  # one pair failing does not stop the others
                    failures += 1
                    print(f"   {server} on {backend}: FAILED: {e}", file=sys.stderr, flush=True)
                (out_dir / "tenants.json").write_text(json.dumps(recs, indent=1) + "\n")
    finally:
        dbs.stop()
        shutil.rmtree(out_dir / "work", ignore_errors=True)  # stores, certificates; logs/ stay
    print(f"results: {out_dir / 'tenants.json'}", flush=True)
    report = args.report
    if report is None:  # docs/benchmarks.md's section from a run of the defaults only
        defaults = parse([])
        same = all(getattr(args, k) == getattr(defaults, k) for k in vars(defaults) if k not in ("out", "report"))
        report = str(ROOT / "docs/benchmarks.md") if same else str(out_dir / "report.md")
    if report != "none" and recs:
        from report import render_tenants  # bench/report.py (bench/ is on sys.path)

        render_tenants([out_dir / "tenants.json"], Path(report))
        print(f"report: {report}", flush=True)
    return 1 if failures else 0
