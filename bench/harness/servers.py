"""Lifecycle of the servers under test (etcd, kine, k8s-sql) and of the database servers
they use, each started fresh on free loopback ports."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # testing/: the processes and database servers the tests start too
from testing.databases import MariaDBServer, PostgresServer, find_binary  # noqa: E402
from testing.servers import ServerProcess, etcd_argv, free_port, k8s_sql_argv  # noqa: E402

SERVERS = ("etcd", "kine", "k8s-sql")
BACKENDS = ("sqlite-full", "sqlite-normal", "postgres", "mariadb")
ETCD_BACKEND = "bbolt"  # etcd's own storage: it runs once, not per SQL backend

# kine v0.17.5's SQLite DSN parameters (sqlite.DefaultParams, used when it is given no
# --endpoint), with synchronous=FULL instead of its NORMAL for the durable comparison.
KINE_SQLITE_PARAMS_FULL = (
    "_journal_mode=WAL&_busy_timeout=30000&_synchronous=FULL&_txlock=immediate&_stmt_cache_size=20&cache=shared"
)

# What each server/backend pair promises about an acknowledged write (shown in the report).
DURABILITY = {
    ("etcd", ETCD_BACKEND): "etcd defaults: WAL fsync on every commit (`--unsafe-no-fsync` not set)",
    ("k8s-sql", "sqlite-full"): "SQLite WAL, `synchronous=FULL` (k8s-sql's default): every acknowledged write durable",
    ("kine", "sqlite-full"): "kine's default SQLite DSN parameters with `_synchronous=FULL` instead of NORMAL "
    "(WAL): every acknowledged write durable",
    ("k8s-sql", "sqlite-normal"): "SQLite WAL, `--sqlite-synchronous normal`: last writes can be lost on power loss",
    ("kine", "sqlite-normal"): "no `--endpoint`: kine's default SQLite (`./db/state.db`, WAL, "
    "`synchronous=NORMAL`): last writes can be lost on power loss",
    ("k8s-sql", "postgres"): "PostgreSQL `fsync=on`, `synchronous_commit=on`: every acknowledged write durable",
    ("kine", "postgres"): "PostgreSQL `fsync=on`, `synchronous_commit=on`: every acknowledged write durable",
    ("k8s-sql", "mariadb"): "MariaDB InnoDB `innodb_flush_log_at_trx_commit=1`: every acknowledged write durable",
    ("kine", "mariadb"): "MariaDB InnoDB `innodb_flush_log_at_trx_commit=1`: every acknowledged write durable",
}


class Databases:
    """The run's database servers: one durable PostgreSQL and one durable MariaDB, started
    on first use; each server under test gets its own database on them."""

    def __init__(self, pin_cores: set[int] | None) -> None:
        self.pin_cores = pin_cores
        self.pg: PostgresServer | None = None
        self.maria: MariaDBServer | None = None
        self._n = 0

    def postgres(self) -> PostgresServer:
        if self.pg is None:
            reason = PostgresServer.available()
            if reason:
                raise RuntimeError(reason)
            self.pg = PostgresServer(free_port(), settings={"fsync": "on", "synchronous_commit": "on"})
            self.pg.start()
            self._pin(self.pg.proc)
        return self.pg

    def mariadb(self) -> MariaDBServer:
        if self.maria is None:
            reason = MariaDBServer.available()
            if reason:
                raise RuntimeError(reason)
            self.maria = MariaDBServer(free_port(), extra_args=["--innodb-flush-log-at-trx-commit=1"])
            self.maria.start()
            self._pin(self.maria.proc)
        return self.maria

    def _pin(self, proc: subprocess.Popen[bytes] | None) -> None:
        if self.pin_cores and proc is not None:
            from .procs import pin

            pin(proc.pid, self.pin_cores)

    def db_pid(self, backend: str) -> int | None:
        """The root process of the database server behind ``backend`` (None for SQLite/etcd)."""
        srv = {"postgres": self.pg, "mariadb": self.maria}.get(backend)
        return srv.proc.pid if srv is not None and srv.proc is not None else None

    def new_database(self, backend: str) -> tuple[str, str]:
        """A fresh database name and its host:port on ``backend``'s server."""
        self._n += 1
        name = f"bench_{os.getpid()}_{self._n}"
        if backend == "postgres":
            return name, f"127.0.0.1:{self.postgres().port}"
        return name, f"127.0.0.1:{self.mariadb().port}"

    def versions(self) -> dict[str, str]:
        out: dict[str, str] = {}
        pg = find_binary("postgres")
        if pg:
            out["postgres"] = _run([pg, "--version"])
        maria = MariaDBServer.server_binary()
        if maria:
            out["mariadb"] = _run([maria, "--version"])
        return out

    def stop(self) -> None:
        for srv in (self.pg, self.maria):
            if srv is not None:
                srv.stop()


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


