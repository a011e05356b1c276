"""Start-up, run as an operator runs it (``python -m k8s_sql`` in a child process).

- Every bad flag, URL, DSN, certificate or duration is one line and a non-zero
  exit, never a traceback.
- The database password never shows: not in the log (at debug), not in argv when
  it comes from ``--endpoint-file`` or ``K8S_SQL_ENDPOINT``.
- A database that is down at start is waited for: the port answers every call
  with UNAVAILABLE and etcd's "database unavailable" meanwhile, and serves once the
  database is up. A wrong password is not retried: one line, and the process ends.
- ``--workers`` processes log at the level and in the format the command says.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import grpc
import pytest
from conftest import free_port, missing, wait_for_grpc
from databases import MariaDBServer, PostgresServer

from k8s_sql import errors
from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc

# A password with characters a URL reserves: DSNs carry it percent-encoded, the
# drivers get it decoded, and neither form may show anywhere.
PASSWORD = "Zq7@kx/Wm9-startup"
ENCODED = quote(PASSWORD, safe="")
UNAVAILABLE = errors.DatabaseUnavailable.message


def argv(tmp_path: Path, port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "k8s_sql",
        "--data-dir",
        str(tmp_path / "data"),
        "--listen-client-urls",
        f"http://127.0.0.1:{port}",
        *extra,
    ]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any K8S_SQL_<FLAG> of the caller's (it would set a flag)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("K8S_SQL_")}
    return {**env, **extra}


def error_lines(output: str) -> list[str]:
    """The lines that report an error: click's ``Error:`` and log records at ERROR or worse."""
    return [
        line
        for line in output.splitlines()
        if line.startswith("Error:")
        or " ERROR " in line
        or " CRITICAL " in line
        or re.match(r"[EF]\d{4} ", line)  # gRPC C-core's own (E1130 00:14:46.29 ... add_port.cc:83] ...)
    ]


