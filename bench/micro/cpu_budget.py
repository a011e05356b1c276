"""Server CPU per request, by operation and backend, split by layer from a profile.

One k8s-sql frontend (its default configuration) is pinned to CPU 0 and the client to
CPU 1. For each operation the server's CPU seconds (utime + stime from /proc, the
frontend process only: the database's own CPU is not in it) are read before and after
a run of the operation, and divided by the operations completed:

| operation | client |
|---|---|
| Put (1 KiB) | etcd `benchmark put`, 16 clients |
| Txn create + update (W1) | the project's `bench-driver w1`, 16 clients: creates, then updates |
| Range, one key | `benchmark range KEY`, linearizable, 16 clients |
| Range, page of 500 | `benchmark range PREFIX --limit 500` over 5,000 keys |
| watch event delivered | `benchmark watch-latency`: puts seen by 100 watchers; the puts' own cost is taken off |
| lease keepalive | `benchmark lease-keepalive`, 16 clients |

With ``--profile``, py-spy samples the frontend's Python frames during each run
(``--nonblocking``: the process is not paused) and every sample is put in one layer by
the innermost frame it recognises: SQL (the drivers: asyncpg, asyncmy, sqlite3,
k8s_sql.backend), protobuf (google.protobuf's Python code), store (k8s_sql.store),
watch (k8s_sql.watch), api (k8s_sql.api), transport (grpc.aio, the event loop,
everything else). Native code is charged to the Python frame that called it: upb's
decoding to grpc's deserializer (transport), a response's SerializeToString to the
layer that calls it. py-spy's ``--native`` would split those out, but it must pause
the process for each sample, which cut throughput tenfold here. Run it from the repository root:

    python3 bench/micro/cpu_budget.py [--backends sqlite,postgres,mariadb] [--ops 4000] [--profile]
        [--json OUT.json] [--bench-bin DIR]

``bench/run`` runs it as its ``cpu`` workload (``--json``) and renders the table into
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # testing/

TICKS = os.sysconf("SC_CLK_TCK")
LAYERS = ("transport", "protobuf", "api", "watch", "store", "SQL")
# innermost recognised frame -> layer (checked from the leaf outwards)
PATTERNS = [
    (re.compile(r"asyncpg|asyncmy|sqlite3|libsqlite|k8s_sql/backend/"), "SQL"),
    (re.compile(r"google/protobuf|_pb2\.py|upb|_message\.cpython"), "protobuf"),
    (re.compile(r"k8s_sql/store/"), "store"),
    (re.compile(r"k8s_sql/watch/"), "watch"),
    (re.compile(r"k8s_sql/api/"), "api"),
]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a database server: its process, its live descendants (PostgreSQL's
    backends) and the children it has reaped (cutime + cstime)."""
    total, todo, root = 0.0, [pid], True
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if root else 0)) / TICKS
            root = False
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def counters(endpoint: str) -> tuple[float, float, float]:
    """From the frontend's /metrics: the SQL statements it has run (its
    k8s_sql_sql_statement_duration_seconds counts: the plans' statements, a pipeline
    one; BEGIN and COMMIT are not among them), its write batches and the requests
    they held (k8s_sql_write_batch_requests' count and sum)."""
    import urllib.request

    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10) as r:
        text = r.read().decode()
    sql = batches = requests = 0.0
    for line in text.splitlines():
        if line.startswith("k8s_sql_sql_statement_duration_seconds_count{"):
            sql += float(line.rsplit(" ", 1)[1])
        elif line.startswith("k8s_sql_write_batch_requests_count"):
            batches += float(line.rsplit(" ", 1)[1])
        elif line.startswith("k8s_sql_write_batch_requests_sum"):
            requests += float(line.rsplit(" ", 1)[1])
    return sql, batches, requests


