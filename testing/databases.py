"""Throwaway database servers started from the installed binaries, for the tests and the
benchmark harness (bench/harness/servers.py, which makes them durable).

PostgreSQL refuses to run as root, so when the tests run as root (as CI does) the
server runs as the ``postgres`` system user in a temporary directory it owns.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from testing.servers import free_port, start_logged, stop_process, wait_until


def find_binary(binary: str) -> str | None:
    found = shutil.which(binary)
    if found:
        return found
    lib = Path("/usr/lib/postgresql")
    if lib.is_dir():
        for version in sorted(lib.iterdir(), reverse=True):
            candidate = version / "bin" / binary
            if candidate.exists():
                return str(candidate)
    return None


def _wait_started(
    what: str, ready: Callable[[], bool], timeout: float, proc: subprocess.Popen[bytes], log: Path
) -> None:
    """Wait for a database server to be ready; if it exits or times out, say so with its log."""
    try:
        wait_until(ready, timeout, proc, 0.1)
    except (RuntimeError, TimeoutError) as e:
        raise RuntimeError(f"{what} did not start ({e}):\n{log.read_text()}") from None


@dataclass
class PostgresServer:
    port: int
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="k8s-sql-pg-")))
    proc: subprocess.Popen[bytes] | None = None
    settings: dict[str, str] = field(default_factory=dict)  # extra postgres -c settings
    hba: str | None = None  # pg_hba.conf to use instead of initdb's (trust for everyone)
    _databases: int = 0

    @staticmethod
    def available() -> str | None:
        """Why PostgreSQL cannot be started here, or None."""
        if find_binary("initdb") is None or find_binary("postgres") is None:
            return "PostgreSQL server binaries (initdb, postgres) are not installed (apt-get install postgresql)"
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                return "running as root but there is no 'postgres' user to run the server as"
        return None

    def _exec_as_owner(self) -> list[str]:
        """A prefix that runs the server as ``postgres`` when we are root. setpriv changes
        user and then execs, so the child is still the server itself (signals reach it),
        and Popen can spawn it without a plain fork: with Popen(user=...) Python forks,
        and a fork while gRPC's threads run can abort in gRPC's fork handler before the
        exec (seen restarting PostgreSQL under load in the linearizability suite)."""
        if os.geteuid() != 0:
            return []
        setpriv = shutil.which("setpriv")
        assert setpriv is not None, "setpriv (util-linux) runs the server as postgres"
        return [setpriv, "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]

    def _as_owner(self) -> dict[str, object]:
        """Popen arguments that run the child as ``postgres`` when we are root (the child
        is then the server itself, so signals reach it)."""
        return {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}

    def start(self) -> None:
        data = self.root / "data"
        if not data.exists():
            if os.geteuid() == 0:
                shutil.chown(self.root, "postgres", "postgres")
            subprocess.run(
                [find_binary("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8"],
                check=True,
                capture_output=True,
                cwd=self.root,
                **self._as_owner(),  # type: ignore[call-overload]
            )
        if self.hba is not None:
            (data / "pg_hba.conf").write_text(self.hba)
        self.proc = start_logged(
            [
                *self._exec_as_owner(),
                str(find_binary("postgres")),
                *("-D", str(data), "-p", str(self.port), "-h", "127.0.0.1", "-k", str(self.root)),
                # a throwaway database: k8s-sql's own durability is what the tests check
                *("-c", "fsync=off", "-c", "max_connections=300"),
                *[x for k, v in self.settings.items() for x in ("-c", f"{k}={v}")],
            ],
            self.root / "server.log",
            cwd=self.root,
        )

        def ready() -> bool:
            ok = subprocess.run(
                ["pg_isready", "-h", "127.0.0.1", "-p", str(self.port)] if shutil.which("pg_isready") else ["true"],
                capture_output=True,
            )
            return ok.returncode == 0 and (self.root / f".s.PGSQL.{self.port}").exists()

        _wait_started("PostgreSQL", ready, 30, self.proc, self.root / "server.log")

    def new_dsn(self) -> str:
        """A DSN naming a database that does not exist yet (k8s-sql creates it)."""
        self._databases += 1
        return f"postgres://postgres@127.0.0.1:{self.port}/k8s_sql_{os.getpid()}_{self._databases}"

    def standby(self, port: int, **settings: str) -> PostgresServer:
        """A streaming-replication standby of this (running) server on ``port``: a base
        backup with its replication settings (``pg_basebackup -R``), not started yet."""
        standby = PostgresServer(port, settings=dict(settings))
        if os.geteuid() == 0:
            shutil.chown(standby.root, "postgres", "postgres")
        subprocess.run(
            [
                str(find_binary("pg_basebackup")),
                *("-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"),
                *("-D", str(standby.root / "data"), "-R", "-X", "stream", "-c", "fast"),
            ],
            check=True,
            capture_output=True,
            cwd=standby.root,
            **self._as_owner(),  # type: ignore[call-overload]
        )
        return standby

    def psql(self, statement: str, database: str = "postgres") -> str:
        """Run a statement as ``postgres`` over TCP; its output, unaligned without headers."""
        res = subprocess.run(
            [
                str(find_binary("psql")),
                *("-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database),
                *("-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", statement),
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return res.stdout.strip()

    def halt(self) -> None:
        """Stop the server (fast shutdown: open connections are cut), keeping its data."""
        stop_process(self.proc, signal.SIGINT, timeout=20)

    def kill9(self) -> None:
        """Crash the server, keeping its data: SIGKILL to its whole process group (the
        postmaster and every backend, as a host crash would; a backend left behind would
        hold the shared memory and stop the next start). start() recovers from the WAL."""
        stop_process(self.proc, signal.SIGKILL, group=True)

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class MariaDBServer:
    """A throwaway MariaDB server (no grant tables: the tests connect as root without a password)."""

    port: int
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="k8s-sql-mariadb-")))
    proc: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)
    grant_tables: bool = False  # enforce accounts (root then only logs in over the socket)
    _databases: int = 0

    @staticmethod
    def server_binary() -> str | None:
        return (
            shutil.which("mariadbd")
            or shutil.which("mysqld")
            or ("/usr/sbin/mariadbd" if Path("/usr/sbin/mariadbd").exists() else None)
        )

    @classmethod
    def available(cls) -> str | None:
        if cls.server_binary() is None or shutil.which("mariadb-install-db") is None:
            return "MariaDB server binaries are not installed (apt-get install mariadb-server)"
        return None

    @staticmethod
    def _install(data: Path, user: list[str]) -> None:
        """mariadb-install-db, once more on a clean directory if it fails: in CI it
        once failed for one of three pytest-xdist workers, with the others fine."""
        for attempt in (1, 2):
            res = subprocess.run(
                ["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--skip-test-db", *user],
                capture_output=True,
                text=True,
            )
            if res.returncode == 0:
                return
            shutil.rmtree(data, ignore_errors=True)
            warnings.warn(f"mariadb-install-db failed, attempt {attempt}: {res.stderr[-3000:]}", stacklevel=2)
            if attempt == 2:
                raise RuntimeError(f"mariadb-install-db failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")

    def start(self) -> None:
        data = self.root / "data"
        user = ["--user=root"] if os.geteuid() == 0 else []
        if not data.exists():
            self._install(data, user)
        tmp = self.root / "tmp"  # its own: CI once found an internal temporary table's file gone from /tmp
        tmp.mkdir(exist_ok=True)
        if user:
            os.chmod(tmp, 0o1777)
        self.proc = start_logged(
            [
                str(self.server_binary()),
                "--no-defaults",
                f"--datadir={data}",
                f"--tmpdir={tmp}",
                f"--socket={self.root / 'mysqld.sock'}",
                f"--port={self.port}",
                "--bind-address=127.0.0.1",
                *([] if self.grant_tables else ["--skip-grant-tables"]),
                "--innodb-flush-log-at-trx-commit=2",  # a throwaway database: speed over its own durability
                "--max-connections=500",
                *self.extra_args,
                *user,
            ],
            self.root / "server.log",
        )

        def ready() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        _wait_started("MariaDB", ready, 60, self.proc, self.root / "server.log")

    def new_dsn(self) -> str:
        self._databases += 1
        return f"mysql://root@tcp(127.0.0.1:{self.port})/k8s_sql_{os.getpid()}_{self._databases}"

    def sql(self, statement: str) -> str:
        """Run a statement as the database's root over its socket."""
        client = shutil.which("mariadb") or "mysql"
        res = subprocess.run(
            [client, "--no-defaults", f"--socket={self.root / 'mysqld.sock'}", "-u", "root", "-N", "-e", statement],
            check=True,
            capture_output=True,
            text=True,
        )
        return res.stdout

    def halt(self) -> None:
        """Stop the server, keeping its data (start() brings it back)."""
        stop_process(self.proc, timeout=30)

    def kill9(self) -> None:
        """Crash the server (SIGKILL to its process group), keeping its data; start()
        recovers it from InnoDB's log."""
        stop_process(self.proc, signal.SIGKILL, group=True)

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class GaleraNode:
    """One ``mariadbd`` of a :class:`GaleraCluster`."""

    index: int
    root: Path
    port: int  # MySQL clients
    gcomm: int  # group communication
    ist: int  # incremental state transfer
    sst: int  # full state transfer (rsync)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"


