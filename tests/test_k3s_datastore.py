"""k3s with an external etcd (``--datastore-endpoint=https://…``) on k8s-sql over mutual TLS.

k3s itself cannot be built here (conformance/k3s/README.md says why). Instead
conformance/k3s's probe makes the datastore calls a k3s server makes with an external
etcd, through the kine packages k3s uses for them: two k3s servers, A and B, on two
k8s-sql frontends of one store, take the bootstrap lock, save and load the bootstrap
data, and rotate it. Every backend is tested; the probe exits non-zero on any answer
k3s would not expect.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT, ServerProcess, missing
from test_tls import PKI, make_ca, make_cert, start_tls

TOKEN = "k8s-sql-k3s-probe"
PROBE_STEPS = (
    "listen",
    "client-cert-required",
    "fresh-datastore",
    "abandoned-lock",
    "lock-race",
    "save-and-load",
    "restart",
    "stale-revisions",
    "override",
    "token-rotation",
)


@pytest.fixture(scope="module")
def k3s_probe() -> Path:
    """conformance/k3s/build.sh's k3s-probe (built once; cached by a hash of its sources)."""
    if shutil.which("go") is None:
        missing("Go is not installed, so the k3s probe cannot be built (conformance/k3s/build.sh)")
    start = time.monotonic()
    res = subprocess.run(["bash", str(ROOT / "conformance/k3s/build.sh")], capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        missing(f"building the k3s probe failed:\n{res.stderr[-3000:]}")
    print(f"k3s-probe ready in {time.monotonic() - start:.1f}s: {res.stderr.strip()}")
    return Path(res.stdout.strip().splitlines()[-1]) / "k3s-probe"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    if shutil.which("openssl") is None:
        missing("openssl is not installed")
    d = tmp_path_factory.mktemp("k3s-pki")
    ca = make_ca(d, "k3s-datastore-ca")
    server = make_cert(d, "k8s-sql", ca, server=True)
    client = make_cert(d, "k3s-server", ca, server=False)
    rogue_ca = make_ca(d, "rogue-ca")
    rogue = make_cert(d, "rogue", rogue_ca, server=False)
    return PKI(ca[0], server[0], server[1], client[0], client[1], rogue_ca[0], rogue[0], rogue[1])


def mtls_frontends(
    factory: Callable[..., ServerProcess], backend_args: list[str], pki: PKI, tmp_path: Path
) -> list[ServerProcess]:
    """Two k8s-sql frontends of one store, serving https and requiring client certificates."""
    # sqlite: both frontends open the same data directory; a database: the same DSN
    shared = {} if backend_args else {"data_dir": tmp_path / "store"}
    out = []
    for _ in range(2):
        s = factory(*backend_args, start=False, **shared)
        s.argv = [a.replace(f"http://{s.endpoint}", f"https://{s.endpoint}") for a in s.argv]
        s.argv += ["--cert-file", str(pki.server_cert), "--key-file", str(pki.server_key)]
        s.argv += ["--trusted-ca-file", str(pki.ca), "--client-cert-auth"]
        start_tls(s, pki.client_creds())
        out.append(s)
    return out


def test_k3s_external_etcd_datastore(k8s_sql_factory, backend_args, pki: PKI, k3s_probe: Path, etcdctl, tmp_path):
    a, b = mtls_frontends(k8s_sql_factory, backend_args, pki, tmp_path)
    url_a, url_b = f"https://{a.endpoint}", f"https://{b.endpoint}"
    files = ["-cafile", str(pki.ca), "-certfile", str(pki.client_cert), "-keyfile", str(pki.client_key)]
    # server A lists one frontend, server B both (as --datastore-endpoint=https://fe2,https://fe1)
    argv = [str(k3s_probe), "-endpoint", url_a, "-endpoint-b", f"{url_b},{url_a}", "-token", TOKEN, *files]
    started = time.monotonic()
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    report = f"k3s-probe exited {res.returncode} after {took:.1f}s\n{res.stdout}\n{res.stderr}\n{a.log()}\n{b.log()}"
    assert res.returncode == 0, report
    lines = res.stdout.strip().splitlines()
    done = [line.split()[1] for line in lines if line.startswith("ok ")]
    assert done == list(PROBE_STEPS), report
    assert lines[-2].startswith("OK:"), report

    # The final bootstrap key is really stored: etcdctl over mutual TLS sees it on both frontends.
    _, key, rev = lines[-1].split()
    assert key == "/bootstrap/" + hashlib.sha256(f"{TOKEN}-rotated".encode()).hexdigest()[:12]
    good = [f"--cacert={pki.ca}", f"--cert={pki.client_cert}", f"--key={pki.client_key}"]
    for url in (url_a, url_b):
        out = json.loads(etcdctl(url, *good, "get", "/bootstrap", "--prefix", "-w", "json").stdout)
        kvs = out.get("kvs", [])
        assert [base64.b64decode(kv["key"]).decode() for kv in kvs] == [key], out
        assert kvs[0]["mod_revision"] == int(rev) and kvs[0]["version"] == 1, kvs[0]
        salt, sep, sealed = base64.b64decode(kvs[0]["value"]).partition(b":")
        assert sep and len(salt) == 8 and len(base64.b64decode(sealed)) == 48 << 10

    # Strict: run again on the same store and it refuses, naming the step.
    again = subprocess.run([*argv, "-require-client-cert=false"], capture_output=True, text=True, timeout=60)
    assert again.returncode != 0, again.stdout
    assert again.stderr.startswith("FAIL fresh-datastore: the datastore already holds"), again.stderr
    print(f"k3s-probe passed in {took:.1f}s")
