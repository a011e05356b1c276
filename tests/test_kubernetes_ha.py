"""High availability end to end: two k8s-sql frontends on one PostgreSQL database,
with stock kube-apiservers on top.

- apiserver A talks to frontend 1 only, apiserver B to frontend 2 only, and
  apiserver C to both (``--etcd-servers=http://fe1,http://fe2``);
- writes through A are seen, every one and in order, by a watch through B;
- frontend 1 is killed with SIGKILL while a writer keeps creating objects through C:
  C carries on (writes and reads succeed again within a bounded time), nothing it
  acknowledged is lost, and B's watch, opened before the kill, still sees every
  write in order.

The apiservers share the service-account keys and the token file; each has its own
secure port and certificate directory.
"""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import test_kubernetes_e2e as e2e
from conftest import ServerProcess, free_port, k8s_sql_argv
from test_kubernetes_e2e import _BUILT, EXTRA_SERVER_ARGS, Cluster, RawWatch, summary

kube_bin = e2e.kube_bin  # the session fixture that builds (or finds) the binaries

pytestmark = pytest.mark.timeout(600 if _BUILT else 3600)

FAILOVER_BOUND_S = 30.0  # C must write and read again within this long after the kill


@dataclass
class HACluster(Cluster):
    """A kube-apiserver whose --etcd-servers is a list of frontends."""

    frontends: list[ServerProcess] = field(default_factory=list)

    def argv(self) -> list[str]:
        urls = ",".join(f.url for f in self.frontends)
        return [f"--etcd-servers={urls}" if a.startswith("--etcd-servers=") else a for a in super().argv()]


@dataclass
class HA:
    fe1: ServerProcess
    fe2: ServerProcess
    a: HACluster  # fe1 only
    b: HACluster  # fe2 only
    c: HACluster  # fe1 and fe2
    timings: dict[str, float] = field(default_factory=dict)


def _frontend(d: Path, name: str, dsn: str) -> ServerProcess:
    port = free_port()
    argv = k8s_sql_argv(port, d / name, "--name", name, "--endpoint", dsn, *EXTRA_SERVER_ARGS)
    return ServerProcess(f"127.0.0.1:{port}", d / name, argv, d / f"{name}.log")


@pytest.fixture(scope="module")
def ha(request: pytest.FixtureRequest, kube_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HA]:
    dsn = request.getfixturevalue("postgres_server").new_dsn()
    d = tmp_path_factory.mktemp("kube-ha")
    fe1, fe2 = _frontend(d, "fe1", dsn), _frontend(d, "fe2", dsn)
    fe1.start()
    fe2.start()
    a = HACluster(bin=kube_bin, dir=d / "a", store=fe1, watch_cache=True, frontends=[fe1])
    b = HACluster(bin=kube_bin, dir=d / "b", store=fe2, watch_cache=True, frontends=[fe2])
    c = HACluster(bin=kube_bin, dir=d / "c", store=fe2, watch_cache=True, frontends=[fe1, fe2])
    started: list[HACluster] = []
    try:
        # A first: it makes the keys and bootstraps the cluster objects; then B and C
        # together, sharing A's service-account keys and tokens
        a.dir.mkdir()
        a.start()
        started.append(a)
        errors: list[BaseException] = []
        for other in (b, c):
            other.dir.mkdir()
            for f in ("sa.key", "sa.pub", "tokens.csv"):
                shutil.copy(a.dir / f, other.dir / f)

        def start(k: HACluster) -> None:
            try:
                k.start()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=start, args=(k,)) for k in (b, c)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        started += [b, c]
        if errors:
            raise errors[0]
        h = HA(fe1, fe2, a, b, c)
        print(
            "\n[ha] apiservers ready in "
            + ", ".join(f"{n}={k.timings['apiserver_start_s']:.1f}s" for n, k in (("A", a), ("B", b), ("C", c)))
        )
        yield h
        for n, v in h.timings.items():
            print(f"[ha] {n} = {v:.3f}")
    finally:
        # all at once, and not patiently: A has lost its only frontend, and its
        # graceful shutdown would wait for it
        for k in started:
            if k.proc is not None and k.proc.poll() is None:
                k.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for k in started:
            assert k.proc is not None
            try:
                k.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                k.proc.kill()
                k.proc.wait()
        fe1.stop()
        fe2.stop()