@dataclass
class GaleraCluster:
    """A MariaDB Galera cluster (galera-4) of ``size`` nodes on loopback ports, each
    ``mariadbd`` with its own data directory: the first bootstraps the cluster, the
    others join it by state transfer (rsync SST, then IST after a restart). No grant
    tables: the tests connect as root without a password, as to :class:`MariaDBServer`."""

    size: int = 3
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="k8s-sql-galera-")))
    nodes: list[GaleraNode] = field(default_factory=list)
    _databases: int = 0

    PROVIDER = "/usr/lib/galera/libgalera_smm.so"

    @classmethod
    def available(cls) -> str | None:
        why = MariaDBServer.available()
        if why:
            return why
        if not Path(cls.PROVIDER).exists():
            return "Galera is not installed (apt-get install galera-4)"
        if shutil.which("rsync") is None:
            return "rsync is not installed (Galera's state transfer uses it)"
        return None

    def __post_init__(self) -> None:
        # As root, the nodes run as the ``mysql`` user: a joiner's rsync daemon started
        # by root would switch to ``nobody`` and be refused its own data directory.
        self.root.chmod(0o755)
        if os.geteuid() == 0:
            shutil.chown(self.root, "mysql", "mysql")
        if not self.nodes:
            ports = [_free_ports(4) for _ in range(self.size)]
            self.nodes = [GaleraNode(i, self.root / f"node{i}", p[0], p[1], p[2], p[3]) for i, p in enumerate(ports)]

    def argv(self, node: GaleraNode, *, bootstrap: bool = False, position: str = "") -> list[str]:
        peers = ",".join(f"127.0.0.1:{n.gcomm}" for n in self.nodes)
        options = ";".join(
            [
                f"gmcast.listen_addr=tcp://127.0.0.1:{node.gcomm}",
                f"ist.recv_addr=127.0.0.1:{node.ist}",
                "gcache.size=128M",
                "evs.inactive_timeout=PT6S",  # a killed node is evicted in seconds
                "evs.suspect_timeout=PT2S",
                "evs.keepalive_period=PT0.5S",
            ]
        )
        return [
            str(MariaDBServer.server_binary()),
            "--no-defaults",
            f"--datadir={node.data}",
            f"--socket={node.root / 'mysqld.sock'}",
            f"--port={node.port}",
            "--bind-address=127.0.0.1",
            "--skip-grant-tables",
            "--max-connections=500",
            "--innodb-flush-log-at-trx-commit=2",
            "--binlog-format=ROW",
            "--innodb-autoinc-lock-mode=2",
            "--wsrep-on=ON",
            f"--wsrep-provider={self.PROVIDER}",
            f"--wsrep-cluster-address=gcomm://{'' if bootstrap else peers}",
            "--wsrep-cluster-name=k8s-sql-test",
            f"--wsrep-node-name=node{node.index}",
            f"--wsrep-node-address=127.0.0.1:{node.gcomm}",
            f"--wsrep-provider-options={options}",
            "--wsrep-sst-method=rsync",
            f"--wsrep-sst-receive-address=127.0.0.1:{node.sst}",
            "--wsrep-slave-threads=2",
            *([f"--wsrep-start-position={position}"] if position else []),
            *self._user(),
        ]

    @staticmethod
    def _user() -> list[str]:
        return ["--user=mysql"] if os.geteuid() == 0 else []

    def start(self) -> None:
        """Bootstrap the first node, then join the others one at a time."""
        for node in self.nodes:
            self.start_node(node, bootstrap=node.index == 0)

    def start_node(self, node: GaleraNode, bootstrap: bool = False, timeout: float = 120) -> None:
        """Start (or restart) a node; it is ready when it reports itself Synced. A node
        whose data directory exists recovers its position from InnoDB first
        (``--wsrep-recover``, as the packaged service does), so it rejoins by IST."""
        node.root.mkdir(parents=True, exist_ok=True)
        position = ""
        if os.geteuid() == 0:
            shutil.chown(node.root, "mysql", "mysql")
        if not node.data.exists():
            if bootstrap:
                MariaDBServer._install(node.data, self._user())
            else:  # filled by the state transfer
                node.data.mkdir()
                if os.geteuid() == 0:
                    shutil.chown(node.data, "mysql", "mysql")
        else:
            position = self._recover(node)
        node.proc = start_logged(self.argv(node, bootstrap=bootstrap, position=position), node.log)

        def synced() -> bool:
            try:
                return self.status(node, "wsrep_local_state_comment") == "Synced"
            except subprocess.CalledProcessError:
                return False

        _wait_started(f"Galera node{node.index}", synced, timeout, node.proc, node.log)

    def _recover(self, node: GaleraNode) -> str:
        log = node.root / "recover.log"
        res = subprocess.run(
            [*self.argv(node), "--wsrep-recover", f"--log-error={log}"], capture_output=True, text=True, timeout=120
        )
        text = log.read_text(errors="replace") if log.exists() else res.stderr
        found = [
            line.split("Recovered position:")[1].strip() for line in text.splitlines() if "Recovered position:" in line
        ]
        return found[-1] if found else ""

    def status(self, node: GaleraNode, name: str) -> str:
        out = self.sql(node, f"SHOW GLOBAL STATUS LIKE '{name}'")
        return out.split("\t", 1)[1].strip() if "\t" in out else ""

    def sql(self, node: GaleraNode, statement: str) -> str:
        client = shutil.which("mariadb") or "mysql"
        res = subprocess.run(
            [client, "--no-defaults", f"--socket={node.root / 'mysqld.sock'}", "-u", "root", "-N", "-e", statement],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return res.stdout

    def kill9(self, node: GaleraNode) -> None:
        stop_process(node.proc, signal.SIGKILL, group=True)

    def halt(self, node: GaleraNode) -> None:
        stop_process(node.proc, timeout=30)

    def new_database(self) -> str:
        self._databases += 1
        return f"k8s_sql_{os.getpid()}_{self._databases}"

    def dsn(self, database: str, *nodes: GaleraNode) -> str:
        """A DSN listing ``nodes`` (all of them if none are named), in that order."""
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in (nodes or tuple(self.nodes)))
        return f"mysql://root@tcp({hosts})/{database}"

    def stop(self) -> None:
        for node in reversed(self.nodes):
            self.halt(node)
        shutil.rmtree(self.root, ignore_errors=True)


