"""End to end: a stock kube-apiserver, built from the Go module proxy by
conformance/build.sh, runs on k8s-sql and is driven by kubectl over real HTTPS with
real token auth and RBAC.

Everything runs on every backend (SQLite, PostgreSQL, MariaDB; ``K8S_SQL_BACKENDS``
narrows it) with the default watch cache, and on SQLite also with
``--watch-cache=false`` so that every request reaches k8s-sql
(``K8S_SQL_E2E_ALL_MODES=1`` runs that mode on every backend). The tests of one mode
share one cluster and run in file order; later tests rely on objects the earlier
ones created.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import ssl
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import ROOT, ServerProcess, free_port, k8s_sql_argv, missing

KUBE_VERSION = os.environ.get("KUBE_VERSION", "v1.37.2")
KUBE_MINOR = int(KUBE_VERSION.split(".")[1])
KUBE_CACHE = Path(os.environ.get("K8S_SQL_KUBE_CACHE", Path.home() / ".cache/k8s-sql/kube"))
KUBE_BIN = KUBE_CACHE / KUBE_VERSION / "bin"
EVENT_TTL = 10  # seconds; --event-ttl
TOKEN = "k8s-sql-e2e-admin-token"
# extra kube-apiserver flags for experiments, e.g. "--etcd-compaction-interval=10s"
EXTRA_APISERVER_ARGS = os.environ.get("K8S_SQL_E2E_APISERVER_ARGS", "").split()
# and for k8s-sql, e.g. "--watch-progress-notify-interval 5s"
EXTRA_SERVER_ARGS = os.environ.get("K8S_SQL_E2E_SERVER_ARGS", "").split()

# A cold build of kube-apiserver takes many minutes and happens inside the first
# test's setup; once the binaries exist every test is short.
_BUILT = all((KUBE_BIN / b).exists() for b in ("kube-apiserver", "kubectl"))
pytestmark = pytest.mark.timeout(600 if _BUILT else 3600)

# kube-apiserver's serving certificate is self-signed (--cert-dir); made once, as loading
# the default CA bundle per request costs more than the request itself
INSECURE_TLS = ssl.create_default_context()
INSECURE_TLS.check_hostname = False
INSECURE_TLS.verify_mode = ssl.CERT_NONE

# Lines that mean the storage layer misbehaved, whenever they appear.
ALWAYS_BAD = re.compile(
    r"Too large resource version|required revision has been compacted|required revision is a future revision"
    r"|duplicate key given in txn|too many operations in txn|unexpected ListAndWatch error"
)
# Lines that are expected while k8s-sql is down, and bad at any other time.
BAD_WHEN_UP = re.compile(
    r"Terminating all watchers from cacher|etcdserver:|mvcc:|StorageError|rpc error|transport: Error while dialing"
    r"|watch chan error|Failed to list|Unhandled Error",
    re.IGNORECASE,
)

# ... except these: a client that kube-apiserver closes while it is still dialling (1.34
# replaces a CRD's storage, and its etcd client, when the CRD changes)
BENIGN = re.compile(r"Error while dialing: dial tcp [0-9.:]+: operation was canceled")


# KNOWN BUG (k8s-sql, src/k8s_sql/backend/mysql.py schema setup): on a database that
# already exists (a restarted or second frontend) asyncmy logs the server's notes for
# CREATE DATABASE/TABLE IF NOT EXISTS and INSERT IGNORE INTO meta as WARNINGs. They are
# harmless; tolerated here by exact text until k8s-sql silences them.
# -- the binaries ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kube_bin() -> Path:
    """kube-apiserver and kubectl from conformance/build.sh (cached after the first build)."""
    if shutil.which("openssl") is None:
        missing("openssl is needed to make the service-account key")
    if shutil.which("go") is None:
        if _BUILT:
            return KUBE_BIN  # built earlier (e.g. a restored cache); nothing to check against
        missing("Go is not installed, so kube-apiserver cannot be built (see conformance/README.md)")
    t0 = time.monotonic()
    try:
        res = subprocess.run(
            ["bash", str(ROOT / "conformance/build.sh")],
            env={**os.environ, "KUBE_VERSION": KUBE_VERSION, "K8S_SQL_KUBE_CACHE": str(KUBE_CACHE)},
            capture_output=True,
            text=True,
            check=True,
            timeout=3300,
        )
    except subprocess.CalledProcessError as e:
        missing(f"conformance/build.sh failed ({e.returncode}):\n{e.stderr[-4000:]}")
    except subprocess.TimeoutExpired:
        missing("conformance/build.sh took longer than 55 minutes")
    print(f"\n[e2e] conformance/build.sh: {time.monotonic() - t0:.0f}s", flush=True)
    return Path(res.stdout.strip().splitlines()[-1])


# -- a cluster: k8s-sql + kube-apiserver + kubectl --------------------------------------------------


@dataclass
class Cluster:
    bin: Path
    dir: Path
    store: ServerProcess
    watch_cache: bool
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # byte ranges of the apiserver log during which errors are expected: the startup
    # and the times k8s-sql was deliberately down
    outage: list[tuple[int, int]] = field(default_factory=list)
    # etcd_request_errors_total when the apiserver became ready: during startup it closes
    # etcd clients of its own while requests on them are in flight (Canceled, "the
    # client connection is closing"); seen on the slower backends
    startup_errors: dict[str, float] = field(default_factory=dict)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.dir / "kube-apiserver.log"

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # -- process ----------------------------------------------------------------------------------

    def argv(self) -> list[str]:
        d = self.dir
        return [
            str(self.bin / "kube-apiserver"),
            f"--etcd-servers={self.store.url}",
            f"--cert-dir={d / 'certs'}",
            f"--secure-port={self.port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            "--service-cluster-ip-range=10.96.0.0/24",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--token-auth-file={d / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            f"--event-ttl={EVENT_TTL}s",
            f"--watch-cache={'true' if self.watch_cache else 'false'}",
            # a loopback advertise address cannot go into the kubernetes service's
            # EndpointSlice (validation forbids loopback), so don't reconcile it
            "--endpoint-reconciler-type=none",
            "--v=1",
            *EXTRA_APISERVER_ARGS,
        ]

    def start(self) -> None:
        d = self.dir
        (d / "certs").mkdir(parents=True, exist_ok=True)
        if not (d / "sa.key").exists():
            subprocess.run(["openssl", "genrsa", "-out", str(d / "sa.key"), "2048"], check=True, capture_output=True)
            subprocess.run(
                ["openssl", "rsa", "-in", str(d / "sa.key"), "-pubout", "-out", str(d / "sa.pub")],
                check=True,
                capture_output=True,
            )
            (d / "tokens.csv").write_text(f'{TOKEN},admin,admin,"system:masters"\n')
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        t0 = time.monotonic()
        self.wait_ready(timeout=180)
        self.timings["apiserver_start_s"] = time.monotonic() - t0
        # startup logs transient noise (clients closed while dialling, controllers racing
        # the bootstrap of kube-system): the log is checked from here on
        self.outage.append((0, self.log_size()))
        self.startup_errors = self.etcd_request_errors()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"kube-apiserver exited with {self.proc.returncode}; log tail:\n{self.log()[-6000:]}")

    def wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self.alive()
            try:
                status, body = self.http("GET", "/readyz?verbose", timeout=5)
                last = body.decode(errors="replace")
                if status == 200:
                    return last
            except (OSError, urllib.error.URLError) as e:
                last = repr(e)
            time.sleep(0.5)
        raise AssertionError(f"kube-apiserver not ready after {timeout}s: {last}\nlog tail:\n{self.log()[-6000:]}")

    # -- clients ----------------------------------------------------------------------------------

    def http(
        self, method: str, path: str, body: Any = None, timeout: float = 30, content_type: str = "application/json"
    ) -> tuple[int, bytes]:
        """A request with the admin token; returns (status, body) for any status."""
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {TOKEN}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=INSECURE_TLS) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def json(self, method: str, path: str, body: Any = None, expect: int | tuple[int, ...] = (200, 201)) -> Any:
        status, raw = self.http(method, path, body)
        ok = (expect,) if isinstance(expect, int) else expect
        assert status in ok, f"{method} {path} -> {status}: {raw[:2000]!r}"
        return json.loads(raw)

    def kubectl_argv(self, *args: str) -> list[str]:
        return [
            str(self.bin / "kubectl"),
            f"--server={self.server}",
            f"--token={TOKEN}",
            "--insecure-skip-tls-verify",
            f"--cache-dir={self.dir / 'kubectl-cache'}",
            *args,
        ]

    def kubectl_env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.dir / "no-kubeconfig")}

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            self.kubectl_argv(*args),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.kubectl_env(),
        )
        if check and res.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def kjson(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def apply_json(self, verb: str, obj: dict[str, Any], *args: str) -> Any:
        """kubectl create/replace/apply -f - with a JSON manifest; returns the stored object."""
        return json.loads(self.kubectl(verb, "-f", "-", "-o", "json", *args, input=json.dumps(obj)).stdout)

    def etcd_request_errors(self) -> dict[str, float]:
        out = {}
        for line in self.metrics().splitlines():
            if line.startswith("etcd_request_errors_total{"):
                labels, value = line.rsplit(" ", 1)
                out[labels] = float(value)
        return out

    def metrics(self) -> str:
        status, body = self.http("GET", "/metrics")
        assert status == 200, body[:500]
        return body.decode()

    # -- direct etcd access, to look at keys ------------------------------------------------------

    def etcd_get(self, key: str) -> Any:
        from k8s_sql.pb import rpc_pb2, rpc_pb2_grpc

        with grpc.insecure_channel(self.store.endpoint) as ch:
            resp = rpc_pb2_grpc.KVStub(ch).Range(rpc_pb2.RangeRequest(key=key.encode()), timeout=10)
        return resp.kvs[0] if resp.kvs else None

    def etcd_count(self, prefix: str) -> int:
        from k8s_sql.pb import rpc_pb2, rpc_pb2_grpc

        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        with grpc.insecure_channel(self.store.endpoint) as ch:
            req = rpc_pb2.RangeRequest(key=prefix.encode(), range_end=end.encode(), count_only=True)
            return int(rpc_pb2_grpc.KVStub(ch).Range(req, timeout=10).count)

    def lease_ttl(self, lease_id: int) -> Any:
        from k8s_sql.pb import rpc_pb2, rpc_pb2_grpc

        with grpc.insecure_channel(self.store.endpoint) as ch:
            return rpc_pb2_grpc.LeaseStub(ch).LeaseTimeToLive(rpc_pb2.LeaseTimeToLiveRequest(ID=lease_id), timeout=10)


class RawWatch:
    """``kubectl get --raw '<path>?watch=true&resourceVersion=RV'``: the watch API, one JSON event a line."""

    def __init__(self, cluster: Cluster, path: str, rv: str) -> None:
        sep = "&" if "?" in path else "?"
        url = f"{path}{sep}watch=true&resourceVersion={rv}&allowWatchBookmarks=false"
        self.proc = subprocess.Popen(
            cluster.kubectl_argv("get", "--raw", url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=cluster.kubectl_env(),
        )
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not line.strip():
                continue
            ev = json.loads(line)
            with self._cond:
                self.events.append(ev)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.events) < n and not self._eof:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return list(self.events)

    @property
    def closed(self) -> bool:
        return self._eof

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def summary(events: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    out = []
    for ev in events:
        obj = ev.get("object", {})
        md = obj.get("metadata", {})
        out.append((ev["type"], md.get("name", obj.get("message", "")), md.get("resourceVersion", "")))
    return out


# (backend, watch cache): every backend with the watch cache; without it only on SQLite,
# to bound the run time (K8S_SQL_E2E_ALL_MODES=1 runs every combination)
_ALL_MODES = os.environ.get("K8S_SQL_E2E_ALL_MODES", "") not in ("", "0", "false")
_BACKENDS = [b for b in os.environ.get("K8S_SQL_BACKENDS", "sqlite,postgres,mariadb").split(",") if b]
MODES = [
    pytest.param((backend, wc), id=f"{backend}-{'watch-cache' if wc else 'no-watch-cache'}")
    for backend in _BACKENDS
    for wc in (True, False)
    if wc or backend == "sqlite" or _ALL_MODES
]


@pytest.fixture(scope="module", params=MODES)
def cluster(
    request: pytest.FixtureRequest, kube_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    backend, watch_cache = request.param
    mode = f"{backend}-{'watch-cache' if watch_cache else 'no-watch-cache'}"
    d = tmp_path_factory.mktemp(f"kube-{mode}")
    # sqlite: the data directory; postgres, mariadb: a fresh database on the session's
    # throwaway server, which a restarted k8s-sql reconnects to
    backend_args = [] if backend == "sqlite" else ["--endpoint", request.getfixturevalue(f"{backend}_server").new_dsn()]
    port = free_port()
    store = ServerProcess(
        f"127.0.0.1:{port}",
        d / "k8s-sql",
        k8s_sql_argv(port, d / "k8s-sql", *backend_args, *EXTRA_SERVER_ARGS),
        d / f"k8s-sql-{port}.log",
    )
    t0 = time.monotonic()
    store.start()
    c = Cluster(bin=kube_bin, dir=d, store=store, watch_cache=watch_cache)
    try:
        c.start()
        print(f"\n[e2e] {request.node.name}: apiserver ready in {c.timings['apiserver_start_s']:.1f}s; dir {d}")
        yield c
    finally:
        c.stop()
        store.stop()
        c.timings["module_wall_s"] = time.monotonic() - t0
        for k, v in c.timings.items():
            print(f"[e2e] {mode} {k} = {v:.3f}")


def ns_manifest(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


# -- the tests, in order --------------------------------------------------------------------------


def test_health_checks_include_etcd(cluster: Cluster) -> None:
    for path in ("/readyz?verbose", "/livez?verbose"):
        out = cluster.kubectl("get", "--raw", path).stdout
        assert "[+]etcd ok" in out, out
        assert "check passed" in out, out
    ready = cluster.kubectl("get", "--raw", "/readyz?verbose").stdout
    assert "[+]etcd-readiness ok" in ready, ready
    version = cluster.json("GET", "/version")
    assert version["gitVersion"] == KUBE_VERSION, version
    # the apiserver's view of the storage: a cluster-scoped list that reaches etcd
    assert cluster.kjson("get", "namespaces")["items"], "no namespaces"


def test_core_objects_create_get_patch_replace_delete(cluster: Cluster) -> None:
    k = cluster
    k.kubectl("create", "namespace", "e2e")
    k.kubectl("create", "namespace", "e2e-other")
    names = {n["metadata"]["name"] for n in k.kjson("get", "namespaces")["items"]}
    assert {"default", "kube-system", "e2e", "e2e-other"} <= names

    # configmap: create, get, merge patch, replace with the current RV, stale replace conflicts
    k.kubectl("create", "configmap", "cm1", "-n", "e2e", "--from-literal=a=1")
    cm = k.kjson("get", "configmap", "cm1", "-n", "e2e")
    assert cm["data"] == {"a": "1"}
    rv1 = cm["metadata"]["resourceVersion"]
    k.kubectl("patch", "configmap", "cm1", "-n", "e2e", "--type=merge", "-p", '{"data":{"b":"2"}}')
    cm = k.kjson("get", "configmap", "cm1", "-n", "e2e")
    assert cm["data"] == {"a": "1", "b": "2"}
    assert int(cm["metadata"]["resourceVersion"]) > int(rv1)
    cm["data"]["c"] = "3"
    replaced = k.apply_json("replace", cm)
    assert replaced["data"] == {"a": "1", "b": "2", "c": "3"}
    stale = k.kubectl("replace", "-f", "-", input=json.dumps(cm), check=False)
    assert stale.returncode != 0 and "the object has been modified" in stale.stderr, stale.stderr
    k.kubectl("patch", "configmap", "cm1", "-n", "e2e", "--type=json", "-p", '[{"op":"remove","path":"/data/a"}]')
    assert k.kjson("get", "configmap", "cm1", "-n", "e2e")["data"] == {"b": "2", "c": "3"}
    dup = k.kubectl("create", "configmap", "cm1", "-n", "e2e", check=False)
    assert dup.returncode != 0 and "already exists" in dup.stderr, dup.stderr

    # secret
    k.kubectl("create", "secret", "generic", "s1", "-n", "e2e", "--from-literal=password=hunter2")
    s = k.kjson("get", "secret", "s1", "-n", "e2e")
    assert s["data"]["password"] == "aHVudGVyMg=="
    k.kubectl("patch", "secret", "s1", "-n", "e2e", "-p", '{"stringData":{"user":"admin"}}')
    assert set(k.kjson("get", "secret", "s1", "-n", "e2e")["data"]) == {"password", "user"}

    # service (allocates a cluster IP: IPAddress objects and the ServiceCIDR go through storage too)
    k.kubectl("create", "service", "clusterip", "svc1", "-n", "e2e", "--tcp=80:8080")
    svc = k.kjson("get", "service", "svc1", "-n", "e2e")
    assert svc["spec"]["clusterIP"].startswith("10.96.0."), svc["spec"]
    k.kubectl("patch", "service", "svc1", "-n", "e2e", "-p", '{"metadata":{"labels":{"tier":"web"}}}')
    assert k.kjson("get", "service", "svc1", "-n", "e2e")["metadata"]["labels"]["tier"] == "web"

    # deployment (no controller-manager: no pods, but the object round-trips)
    k.kubectl("create", "deployment", "web", "-n", "e2e", "--image=registry.k8s.io/pause:3.10", "--replicas=1")
    k.kubectl("scale", "deployment", "web", "-n", "e2e", "--replicas=3")
    dep = k.kjson("get", "deployment", "web", "-n", "e2e")
    assert dep["spec"]["replicas"] == 3
    assert dep["metadata"]["generation"] == 2
    k.kubectl("set", "image", "deployment/web", "-n", "e2e", "pause=registry.k8s.io/pause:3.9")
    dep = k.kjson("get", "deployment", "web", "-n", "e2e")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"].endswith("pause:3.9")

    # server-side apply
    cm_apply = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied", "namespace": "e2e"}}
    cm_apply["data"] = {"x": "1"}
    k.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(cm_apply))
    cm_apply["data"] = {"x": "2"}
    k.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(cm_apply))
    assert k.kjson("get", "configmap", "applied", "-n", "e2e")["data"] == {"x": "2"}

    # delete
    k.kubectl("create", "configmap", "doomed", "-n", "e2e")
    k.kubectl("delete", "configmap", "doomed", "-n", "e2e")
    gone = k.kubectl("get", "configmap", "doomed", "-n", "e2e", check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr
    assert k.etcd_get("/registry/configmaps/e2e/doomed") is None
    k.kubectl("delete", "namespace", "e2e-other", "--wait=false")
    # without kube-controller-manager the namespace stays Terminating
    assert k.kjson("get", "namespace", "e2e-other")["status"]["phase"] == "Terminating"

    # the objects are in k8s-sql under the usual keys
    assert k.etcd_get("/registry/configmaps/e2e/cm1") is not None
    assert k.etcd_get("/registry/secrets/e2e/s1") is not None
    assert k.etcd_get("/registry/services/specs/e2e/svc1") is not None
    assert k.etcd_get("/registry/deployments/e2e/web") is not None


def test_chunked_list(cluster: Cluster) -> None:
    k = cluster
    k.kubectl("create", "namespace", "e2e-many")
    docs = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"many-{i:03d}"}, "data": {"i": str(i)}}
        for i in range(40)
    ]
    k.kubectl(
        "create", "-n", "e2e-many", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
    )

    # kubectl pages with limit/continue
    res = k.kubectl("get", "configmaps", "-n", "e2e-many", "--chunk-size=7", "-o", "name", "-v=6")
    names = [line.removeprefix("configmap/") for line in res.stdout.split()]
    assert sorted(n for n in names if n.startswith("many-")) == [f"many-{i:03d}" for i in range(40)]
    urls = set(re.findall(r"/namespaces/e2e-many/configmaps\?[^\s\"]*", res.stderr))
    pages = sorted(u for u in urls if re.search(r"[?&]limit=7(&|$)", u))
    assert len(pages) == 6, res.stderr  # 40 objects, 7 a page
    assert sum("continue=" in p for p in pages) == 5, pages

    # the API directly: every page pinned to the first page's resourceVersion
    items: list[str] = []
    rvs = set()
    cont = ""
    remaining = []
    while True:
        page = k.json("GET", f"/api/v1/namespaces/e2e-many/configmaps?limit=9&continue={cont}")
        items += [i["metadata"]["name"] for i in page["items"]]
        rvs.add(page["metadata"]["resourceVersion"])
        remaining.append(page["metadata"].get("remainingItemCount"))
        cont = page["metadata"].get("continue", "")
        if not cont:
            break
        # writes between pages must not show up in later pages
        k.kubectl("create", "configmap", f"late-{len(items)}", "-n", "e2e-many")
    assert len(rvs) == 1, rvs
    assert items == sorted(items) and len(items) == len(set(items))
    assert [n for n in items if n.startswith("many-")] == [f"many-{i:03d}" for i in range(40)]
    assert not any(n.startswith("late-") for n in items), items
    assert remaining[0] == len(items) - 9, remaining

    # a paged list of everything, across namespaces
    allcms = k.kubectl("get", "configmaps", "-A", "--chunk-size=5", "-o", "name").stdout.split()
    assert len(allcms) >= 45


def test_selectors_and_exact_resource_versions(cluster: Cluster) -> None:
    """Filtered pages (etcd pages, the apiserver filters) and historical lists at an exact revision."""
    k = cluster
    base = "/api/v1/namespaces/e2e-many/configmaps"
    for i in range(0, 40, 4):
        k.kubectl("label", "configmap", f"many-{i:03d}", "-n", "e2e-many", "pick=yes")
    # a label selector with a small limit: pages may come back short, continue must carry on
    names: list[str] = []
    cont = ""
    while True:
        page = k.json("GET", f"{base}?labelSelector=pick%3Dyes&limit=3&continue={cont}")
        names += [i["metadata"]["name"] for i in page["items"]]
        cont = page["metadata"].get("continue", "")
        if not cont:
            break
    assert names == [f"many-{i:03d}" for i in range(0, 40, 4)], names
    fs = k.json("GET", f"{base}?fieldSelector=metadata.name%3Dmany-007")
    assert [i["metadata"]["name"] for i in fs["items"]] == ["many-007"]

    # list as of an exact earlier revision, then as of now
    before = k.json("GET", f"{base}?limit=500")
    rv = before["metadata"]["resourceVersion"]
    k.kubectl("patch", "configmap", "many-001", "-n", "e2e-many", "--type=merge", "-p", '{"data":{"i":"changed"}}')
    k.kubectl("delete", "configmap", "many-002", "-n", "e2e-many")
    k.kubectl("create", "configmap", "many-zzz", "-n", "e2e-many")
    old = k.json("GET", f"{base}?resourceVersion={rv}&resourceVersionMatch=Exact")
    assert old["metadata"]["resourceVersion"] == rv
    assert [i["metadata"]["name"] for i in old["items"]] == [i["metadata"]["name"] for i in before["items"]]
    assert next(i for i in old["items"] if i["metadata"]["name"] == "many-001")["data"] == {"i": "1"}
    # the same, a page at a time
    paged: list[str] = []
    cont = ""
    while True:
        q = f"&continue={cont}" if cont else f"&resourceVersion={rv}&resourceVersionMatch=Exact"
        page = k.json("GET", f"{base}?limit=15{q}")
        paged += [i["metadata"]["name"] for i in page["items"]]
        cont = page["metadata"].get("continue", "")
        if not cont:
            break
    assert paged == [i["metadata"]["name"] for i in before["items"]]
    now = k.json("GET", base)
    now_names = [i["metadata"]["name"] for i in now["items"]]
    assert "many-002" not in now_names and "many-zzz" in now_names
    # a get with resourceVersion=<old> means "not older than": it returns the current object
    got = k.json("GET", f"{base}/many-001?resourceVersion={rv}")
    assert got["data"] == {"i": "changed"}


def test_big_objects_and_long_lists(cluster: Cluster) -> None:
    """Lists that need several RangeStream chunks / pages: many keys and values near etcd's limit."""
    k = cluster
    k.kubectl("create", "namespace", "e2e-big")
    small = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"s-{i:04d}"}, "data": {"i": str(i) * 50}}
        for i in range(300)
    ]
    k.kubectl(
        "create", "-n", "e2e-big", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": small})
    )
    big = {}
    for i in range(4):
        value = "".join(chr(ord("a") + (i * 7 + j) % 26) for j in range(900_000))
        big[f"big-{i}"] = value
        k.json(
            "POST", "/api/v1/namespaces/e2e-big/configmaps", {"metadata": {"name": f"big-{i}"}, "data": {"v": value}}
        )
    assert k.etcd_count("/registry/configmaps/e2e-big/") == 304

    # one unpaginated list (about 3.7 MB)
    t0 = time.monotonic()
    lst = k.json("GET", "/api/v1/namespaces/e2e-big/configmaps")
    k.timings["list_304_objects_3_7MB_s"] = time.monotonic() - t0
    names = [i["metadata"]["name"] for i in lst["items"]]
    assert names == sorted(big) + [f"s-{i:04d}" for i in range(300)], names[:10]
    for item in lst["items"]:
        if item["metadata"]["name"] in big:
            assert item["data"]["v"] == big[item["metadata"]["name"]]
    # paged, with pages that hold several big objects, and across all namespaces
    # (kubectl sends at most 5 requests a second: keep the page count low enough that
    # the list finishes well inside one --etcd-compaction-interval)
    res = k.kubectl("get", "configmaps", "-n", "e2e-big", "--chunk-size=20", "-o", "name")
    out = res.stdout.split()
    assert len(out) == 304
    out = k.kubectl("get", "configmaps", "-A", "--chunk-size=100", "-o", "name").stdout.split()
    assert len(out) >= 304 + 40
    # a big object survives update and a delete answers for it
    k.kubectl("patch", "configmap", "big-3", "-n", "e2e-big", "--type=merge", "-p", '{"data":{"w":"x"}}')
    k.kubectl("delete", "configmap", "big-2", "-n", "e2e-big")
    assert k.etcd_count("/registry/configmaps/e2e-big/") == 303


CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.e2e.k8s-sql.io"},
    "spec": {
        "group": "e2e.k8s-sql.io",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {"size": {"type": "integer"}, "color": {"type": "string"}},
                            },
                            "status": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
                        },
                    }
                },
            }
        ],
    },
}


def widget(name: str, size: int) -> dict[str, Any]:
    return {
        "apiVersion": "e2e.k8s-sql.io/v1",
        "kind": "Widget",
        "metadata": {"name": name, "namespace": "e2e"},
        "spec": {"size": size, "color": "blue"},
    }


def test_crd_and_custom_resources(cluster: Cluster) -> None:
    k = cluster
    k.apply_json("create", CRD)

    # Polled rather than `kubectl wait`: a CRD read before the apiserver's controller
    # first writes its status has `conditions: null`, which kubectl wait reports as an
    # error instead of waiting (CI, with the watch cache on).
    # (Read as JSON: a jsonpath filter over `conditions: null` fails too.)
    def established() -> bool:
        conditions = k.kjson("get", "crd/widgets.e2e.k8s-sql.io")["status"].get("conditions") or []
        return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)

    deadline = time.monotonic() + 60
    while not established():
        assert time.monotonic() < deadline, "the CRD did not become Established"
        time.sleep(0.2)
    # discovery can lag Established by a moment
    deadline = time.monotonic() + 30
    while k.kubectl("get", "widgets", "-n", "e2e", check=False).returncode != 0:
        assert time.monotonic() < deadline, "widgets never became servable"
        time.sleep(0.5)

    for i in range(12):
        k.apply_json("create", widget(f"w{i:02d}", i))
    listed = k.kubectl("get", "wd", "-n", "e2e", "--chunk-size=5", "-o", "name").stdout.split()
    assert listed == [f"widget.e2e.k8s-sql.io/w{i:02d}" for i in range(12)]

    k.kubectl("patch", "widget", "w01", "-n", "e2e", "--type=merge", "-p", '{"spec":{"color":"red"}}')
    w = k.kjson("get", "widget", "w01", "-n", "e2e")
    assert w["spec"] == {"size": 1, "color": "red"}
    w["spec"]["size"] = 100
    assert k.apply_json("replace", w)["spec"]["size"] == 100
    k.kubectl(
        "patch", "widget", "w01", "-n", "e2e", "--subresource=status", "--type=merge", "-p", '{"status":{"ready":true}}'
    )
    w = k.kjson("get", "widget", "w01", "-n", "e2e")
    assert w["status"] == {"ready": True} and w["spec"]["size"] == 100
    k.kubectl("delete", "widget", "w11", "-n", "e2e")
    assert len(k.kjson("get", "widgets", "-n", "e2e")["items"]) == 11
    assert k.etcd_get("/registry/e2e.k8s-sql.io/widgets/e2e/w01") is not None
    assert k.etcd_get("/registry/e2e.k8s-sql.io/widgets/e2e/w11") is None