def fails_with_one_line(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> str:
    """Run ``cmd``, which must fail: a non-zero exit, no traceback, exactly one error
    line (returned), no password."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or clean_env())
    output = res.stdout + res.stderr
    assert res.returncode != 0, output
    assert "Traceback" not in output, output
    lines = error_lines(output)
    assert len(lines) == 1, output
    assert PASSWORD not in output and ENCODED not in output, output
    return lines[0]


# -- bad flags: one line, non-zero exit ---------------------------------------------

BAD_FLAGS: dict[str, tuple[list[str], str]] = {
    "endpoint-scheme": (["--endpoint", "ftp://x"], "unsupported --endpoint 'ftp://x'"),
    "endpoint-scheme-with-password": (["--endpoint", f"ftp://k8s:{ENCODED}@x/db"], "unsupported --endpoint"),
    "duration-go-unit": (["--watch-progress-notify-interval", "1m30x"], 'time: unknown unit "x" in duration "1m30x"'),
    "duration-words": (["--watch-progress-notify-interval", "soon"], 'time: invalid duration "soon"'),
    "duration-missing-unit": (["--watch-progress-notify-interval", "1m30"], 'time: missing unit in duration "1m30"'),
    "mysql-without-database": (["--endpoint", f"mysql://root:{ENCODED}@tcp(127.0.0.1:3306)/"], "invalid MySQL DSN"),
    "mysql-bad-port": (["--endpoint", f"mysql://root:{ENCODED}@tcp(127.0.0.1:x)/k8s"], "invalid port 'x'"),
    "mysql-missing-ca": (
        ["--endpoint", f"mysql://root:{ENCODED}@tcp(127.0.0.1:3306)/k8s?ssl-ca=/nonexistent/ca.pem"],
        "cannot load its TLS files",
    ),
    "postgres-bad-port": (["--endpoint", f"postgres://k8s:{ENCODED}@127.0.0.1:5x/k8s"], "invalid port '5x'"),
    "postgres-missing-ca": (
        ["--endpoint", f"postgres://k8s:{ENCODED}@127.0.0.1/k8s?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"],
        "sslrootcert /nonexistent/ca.pem: no such file",
    ),
    "sqlite-without-path": (["--endpoint", "sqlite://"], "no database file"),
    "listen-scheme": (["--listen-client-urls", "ftp://127.0.0.1:2379"], "invalid URL 'ftp://127.0.0.1:2379'"),
    "listen-without-port": (["--listen-client-urls", "http://127.0.0.1"], "invalid URL"),
    "listen-port-out-of-range": (["--listen-client-urls", "http://127.0.0.1:99999"], "invalid URL"),
    "advertise-without-scheme": (["--advertise-client-urls", "127.0.0.1:2379"], "--advertise-client-urls"),
    "https-without-cert": (["--listen-client-urls", "https://127.0.0.1:{port}"], "--cert-file and --key-file"),
    "missing-cert": (
        ["--listen-client-urls", "https://127.0.0.1:{port}", "--cert-file", "{tmp}/no.pem", "--key-file", "{tmp}/no"],
        "--cert-file {tmp}/no.pem: no such file",
    ),
    "garbage-cert": (
        ["--listen-client-urls", "https://127.0.0.1:{port}", "--cert-file", "{garbage}", "--key-file", "{garbage}"],
        "not a PEM certificate and its key",
    ),
    "garbage-ca": (["--trusted-ca-file", "{garbage}", "--client-cert-auth"], "--trusted-ca-file"),
    "client-cert-auth-without-ca": (["--client-cert-auth"], "--client-cert-auth needs --trusted-ca-file"),
    "workers-zero": (["--workers", "0"], "--workers must be at least 1"),
    "workers-not-a-number": (["--workers", "many"], "'many' is not a number or auto"),
    "max-request-bytes-zero": (["--max-request-bytes", "0"], "--max-request-bytes must be positive"),
    "log-level": (["--log-level", "verbose"], "'verbose' is not one of"),
    "metrics-url-scheme": (["--listen-metrics-urls", "ftp://127.0.0.1:2381"], "--listen-metrics-urls: invalid URL"),
    "https-metrics-without-cert": (["--listen-metrics-urls", "https://127.0.0.1:{port}"], "--cert-file and --key-file"),
    "log-format": (["--log-format", "xml"], "'xml' is not one of"),
    "log-outputs-unwritable": (["--log-outputs", "{garbage}/sub/k8s-sql.log"], "--log-outputs: cannot open"),
    "warning-apply-duration": (["--warning-apply-duration", "5x"], 'time: unknown unit "x" in duration "5x"'),
    "endpoint-file-missing": (["--endpoint-file", "{tmp}/nope"], "does not exist"),
    "endpoint-file-empty": (["--endpoint-file", "{empty}"], "is empty"),
    "endpoint-and-endpoint-file": (["--endpoint", "sqlite:///x.db", "--endpoint-file", "{empty}"], "not both"),
    # found only at start (after listening): still one line, and the port is closed again
    "data-dir-under-a-file": (["--data-dir", "{garbage}/sub"], "cannot open the database sqlite://"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flag_is_one_line(case: str, tmp_path: Path) -> None:
    args, expected = BAD_FLAGS[case]
    port = free_port()
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    values = {"port": str(port), "tmp": str(tmp_path), "garbage": str(garbage), "empty": str(empty)}
    line = fails_with_one_line(argv(tmp_path, port, *(a.format(**values) for a in args)))
    assert expected.format(**values) in line


def test_bad_duration_from_the_environment(tmp_path: Path) -> None:
    env = clean_env(K8S_SQL_WATCH_PROGRESS_NOTIFY_INTERVAL="90x")
    line = fails_with_one_line(argv(tmp_path, free_port()), env=env)
    assert 'time: unknown unit "x" in duration "90x"' in line


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        line = fails_with_one_line(argv(tmp_path, port))
    assert f"cannot listen on http://127.0.0.1:{port}: bind: Address already in use" in line


# -- a running frontend in a child process ---------------------------------------------


class Frontend:
    """k8s-sql in a child process whose output goes to a log file."""

    def __init__(self, tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"k8s-sql-{self.port}.log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                argv(tmp_path, self.port, *extra),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env or clean_env(),
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert self.proc.poll() is None, f"k8s-sql exited with {self.proc.returncode}:\n{self.log()}"
            assert time.monotonic() < deadline, f"{text!r} not logged in {timeout} s:\n{self.log()}"
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextmanager
def frontend(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> Iterator[Frontend]:
    fe = Frontend(tmp_path, *extra, env=env)
    try:
        yield fe
    finally:
        fe.stop()


def assert_no_password(fe: Frontend) -> None:
    log = fe.log()
    assert PASSWORD not in log and ENCODED not in log, log
    assert "Traceback" not in log, log
    cmdline = Path(f"/proc/{fe.proc.pid}/cmdline")
    if fe.proc.poll() is None and cmdline.exists():  # what `ps` shows
        assert ENCODED.encode() not in cmdline.read_bytes()


def assert_unavailable_until_ready(endpoint: str, timeout: float = 60) -> None:
    """Every kind of call (unary, server and bidirectional streams) is answered
    UNAVAILABLE with etcd's message, as soon as the port listens."""
    with grpc.insecure_channel(endpoint) as ch:
        kv = rpc_pb2_grpc.KVStub(ch)
        deadline = time.monotonic() + timeout
        while True:  # until the port listens (before, the client's own "connection refused")
            try:
                kv.Range(pb.RangeRequest(key=b"k"), timeout=5)
                raise AssertionError("served before the database was open")
            except grpc.RpcError as e:
                if e.details() == UNAVAILABLE:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE
                    break
                assert time.monotonic() < deadline, f"never answered {UNAVAILABLE!r}: {e}"
                time.sleep(0.05)
        calls: list[Callable[[], object]] = [
            lambda: kv.Put(pb.PutRequest(key=b"k", value=b"v"), timeout=5),
            lambda: kv.Txn(pb.TxnRequest(), timeout=5),
            lambda: rpc_pb2_grpc.MaintenanceStub(ch).Status(pb.StatusRequest(), timeout=5),
            lambda: rpc_pb2_grpc.ClusterStub(ch).MemberList(pb.MemberListRequest(), timeout=5),
            lambda: rpc_pb2_grpc.LeaseStub(ch).LeaseGrant(pb.LeaseGrantRequest(TTL=10), timeout=5),
            lambda: list(rpc_pb2_grpc.MaintenanceStub(ch).Snapshot(pb.SnapshotRequest(), timeout=5)),
            lambda: list(
                rpc_pb2_grpc.WatchStub(ch).Watch(
                    iter([pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"k"))]), timeout=5
                )
            ),
            lambda: list(rpc_pb2_grpc.LeaseStub(ch).LeaseKeepAlive(iter([pb.LeaseKeepAliveRequest(ID=1)]), timeout=5)),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert (e.value.code(), e.value.details()) == (grpc.StatusCode.UNAVAILABLE, UNAVAILABLE)