def _free_ports(n: int) -> tuple[int, ...]:
    """``n`` different ports free now (servers.free_port)."""
    ports: list[int] = []
    while len(ports) < n:
        if (port := free_port()) not in ports:
            ports.append(port)
    return tuple(ports)


@dataclass
class AutoFailoverCluster:
    """PostgreSQL with automatic failover by pg_auto_failover (``pg_autoctl``): a
    monitor and two nodes, the second a synchronous standby of the first
    (``synchronous_standby_names = 'ANY 1 (…)'``, ``synchronous_commit = on``). The
    monitor's health checks are tightened so that a dead primary is replaced within
    seconds (defaults: about 30 s). Each ``pg_autoctl`` runs in a session of its own,
    as ``postgres`` when we are root, with the PostgreSQL it supervises."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="k8s-sql-paf-")))
    monitor_port: int = 0
    ports: list[int] = field(default_factory=list)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _databases: int = 0

    # the monitor's settings (milliseconds): a primary unanswering for ~3 s is failed over
    MONITOR_SETTINGS = {
        "pgautofailover.health_check_period": "1000",
        "pgautofailover.health_check_timeout": "1000",
        "pgautofailover.health_check_max_retries": "1",
        "pgautofailover.health_check_retry_delay": "500",
        "pgautofailover.node_considered_unhealthy_timeout": "3000",
        "pgautofailover.primary_demote_timeout": "5000",
    }

    @staticmethod
    def available() -> str | None:
        why = PostgresServer.available()
        if why:
            return why
        if shutil.which("pg_autoctl") is None:
            return "pg_auto_failover is not installed (apt-get install postgresql-15-auto-failover)"
        return None

    def __post_init__(self) -> None:
        if not self.monitor_port:
            self.monitor_port, *self.ports = _free_ports(3)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")

    @property
    def monitor_uri(self) -> str:
        return f"postgres://autoctl_node@127.0.0.1:{self.monitor_port}/pg_auto_failover?sslmode=disable"

    def _autoctl(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        prefix = PostgresServer(0, root=self.root)._exec_as_owner()
        # the directory of PostgreSQL's own binaries (pg_autoctl runs pg_controldata
        # and others next to pg_ctl), not a symlink to pg_ctl elsewhere
        pg_ctl = Path(str(find_binary("pg_ctl"))).resolve()
        env = {
            **os.environ,
            "PATH": f"{pg_ctl.parent}:{os.environ.get('PATH', '')}",
            # its state and configuration files go under XDG directories: keep them here
            "HOME": str(self.root),
            "XDG_CONFIG_HOME": str(self.root / "config"),
            "XDG_DATA_HOME": str(self.root / "share"),
        }
        return start_logged(
            [*prefix, str(shutil.which("pg_autoctl")), *args, "--pgctl", str(pg_ctl)],
            self.root / f"{name}.log",
            cwd=self.root,
            env=env,
        )

    def start(self) -> None:
        self.procs["monitor"] = self._autoctl(
            "monitor",
            *("create", "monitor", "--pgdata", str(self.root / "monitor"), "--pgport", str(self.monitor_port)),
            *("--hostname", "127.0.0.1", "--auth", "trust", "--no-ssl", "--run"),
        )
        monitor = PostgresServer(self.monitor_port, root=self.root)
        _wait_started(
            "the pg_auto_failover monitor",
            lambda: _answers(lambda: monitor.psql("SELECT 1", "pg_auto_failover") == "1"),
            60,
            self.procs["monitor"],
            self.root / "monitor.log",
        )
        for name, value in self.MONITOR_SETTINGS.items():
            monitor.psql(f"ALTER SYSTEM SET {name} = {value}")
        monitor.psql("SELECT pg_reload_conf()")
        self.start_node(0)
        self.wait_state(0, "single", 90)  # a primary once a standby joins
        self.start_node(1)
        self.wait_state(1, "secondary", 90)
        self.wait_state(0, "primary", 30)

    def start_node(self, i: int) -> None:
        name = f"node{i}"
        self.procs[name] = self._autoctl(
            name,
            *("create", "postgres", "--pgdata", str(self.root / name), "--pgport", str(self.ports[i])),
            *("--hostname", "127.0.0.1", "--auth", "trust", "--no-ssl", "--name", name),
            *("--monitor", self.monitor_uri, "--run"),
        )

    def states(self) -> dict[str, tuple[str, str]]:
        """Each node's (reported, assigned) state, as the monitor holds them."""
        monitor = PostgresServer(self.monitor_port, root=self.root)
        out = monitor.psql("SELECT nodename, reportedstate, goalstate FROM pgautofailover.node", "pg_auto_failover")
        return {n: (r, g) for n, r, g in (line.split("|") for line in out.splitlines() if line)}

    def wait_state(self, i: int, state: str, timeout: float) -> None:
        proc = self.procs[f"node{i}"]

        def reached() -> bool:
            return _answers(lambda: self.states().get(f"node{i}") == (state, state))

        _wait_started(f"pg_auto_failover node{i} ({state})", reached, timeout, proc, self.root / f"node{i}.log")

    def kill9_node(self, i: int) -> None:
        """A host crash: SIGKILL to the node's pg_autoctl and its PostgreSQL together."""
        stop_process(self.procs[f"node{i}"], signal.SIGKILL, group=True)

    def dsn(self, database: str) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        return f"postgres://postgres@{hosts}/{database}?target_session_attrs=read-write"

    def new_dsn(self) -> str:
        self._databases += 1
        return self.dsn(f"k8s_sql_{os.getpid()}_{self._databases}")

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_process(proc, signal.SIGKILL, group=True)
        shutil.rmtree(self.root, ignore_errors=True)


