"""Linearizability and etcd's watch guarantees under faults, on every backend, with a
real etcd as the control (the same workload and checker must pass on it).

Each run: several concurrent clients (multi-key txns, puts with leases of 2-3 s TTL,
deletes, current/historical/serializable reads) spread over the frontends, leases kept
alive, revoked or left to expire, compaction running, reference and random watches, and
faults injected on a schedule. Then ``checker.check`` proves the history linearizable
and the watches correct (see its docstring for exactly what that covers).

``K8S_SQL_LINEARIZABILITY_SECONDS`` (default 12) sets each run's workload time; faults
repeat in turn for longer runs. Each run prints one line (backend, frontends, operations,
faults, result, seconds) and records it as the user property ``linearizability``.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .checker import check
from .faults import Faults
from .workload import FAULT_CODES, Workload, summarize_errors

SECONDS = float(os.environ.get("K8S_SQL_LINEARIZABILITY_SECONDS", "12"))

FRONTEND_FAULTS = ["sigstop-frontend", "kill9-frontend"]
DB_FAULTS = ["kill9-frontend", "restart-db", "sigstop-frontend", "kill9-db"]
PG_FAULTS = DB_FAULTS  # (PostgresServer.start spawns through setpriv: see testing/databases.py)


def _targets() -> list[str]:
    from conftest import BACKENDS

    return ["etcd", *BACKENDS]


@pytest.mark.slow
@pytest.mark.timeout(300 + 4 * SECONDS)
@pytest.mark.parametrize("target", _targets())
def test_linearizable_under_faults(target: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    from conftest import missing

    from testing.databases import MariaDBServer, PostgresServer
    from testing.servers import free_port

    started = time.monotonic()
    db = None
    progress = ("--watch-progress-notify-interval", "1s")
    try:
        if target == "etcd":
            etcd_factory: Callable[..., object] = request.getfixturevalue("etcd_factory")
            frontends = [etcd_factory(*progress)]
            kinds = FRONTEND_FAULTS
        elif target == "sqlite":
            factory = request.getfixturevalue("k8s_sql_factory")
            frontends = [factory(*progress)]
            kinds = FRONTEND_FAULTS
        else:
            server_class = {"postgres": PostgresServer, "mariadb": MariaDBServer}[target]
            reason = server_class.available()
            if reason:
                missing(reason)
            db = server_class(free_port())  # its own server: the faults stop and kill it
            db.start()
            factory = request.getfixturevalue("k8s_sql_factory")
            dsn = db.new_dsn()
            frontends = [factory(*progress, "--endpoint", dsn) for _ in range(2)]
            kinds = PG_FAULTS if target == "postgres" else DB_FAULTS
        endpoints = [f.endpoint for f in frontends]  # type: ignore[attr-defined]

        seed = int(os.environ.get("K8S_SQL_LINEARIZABILITY_SEED", str(int(time.time()) % 100000)))
        workload = Workload(endpoints, seed)
        faults = Faults(frontends, db, kinds, seed)
        workload.start()
        faults.run(begin=1.5, end=max(2.0, SECONDS - 2.0))
        time.sleep(SECONDS)  # the workload runs for its allotted time: nothing to wait for
        faults.stop()
        problems = workload.finish()
        history = workload.rec.history
        report = check(history)
        st = report.stats
        errors = summarize_errors(history)
        odd = {error: n for error, n in errors.items() if error not in FAULT_CODES and not error.islower()}
        line = (
            f"{target}: {len(frontends)} frontend(s), seed {seed}, {st['ops']} ops "
            f"({st['ops_ok']} ok, {st['ops_error']} definite errors, {st['ops_unknown']} unknown, "
            f"{st['unknown_applied']} of those applied), {st['revisions']} revisions, "
            f"{st['lease_expiries']} lease expiries, {st['watch_streams']} watch streams with "
            f"{st['watch_events']} events; faults: {', '.join(map(str, faults.injected)) or 'none'}; "
            f"result: {'PASS' if report.ok and not problems and not odd else 'FAIL'}"
            "; "
            f"{time.monotonic() - started:.0f}s"
        )
        print("\nlinearizability", line)
        if not (report.ok and not problems):
            dump = tmp_path / "history.pickle"
            dump.write_bytes(pickle.dumps(history))
            line += f" (history: {dump})"
        request.node.user_properties.append(("linearizability", line))
        assert not faults.errors, f"a fault could not be injected or undone: {faults.errors}"
        assert not problems, f"the run did not finish cleanly: {problems}"
        assert report.ok, f"{line}\n{report.summary()}"
        assert not odd, f"errors that no fault explains: {odd}"
        # the run exercised what it claims to
        assert st["ops_ok"] >= 200 and st["revisions"] >= 100, line
        assert st["lease_expiries"] >= 1, f"no lease expired with keys attached: {line}"
        assert any(op.status == "ok" and type(op.req).__name__ == "Compact" for op in history.ops), "no compaction"
        assert len(faults.injected) >= min(len(kinds), 2), f"faults injected: {faults.injected}"
    finally:
        if db is not None:
            for f in frontends if "frontends" in locals() else []:
                f.stop()  # type: ignore[attr-defined]
            db.stop()