def test_watch_sees_every_change_in_order(cluster: Cluster) -> None:
    k = cluster
    start = k.apply_json("create", ns_manifest("e2e-watch"))
    rv0 = start["metadata"]["resourceVersion"]
    w = RawWatch(k, "/api/v1/namespaces/e2e-watch/configmaps", rv0)
    try:
        expected: list[tuple[str, str, str]] = []
        # (kube-root-ca.crt comes from kube-controller-manager, which is not running, so the
        # namespace holds only what the test creates)
        for i in range(8):
            obj = k.apply_json(
                "create",
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"c{i}", "namespace": "e2e-watch"}},
            )
            expected.append(("ADDED", f"c{i}", obj["metadata"]["resourceVersion"]))
        for i in (0, 3, 5):
            obj = json.loads(
                k.kubectl(
                    "patch",
                    "configmap",
                    f"c{i}",
                    "-n",
                    "e2e-watch",
                    "--type=merge",
                    "-p",
                    '{"data":{"k":"v"}}',
                    "-o",
                    "json",
                ).stdout
            )
            expected.append(("MODIFIED", f"c{i}", obj["metadata"]["resourceVersion"]))
        for i in (1, 3):
            # (DELETE answers with a Status, so the delete's resourceVersion is unknown here)
            k.json("DELETE", f"/api/v1/namespaces/e2e-watch/configmaps/c{i}")
            expected.append(("DELETED", f"c{i}", "?"))
        events = w.wait_for(len(expected), timeout=30)
        got = [(t, n, "?" if t == "DELETED" else rv) for t, n, rv in summary(events)]
        assert got[: len(expected)] == expected, f"\nexpected {expected}\ngot      {got}\n{w.stderr()}"
        rvs = [int(rv) for _, _, rv in summary(events)]
        assert rvs == sorted(set(rvs)), rvs
        # nothing extra shows up
        time.sleep(1)
        assert len(w.events) == len(expected), summary(w.events)
        assert not w.closed, w.stderr()
    finally:
        w.stop()

    # kubectl get -w --output-watch-events: the list, then the changes
    proc = subprocess.Popen(
        k.kubectl_argv("get", "configmaps", "-n", "e2e-watch", "-w", "--output-watch-events", "--no-headers"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=k.kubectl_env(),
    )
    try:
        lines: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(" ".join(line.split()[:2]))  # EVENT NAME DATA AGE

        t = threading.Thread(target=read, daemon=True)
        t.start()
        deadline = time.monotonic() + 20
        while len(lines) < 6 and time.monotonic() < deadline:  # c0 c2 c4 c5 c6 c7
            time.sleep(0.1)
        k.kubectl("create", "configmap", "c8", "-n", "e2e-watch")
        k.kubectl("delete", "configmap", "c8", "-n", "e2e-watch")
        while len(lines) < 8 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lines[:6] == [f"ADDED c{i}" for i in (0, 2, 4, 5, 6, 7)], lines
        assert lines[6:8] == ["ADDED c8", "DELETED c8"], lines
    finally:
        proc.terminate()
        proc.wait(10)


def _metric_sum(k: Cluster, name: str, **labels: str) -> float:
    total = 0.0
    for line in k.metrics().splitlines():
        if line.startswith(name + "{") and all(f'{lk}="{lv}"' in line for lk, lv in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_storage_metrics_before_any_outage(cluster: Cluster) -> None:
    """Until now k8s-sql never went away: no etcd request may have failed since the
    apiserver became ready, and lists streamed."""
    k = cluster
    if k.startup_errors:
        print(f"\n[e2e] etcd request errors during apiserver startup: {k.startup_errors}")
    errors = {
        labels: n - k.startup_errors.get(labels, 0.0)
        for labels, n in k.etcd_request_errors().items()
        if n > k.startup_errors.get(labels, 0.0)
    }
    assert not errors, "\n".join(f"{labels} +{n:.0f}" for labels, n in errors.items())
    # kube-apiserver 1.37 lists with etcd 3.7's KV/RangeStream; a server that answers
    # UNIMPLEMENTED makes it fall back to paging (and it re-checks every 10 minutes)
    if KUBE_MINOR >= 37:
        streamed = _metric_sum(k, "etcd_requests_total", operation="listStream")
        paged = _metric_sum(k, "etcd_requests_total", operation="list")
        print(f"\n[e2e] etcd list requests: {streamed:.0f} streamed, {paged:.0f} paged")
        assert streamed > 0, "kube-apiserver never used RangeStream"


def _consistent_read_fallbacks(k: Cluster) -> float:
    total = 0.0
    for line in k.metrics().splitlines():
        if line.startswith("apiserver_watch_cache_consistent_read_total") and 'fallback="true"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _list_latency_server_side(k: Cluster) -> tuple[float, float]:
    """(sum, count) of kube-apiserver's own LIST latency for namespaced configmaps."""
    total = count = 0.0
    for line in k.metrics().splitlines():
        if 'verb="LIST"' in line and 'resource="configmaps"' in line and 'scope="namespace"' in line:
            if line.startswith("apiserver_request_duration_seconds_sum{"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith("apiserver_request_duration_seconds_count{"):
                count += float(line.rsplit(" ", 1)[1])
    return total, count


def test_consistent_list_is_fast(cluster: Cluster) -> None:
    """A LIST without resourceVersion must be consistent (see a write made just before)
    and fast: with the watch cache the apiserver asks k8s-sql for watch progress
    (RequestProgress) and waits for it; without it, the 3 s fallback kicks in."""
    k = cluster
    fallbacks_before = _consistent_read_fallbacks(k)
    server_before = _list_latency_server_side(k)
    conn = http.client.HTTPSConnection("127.0.0.1", k.port, context=INSECURE_TLS, timeout=30)
    headers = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/json", "Content-Type": "application/json"}

    def call(method: str, path: str, body: Any = None) -> Any:
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        r = conn.getresponse()
        raw = r.read()
        assert r.status in (200, 201), (method, path, r.status, raw[:300])
        return json.loads(raw)

    times = []
    try:
        for i in range(10):
            # a write first, so the watch cache is behind etcd when the LIST arrives
            call("POST", "/api/v1/namespaces/e2e/configmaps", {"metadata": {"name": f"fast-{i}"}})
            t0 = time.monotonic()
            lst = call("GET", "/api/v1/namespaces/e2e/configmaps")
            times.append(time.monotonic() - t0)
            assert f"fast-{i}" in {c["metadata"]["name"] for c in lst["items"]}
    finally:
        conn.close()
    server_after = _list_latency_server_side(k)
    server_mean = (server_after[0] - server_before[0]) / max(1.0, server_after[1] - server_before[1])
    k.timings["consistent_list_max_s"] = max(times)
    k.timings["consistent_list_median_s"] = statistics.median(times)
    k.timings["consistent_list_server_mean_s"] = server_mean
    print(
        f"\n[e2e] consistent LIST latencies: {', '.join(f'{t * 1000:.0f}ms' for t in times)}; "
        f"kube-apiserver's own mean {server_mean * 1000:.1f}ms"
    )
    assert max(times) < 1.0, f"a consistent LIST took {max(times):.2f}s (3 s means the progress-notify fallback)"
    assert server_mean < 0.5, server_mean
    if k.watch_cache:
        assert _consistent_read_fallbacks(k) == fallbacks_before, "consistent reads fell back to etcd"
        served = _metric_sum(k, "apiserver_watch_cache_consistent_read_total", resource="configmaps", fallback="false")
        assert served >= 10, "consistent LISTs were not served from the watch cache"


def test_events_expire_through_lease_ttl(cluster: Cluster) -> None:
    k = cluster
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": "e2e-event", "namespace": "e2e"},
        "involvedObject": {"apiVersion": "v1", "kind": "ConfigMap", "name": "cm1", "namespace": "e2e"},
        "reason": "E2E",
        "message": "an event that must expire",
        "type": "Normal",
    }
    t0 = time.monotonic()
    k.apply_json("create", event)
    kv = k.etcd_get("/registry/events/e2e/e2e-event")
    assert kv is not None, "the event is not under /registry/events"
    assert kv.lease != 0, "the event key has no lease"
    ttl = k.lease_ttl(kv.lease)
    assert 0 < ttl.TTL <= EVENT_TTL + 60, ttl
    deadline = t0 + EVENT_TTL + 60
    while k.etcd_get("/registry/events/e2e/e2e-event") is not None:
        assert time.monotonic() < deadline, f"event key still there {time.monotonic() - t0:.0f}s later"
        time.sleep(0.5)
    k.timings["event_expiry_s"] = time.monotonic() - t0
    # kube-apiserver sees it gone too (with the watch cache: through the DELETE watch event)
    deadline = time.monotonic() + 10
    while k.kubectl("get", "event", "e2e-event", "-n", "e2e", check=False).returncode == 0:
        assert time.monotonic() < deadline, "kube-apiserver still serves the expired event"
        time.sleep(0.5)


def _snapshot(k: Cluster) -> dict[str, str]:
    """Every object the tests made: kind/ns/name -> resourceVersion."""
    out = {}
    for kind in ("namespaces", "configmaps", "secrets", "services", "deployments", "widgets.e2e.k8s-sql.io", "crd"):
        for item in k.kjson("get", kind, "-A")["items"]:
            md = item["metadata"]
            ns = md.get("namespace", md["name"])
            if (ns.startswith("e2e") and ns != "e2e-writes") or md["name"].endswith(".k8s-sql.io"):
                out[f"{kind}/{md.get('namespace', '')}/{md['name']}"] = md["resourceVersion"]
    return out


def test_kill9_restart_of_k8s_sql(cluster: Cluster) -> None:
    k = cluster
    before = _snapshot(k)
    rv = k.json("GET", "/api/v1/namespaces/e2e/configmaps?limit=1")["metadata"]["resourceVersion"]
    w = RawWatch(k, "/api/v1/namespaces/e2e/configmaps", rv)
    try:
        k.kubectl("create", "configmap", "pre-kill", "-n", "e2e")
        assert [(t, n) for t, n, _ in summary(w.wait_for(1, 15))] == [("ADDED", "pre-kill")], w.events

        # a writer keeps creating configmaps while k8s-sql is killed: every create that
        # kube-apiserver acknowledged must still be there afterwards
        acked: list[str] = []
        stop_writer = threading.Event()

        def writer() -> None:
            i = 0
            while not stop_writer.is_set():
                name = f"w-{i:05d}"
                with contextlib.suppress(OSError):
                    status, _ = k.http(
                        "POST", "/api/v1/namespaces/e2e-writes/configmaps", {"metadata": {"name": name}}, timeout=5
                    )
                    if status == 201:
                        acked.append(name)
                i += 1

        k.kubectl("create", "namespace", "e2e-writes")
        writer_thread = threading.Thread(target=writer, daemon=True)
        writer_thread.start()
        time.sleep(1)

        k.outage.append((k.log_size(), -1))
        k.store.kill9()
        t_kill = time.monotonic()
        # the apiserver notices: /readyz reports the etcd check failing
        deadline = t_kill + 30
        down = ""
        while time.monotonic() < deadline:
            status, body = k.http("GET", "/readyz?verbose", timeout=10)
            if status != 200:
                down = body.decode(errors="replace")
                break
            time.sleep(0.5)
        assert "[-]etcd" in down, f"readyz never noticed that etcd is down: {down}"
        k.timings["outage_detected_s"] = time.monotonic() - t_kill

        k.store.start()
        t_up = time.monotonic()
        k.wait_ready(timeout=60)
        k.timings["restart_readyz_s"] = time.monotonic() - t_up
        deadline = t_up + 60
        while True:
            status, body = k.http("POST", "/api/v1/namespaces/e2e/configmaps", {"metadata": {"name": "post-restart"}})
            if status == 201:
                break
            assert time.monotonic() < deadline, f"writes still fail a minute after the restart: {status} {body[:300]!r}"
            time.sleep(0.2)
        k.timings["restart_first_write_s"] = time.monotonic() - t_up
        stop_writer.set()
        writer_thread.join(10)
        stored = {i["metadata"]["name"] for i in k.json("GET", "/api/v1/namespaces/e2e-writes/configmaps")["items"]}
        lost = sorted(set(acked) - stored)
        assert len(acked) > 5 and not lost, f"{len(acked)} acknowledged creates, lost: {lost}"
        k.timings["acked_writes_during_kill"] = len(acked)
        start, _ = k.outage[-1]
        k.outage[-1] = (start, k.log_size())

        after = _snapshot(k)
        after.pop("configmaps/e2e/post-restart")
        before_keys = {**before, "configmaps/e2e/pre-kill": after.get("configmaps/e2e/pre-kill", "")}
        assert after == before_keys, {
            "lost": sorted(set(before_keys) - set(after)),
            "new": sorted(set(after) - set(before_keys)),
            "changed": sorted(n for n in before_keys if n in after and after[n] != before_keys[n]),
        }

        # the watch opened before the crash carries on: no error, no gap, no duplicate
        k.kubectl("patch", "configmap", "post-restart", "-n", "e2e", "-p", '{"data":{"a":"b"}}')
        k.kubectl("delete", "configmap", "pre-kill", "-n", "e2e")
        events = w.wait_for(4, 30)
        got = [(t, n) for t, n, _ in summary(events)]
        want = [("ADDED", "pre-kill"), ("ADDED", "post-restart"), ("MODIFIED", "post-restart"), ("DELETED", "pre-kill")]
        assert got == want, (summary(events), w.stderr())
        rvs = [int(r) for _, _, r in summary(events)]
        assert rvs == sorted(rvs), rvs
        assert not w.closed, w.stderr()
    finally:
        w.stop()
    # kube-apiserver is fully healthy again
    out = k.kubectl("get", "--raw", "/readyz?verbose").stdout
    assert "[+]etcd ok" in out, out


def test_apiserver_log_has_no_storage_errors(cluster: Cluster) -> None:
    k = cluster
    time.sleep(3)  # let background loops (progress requests, bookmarks, cache checks) run a little
    k.alive()
    data = k.log_path.read_bytes()
    lines_always: list[str] = []
    lines_up: list[str] = []
    pos = 0
    for raw in data.splitlines(keepends=True):
        line = raw.decode(errors="replace").rstrip()
        in_outage = any(a <= pos < b for a, b in k.outage)
        pos += len(raw)
        if ALWAYS_BAD.search(line):
            lines_always.append(line)
        elif not in_outage and BAD_WHEN_UP.search(line) and not BENIGN.search(line):
            lines_up.append(line)
    assert not lines_always, "\n".join(lines_always[:40])
    assert not lines_up, "\n".join(lines_up[:40])

    # k8s-sql itself logged no warning, error or traceback (it runs at --log-level warn),
    # but etcd's slow-request warning: a request over 100 ms on a loaded CI machine is
    # what the warning is for, not a fault (etcd logs the same under load).
    store_log = k.store.log()
    bad = [
        line
        for line in store_log.splitlines()
        if re.search(r" (WARNING|ERROR|CRITICAL) |Traceback", line) and "apply request took too long" not in line
    ]
    assert not bad, "\n".join(bad[:40])

    # no watch-cache re-initialisation storms
    if k.watch_cache:
        inits: dict[str, float] = {}
        for line in k.metrics().splitlines():
            if line.startswith("apiserver_watch_cache_initializations_total{"):
                labels, value = line.rsplit(" ", 1)
                inits[labels] = float(value)
        print(f"\n[e2e] watch-cache initialisations: {len(inits)} caches, {sum(inits.values()):.0f} in all")
        # one each at start; a restart of k8s-sql within the compaction window needs none
        # (the etcd client resumes every watch), so allow a single re-initialisation
        storms = {r: n for r, n in inits.items() if n > 2}
        assert inits and not storms, storms
    with contextlib.suppress(Exception):
        print(f"\n[e2e] timings: {json.dumps({n: round(v, 3) for n, v in k.timings.items()})}")