def _bins() -> Path:
    out = subprocess.run(["bash", str(ROOT / "bench/build.sh")], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def _layer(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for pattern, layer in PATTERNS:
            if pattern.search(frame):
                return layer
    return "transport"


class Profile:
    """py-spy record of one process for one run, in collapsed stacks."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            ["py-spy", "record", "--pid", str(pid), "--format", "raw", "--rate", "200", "--output", str(out),
             "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.5)

    def stop(self) -> dict[str, float]:
        self.proc.send_signal(2)
        self.proc.wait(30)
        counts: collections.Counter[str] = collections.Counter()
        if self.out.exists():
            for line in self.out.read_text().splitlines():
                stack, _, n = line.rpartition(" ")
                if n.isdigit() and "(idle)" not in stack and "select" not in stack.rsplit(";", 1)[-1]:
                    counts[_layer(stack)] += int(n)
        total = sum(counts.values()) or 1
        return {layer: counts[layer] / total for layer in LAYERS}


def _load_pages(endpoint: str, keys: int) -> None:
    """``keys`` keys of 1 KiB under /page/, for the paged Range."""
    import grpc

    from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc

    with grpc.insecure_channel(endpoint) as ch:
        kv = rpc_pb2_grpc.KVStub(ch)
        futures = [kv.Put.future(pb.PutRequest(key=b"/page/%06d" % i, value=b"v" * 1024)) for i in range(keys)]
        for f in futures:
            f.result(timeout=120)


def _run(argv: list[str]) -> str:
    res = subprocess.run(["taskset", "-c", "1", *argv], capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {res.stderr[-2000:]}")
    return res.stdout + res.stderr


def measure(  # type: ignore[type-arg]
    backend: str, dsn_args: list[str], bins: Path, ops: int, profile: bool, work: Path, db_pid: int | None
) -> list[tuple]:
    from testing.servers import ServerProcess, free_port, k8s_sql_argv

    port = free_port()
    d = work / f"fe-{backend}"
    argv = ["taskset", "-c", "0", *k8s_sql_argv(port, d, *dsn_args)]
    fe = ServerProcess(f"127.0.0.1:{port}", d, argv, work / f"fe-{backend}.log")
    fe.start()
    ep = fe.endpoint
    bench = str(bins / "benchmark")
    common = [f"--endpoints={ep}", "--conns=4", "--clients=16"]
    rows = []
    try:
        _run([str(bins / "etcdctl"), f"--endpoints={ep}", "put", "/one", "x" * 1024])
        _load_pages(ep, 5000)

        def timed(name: str, count: int, cmd: list[str]) -> tuple:  # type: ignore[type-arg]
            prof = Profile(fe.pid, work / f"{backend}-{name}.txt") if profile else None
            (s0, b0, r0), d0 = counters(ep), tree_cpu_seconds(db_pid) if db_pid else 0.0
            c0, t0 = cpu_seconds(fe.pid), time.monotonic()
            _run(cmd)
            c1, t1 = cpu_seconds(fe.pid), time.monotonic()
            (s1, b1, r1), d1 = counters(ep), tree_cpu_seconds(db_pid) if db_pid else 0.0
            layers = prof.stop() if prof else {}
            layers["statements"] = (s1 - s0) / count
            # write batches: requests per batch, and the plans' statements per batch
            layers["per_batch"] = (r1 - r0) / (b1 - b0) if b1 - b0 >= count / 100 else float("nan")
            layers["sql_per_batch"] = (s1 - s0) / (b1 - b0) if b1 - b0 >= count / 100 else float("nan")
            layers["db_us"] = (d1 - d0) / count * 1e6 if db_pid else float("nan")
            return name, (c1 - c0) / count * 1e6, count / (t1 - t0), layers

        put = timed("Put", ops, [bench, *common, "put", "--key-size=32", "--val-size=1024", f"--total={ops}"])
        rows.append(put)
        rows.append(
            timed(
                "Txn create+update (W1)",
                2 * ops,
                [str(bins / "bench-driver"), "w1", "--endpoints", ep, "--clients", "16", "--total", str(ops)],
            )
        )
        rows.append(timed("Range, one key", ops, [bench, *common, "range", "/one", f"--total={ops}"]))
        pages = max(50, ops // 20)
        rows.append(
            timed(
                "Range, page of 500",
                pages,
                [bench, *common, "range", "/page/", "/page0", "--limit=500", f"--total={pages}"],
            )
        )
        events = ops // 2
        _name, us, _rate, layers = timed(
            "watch: 100 watchers",
            events,
            [bench, f"--endpoints={ep}", "watch-latency", "--streams=10", "--watchers-per-stream=10",
             f"--put-total={events}", "--put-rate=2000", "--val-size=1024"],
        )  # fmt: skip
        per_event = (us - put[1]) / 100  # the put's own cost taken off, over the 100 deliveries
        layers["statements"] = layers["db_us"] = float("nan")  # (the puts' own, mostly)
        layers["per_batch"] = layers["sql_per_batch"] = float("nan")
        rows.append(("watch event delivered", per_event, float("nan"), layers))
        rows.append(timed("lease keepalive", ops, [bench, *common, "lease-keepalive", f"--total={ops}"]))
    finally:
        fe.stop()
    return [(backend, *r) for r in rows]


def _num(x: float) -> float | None:
    """JSON has no NaN: a measure that does not apply is null."""
    return None if x != x else round(x, 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="sqlite,postgres,mariadb")
    p.add_argument("--ops", type=int, default=4000)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--json", help="also write the rows to this file (bench/run's cpu workload)")
    p.add_argument("--bench-bin", help="directory with bench-driver and etcd's benchmark (default: bench/build.sh)")
    args = p.parse_args()
    if args.profile and shutil.which("py-spy") is None:
        sys.exit("--profile needs py-spy on PATH")
    from testing.databases import MariaDBServer, PostgresServer
    from testing.servers import free_port

    bins = Path(args.bench_bin) if args.bench_bin else _bins()
    out: list[dict[str, object]] = []
    header = "| backend | operation | µs server CPU / op | ops/s | SQL statements / op | µs database CPU / op |"
    if args.profile:
        header += "".join(f" {layer} |" for layer in LAYERS)
    print(header)
    print("|---|---|---:|---:|---:|---:|" + ("---:|" * len(LAYERS) if args.profile else ""))
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        for backend in args.backends.split(","):
            server = None
            dsn_args: list[str] = []
            if backend != "sqlite":
                server = {"postgres": PostgresServer, "mariadb": MariaDBServer}[backend](free_port())
                server.start()
                dsn_args = ["--endpoint", server.new_dsn()]
            try:
                db_pid = server.proc.pid if server is not None and server.proc is not None else None
                for row in measure(backend, dsn_args, bins, args.ops, args.profile, work, db_pid):
                    b, name, us, rate, layers = row
                    st, db = layers["statements"], layers["db_us"]
                    line = (
                        f"| {b} | {name} | {us:,.0f} | {'-' if rate != rate else f'{rate:,.0f}'} | "
                        f"{'-' if st != st else f'{st:.2f}'} | {'-' if db != db else f'{db:,.0f}'} |"
                    )
                    if args.profile:
                        line += "".join(f" {layers.get(layer, 0) * 100:.0f}% |" for layer in LAYERS)
                    print(line, flush=True)
                    out.append(
                        {
                            "backend": b,
                            "operation": name,
                            "server_us": _num(us),
                            "ops_per_s": _num(rate),
                            "statements": _num(st),
                            "db_us": _num(db),
                            "requests_per_batch": _num(layers.get("per_batch", float("nan"))),
                            "statements_per_batch": _num(layers.get("sql_per_batch", float("nan"))),
                            "layers": {layer: layers[layer] for layer in LAYERS if layer in layers},
                        }
                    )
                    if args.json:
                        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
            finally:
                if server is not None:
                    server.stop()


if __name__ == "__main__":
    main()
