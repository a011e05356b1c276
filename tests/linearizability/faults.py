"""Faults injected during a run, on a schedule, each recorded with its time.

- ``kill9-frontend``: SIGKILL one frontend (k8s-sql or etcd), start it again on the same
  port and data.
- ``sigstop-frontend``: SIGSTOP one frontend for 1.5 s (its clients time out; the requests
  it holds may still take effect after SIGCONT), then SIGCONT.
- ``restart-db``: stop the database server (fast shutdown: connections are cut) and start it.
- ``kill9-db``: SIGKILL the database server's whole process group, as a host crash would,
  and start it (it recovers from its own log).
- ``kill9-galera-node``: SIGKILL one node of a Galera cluster (``db`` is a
  :class:`testing.databases.GaleraCluster`), leave it down 1 s while the others carry
  on, and start it again: it rejoins by incremental state transfer (IST).
"""

from __future__ import annotations

import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Fault:
    kind: str
    target: str
    start: float
    end: float = 0.0

    note: str = ""

    def __str__(self) -> str:
        return f"{self.kind}({self.target}) {self.end - self.start:.1f}s{self.note}"


@dataclass
class Faults:
    """Injects ``kinds`` in turn, evenly spread over [begin, end] seconds after ``run``."""

    frontends: list[Any]  # testing.servers.ServerProcess
    db: Any | None  # testing.databases.PostgresServer / MariaDBServer
    kinds: list[str]
    seed: int
    injected: list[Fault] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def run(self, begin: float, end: float) -> None:
        self._thread = threading.Thread(target=self._loop, args=(begin, end), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(120)

    def _loop(self, begin: float, end: float) -> None:
        if not self.kinds:
            return
        rng = random.Random(self.seed)
        t0 = time.monotonic()
        at = begin
        n = 0
        spacing = max(2.0, (end - begin) / max(1, len(self.kinds) - 1))
        while at <= end or n < len(self.kinds):  # every kind at least once, then repeat while time allows
            if self._stop.wait(max(0.0, t0 + at - time.monotonic())):
                return
            kind = self.kinds[n % len(self.kinds)]
            try:
                self._inject(kind, rng)
            except Exception as e:  # a fault that cannot be undone ends the run's faults, loudly
                self.errors.append(f"{kind}: {e!r}")
                return
            n += 1
            at = max(at + spacing, time.monotonic() - t0 + 1.0)

    def _start_db(self, fault: Fault) -> None:
        """Start the database again; once more if it does not come up (once, in a loaded run,
        a PostgreSQL started after a fast shutdown logged nothing for 30 s)."""
        assert self.db is not None
        try:
            self.db.start()
        except RuntimeError as e:
            fault.note = f" (start retried: {str(e).splitlines()[0]})"
            self.db.kill9()
            self.db.start()

    def _inject(self, kind: str, rng: random.Random) -> None:
        if kind == "kill9-galera-node":
            self._galera_node(rng)
            return
        if kind.endswith("-frontend"):
            i = rng.randrange(len(self.frontends))
            target, proc = f"frontend{i}", self.frontends[i]
        else:
            assert self.db is not None, f"{kind} needs a database server"
            target, proc = "db", self.db
        fault = Fault(kind, target, time.monotonic())
        self.injected.append(fault)
        if kind == "kill9-frontend":
            proc.kill9()
            self._stop.wait(0.5)
            proc.start()
        elif kind == "sigstop-frontend":
            proc.proc.send_signal(signal.SIGSTOP)
            try:
                self._stop.wait(1.5)
            finally:
                proc.proc.send_signal(signal.SIGCONT)
        elif kind == "restart-db":
            proc.halt()
            self._stop.wait(0.5)
            self._start_db(fault)
        elif kind == "kill9-db":
            proc.kill9()
            self._start_db(fault)
        else:
            raise ValueError(kind)
        fault.end = time.monotonic()

    def _galera_node(self, rng: random.Random) -> None:
        assert self.db is not None and hasattr(self.db, "nodes"), "kill9-galera-node needs a GaleraCluster"
        node = self.db.nodes[rng.randrange(len(self.db.nodes))]
        fault = Fault("kill9-galera-node", f"node{node.index}", time.monotonic())
        self.injected.append(fault)
        before = node.log.read_text(errors="replace")
        self.db.kill9(node)
        self._stop.wait(1.0)
        self.db.start_node(node)
        after = node.log.read_text(errors="replace")
        # A node that missed no commit while it was down needs no transfer at all (CI's
        # load once kept every write off the cluster for that second).
        if after.count("IST received") > before.count("IST received"):
            fault.note = " (rejoined by IST)"
        elif after.count("SST received") > before.count("SST received"):
            fault.note = " (rejoined by SST)"
        else:
            fault.note = " (rejoined, nothing to transfer)"
        fault.end = time.monotonic()