def wait_serving(endpoint: str, timeout: float = 60) -> int:
    """Poll a Put until it succeeds (UNAVAILABLE meanwhile); its revision."""
    with grpc.insecure_channel(endpoint) as ch:
        kv = rpc_pb2_grpc.KVStub(ch)
        deadline = time.monotonic() + timeout
        while True:
            try:
                return int(kv.Put(pb.PutRequest(key=b"after", value=b"up"), timeout=5).header.revision)
            except grpc.RpcError as e:
                assert (e.code(), e.details()) == (grpc.StatusCode.UNAVAILABLE, UNAVAILABLE), e
                assert time.monotonic() < deadline, "k8s-sql did not serve after the database came up"
                time.sleep(0.1)


def exercise(endpoint: str) -> None:
    """Some work that makes the drivers talk: writes, a read, a watch event."""
    with grpc.insecure_channel(endpoint) as ch:
        kv = rpc_pb2_grpc.KVStub(ch)
        rev = kv.Put(pb.PutRequest(key=b"a", value=b"1")).header.revision
        kv.Put(pb.PutRequest(key=b"a", value=b"2"))
        assert kv.Range(pb.RangeRequest(key=b"a")).kvs[0].value == b"2"
        watch = rpc_pb2_grpc.WatchStub(ch).Watch(
            iter([pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"a", start_revision=rev))]), timeout=10
        )
        events = []
        for resp in watch:
            events += resp.events
            if len(events) >= 2:
                break
        watch.cancel()
        assert [e.kv.value for e in events] == [b"1", b"2"]


