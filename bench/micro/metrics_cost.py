"""Server CPU per write txn with and without what observability adds.

Runs the project's Go W1 driver (creates then updates, Kubernetes-shaped txns)
against one k8s-sql frontend on SQLite and reads the server's CPU seconds from
/proc over the txns completed. The server is pinned to CPU 0 and the driver to
CPU 1 (on a machine with two cores, each gets one). Variants:

- ``base``: a checkout without metrics (``--base-src``, e.g. a ``git worktree`` of the
  commit before them), gRPC directly on the client port;
- ``metrics``: this tree with ``--no-client-url-http`` (gRPC directly on the port):
  the cost of counting and timing every request;
- ``mux``: this tree with the default plain-HTTP client URL, where gRPC is relayed
  through the event loop so that /metrics answers on the same port (mux.py).

    git worktree add /tmp/k8s-sql-base <commit before metrics>
    python3 bench/micro/metrics_cost.py --base-src /tmp/k8s-sql-base/src [--txns 6000] [--rounds 3]

Prints µs of server CPU per txn for each variant and round (the median is what
docs/monitoring.md quotes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # testing/

from testing.servers import free_port, wait_for_grpc  # noqa: E402

DRIVER = Path.home() / ".cache/k8s-sql/bench/v0.17.5/bench-driver"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def run(variant: str, src: Path, extra: list[str], txns: int, clients: int) -> float:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(src)}
        argv = [
            "taskset",
            "-c",
            "0",
            sys.executable,
            "-m",
            "k8s_sql",
            "--data-dir",
            tmp,
            "--listen-client-urls",
            f"http://127.0.0.1:{port}",
            "--log-level",
            "warn",
            "--sqlite-synchronous",
            "normal",
            *extra,
        ]
        proc = subprocess.Popen(argv, env=env)
        try:
            wait_for_grpc(f"127.0.0.1:{port}", timeout=30)
            before = cpu_seconds(proc.pid)
            out = subprocess.run(
                [
                    "taskset",
                    "-c",
                    "1",
                    str(DRIVER),
                    "w1",
                    "--endpoints",
                    f"127.0.0.1:{port}",
                    "--clients",
                    str(clients),
                    "--total",
                    str(txns // 2),
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            used = cpu_seconds(proc.pid) - before
            results = json.loads(out)
            done = sum(r.get("ops", 0) - r.get("errors", 0) for r in results)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    per_txn = used / done * 1e6
    print(f"{variant:8s} {done} txns, {used:.2f} s CPU: {per_txn:.0f} us/txn", flush=True)
    return per_txn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-src", type=Path, help="src/ of a checkout without metrics (omit to skip 'base')")
    ap.add_argument("--txns", type=int, default=6000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    variants = [("metrics", ROOT / "src", ["--no-client-url-http"]), ("mux", ROOT / "src", [])]
    if args.base_src:
        variants.insert(0, ("base", args.base_src, []))
    table: dict[str, list[float]] = {v: [] for v, _, _ in variants}
    for _ in range(args.rounds):  # interleaved, so drift in the machine hits every variant alike
        for name, src, extra in variants:
            table[name].append(run(name, src, extra, args.txns, args.clients))
    print("\nmedian us of server CPU per txn:")
    for name, values in table.items():
        print(f"  {name:8s} {statistics.median(values):6.0f}  ({', '.join(f'{v:.0f}' for v in values)})")


if __name__ == "__main__":
    start = time.monotonic()
    main()
    print(f"({time.monotonic() - start:.0f} s)")
