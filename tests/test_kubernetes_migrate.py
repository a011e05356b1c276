"""Moving a running Kubernetes cluster's state, with a stock kube-apiserver on both sides.

A kube-apiserver writes a namespace's worth of objects (configmaps, secrets, a
deployment, a CRD and its custom resources, events on leases) into a source: a real
etcd 3.6, kine v0.17 on SQLite, PostgreSQL and MariaDB, or k8s-sql. Then, with
``k8s-sql migrate``, the state moves, and a kube-apiserver started on the destination
must

- list every object exactly as before, resourceVersions included;
- continue a watch started from a resourceVersion taken before the move, without a
  410, replaying the changes made after it (where the source had history: an etcd
  snapshot, kine's table, k8s-sql); from a live endpoint, which gives no history, the
  same watch gets 410 Gone, as after a compaction, and one from the migrated revision
  continues;
- give new writes resourceVersions above every one the source handed out;
- keep each event on a lease that still has its TTL.

The way back: k8s-sql → an etcd snapshot (``k8s-sql migrate`` and ``etcdctl snapshot
save``) → ``etcdutl snapshot status`` and ``restore`` → a real etcd, checked the same
way and key by key with etcdctl.

The destination's kube-apiserver runs with ``--watch-cache=false``: a watch cache is
filled by a fresh LIST at startup and answers any older resourceVersion with 410 --
on etcd too, with no migration -- so only the storage itself can show a watch carried
across the move.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import test_kubernetes_e2e as e2e
from conftest import free_port, k8s_sql_argv
from test_kubernetes_e2e import _BUILT, Cluster, RawWatch, ns_manifest, summary

from testing.servers import ServerProcess, etcd_argv, restored_etcd

kube_bin = e2e.kube_bin  # the session fixture that builds (or finds) kube-apiserver
pytestmark = pytest.mark.timeout(900 if _BUILT else 3600)

NS = "moving"
EVENT_TTL_S = 3600  # long enough to outlive the move
GROUP = "migrate.k8s-sql.io"
CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"gadgets.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {"spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                    }
                },
            }
        ],
    },
}
# what is compared before and after the move: every object in these lists
LISTS = (
    f"/api/v1/namespaces/{NS}/configmaps",
    f"/api/v1/namespaces/{NS}/secrets",
    f"/api/v1/namespaces/{NS}/events",
    f"/apis/apps/v1/namespaces/{NS}/deployments",
    f"/apis/{GROUP}/v1/namespaces/{NS}/gadgets",
)
WATCHED = f"/api/v1/namespaces/{NS}/configmaps"


@dataclass
class MigCluster(Cluster):
    """A kube-apiserver whose events live an hour; the watch cache as asked."""

    def argv(self) -> list[str]:
        return [f"--event-ttl={EVENT_TTL_S}s" if a.startswith("--event-ttl=") else a for a in super().argv()]


@dataclass
class Recorded:
    """What a source held when its kube-apiserver stopped."""

    objects: dict[str, list[dict[str, Any]]]  # LISTS -> items
    namespace: dict[str, Any]
    crd_uid: str
    before_rv: str  # a configmap list's resourceVersion, taken before the last changes
    after_before: list[tuple[str, str, str]]  # the watch events since before_rv
    max_rv: int  # the resourceVersion of the last change in the namespace
    events: list[str] = field(default_factory=list)  # event names, each on a lease
    revision: int = 0  # the source's revision when its kube-apiserver stopped


def _apiserver(kube_bin: Path, d: Path, store: ServerProcess, watch_cache: bool) -> MigCluster:
    c = MigCluster(bin=kube_bin, dir=d, store=store, watch_cache=watch_cache)
    c.start()
    return c


def _list(k: Cluster, path: str) -> tuple[list[dict[str, Any]], str]:
    body = k.json("GET", path)
    return body["items"], body["metadata"]["resourceVersion"]


def _cm(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": NS}, "data": data}


def _populate(k: Cluster) -> Recorded:
    """The objects of a real workload, then a resourceVersion, then more changes."""
    k.json("POST", "/api/v1/namespaces", ns_manifest(NS))
    for i in range(8):
        k.json("POST", f"/api/v1/namespaces/{NS}/configmaps", _cm(f"cm-{i}", {"i": str(i), "blob": "x" * 100 * i}))
    for i in range(3):
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": f"secret-{i}", "namespace": NS},
            "type": "Opaque",
            "data": {"password": base64.b64encode(bytes(range(256)) * (i + 1)).decode()},
        }
        k.json("POST", f"/api/v1/namespaces/{NS}/secrets", secret)
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "registry.invalid/web:1"}]},
            },
        },
    }
    k.json("POST", f"/apis/apps/v1/namespaces/{NS}/deployments", deployment)
    crd = k.json("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", CRD)
    deadline = time.monotonic() + 60
    for i in range(4):
        gadget = {"apiVersion": f"{GROUP}/v1", "kind": "Gadget", "metadata": {"name": f"g-{i}", "namespace": NS}}
        gadget["spec"] = {"n": i, "tags": ["a", "b"][: i % 3]}
        while True:  # the CRD's endpoint is served a moment after it is established
            status, raw = k.http("POST", f"/apis/{GROUP}/v1/namespaces/{NS}/gadgets", gadget)
            if status == 201:
                break
            assert status == 404 and time.monotonic() < deadline, (status, raw[:500])
            time.sleep(0.2)
    events = []
    for i in range(3):
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"event-{i}", "namespace": NS},
            "involvedObject": {"apiVersion": "v1", "kind": "ConfigMap", "name": f"cm-{i}", "namespace": NS},
            "reason": "Moving",
            "message": f"event {i} before the move",
            "type": "Normal",
        }
        k.json("POST", f"/api/v1/namespaces/{NS}/events", event)
        events.append(f"event-{i}")

    _, before_rv = _list(k, WATCHED)
    watch = RawWatch(k, WATCHED, before_rv)
    try:
        cm1 = k.json("GET", f"/api/v1/namespaces/{NS}/configmaps/cm-1")
        cm1["data"]["i"] = "one"
        k.json("PUT", f"/api/v1/namespaces/{NS}/configmaps/cm-1", cm1)
        k.json("DELETE", f"/api/v1/namespaces/{NS}/configmaps/cm-2")
        k.json("POST", f"/api/v1/namespaces/{NS}/configmaps", _cm("cm-late", {"late": "yes"}))
        seen = watch.wait_for(3, timeout=30)
    finally:
        watch.stop()
    after_before = summary(seen)
    assert [t for t, _, _ in after_before] == ["MODIFIED", "DELETED", "ADDED"], after_before
    objects = {path: _list(k, path)[0] for path in LISTS}
    assert len(objects[LISTS[0]]) == 8 and len(objects[LISTS[2]]) == 3 and len(objects[LISTS[4]]) == 4
    for name in events:
        kv = k.etcd_get(f"/registry/events/{NS}/{name}")
        assert kv is not None and kv.lease != 0, f"{name} is not on a lease in the source"
    max_rv = int(k.etcd_get(f"/registry/configmaps/{NS}/cm-late").mod_revision)
    return Recorded(
        objects=objects,
        namespace=k.json("GET", f"/api/v1/namespaces/{NS}"),
        crd_uid=crd["metadata"]["uid"],
        before_rv=before_rv,
        after_before=after_before,
        max_rv=max_rv,
        events=events,
    )


def _store_revision(store: ServerProcess) -> int:
    import grpc

    from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc

    with grpc.insecure_channel(store.endpoint) as ch:
        return int(rpc_pb2_grpc.KVStub(ch).Range(pb.RangeRequest(key=b"/"), timeout=10).header.revision)


def _check(k: Cluster, want: Recorded, history: bool) -> None:
    """The destination's kube-apiserver serves the source's objects as they were.
    ``history``: the destination holds the source's history (else it starts at the
    migrated revision)."""
    assert want.revision >= want.max_rv > int(want.before_rv)
    for path, items in want.objects.items():
        got, _ = _list(k, path)
        assert got == items, f"{path} differs after the move"
    assert k.json("GET", f"/api/v1/namespaces/{NS}") == want.namespace
    crd = k.json("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/gadgets.{GROUP}")
    assert crd["metadata"]["uid"] == want.crd_uid
    for name in want.events:  # still on a lease that has its TTL left
        kv = k.etcd_get(f"/registry/events/{NS}/{name}")
        assert kv is not None and kv.lease != 0, name
        ttl = k.lease_ttl(kv.lease)
        assert 0 < ttl.TTL <= EVENT_TTL_S + 60, (name, ttl)

    watch = RawWatch(k, WATCHED, want.before_rv)
    try:
        if history:
            replayed = watch.wait_for(3, timeout=30)
            assert summary(replayed) == want.after_before, "the watch from before the move did not replay"
        else:
            first = watch.wait_for(1, timeout=30)
            gone = [e for e in first if e.get("type") == "ERROR" and e["object"].get("code") == 410]
            assert gone or "410" in watch.stderr() or "too old" in watch.stderr(), (first, watch.stderr())
    finally:
        watch.stop()

    # a watch from the source's last change (without history: from the migrated
    # revision), then a write, at a resourceVersion above any the source handed out
    continued = RawWatch(k, WATCHED, str(want.max_rv if history else want.revision))
    try:
        created = k.json("POST", f"/api/v1/namespaces/{NS}/configmaps", _cm("cm-after", {"after": "move"}))
        rv = int(created["metadata"]["resourceVersion"])
        assert rv > want.revision, (rv, want.revision)
        events = continued.wait_for(1, timeout=30)
        assert summary(events)[:1] == [("ADDED", "cm-after", str(rv))], events
    finally:
        continued.stop()
    k.json("DELETE", f"/api/v1/namespaces/{NS}/configmaps/cm-after")


def _migrate(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "k8s_sql", "migrate", *args], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def _k8s_sql(d: Path, *args: str) -> ServerProcess:
    port = free_port()
    s = ServerProcess(f"127.0.0.1:{port}", d, k8s_sql_argv(port, d, *args), d.parent / f"{d.name}-k8s-sql.log")
    s.start()
    return s


def _on_k8s_sql(
    kube_bin: Path, d: Path, backend_args: list[str], want: Recorded, history: bool
) -> tuple[ServerProcess, MigCluster]:
    """k8s-sql on the migrated database, a kube-apiserver on it, and the checks."""
    store = _k8s_sql(d / "k8s-sql", *backend_args)
    k = _apiserver(kube_bin, d / "apiserver", store, watch_cache=False)
    try:
        _check(k, want, history)
    except BaseException:
        k.stop()
        store.stop()
        raise
    return store, k


def _dest(backend: str, d: Path, request: pytest.FixtureRequest) -> tuple[str, list[str]]:
    """A new, empty database: its DSN and k8s-sql's flags for it."""
    if backend == "sqlite":
        dsn = f"sqlite://{d / 'k8s-sql' / 'state.db'}"
    else:
        dsn = request.getfixturevalue(f"{backend}_server").new_dsn()
    return dsn, ["--endpoint", dsn]