@dataclass
class Launcher:
    """Builds the command lines of the servers under test."""

    work: Path  # scratch directory of this run
    dbs: Databases
    peers_bin: Path | None
    kine_bin: Path | None
    server_cores: str | None  # "0" to wrap servers in `taskset -c 0`
    log_dir: Path
    k8s_sql_workers: int = 1  # --workers of each k8s-sql frontend (the two-core layout: 2)
    _n: int = 0

    def _taskset(self, cores: str | None) -> list[str]:
        return ["taskset", "-c", cores] if cores else []

    def launch(self, server: str, backend: str, frontends: int = 1, spread: bool = False) -> list[ServerProcess]:
        """Start ``frontends`` processes of ``server`` sharing one fresh store on ``backend``.
        Pinned runs put every server on ``server_cores``; with ``spread``, frontend i goes
        on core i instead (the first shares its core with the database, the second with
        the driver): several frontends exist to use several cores."""
        self._n += 1
        tag = f"{self._n:02d}-{server}-{backend}"
        store = self.work / tag
        store.mkdir(parents=True)
        shared: str | None = None
        if backend in ("postgres", "mariadb"):
            db, hostport = self.dbs.new_database(backend)
            shared = (
                f"postgres://postgres@{hostport}/{db}"
                if backend == "postgres"
                else f"mysql://root@tcp({hostport})/{db}"
            )
        procs: list[ServerProcess] = []
        try:
            for i in range(frontends):
                port = free_port()
                cores = self.server_cores
                if cores and spread:
                    cores = str(i % (os.cpu_count() or 1))
                argv = [*self._taskset(cores), *self._argv(server, backend, port, store, i, shared)]
                p = ServerProcess(
                    f"127.0.0.1:{port}",
                    store / f"fe{i}",
                    argv,
                    self.log_dir / f"{tag}-{i}.log",
                    name=f"{tag}-{i}",
                    cwd=store / f"fe{i}",
                    probe="range",  # kine has no Maintenance.Status
                    stop_timeout=15,
                    group=True,  # stop() signals its process group: the server and all it started
                )
                procs.append(p)
                p.start(timeout=60)
        except Exception:
            for p in procs:
                p.stop()
            raise
        return procs

    def _argv(self, server: str, backend: str, port: int, store: Path, i: int, shared: str | None) -> list[str]:
        if server == "etcd":
            assert self.peers_bin is not None
            return etcd_argv(self.peers_bin, port, free_port(), store / "etcd", name="bench")
        if server == "k8s-sql":
            argv = k8s_sql_argv(port, store / f"fe{i}", "--name", f"fe{i}")
            if self.k8s_sql_workers > 1:
                argv += ["--workers", str(self.k8s_sql_workers)]
            if backend.startswith("sqlite"):
                argv += ["--endpoint", f"sqlite://{store}/state.db"]
                argv += ["--sqlite-synchronous", "full" if backend == "sqlite-full" else "normal"]
            else:
                assert shared is not None
                argv += ["--endpoint", shared]
            return argv
        if server == "kine":
            assert self.kine_bin is not None
            argv = [str(self.kine_bin / "kine"), "--listen-address", f"127.0.0.1:{port}"]
            if backend == "sqlite-full":
                argv += ["--endpoint", f"sqlite://{store}/state.db?{KINE_SQLITE_PARAMS_FULL}"]
            elif backend == "postgres":
                assert shared is not None
                argv += ["--endpoint", shared + "?sslmode=disable"]
            elif backend == "mariadb":
                assert shared is not None
                argv += ["--endpoint", shared]
            # sqlite-normal: no --endpoint, i.e. kine's own default (./db/state.db in its directory)
            return argv
        raise ValueError(server)