def _answers(probe: Callable[[], bool]) -> bool:
    try:
        return probe()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return False


@dataclass
class PgBouncer:
    """PgBouncer in front of a PostgreSQL server, in transaction-pooling mode (a server
    connection is a client's only for the length of a transaction), as ``postgres``
    when we are root (it refuses to run as root)."""

    port: int
    server_port: int
    pool_mode: str = "transaction"
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="k8s-sql-pgbouncer-")))
    proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> str | None:
        if shutil.which("pgbouncer") is None and not Path("/usr/sbin/pgbouncer").exists():
            return "PgBouncer is not installed (apt-get install pgbouncer)"
        return PostgresServer.available()

    def start(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        (self.root / "userlist.txt").write_text('"postgres" ""\n')
        (self.root / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={self.server_port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir = {self.root}\n"
            f"auth_type = trust\nauth_file = {self.root / 'userlist.txt'}\n"
            f"pool_mode = {self.pool_mode}\nmax_client_conn = 1000\ndefault_pool_size = 20\n"
            "ignore_startup_parameters = extra_float_digits\n"
            # after a failed server login (a database not created yet) PgBouncer waits this
            # long before it tries the server again: 15 s by default
            "server_login_retry = 1\n"
        )
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        prefix = PostgresServer(0, root=self.root)._exec_as_owner()
        self.proc = start_logged([*prefix, binary, str(self.root / "pgbouncer.ini")], self.root / "pgbouncer.log")

        def ready() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        _wait_started("PgBouncer", ready, 30, self.proc, self.root / "pgbouncer.log")

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class HAProxy:
    """HAProxy in TCP mode in front of several servers (a Galera cluster's nodes):
    connections go round robin to the servers its health checks (a TCP connect every
    0.5 s) find up; a server marked down has its connections cut."""

    port: int
    servers: list[int]
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="k8s-sql-haproxy-")))
    proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> str | None:
        if shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists():
            return "HAProxy is not installed (apt-get install haproxy)"
        return None

    def start(self) -> None:
        lines = [
            "global",
            "  maxconn 4000",
            "defaults",
            "  mode tcp",
            "  timeout connect 2s",
            "  timeout client 1h",
            "  timeout server 1h",
            "listen galera",
            f"  bind 127.0.0.1:{self.port}",
            "  balance roundrobin",
            *(
                f"  server n{i} 127.0.0.1:{p} check inter 500 fall 2 rise 2 on-marked-down shutdown-sessions"
                for i, p in enumerate(self.servers)
            ),
        ]
        (self.root / "haproxy.cfg").write_text("\n".join(lines) + "\n")
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.proc = start_logged([binary, "-db", "-f", str(self.root / "haproxy.cfg")], self.root / "haproxy.log")

        def ready() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        _wait_started("HAProxy", ready, 30, self.proc, self.root / "haproxy.log")

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
