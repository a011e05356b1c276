"""Throughput and latency of k8s-sql on the clustered topologies of docs/high-availability.md,
next to the single server they replace, with the project's Go W1 driver (Kubernetes-shaped
create and update txns, 1 KiB values) and etcd's ``benchmark`` for serializable reads.

- ``galera``: one frontend on a single MariaDB; one frontend on one Galera node; three
  frontends, one per node of a 3-node Galera cluster (galera-4), the driver's connections
  spread over them; three frontends all writing through the first node (the same DSN
  order: Galera's single-writer advice).
- ``replica``: serializable single-key Ranges through one frontend on PostgreSQL, without
  and with ``--read-endpoint`` naming a streaming hot standby.

Everything runs on this machine (throwaway servers from testing/databases.py), so the
frontends, the database nodes and the driver share its cores: the numbers compare
topologies on equal hardware, not what separate hosts would give. Run it from the
repository root:

    python3 bench/micro/ha_topologies.py [--total 4000] [--clients 16,64] [--only galera,replica]

docs/benchmarks.md quotes its output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # testing/


def _bin() -> Path:
    out = subprocess.run(["bash", str(ROOT / "bench/build.sh")], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def _frontend(d: Path, *args: str):  # type: ignore[no-untyped-def]
    from testing.servers import ServerProcess, free_port, k8s_sql_argv

    port = free_port()
    fe = ServerProcess(f"127.0.0.1:{port}", d, k8s_sql_argv(port, d, *args), d.parent / f"{d.name}.log")
    fe.start()
    return fe


def _w1(bins: Path, endpoints: list[str], clients: int, total: int) -> dict[str, dict[str, float]]:
    out = subprocess.run(
        [
            str(bins / "bench-driver"), "w1", "--endpoints", ",".join(endpoints),
            "--clients", str(clients), "--total", str(total),
        ],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    return {r["workload"]: r for r in json.loads(out.stdout)}


def _row(topology: str, clients: int, results: dict[str, dict[str, float]]) -> str:
    c = results["w1-create"]
    u = results["w1-update"]
    cl, ul = c["latency_ms"], u["latency_ms"]
    for r in (c, u):
        if r.get("first_error"):
            print(f"<!-- {topology}, {clients} clients, {r['workload']}: {r['first_error']} -->", flush=True)
    return (
        f"| {topology} | {clients} | {c['throughput']:,.0f} | {cl['p50']:.1f} | {cl['p99']:.1f} "
        f"| {u['throughput']:,.0f} | {ul['p50']:.1f} | {ul['p99']:.1f} | {c['errors'] + u['errors']:.0f} |"
    )


def galera(bins: Path, clients: list[int], total: int, work: Path) -> None:
    from testing.databases import GaleraCluster, MariaDBServer
    from testing.servers import free_port

    print("| topology | clients | create txn/s | p50 ms | p99 ms | update txn/s | p50 ms | p99 ms | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    single = MariaDBServer(free_port())
    single.start()
    try:
        fe = _frontend(work / "single", "--endpoint", single.new_dsn())
        for c in clients:
            print(_row("single MariaDB, 1 frontend", c, _w1(bins, [fe.endpoint], c, total)), flush=True)
        fe.stop()
    finally:
        single.stop()
    cluster = GaleraCluster(3)
    cluster.start()
    try:
        db = cluster.new_database()
        one = _frontend(work / "galera-one", "--endpoint", cluster.dsn(db, cluster.nodes[0]))
        for c in clients:
            print(_row("Galera, 1 frontend on 1 node", c, _w1(bins, [one.endpoint], c, total)), flush=True)
        one.stop()
        db = cluster.new_database()
        nodes = cluster.nodes
        fes = [
            _frontend(work / f"galera-{i}", "--endpoint", cluster.dsn(db, *nodes[i:], *nodes[:i]))
            for i in range(len(nodes))
        ]
        for c in clients:
            print(_row("Galera, 3 frontends on 3 nodes", c, _w1(bins, [f.endpoint for f in fes], c, total)), flush=True)
        for f in fes:
            f.stop()
        db = cluster.new_database()  # every frontend lists the nodes in the same order: one writer node
        fes = [_frontend(work / f"galera-same-{i}", "--endpoint", cluster.dsn(db)) for i in range(len(nodes))]
        for c in clients:
            print(
                _row(
                    "Galera, 3 frontends, all on node 1 (same DSN order)",
                    c,
                    _w1(bins, [f.endpoint for f in fes], c, total),
                ),
                flush=True,
            )
        for f in fes:
            f.stop()
    finally:
        cluster.stop()


def replica(bins: Path, clients: list[int], total: int, work: Path) -> None:
    from testing.databases import PostgresServer
    from testing.servers import free_port

    primary = PostgresServer(free_port())
    primary.start()
    standby = None
    try:
        database = "bench_replica"
        primary.psql(f"CREATE DATABASE {database}")
        standby = primary.standby(free_port())
        standby.start()
        dsn = f"postgres://postgres@127.0.0.1:{primary.port}/{database}"
        read = f"postgres://postgres@127.0.0.1:{standby.port}/{database}"
        print("| topology | clients | serializable gets/s | p50 ms | p99 ms |")
        print("|---|---:|---:|---:|---:|")
        for name, extra in (("primary only", []), ("--read-endpoint hot standby", ["--read-endpoint", read])):
            fe = _frontend(work / name.split()[0].strip("-"), "--endpoint", dsn, *extra)
            subprocess.run(
                [str(bins / "etcdctl"), f"--endpoints={fe.endpoint}", "put", "/bench/key", "x" * 1024],
                check=True, capture_output=True,
            )  # fmt: skip
            time.sleep(1)  # the standby replays the put
            for c in clients:
                out = subprocess.run(
                    [
                        str(bins / "benchmark"), f"--endpoints={fe.endpoint}", f"--conns={min(c, 8)}",
                        f"--clients={c}", "range", "/bench/key", "--consistency=s", f"--total={total}",
                    ],
                    capture_output=True, text=True, check=True, timeout=600,
                )  # fmt: skip
                text = out.stdout
                rps = float(text.split("Requests/sec:")[1].split()[0])
                p50 = float(text.split("50% in ")[1].split()[0]) * 1000
                p99 = float(text.split("99% in ")[1].split()[0]) * 1000
                print(f"| {name} | {c} | {rps:,.0f} | {p50:.2f} | {p99:.2f} |", flush=True)
            fe.stop()
    finally:
        if standby is not None:
            standby.stop()
        primary.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--total", type=int, default=4000)
    p.add_argument("--clients", default="16,64")
    p.add_argument("--only", default="galera,replica")
    args = p.parse_args()
    bins = _bin()
    clients = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        os.chmod(work, 0o755)
        if "galera" in args.only:
            galera(bins, clients, args.total, work)
        if "replica" in args.only:
            replica(bins, clients, args.total * 5, work)


if __name__ == "__main__":
    main()
