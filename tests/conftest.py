"""Shared fixtures: real servers (k8s-sql, etcd) and real tools (etcdctl, benchmark).

Strict mode (``K8S_SQL_STRICT=1``, set by CI): a missing tool or server fails the
test instead of skipping it, so CI can never pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from testing.databases import MariaDBServer, PostgresServer
from testing.servers import (  # the test modules import these from here
    ServerProcess as ServerProcess,
    etcd_argv,
    free_port as free_port,
    k8s_sql_argv as k8s_sql_argv,
    wait_for_grpc as wait_for_grpc,
)

ROOT = Path(__file__).resolve().parent.parent
STRICT = os.environ.get("K8S_SQL_STRICT", "") not in ("", "0", "false")
PEERS_VERSION = "v3.6.16"
PEERS_BIN = Path(os.environ.get("K8S_SQL_PEERS_BIN", Path.home() / ".cache/k8s-sql/peers" / PEERS_VERSION))


def missing(what: str) -> None:
    """Skip on a laptop, fail in CI."""
    if STRICT:
        pytest.fail(f"{what} (strict mode: nothing may be skipped)")
    pytest.skip(what)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the test (``item.failed_call``) for fixtures' teardown."""
    report = yield
    if report.when == "call" and report.failed:
        item.failed_call = True  # type: ignore[attr-defined]
    return report


@pytest.fixture
def k8s_sql_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., ServerProcess]]:
    """Start k8s-sql servers: ``factory(*extra_args, data_dir=None, start=True)``. When
    the test fails, the end of each server's log is printed with the failure."""
    servers: list[ServerProcess] = []

    def make(*extra: str, data_dir: Path | None = None, start: bool = True) -> ServerProcess:
        port = free_port()
        d = data_dir or tmp_path / f"k8s-sql-{len(servers)}"
        s = ServerProcess(f"127.0.0.1:{port}", d, k8s_sql_argv(port, d, *extra), tmp_path / f"k8s-sql-{port}.log")
        # A native crash prints every thread's Python stack to the log (CI saw a --workers
        # process abort once with glibc's "double free or corruption" and nothing else).
        s.env["PYTHONFAULTHANDLER"] = "1"
        servers.append(s)
        if start:
            s.start()
        return s

    yield make
    for s in servers:
        s.stop()
    if getattr(request.node, "failed_call", False):
        for s in servers:
            print(f"--- k8s-sql {s.endpoint} log (end) ---\n{s.log()[-4000:]}")


BACKENDS = [b for b in os.environ.get("K8S_SQL_BACKENDS", "sqlite,postgres,mariadb").split(",") if b]


@pytest.fixture(params=BACKENDS)
def backend_args(request: pytest.FixtureRequest) -> list[str]:
    """k8s-sql arguments selecting a fresh store on each backend in turn (sqlite:
    the default data directory; postgres, mariadb: a new database on the session's
    throwaway server). ``K8S_SQL_BACKENDS=sqlite`` narrows the run."""
    if request.param == "sqlite":
        return []
    server = request.getfixturevalue(f"{request.param}_server")
    return ["--endpoint", server.new_dsn()]


@pytest.fixture
def k8s_sql(k8s_sql_factory: Callable[..., ServerProcess], backend_args: list[str]) -> ServerProcess:
    """A fresh k8s-sql, once per backend."""
    return k8s_sql_factory("--watch-progress-notify-interval", "1s", *backend_args)


