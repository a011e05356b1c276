"""W1 when the database is a network hop away, as a managed database (RDS, Cloud SQL) is:
k8s-sql and kine on PostgreSQL and MariaDB reached through a proxy that holds every
chunk of bytes for a fixed one-way delay in each direction.

bench/run puts the database on the same core as the server under test, where a round
trip costs CPU but no waiting; here each round trip also costs the round-trip time,
which is what a write batch's round-trip count (docs/architecture.md) decides.

- The proxy is Python threads on the driver's core (CPU 1): a reader timestamps each
  chunk, a writer sends it once the delay has passed (``time.sleep``'s hrtimers: tens
  of µs late at most). It adds its own small per-chunk cost on top of the delay.
- The servers and the databases run on CPU 0, as in bench/run; the databases are
  durable (``fsync=on``, ``innodb_flush_log_at_trx_commit=1``).
- ``--k8s-sql-src DIR`` runs the k8s-sql of another checkout (its ``src``), to compare
  two commits on the same databases and proxy.

Run it from the repository root:

    python3 bench/micro/db_distance.py [--delay-us 250] [--clients 1,16] [--total 2000]

bench/limits.md quotes its output.
"""

from __future__ import annotations

import argparse
import json
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # testing/


class DelayProxy:
    """127.0.0.1:``port`` forwarded to 127.0.0.1:``upstream``, every chunk held ``delay`` s."""

    def __init__(self, upstream: int, delay: float) -> None:
        self.upstream, self.delay = upstream, delay
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.sock.accept()
            server = socket.create_connection(("127.0.0.1", self.upstream))
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        held: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

        def send() -> None:
            while True:
                due, data = held.get()
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                try:
                    if not data:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    dst.sendall(data)
                except OSError:
                    return

        threading.Thread(target=send, daemon=True).start()
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                data = b""
            held.put((time.perf_counter() + self.delay, data))
            if not data:
                return


def proxy_round_trip(delay: float, n: int = 200) -> float:
    """The median round trip (s) of one byte through a DelayProxy to an echo server:
    the delay as the proxy really adds it, its own cost included."""
    echo = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = echo.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := conn.recv(1 << 16):
            conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    proxy = DelayProxy(echo.getsockname()[1], delay)
    c = socket.create_connection(("127.0.0.1", proxy.port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        c.sendall(b"x")
        c.recv(1)
        times.append(time.perf_counter() - t)
    c.close()
    return sorted(times)[n // 2]


def _bin() -> Path:
    out = subprocess.run(["bash", str(ROOT / "bench/build.sh")], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def _start(argv: list[str], d: Path, port: int, env: dict[str, str], probe: str):  # type: ignore[no-untyped-def]
    from testing.servers import ServerProcess

    srv = ServerProcess(f"127.0.0.1:{port}", d, argv, d.parent / f"{d.name}.log", env=env, probe=probe)
    srv.start()
    _pin(srv.pid)
    return srv


def _pin(pid: int) -> None:
    subprocess.run(["taskset", "-a", "-p", "-c", "0", str(pid)], check=True, capture_output=True)


def _w1(bins: Path, endpoint: str, clients: int, total: int) -> dict[str, dict[str, float]]:
    out = subprocess.run(
        ["taskset", "-c", "1", str(bins / "bench-driver"), "w1", "--endpoints", endpoint,
         "--clients", str(clients), "--total", str(total)],
        capture_output=True, text=True, check=True, timeout=900,
    )  # fmt: skip
    return {r["workload"]: r for r in json.loads(out.stdout)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delay-us", type=int, default=250, help="one-way delay; the round trip is twice this")
    ap.add_argument("--clients", default="1,16")
    ap.add_argument("--total", type=int, default=2000, help="txns per phase (creates, then updates)")
    ap.add_argument("--only", default="postgres,mariadb")
    ap.add_argument("--k8s-sql-src", type=Path, help="run this checkout's k8s-sql instead of this one's")
    args = ap.parse_args()

    from testing.databases import MariaDBServer, PostgresServer
    from testing.servers import free_port, k8s_sql_argv

    bins = _bin()
    clients = [int(c) for c in args.clients.split(",")]
    work = Path(tempfile.mkdtemp(prefix="k8s-sql-db-distance-"))
    rtt = proxy_round_trip(args.delay_us / 1e6)
    print(
        f"one-way delay {args.delay_us} µs: a round trip through the proxy takes {rtt * 1e6:.0f} µs (median); "
        f"{args.total} txns per phase\n"
    )
    print("| database | server | clients | create txn/s | p50 ms | update txn/s | p50 ms | errors |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for backend in args.only.split(","):
        db: PostgresServer | MariaDBServer
        if backend == "postgres":
            db = PostgresServer(free_port(), settings={"fsync": "on", "synchronous_commit": "on"})
        else:
            db = MariaDBServer(free_port(), extra_args=["--innodb-flush-log-at-trx-commit=1"])
        db.start()
        assert db.proc is not None
        _pin(db.proc.pid)
        proxy = DelayProxy(db.port, args.delay_us / 1e6)
        try:
            for server in ("k8s-sql", "kine"):
                dsn = db.new_dsn().replace(f"127.0.0.1:{db.port}", f"127.0.0.1:{proxy.port}")
                port = free_port()
                d = work / f"{backend}-{server}"
                d.mkdir()
                if server == "k8s-sql":
                    argv = k8s_sql_argv(port, d, "--endpoint", dsn)
                    env = {}
                    if args.k8s_sql_src is not None:
                        env = {"PYTHONPATH": str(args.k8s_sql_src.resolve() / "src")}
                else:
                    kine_dsn = dsn + ("?sslmode=disable" if backend == "postgres" else "")
                    argv = [str(bins / "kine"), "--listen-address", f"127.0.0.1:{port}", "--endpoint", kine_dsn]
                    env = {}
                srv = _start(argv, d, port, env, "status" if server == "k8s-sql" else "range")
                try:
                    for n in clients:
                        r = _w1(bins, srv.endpoint, n, args.total)
                        c, u = r["w1-create"], r["w1-update"]
                        cells = [backend, server, str(n)]
                        for phase in (c, u):
                            cells += [f"{phase['throughput']:,.0f}", f"{phase['latency_ms']['p50']:.2f}"]
                        print("| " + " | ".join([*cells, f"{c['errors'] + u['errors']:.0f}"]) + " |", flush=True)
                finally:
                    srv.stop()
        finally:
            db.stop()


if __name__ == "__main__":
    main()