def _cm(name: str, ns: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": ns}, "data": data}


def test_writes_through_one_apiserver_are_watched_through_another(ha: HA) -> None:
    a, b = ha.a, ha.b
    a.kubectl("create", "namespace", "ha")
    # B learns of the namespace through its own frontend
    deadline = time.monotonic() + 10
    while b.kubectl("get", "namespace", "ha", check=False).returncode != 0:
        assert time.monotonic() < deadline, "B never saw the namespace created through A"
        time.sleep(0.1)
    # `kubectl get -w --output-watch-events` through B lists, then watches from the
    # list's resourceVersion; a sentinel made first shows when its list is done
    a.kubectl("create", "configmap", "sentinel", "-n", "ha")
    kw = RawWatchCmd(b, "get", "configmaps", "-n", "ha", "-w", "--output-watch-events", "-o", "json")
    w: RawWatch | None = None
    try:
        sentinel = [("ADDED", "sentinel")]
        got_kw = kw.wait_for(lambda evs: [(t, n) for t, n, _ in evs] == sentinel, 15)
        assert [(t, n) for t, n, _ in got_kw] == sentinel, (got_kw, kw.err())
        # and a watch through B from B's own list (the watch API)
        rv = b.json("GET", "/api/v1/namespaces/ha/configmaps")["metadata"]["resourceVersion"]
        w = RawWatch(b, "/api/v1/namespaces/ha/configmaps", rv)
        expected: list[tuple[str, str, str]] = []
        for i in range(10):
            obj = a.apply_json("create", _cm(f"x{i}", "ha", i=str(i)))
            expected.append(("ADDED", f"x{i}", obj["metadata"]["resourceVersion"]))
        for i in (2, 5, 7):
            out = a.kubectl("patch", "configmap", f"x{i}", "-n", "ha", "-p", '{"data":{"p":"1"}}', "-o", "json")
            expected.append(("MODIFIED", f"x{i}", json.loads(out.stdout)["metadata"]["resourceVersion"]))
        for i in (0, 5):
            a.json("DELETE", f"/api/v1/namespaces/ha/configmaps/x{i}")
            expected.append(("DELETED", f"x{i}", "?"))
        events = w.wait_for(len(expected), timeout=30)
        got = [(t, n, "?" if t == "DELETED" else r) for t, n, r in summary(events)]
        assert got == expected, f"\nexpected {expected}\ngot      {got}\n{w.stderr()}"
        rvs = [int(r) for _, _, r in summary(events)]
        assert rvs == sorted(rvs) and len(set(rvs)) == len(rvs), rvs
        want_kw = sentinel + [(t, n) for t, n, _ in expected]
        kevents = kw.wait_for(lambda evs: len(evs) >= len(want_kw), 30)
        assert [(t, n) for t, n, _ in kevents] == want_kw, (kevents, kw.err())
        assert [r for _, _, r in kevents[1:]] == [r for _, _, r in summary(events)], "the two watches disagree"
        # the same data through both apiservers
        names_a = sorted(i["metadata"]["name"] for i in a.json("GET", "/api/v1/namespaces/ha/configmaps")["items"])
        names_b = sorted(i["metadata"]["name"] for i in b.json("GET", "/api/v1/namespaces/ha/configmaps")["items"])
        assert names_a == names_b == ["sentinel"] + [f"x{i}" for i in (1, 2, 3, 4, 6, 7, 8, 9)], (names_a, names_b)
    finally:
        if w is not None:
            w.stop()
        kw.stop()


class RawWatchCmd:
    """A kubectl command whose stdout is a stream of JSON objects (``get -w -o json``)."""

    def __init__(self, k: Cluster, *args: str) -> None:
        self.proc = subprocess.Popen(
            k.kubectl_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=k.kubectl_env()
        )
        self.events: list[tuple[str, str, str]] = []
        self._cond = threading.Condition()
        self._eof = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        dec = json.JSONDecoder()
        buf = ""
        for line in self.proc.stdout:
            buf += line.decode()
            while True:
                buf = buf.lstrip()
                try:
                    ev, end = dec.raw_decode(buf)
                except ValueError:
                    break
                buf = buf[end:]
                md = ev.get("object", {}).get("metadata", {})
                with self._cond:
                    self.events.append((ev.get("type", ""), md.get("name", ""), md.get("resourceVersion", "")))
                    self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_for(self, pred: Any, timeout: float) -> list[tuple[str, str, str]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(self.events) and not self._eof:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return list(self.events)

    def err(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def test_apiserver_on_both_frontends_survives_kill9_of_one(ha: HA) -> None:
    b, c = ha.b, ha.c
    c.kubectl("create", "namespace", "ha-writes")
    rv = b.json("GET", "/api/v1/namespaces/ha-writes/configmaps")["metadata"]["resourceVersion"]
    w = RawWatch(b, "/api/v1/namespaces/ha-writes/configmaps", rv)

    acked: list[tuple[str, str]] = []  # (name, resourceVersion)
    ok_times: list[float] = []
    failures: list[tuple[float, str]] = []
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            name = f"w-{i:05d}"
            t = time.monotonic()
            try:
                status, body = c.http(
                    "POST", "/api/v1/namespaces/ha-writes/configmaps", {"metadata": {"name": name}}, timeout=10
                )
            except OSError as e:
                status, body = -1, repr(e).encode()
            if status == 201:
                acked.append((name, json.loads(body)["metadata"]["resourceVersion"]))
                ok_times.append(time.monotonic())
            else:
                failures.append((t, f"{name}: {status} {body[:200]!r}"))
                if status == 409:  # a retried create that had in fact succeeded
                    acked.append((name, "?"))
            i += 1

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 20
        while len(acked) < 20:
            assert time.monotonic() < deadline and not failures, failures[:5]
            time.sleep(0.05)

        ha.a.outage.append((ha.a.log_size(), -1))
        ha.fe1.kill9()
        t_kill = time.monotonic()
        n_at_kill = len(acked)

        # writes through C succeed again, and so do reads
        deadline = t_kill + FAILOVER_BOUND_S
        while not (len(acked) >= n_at_kill + 20 and ok_times[-1] > t_kill):
            assert time.monotonic() < deadline, (
                f"C made {len(acked) - n_at_kill} writes in {FAILOVER_BOUND_S}s after the kill; "
                f"failures: {failures[-5:]}\nC log tail:\n{c.log()[-3000:]}"
            )
            c.alive()
            time.sleep(0.05)
        first_ok_after = min(x for x in ok_times if x > t_kill) - t_kill
        gaps = [y - x for x, y in itertools.pairwise(ok_times) if y > t_kill - 1]
        ha.timings["failover_first_write_after_kill_s"] = first_ok_after
        ha.timings["failover_longest_gap_between_writes_s"] = max(gaps)
        ha.timings["failed_writes_around_kill"] = len(failures)
        t_read = time.monotonic()
        while True:
            status, _ = c.http("GET", "/api/v1/namespaces/ha-writes/configmaps?limit=5")
            if status == 200:
                break
            assert time.monotonic() < t_kill + FAILOVER_BOUND_S, f"reads through C still fail: {status}"
            time.sleep(0.1)
        ha.timings["failover_read_s"] = time.monotonic() - t_read
        # a consistent (quorum) read of a single object, too
        last = acked[-1][0]
        assert c.kjson("get", "configmap", last, "-n", "ha-writes")["metadata"]["name"] == last
    finally:
        stop.set()
        t.join(15)

    # every acknowledged create is there, through C and through B
    names = {n for n, _ in acked}
    for k in (c, b):
        stored = {i["metadata"]["name"] for i in k.json("GET", "/api/v1/namespaces/ha-writes/configmaps")["items"]}
        assert names <= stored, f"lost through {k.dir.name}: {sorted(names - stored)[:20]}"
    # and the earlier test's objects too
    assert len(c.json("GET", "/api/v1/namespaces/ha/configmaps")["items"]) == 9

    # B's watch, on the surviving frontend, saw every acknowledged create, in order, once
    try:
        stored_n = len(c.json("GET", "/api/v1/namespaces/ha-writes/configmaps")["items"])
        events = w.wait_for(stored_n, timeout=30)
        got = summary(events)
        assert all(typ == "ADDED" for typ, _, _ in got), got[:10]
        seen = [n for _, n, _ in got]
        assert len(seen) == len(set(seen)) == stored_n, (len(seen), len(set(seen)), stored_n)
        assert names <= set(seen), sorted(names - set(seen))[:20]
        rvs = [int(r) for _, _, r in got]
        assert rvs == sorted(rvs), rvs
        acked_rv = {n: r for n, r in acked if r != "?"}
        assert all(acked_rv.get(n, r) == r for _, n, r in got), "watch and write disagree on resourceVersions"
        assert not w.closed, w.stderr()
    finally:
        w.stop()

    # A (fe1 only) notices that its etcd is gone
    status, body = ha.a.http("GET", "/readyz?verbose", timeout=10)
    deadline = time.monotonic() + 30
    while status == 200 and time.monotonic() < deadline:
        time.sleep(0.5)
        status, body = ha.a.http("GET", "/readyz?verbose", timeout=10)
    assert status != 200 and b"[-]etcd" in body, body[:2000]
    print(
        f"\n[ha] {len(acked)} acknowledged writes through C, {len(failures)} failed; "
        f"first write after the kill at +{first_ok_after:.2f}s; longest gap {max(gaps):.2f}s; "
        f"failures: {[f for _, f in failures[:5]]}"
    )