@pytest.fixture(scope="session")
def peers_bin() -> Path:
    """The directory holding etcd, etcdctl and benchmark built from the Go module proxy."""
    needed = ("etcd", "etcdctl", "benchmark")
    if all((PEERS_BIN / b).exists() for b in needed):
        return PEERS_BIN
    if shutil.which("go") is None:
        missing("Go is not installed, so etcd/etcdctl cannot be built (see peers/README.md)")
    try:
        subprocess.run(
            ["bash", str(ROOT / "peers/build.sh")],
            check=True,
            env={**os.environ, "K8S_SQL_PEERS_BIN": str(PEERS_BIN)},
            stdout=subprocess.DEVNULL,
            timeout=1800,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        missing(f"building the etcd peers failed: {e}")
    return PEERS_BIN


@pytest.fixture(scope="session")
def kine_bin() -> Path:
    """kine v0.17 from bench/build.sh (built once, cached)."""
    if shutil.which("go") is None:
        missing("Go is not installed, so kine cannot be built (bench/build.sh)")
    res = subprocess.run(["bash", str(ROOT / "bench/build.sh")], capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    return Path(res.stdout.strip().splitlines()[-1]) / "kine"


@pytest.fixture
def kine_factory(
    kine_bin: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[str], tuple[ServerProcess, str]]]:
    """Start kine on ``sqlite``, ``postgres`` or ``mariadb`` (a new database on the
    session's server): the running kine and its DSN, for reading its table afterwards."""
    started: list[ServerProcess] = []

    def make(db: str) -> tuple[ServerProcess, str]:
        if db == "sqlite":
            dsn = f"sqlite://{tmp_path}/kine-{len(started)}.db"
        elif db == "postgres":
            dsn = request.getfixturevalue("postgres_server").new_dsn() + "?sslmode=disable"
        else:
            dsn = request.getfixturevalue("mariadb_server").new_dsn()
        port = free_port()
        kine = ServerProcess(
            f"127.0.0.1:{port}",
            tmp_path / "kine",
            [str(kine_bin), "--listen-address", f"127.0.0.1:{port}", "--endpoint", dsn],
            tmp_path / f"kine-{port}.log",
            probe="range",
        )
        started.append(kine)
        kine.start()
        return kine, dsn

    yield make
    for kine in started:
        kine.stop()


@pytest.fixture
def etcdctl(peers_bin: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real etcdctl: ``etcdctl(endpoint, *args, input=None, check=True)``."""

    def run(
        endpoint: str, *args: str, input: str | None = None, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        cmd = [
            str(peers_bin / "etcdctl"),
            f"--endpoints={endpoint}",
            "--dial-timeout=5s",
            "--command-timeout=20s",
            *args,
        ]
        res = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"etcdctl {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    return run


@pytest.fixture
def etcd_factory(peers_bin: Path, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start real etcd servers (the differential oracle)."""
    servers: list[ServerProcess] = []

    def make(*extra: str) -> ServerProcess:
        for attempt in range(3):
            port, peer = free_port(), free_port()
            d = tmp_path / f"etcd-{len(servers)}-{attempt}"
            argv = etcd_argv(peers_bin, port, peer, d, "--unsafe-no-fsync", *extra, name="oracle")
            s = ServerProcess(f"127.0.0.1:{port}", d, argv, tmp_path / f"etcd-{port}.log")
            try:
                s.start()
            except RuntimeError as e:
                # a free port taken by another worker's server before etcd bound it
                if "address already in use" not in str(e) or attempt == 2:
                    raise
                continue
            servers.append(s)
            return s
        raise AssertionError("unreachable")

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def etcd(etcd_factory: Callable[..., ServerProcess]) -> ServerProcess:
    """A fresh real etcd (single node, no fsync: it is the oracle, not the subject)."""
    return etcd_factory("--watch-progress-notify-interval", "1s")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--store-durations",
        action="store_true",
        help="write each test's seconds to tests/durations.json, which orders the work of "
        "pytest-xdist's workers (tests/scheduling.py)",
    )


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Finer units, longest first (tests/scheduling.py), under ``--dist loadscope``."""
    from scheduling import LongestFirst

    return LongestFirst(config, log) if config.getvalue("dist") == "loadscope" else None


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The differential totals (tests/differential), from the reports' user properties:
    this conftest is the one pytest-xdist's controller loads."""
    from differential.test_differential import Totals

    totals = Totals()
    lines: dict[str, list[str]] = {}
    for outcome in ("passed", "failed"):
        for report in terminalreporter.stats.get(outcome, []):
            if getattr(report, "when", None) != "call":
                continue
            for name, value in getattr(report, "user_properties", []):
                if name == "differential":
                    totals.add(*value)
                elif name in ("linearizability", "fuzz", "resources"):
                    lines.setdefault(name, []).append(str(value))
    if totals.runs:
        terminalreporter.write_sep("=", "differential against etcd")
        terminalreporter.write_line(totals.line())
    for name, found in sorted(lines.items()):
        terminalreporter.write_sep("=", name)
        for line in sorted(found):
            terminalreporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In strict mode a skipped test is a failure: CI must not pass by skipping."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if session.config.getoption("store_durations") and not hasattr(session.config, "workerinput"):
        from scheduling import store_durations

        reporter.write_line(f"durations of {store_durations(reporter)} tests written to tests/durations.json")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if STRICT and skipped and exitstatus == 0:
        reporter.write_line(f"strict mode: {len(skipped)} test(s) skipped; failing the run", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


DB = TypeVar("DB", PostgresServer, MariaDBServer)


def _session_database(server_class: type[DB]) -> Iterator[DB]:
    """One throwaway database server for the session; each store gets its own database."""
    reason = server_class.available()
    if reason:
        missing(reason)
    server = server_class(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    yield from _session_database(PostgresServer)


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[MariaDBServer]:
    yield from _session_database(MariaDBServer)