# -- from etcd ------------------------------------------------------------------------------------


@dataclass
class EtcdSource:
    etcd: ServerProcess
    snapshot: Path
    want: Recorded


@pytest.fixture(scope="module")
def etcd_source(kube_bin: Path, peers_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdSource]:
    """A real etcd holding a kube-apiserver's objects, and its `etcdctl snapshot save`."""
    d = tmp_path_factory.mktemp("etcd-source")
    port, peer = free_port(), free_port()
    etcd = ServerProcess(
        f"127.0.0.1:{port}",
        d / "data",
        etcd_argv(peers_bin, port, peer, d / "data", "--unsafe-no-fsync"),
        d / "etcd.log",
    )
    etcd.start()
    try:
        k = _apiserver(kube_bin, d / "apiserver", etcd, watch_cache=True)
        try:
            want = _populate(k)
        finally:
            k.stop()
        want.revision = _store_revision(etcd)
        snapshot = d / "etcd.snapshot"
        subprocess.run(
            [str(peers_bin / "etcdctl"), f"--endpoints={etcd.endpoint}", "snapshot", "save", str(snapshot)],
            check=True,
            capture_output=True,
        )
        yield EtcdSource(etcd, snapshot, want)
    finally:
        etcd.stop()


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "mariadb"])
def test_etcd_snapshot_into_k8s_sql(
    backend: str, etcd_source: EtcdSource, kube_bin: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    dsn, args = _dest(backend, tmp_path, request)
    out = _migrate(str(etcd_source.snapshot), dsn, "--verify")
    assert "HashKV equal" in out, out
    store, k = _on_k8s_sql(kube_bin, tmp_path, args, etcd_source.want, history=True)
    k.stop()
    store.stop()


def test_live_etcd_endpoint_into_k8s_sql(
    etcd_source: EtcdSource, kube_bin: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    dsn, args = _dest("postgres", tmp_path, request)
    revision = etcd_source.want.revision
    assert _store_revision(etcd_source.etcd) == revision  # nothing wrote since the snapshot
    out = _migrate(etcd_source.etcd.url, dsn, "--verify")
    assert f"copied revision {revision} (compacted at {revision})" in out, out
    store, k = _on_k8s_sql(kube_bin, tmp_path, args, etcd_source.want, history=False)
    k.stop()
    store.stop()


# -- from kine ------------------------------------------------------------------------------------


@pytest.mark.parametrize("db", ["sqlite", "postgres", "mariadb"])
def test_kine_into_k8s_sql(
    db: str, kine_factory: Any, kube_bin: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """kine (its own table on each database) under a kube-apiserver, moved into
    k8s-sql on the same kind of database."""
    kine, kine_dsn = kine_factory(db)
    try:
        k = _apiserver(kube_bin, tmp_path / "kine-apiserver", kine, watch_cache=True)
        try:
            want = _populate(k)
        finally:
            k.stop()
        want.revision = _store_revision(kine)
    finally:
        kine.stop()
    dsn, args = _dest(db, tmp_path, request)
    out = _migrate(f"kine+{kine_dsn}", dsn, "--verify")
    assert "HashKV equal" in out, out
    store, k = _on_k8s_sql(kube_bin, tmp_path, args, want, history=True)
    k.stop()
    store.stop()


# -- back to etcd ---------------------------------------------------------------------------------


def _etcdctl_dump(peers_bin: Path, endpoint: str) -> tuple[int, list[dict[str, Any]]]:
    """Every key as etcdctl reads it: key, value, create and mod revision, version, lease."""
    out = subprocess.run(
        [str(peers_bin / "etcdctl"), f"--endpoints={endpoint}", "get", "", "--prefix", "-w", "json"],
        check=True,
        capture_output=True,
        text=True,
    )
    body = json.loads(out.stdout)
    return int(body["header"]["revision"]), body.get("kvs", [])


def test_k8s_sql_into_etcd(kube_bin: Path, peers_bin: Path, tmp_path: Path, mariadb_server: Any) -> None:
    """k8s-sql (on MariaDB) under a kube-apiserver → an etcd snapshot, written by
    ``k8s-sql migrate`` and by ``etcdctl snapshot save`` → ``etcdutl snapshot restore``
    → etcd: etcdctl reads every key as k8s-sql served it, and a kube-apiserver on it
    passes the same checks."""
    dsn = mariadb_server.new_dsn()
    store = _k8s_sql(tmp_path / "k8s-sql", "--endpoint", dsn)
    try:
        k = _apiserver(kube_bin, tmp_path / "apiserver", store, watch_cache=True)
        try:
            want = _populate(k)
        finally:
            k.stop()
        want.revision = _store_revision(store)
        exported = tmp_path / "exported.snapshot"
        assert "HashKV equal" in _migrate(dsn, str(exported), "--verify")
        saved = tmp_path / "saved.snapshot"
        subprocess.run(
            [str(peers_bin / "etcdctl"), f"--endpoints={store.endpoint}", "snapshot", "save", str(saved)],
            check=True,
            capture_output=True,
        )
        source_dump = _etcdctl_dump(peers_bin, store.endpoint)
    finally:
        store.stop()
    assert source_dump[0] == want.revision and len(source_dump[1]) > 50

    stops: list[Callable[[], None]] = []
    try:
        restored = {}
        for name, snapshot in (("exported", exported), ("saved", saved)):
            restored[name] = etcd = restored_etcd(peers_bin, snapshot, tmp_path / name)[0]
            stops.append(etcd.stop)
            assert _etcdctl_dump(peers_bin, etcd.endpoint) == source_dump, f"{name}: etcdctl reads other keys"
        k = _apiserver(kube_bin, tmp_path / "etcd-apiserver", restored["exported"], watch_cache=False)
        stops.append(k.stop)
        _check(k, want, history=True)
    finally:
        for stop in reversed(stops):
            stop()