# -- the endpoint from a file or the environment; never logged -------------------------


def test_endpoint_file_and_environment_on_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "from-file.db"
    (tmp_path / "dsn").write_text(f"sqlite://{path}\n")
    with frontend(tmp_path, "--endpoint-file", str(tmp_path / "dsn")) as fe:
        wait_for_grpc(fe.endpoint, proc=fe.proc)
        exercise(fe.endpoint)
    assert path.exists()
    env_path = tmp_path / "from-env.db"
    with frontend(tmp_path, env=clean_env(K8S_SQL_ENDPOINT=f"sqlite://{env_path}")) as fe:
        wait_for_grpc(fe.endpoint, proc=fe.proc)
    assert env_path.exists()


@pytest.mark.parametrize("kind", ["postgres", "mariadb"])
def test_password_never_logged(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """At debug, through start, requests, a watch and shutdown; the DSN comes from a
    file (PostgreSQL) or the environment (MariaDB), so argv holds no password either."""
    db = request.getfixturevalue(f"{kind}_server")
    if kind == "postgres":
        dsn = db.new_dsn().replace("postgres://postgres@", f"postgres://postgres:{ENCODED}@")
        (tmp_path / "dsn").write_text(dsn)
        extra, env = ["--endpoint-file", str(tmp_path / "dsn")], clean_env()
    else:  # the session server skips grant tables: any password is accepted, and must still not show
        dsn = db.new_dsn().replace("mysql://root@", f"mysql://root:{ENCODED}@")
        extra, env = [], clean_env(K8S_SQL_ENDPOINT=dsn)
    with frontend(tmp_path, "--log-level", "debug", *extra, env=env) as fe:
        wait_for_grpc(fe.endpoint, proc=fe.proc)
        exercise(fe.endpoint)
        assert_no_password(fe)
        assert fe.stop() == 0
    assert_no_password(fe)
    log = fe.log()
    assert " DEBUG " in log
    scheme = "postgres://postgres" if kind == "postgres" else "mysql://root"
    assert f"ready to serve client requests on http://{fe.endpoint} (store {scheme}:***@" in log


# -- a database that is down at start --------------------------------------------------

PG_HBA = """\
local all all trust
host all postgres 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
"""


def _pg_execute(port: int, statement: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(f"postgres://postgres@127.0.0.1:{port}/postgres")
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


def test_postgres_down_at_start(tmp_path: Path) -> None:
    reason = PostgresServer.available()
    if reason:
        missing(reason)
    db = PostgresServer(free_port(), hba=PG_HBA)  # its own server: this test starts it late
    db.start()
    try:
        # A role that logs in with a password (scram-sha-256), then the server goes down.
        _pg_execute(db.port, f"CREATE ROLE k8s LOGIN CREATEDB PASSWORD '{PASSWORD}'")
        db.halt()
        dsn = f"postgres://k8s:{ENCODED}@127.0.0.1:{db.port}/k8s"
        (tmp_path / "dsn").write_text(dsn)
        with frontend(tmp_path, "--endpoint-file", str(tmp_path / "dsn"), "--log-level", "debug") as fe:
            assert_unavailable_until_ready(fe.endpoint)
            fe.wait_log("unavailable (attempt 2), retrying in 1.0 s")
            assert fe.proc.poll() is None
            db.start()
            assert wait_serving(fe.endpoint) == 2
            exercise(fe.endpoint)
            assert_no_password(fe)
        assert fe.proc.returncode == 0
        assert_no_password(fe)
        assert f"opening the database postgres://k8s:***@127.0.0.1:{db.port}/k8s" in fe.log()

        # The password from asyncpg's own sources instead of the DSN: PGPASSWORD, a passfile.
        bare = f"postgres://k8s@127.0.0.1:{db.port}/k8s"
        with frontend(tmp_path, env=clean_env(K8S_SQL_ENDPOINT=bare, PGPASSWORD=PASSWORD)) as fe:
            wait_for_grpc(fe.endpoint, proc=fe.proc)
        passfile = tmp_path / "pgpass"
        passfile.write_text(f"127.0.0.1:{db.port}:*:k8s:{PASSWORD}\n")
        passfile.chmod(0o600)
        with frontend(tmp_path, env=clean_env(K8S_SQL_ENDPOINT=bare, PGPASSFILE=str(passfile))) as fe:
            wait_for_grpc(fe.endpoint, proc=fe.proc)
        assert_no_password(fe)

        # A wrong password will not pass by retrying: one line, and the process ends.
        wrong = tmp_path / "wrong"
        wrong.write_text(f"postgres://k8s:not-{ENCODED}@127.0.0.1:{db.port}/k8s")
        line = fails_with_one_line(argv(tmp_path, free_port(), "--endpoint-file", str(wrong)))
        assert 'password authentication failed for user "k8s"' in line
        assert line.startswith(f"Error: cannot open the database postgres://k8s:***@127.0.0.1:{db.port}/k8s")
    finally:
        db.stop()


def test_mariadb_down_at_start(tmp_path: Path) -> None:
    reason = MariaDBServer.available()
    if reason:
        missing(reason)
    db = MariaDBServer(free_port(), grant_tables=True)  # its own server: accounts enforced, started late
    db.start()
    try:
        db.sql(f"CREATE USER 'k8s'@'127.0.0.1' IDENTIFIED BY '{PASSWORD}'")
        db.sql("GRANT ALL PRIVILEGES ON *.* TO 'k8s'@'127.0.0.1'")
        db.halt()
        dsn = f"mysql://k8s:{ENCODED}@tcp(127.0.0.1:{db.port})/k8s"
        with frontend(tmp_path, "--log-level", "debug", env=clean_env(K8S_SQL_ENDPOINT=dsn)) as fe:
            assert_unavailable_until_ready(fe.endpoint)
            fe.wait_log("unavailable (attempt 2), retrying in 1.0 s")
            assert fe.proc.poll() is None
            db.start()
            assert wait_serving(fe.endpoint) == 2
            exercise(fe.endpoint)
            assert_no_password(fe)
        assert fe.proc.returncode == 0
        assert_no_password(fe)

        # The password from a MySQL option file instead of the DSN.
        options = tmp_path / "my.cnf"
        options.write_text(f"[client]\npassword={PASSWORD}\n")
        options.chmod(0o600)
        bare = f"mysql://k8s@tcp(127.0.0.1:{db.port})/k8s?defaults-file={options}"
        with frontend(tmp_path, env=clean_env(K8S_SQL_ENDPOINT=bare)) as fe:
            wait_for_grpc(fe.endpoint, proc=fe.proc)
        assert_no_password(fe)

        wrong = f"mysql://k8s:not-{ENCODED}@tcp(127.0.0.1:{db.port})/k8s"
        line = fails_with_one_line(argv(tmp_path, free_port()), env=clean_env(K8S_SQL_ENDPOINT=wrong))
        assert "Access denied for user 'k8s'" in line
    finally:
        db.stop()


# -- --workers keep the logging settings -----------------------------------------------


def test_workers_log_at_the_level_given(tmp_path: Path) -> None:
    with frontend(tmp_path, "--workers", "2", "--log-level", "debug") as fe:
        wait_for_grpc(fe.endpoint, proc=fe.proc)
        for i in range(2):
            fe.wait_log(f"DEBUG k8s_sql: frontend default-{i} starting (pid ")
        deadline = time.monotonic() + 30
        while fe.log().count("INFO k8s_sql: ready to serve client requests") < 2:
            assert time.monotonic() < deadline, fe.log()
            time.sleep(0.05)
    assert fe.proc.returncode == 0, fe.log()
    # the command's format (time, level, logger) in the workers too
    line = next(x for x in fe.log().splitlines() if "frontend default-1 starting" in x)
    date, clock, level, logger = line.split()[:4]
    assert (len(date), clock[2], level, logger) == (10, ":", "DEBUG", "k8s_sql:")
    with frontend(tmp_path, "--workers", "2", "--log-level", "warn") as quiet:
        wait_for_grpc(quiet.endpoint, proc=quiet.proc)
    assert " DEBUG " not in quiet.log() and " INFO " not in quiet.log(), quiet.log()
