"""How fast ``k8s-sql migrate`` moves an etcd snapshot into each backend.

Builds an etcd snapshot of ``--keys`` keys with 1 KiB values (written by k8s-sql's own
exporter, the format ``etcdutl`` reads: see tests/test_migrate.py), then times
``k8s-sql migrate SNAPSHOT DSN`` into a fresh SQLite file, PostgreSQL and MariaDB
database (throwaway servers from testing/databases.py), and prints keys per second.
Run it from the repository root:

    python3 bench/micro/migrate_speed.py [--keys 100000] [--backends sqlite,postgres,mariadb]

docs/migration.md quotes its output.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # testing/

from k8s_sql.backend import migrations, sql
from k8s_sql.backend.snapshot import _create
from k8s_sql.formats import etcd_snapshot


def make_snapshot(keys: int, path: str, workdir: str) -> None:
    store = os.path.join(workdir, "store.db")
    out = _create(store)
    rng = random.Random(1)
    value = rng.randbytes(1024)
    rows = [(b"/registry/bench/%08d" % i, i + 2, i + 2, 1, 0, value) for i in range(keys)]
    out.executemany(f"INSERT INTO kv ({sql.KV_COLUMNS}) VALUES ({sql.marks(6)})", rows)
    for name, v in (
        ("revision", keys + 1),
        ("compact_revision", keys + 1),
        ("schema_version", migrations.SCHEMA_VERSION),
    ):
        out.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, v))
    out.commit()
    out.close()
    etcd_snapshot.export(store, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=100_000)
    p.add_argument("--backends", default="sqlite,postgres,mariadb")
    args = p.parse_args()
    from testing.databases import MariaDBServer, PostgresServer
    from testing.servers import free_port

    with tempfile.TemporaryDirectory() as d:
        snap = os.path.join(d, "etcd.snapshot")
        t0 = time.monotonic()
        make_snapshot(args.keys, snap, d)
        size = os.path.getsize(snap)
        print(f"etcd snapshot: {args.keys} keys, {size / 1e6:.0f} MB, written in {time.monotonic() - t0:.1f} s")
        for name in args.backends.split(","):
            server = None
            if name == "sqlite":
                dsn = f"sqlite://{d}/{name}/state.db"
            else:
                server = PostgresServer(free_port()) if name == "postgres" else MariaDBServer(free_port())
                server.start()
                dsn = server.new_dsn()
            try:
                t0 = time.monotonic()
                out = subprocess.run(
                    [sys.executable, "-m", "k8s_sql", "migrate", snap, dsn], capture_output=True, text=True
                )
                took = time.monotonic() - t0
                assert out.returncode == 0, out.stderr
                print(f"{name:9} {args.keys} keys in {took:6.1f} s: {args.keys / took:8.0f} keys/s", flush=True)
            finally:
                if server is not None:
                    server.stop()


if __name__ == "__main__":
    main()
