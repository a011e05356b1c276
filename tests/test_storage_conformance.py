"""The Kubernetes storage conformance suite against k8s-sql.

Runs ``conformance/storage/run.sh``: k8s.io/apiserver v0.37.2's
``pkg/storage/etcd3`` and ``pkg/storage/cacher`` tests, with
``etcd3/testserver.RunEtcd`` replaced by one that starts a fresh k8s-sql per
call. Asserts that the suite ran, that tests really reached k8s-sql, and that
nothing outside ``conformance/storage/known_failures.txt`` failed.

By default the whole suite runs (about 5 minutes here once built; the first
run downloads modules and compiles the test binaries, 15+ minutes on a small
machine). Narrow it with the same variables run.sh reads:

  K8S_SQL_STORAGE_RUN   go test -run filter (default: every test)
  K8S_SQL_STORAGE_PKGS  packages under pkg/storage (default "etcd3 cacher")

The default runs it on SQLite only. ``K8S_SQL_STORAGE_BACKENDS=sqlite,postgres,mariadb``
runs it once per backend (each k8s-sql then gets a new database on the session's
throwaway PostgreSQL/MariaDB server, through K8S_SQL_ENDPOINT_TEMPLATE).

Without Go the test is skipped (it fails in strict mode).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, missing

SCRIPT = ROOT / "conformance/storage/run.sh"
KNOWN = ROOT / "conformance/storage/known_failures.txt"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(7200)]

STORAGE_BACKENDS = [b for b in os.environ.get("K8S_SQL_STORAGE_BACKENDS", "sqlite").split(",") if b]


@pytest.fixture(params=STORAGE_BACKENDS)
def endpoint_template(request: pytest.FixtureRequest) -> str:
    """Empty for SQLite; else a database URL whose {n} gives every server a new database."""
    if request.param == "sqlite":
        return ""
    server = request.getfixturevalue(f"{request.param}_server")
    return str(server.new_dsn()) + "_{n}"


def known_failures() -> dict[str, str]:
    """``name reason`` lines of known_failures.txt; every entry needs a reason."""
    out: dict[str, str] = {}
    for line in KNOWN.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, reason = line.partition(" ")
            assert reason.strip(), f"known_failures.txt: {name} has no reason"
            out[name] = reason.strip()
    return out


def run_suite(results: Path, endpoint_template: str, timeout: float) -> tuple[int, str, str]:
    env = {
        **os.environ,
        "K8S_SQL_PYTHON": sys.executable,
        "K8S_SQL_STORAGE_RESULTS": str(results),
        "K8S_SQL_ENDPOINT_TEMPLATE": endpoint_template,
    }
    # Its own session, so a timeout stops go test, the test binaries and the
    # servers (which also die with their test binary: Pdeathsig).
    proc = subprocess.Popen(
        ["bash", str(SCRIPT)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"run.sh did not finish in {timeout:.0f}s:\n{err[-4000:]}\n{out[-4000:]}")
    return proc.returncode, out, err


def test_storage_conformance(tmp_path: Path, endpoint_template: str) -> None:
    if shutil.which("go") is None:
        missing("Go is not installed, so the Kubernetes storage tests cannot be built (see conformance/storage)")
    known = known_failures()
    start = time.monotonic()
    rc, out, err = run_suite(tmp_path, endpoint_template, timeout=7000)
    report = out.rstrip()
    print(f"\n{report}\n(run.sh exit {rc}, {time.monotonic() - start:.0f}s)")
    assert rc in (0, 1), f"the suite did not run (exit {rc}):\n{err[-6000:]}\n{report}"
    assert report.splitlines()[-1].startswith("storage conformance: "), report

    rows = [line.split("\t") for line in (tmp_path / "results.txt").read_text().splitlines() if line]
    assert rows, "no test results"
    status = {name: st for st, name, *_ in rows}
    assert "PASS" in status.values(), report
    reached = [name for _st, name, _secs, notes in rows if "k8s-sql" in notes.split(",")]
    assert reached, "no test reached a k8s-sql server: is the testserver replacement in place?"

    unexpected = sorted(n for n, st in status.items() if st == "FAIL" and n not in known)
    assert not unexpected, (
        "failures outside conformance/storage/known_failures.txt:\n  "
        + "\n  ".join(unexpected)
        + f"\n\n{report}\n\nraw go test -json: {tmp_path / 'test.json'}"
    )
