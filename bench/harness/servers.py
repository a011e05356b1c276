"""Lifecycle of the servers under test (etcd, kine, k8s-sql) and of the database servers
they use, each started fresh on free loopback ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from databases import MariaDBServer, PostgresServer  # noqa: E402  (the tests' throwaway servers)

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(endpoint: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    """Wait until a server answers a KV Range (every peer implements it; kine has no Status)."""
    import grpc

    from k8s_sql.pb import rpc_pb2, rpc_pb2_grpc

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before it was ready")
        try:
            with grpc.insecure_channel(endpoint) as ch:
                rpc_pb2_grpc.KVStub(ch).Range(  # type: ignore[no-untyped-call]
                    rpc_pb2.RangeRequest(key=b"/bench-ready", limit=1), timeout=1
                )
            return
        except grpc.RpcError as e:
            last = e
            time.sleep(0.1)
    raise TimeoutError(f"{endpoint} not ready after {timeout}s: {last}")


@dataclass
class Proc:
    """One server process on a loopback port."""

    name: str
    argv: list[str]
    endpoint: str  # host:port
    log_path: Path
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> None:
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.cwd,
            env={**os.environ, **self.env},
            start_new_session=True,
        )
        log.close()
        try:
            wait_ready(self.endpoint, timeout, self.proc)
        except Exception as e:
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} did not start ({e}); log tail:\n{tail}") from None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


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
        from databases import _find

        pg = _find("postgres")
        if pg:
            out["postgres"] = _run([pg, "--version"])
        maria = MariaDBServer._server()
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
    _n: int = 0

    def _taskset(self, cores: str | None) -> list[str]:
        return ["taskset", "-c", cores] if cores else []

    def launch(self, server: str, backend: str, frontends: int = 1, spread: bool = False) -> list[Proc]:
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
        procs: list[Proc] = []
        try:
            for i in range(frontends):
                port = free_port()
                cores = self.server_cores
                if cores and spread:
                    cores = str(i % (os.cpu_count() or 1))
                argv = [*self._taskset(cores), *self._argv(server, backend, port, store, i, shared)]
                p = Proc(f"{tag}-{i}", argv, f"127.0.0.1:{port}", self.log_dir / f"{tag}-{i}.log", store / f"fe{i}")
                procs.append(p)
                p.start()
        except Exception:
            for p in procs:
                p.stop()
            raise
        return procs

    def _argv(self, server: str, backend: str, port: int, store: Path, i: int, shared: str | None) -> list[str]:
        if server == "etcd":
            assert self.peers_bin is not None
            return [
                str(self.peers_bin / "etcd"),
                *("--name", "bench", "--data-dir", str(store / "etcd")),
                *("--listen-client-urls", f"http://127.0.0.1:{port}"),
                *("--listen-peer-urls", f"http://127.0.0.1:{free_port()}"),
            ]
        if server == "k8s-sql":
            argv = [
                sys.executable,
                *("-m", "k8s_sql", "--name", f"fe{i}", "--data-dir", str(store / f"fe{i}")),
                *("--listen-client-urls", f"http://127.0.0.1:{port}", "--log-level", "warn"),
            ]
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


def which(binary: str) -> str | None:
    return shutil.which(binary)
