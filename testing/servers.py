"""Server processes on free loopback ports, for the tests and the benchmark harness.

Each server runs in a session of its own (``start_new_session``) with its output in a log
file; it is ready when its gRPC endpoint answers, and a server that exits first is
reported at once with its log instead of after the timeout.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

LOG_TAIL = 20000  # characters of a server's log shown when it does not start


def _ephemeral_ports() -> range:
    """The kernel's range for the local ports of outgoing connections."""
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999  # Linux's default
    return range(lo, hi + 1)


def free_port() -> int:
    """A port nothing listens on now, for a server about to start.

    Not one ``bind(0)`` hands out: that comes from the ephemeral range, where every
    outgoing connection (to a database, to another server, a client's) takes its local
    port, and one did take it before the server could bind it (CI: "address already in
    use"). So a port below that range, drawn at random from this pytest-xdist worker's
    own share of it, and checked free by binding it."""
    ephemeral = _ephemeral_ports()
    low, high = 10_000, ephemeral.start
    if high - low < 1_000:  # (an ephemeral range reaching down low: draw above it)
        low, high = ephemeral.stop, 65_536
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0) % workers
    share = (high - low) // workers
    start = low + worker * share
    for _ in range(200 if share > 0 else 0):
        port = random.randrange(start, start + share)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # (a machine whose ports are all taken: let the kernel choose)
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    ready: Callable[[], bool], timeout: float, proc: subprocess.Popen[bytes] | None, interval: float
) -> None:
    """Poll ``ready`` every ``interval`` seconds until it holds: RuntimeError as soon as
    ``proc`` has exited, TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        if ready():
            return
        time.sleep(interval)
    raise TimeoutError(f"not ready after {timeout}s")


def wait_for_grpc(
    endpoint: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None, probe: str = "status"
) -> None:
    """Wait until a server answers an RPC (not merely accepts TCP): Maintenance.Status, or
    with ``probe="range"`` a KV Range (every etcd API server has it; kine has no Status)."""
    import grpc

    from k8s_sql.pb import rpc_pb2, rpc_pb2_grpc

    last: list[grpc.RpcError] = []

    def answers() -> bool:
        try:
            with grpc.insecure_channel(endpoint) as ch:
                if probe == "status":
                    rpc_pb2_grpc.MaintenanceStub(ch).Status(rpc_pb2.StatusRequest(), timeout=1)
                else:
                    rpc_pb2_grpc.KVStub(ch).Range(rpc_pb2.RangeRequest(key=b"/ready-probe", limit=1), timeout=1)
            return True
        except grpc.RpcError as e:
            last[:] = [e]
            return False

    try:
        wait_until(answers, timeout, proc, 0.05)
    except TimeoutError:
        raise TimeoutError(f"{endpoint} not ready after {timeout}s: {last[0] if last else None}") from None


def stop_process(
    proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 10.0, group: bool = False
) -> None:
    """Send ``sig`` to a running child, or with ``group`` to its whole process group (it was
    started with ``start_new_session``), and wait for it; SIGKILL (likewise) after ``timeout``
    seconds."""
    if proc is None or proc.poll() is not None:
        return

    def send(s: int) -> None:
        try:
            if group:
                os.killpg(proc.pid, s)
            else:
                proc.send_signal(s)
        except ProcessLookupError:
            pass

    send(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()


def start_logged(
    argv: list[str], log_path: Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a session of its own, its stdout and stderr appended to ``log_path``."""
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)


@dataclass
class ServerProcess:
    """A server started as a child process on a loopback port."""

    endpoint: str  # host:port
    data_dir: Path
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    name: str = ""  # in error messages (argv[0] if empty)
    cwd: Path | None = None  # its working directory, created on start (None: ours)
    probe: str = "status"  # the readiness RPC (see wait_for_grpc)
    stop_timeout: float = 10.0  # seconds from SIGTERM to SIGKILL
    group: bool = False  # stop() and kill9() signal the whole process group

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> None:
        if self.cwd is not None:
            self.cwd.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = start_logged(self.argv, self.log_path, self.cwd, {**os.environ, **self.env})
        try:
            wait_for_grpc(self.endpoint, timeout, self.proc, self.probe)
        except Exception as e:
            self.stop()
            raise RuntimeError(f"{self.name or self.argv[0]} did not start ({e}); log:\n{self.log()}") from None

    def kill9(self) -> None:
        assert self.proc is not None
        stop_process(self.proc, signal.SIGKILL, group=self.group)

    def stop(self) -> None:
        stop_process(self.proc, timeout=self.stop_timeout, group=self.group)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL:]
        except FileNotFoundError:
            return ""


def k8s_sql_argv(port: int, data_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "k8s_sql",
        "--data-dir",
        str(data_dir),
        "--listen-client-urls",
        f"http://127.0.0.1:{port}",
        "--log-level",
        "warn",
        *extra,
    ]


def etcd_argv(
    peers_bin: Path, client_port: int, peer_port: int, data_dir: Path, *extra: str, name: str = "etcd"
) -> list[str]:
    """A single-node etcd with etcd's defaults (durable: the tests add ``--unsafe-no-fsync``)."""
    return [
        str(peers_bin / "etcd"),
        "--name",
        name,
        "--data-dir",
        str(data_dir),
        "--listen-client-urls",
        f"http://127.0.0.1:{client_port}",
        "--listen-peer-urls",
        f"http://127.0.0.1:{peer_port}",
        *extra,
    ]


def restored_etcd(peers_bin: Path, snapshot: Path, d: Path) -> tuple[ServerProcess, dict[str, object]]:
    """``etcdutl snapshot status`` of an etcd snapshot (its JSON), then ``etcdutl snapshot
    restore`` into ``d/data`` and a single-node etcd started on it."""
    import json

    etcdutl = str(peers_bin / "etcdutl")
    status = subprocess.run(
        [etcdutl, "snapshot", "status", str(snapshot), "-w", "json"], capture_output=True, text=True
    )
    assert status.returncode == 0, status.stderr
    port, peer = free_port(), free_port()
    data = d / "data"
    restore = subprocess.run(
        [
            etcdutl, "snapshot", "restore", str(snapshot), "--data-dir", str(data), "--name", "restored",
            "--initial-cluster", f"restored=http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
        ],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert restore.returncode == 0, restore.stderr
    etcd = ServerProcess(
        f"127.0.0.1:{port}",
        data,
        etcd_argv(peers_bin, port, peer, data, "--unsafe-no-fsync", name="restored"),
        d / "etcd.log",
    )
    etcd.start()
    return etcd, json.loads(status.stdout)
