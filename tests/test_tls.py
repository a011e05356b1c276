"""Client TLS with etcd's flags, mutual TLS, and gRPC keepalive pings from idle clients.

Certificates are made with the openssl CLI in tmp_path: a CA, a server certificate
for 127.0.0.1 and localhost, a client certificate, and a second, unrelated CA with
its own client certificate (which must be refused).
"""

from __future__ import annotations

import base64
import json
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from conftest import ServerProcess, missing

from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc

# -- certificates ------------------------------------------------------------------------


def openssl(*args: str) -> None:
    res = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"openssl {' '.join(args)}:\n{res.stderr}"


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    cert, key = d / f"{name}.pem", d / f"{name}.key"
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-days", "2", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert),
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def make_cert(d: Path, name: str, ca: tuple[Path, Path], *, server: bool) -> tuple[Path, Path]:
    cert, key, csr, ext = d / f"{name}.pem", d / f"{name}.key", d / f"{name}.csr", d / f"{name}.ext"
    openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr),
    )  # fmt: skip
    lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment"]
    if server:
        lines += ["extendedKeyUsage=serverAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost"]
    else:
        lines += ["extendedKeyUsage=clientAuth"]
    ext.write_text("\n".join(lines) + "\n")
    openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
        "-days", "2", "-extfile", str(ext), "-out", str(cert),
    )  # fmt: skip
    return cert, key


@dataclass
class PKI:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_cert: Path
    rogue_key: Path

    def client_creds(self, with_cert: bool = True) -> grpc.ChannelCredentials:
        if not with_cert:
            return grpc.ssl_channel_credentials(root_certificates=self.ca.read_bytes())
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.client_key.read_bytes(),
            certificate_chain=self.client_cert.read_bytes(),
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    if shutil.which("openssl") is None:
        missing("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, "k8s-sql-test-ca")
    server = make_cert(d, "server", ca, server=True)
    client = make_cert(d, "client", ca, server=False)
    rogue_ca = make_ca(d, "rogue-ca")
    rogue = make_cert(d, "rogue-client", rogue_ca, server=False)
    return PKI(ca[0], server[0], server[1], client[0], client[1], rogue_ca[0], rogue[0], rogue[1])


# -- a k8s-sql serving https ---------------------------------------------------------------


def start_tls(s: ServerProcess, creds: grpc.ChannelCredentials, timeout: float = 30.0) -> None:
    """Start the server and wait until it answers Status over TLS."""
    log = open(s.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
    s.proc = subprocess.Popen(s.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    deadline = time.monotonic() + timeout
    while True:
        if s.proc.poll() is not None:
            raise AssertionError(f"k8s-sql exited with {s.proc.returncode}:\n{s.log()}")
        try:
            with grpc.secure_channel(s.endpoint, creds) as ch:
                rpc_pb2_grpc.MaintenanceStub(ch).Status(pb.StatusRequest(), timeout=1)
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                s.stop()
                raise AssertionError(f"k8s-sql over TLS not ready after {timeout}s:\n{s.log()}") from None
            time.sleep(0.05)


@pytest.fixture
def tls_server(k8s_sql_factory, pki: PKI) -> Callable[..., tuple[ServerProcess, str]]:
    """``tls_server(*extra) -> (server, https_url)``: k8s-sql on an https client URL."""

    def make(*extra: str) -> tuple[ServerProcess, str]:
        s = k8s_sql_factory(start=False)
        url = f"https://{s.endpoint}"
        s.argv = [a.replace(f"http://{s.endpoint}", url) for a in s.argv]
        s.argv += ["--cert-file", str(pki.server_cert), "--key-file", str(pki.server_key), *extra]
        start_tls(s, pki.client_creds())
        return s, url

    return make


def fast_fail(*args: str) -> list[str]:
    """etcdctl flags that make a refused connection fail in seconds, not 20."""
    return [*args, "--dial-timeout=2s", "--command-timeout=3s"]


def get_value(etcdctl, url: str, key: str, *tls: str) -> list[str]:
    out = json.loads(etcdctl(url, *tls, "get", key, "-w", "json").stdout)
    return [base64.b64decode(kv["value"]).decode() for kv in out.get("kvs", [])]


# -- TLS --------------------------------------------------------------------------------


def test_tls_server_certificate(tls_server, pki: PKI, etcdctl) -> None:
    s, url = tls_server()
    tls = [f"--cacert={pki.ca}"]
    assert etcdctl(url, *tls, "put", "secure", "yes").stdout.strip() == "OK"
    assert get_value(etcdctl, url, "secure", *tls) == ["yes"]
    (st,) = json.loads(etcdctl(url, *tls, "endpoint", "status", "-w", "json").stdout)
    assert st["Status"]["header"]["revision"] == 2
    ml = json.loads(etcdctl(url, *tls, "member", "list", "-w", "json").stdout)
    assert ml["members"][0]["clientURLs"] == [url]
    # without --client-cert-auth a client certificate is optional
    assert etcdctl(url, *tls, f"--cert={pki.client_cert}", f"--key={pki.client_key}", "get", "secure").returncode == 0

    # a client that does not trust the CA refuses the server
    untrusted = etcdctl(url, *fast_fail(f"--cacert={pki.rogue_ca}", "put", "secure", "no"), check=False)
    assert untrusted.returncode != 0
    assert "certificate" in untrusted.stderr.lower() or "deadline" in untrusted.stderr.lower()
    # plain HTTP/2 against the TLS port gets nowhere
    plain = etcdctl(f"http://{s.endpoint}", *fast_fail("put", "secure", "plain"), check=False)
    assert plain.returncode != 0
    assert get_value(etcdctl, url, "secure", *tls) == ["yes"]

    # Python gRPC: the certificate names localhost as well as 127.0.0.1
    by_name = grpc.secure_channel(
        s.endpoint, pki.client_creds(with_cert=False), options=[("grpc.ssl_target_name_override", "localhost")]
    )
    with by_name:
        r = rpc_pb2_grpc.KVStub(by_name).Range(pb.RangeRequest(key=b"secure"), timeout=10)
        assert [kv.value for kv in r.kvs] == [b"yes"]
    wrong_name = grpc.secure_channel(
        s.endpoint, pki.client_creds(with_cert=False), options=[("grpc.ssl_target_name_override", "etcd.invalid")]
    )
    with wrong_name, pytest.raises(grpc.RpcError) as err:
        rpc_pb2_grpc.KVStub(wrong_name).Range(pb.RangeRequest(key=b"secure"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert s.proc is not None and s.proc.poll() is None


def test_mutual_tls(tls_server, pki: PKI, etcdctl, tmp_path: Path) -> None:
    s, url = tls_server("--trusted-ca-file", str(pki.ca), "--client-cert-auth")
    good = [f"--cacert={pki.ca}", f"--cert={pki.client_cert}", f"--key={pki.client_key}"]
    assert etcdctl(url, *good, "put", "m", "1").stdout.strip() == "OK"
    assert get_value(etcdctl, url, "m", *good) == ["1"]
    (h,) = json.loads(etcdctl(url, *good, "endpoint", "health", "-w", "json").stdout)
    assert h["health"] is True
    snap = tmp_path / "over-mtls.db"
    etcdctl(url, *good, "snapshot", "save", str(snap))
    assert snap.stat().st_size > 32

    # no client certificate: refused
    anonymous = etcdctl(url, *fast_fail(f"--cacert={pki.ca}", "put", "m", "anonymous"), check=False)
    assert anonymous.returncode != 0
    # a certificate from another CA: refused
    rogue = etcdctl(
        url,
        *fast_fail(f"--cacert={pki.ca}", f"--cert={pki.rogue_cert}", f"--key={pki.rogue_key}", "put", "m", "rogue"),
        check=False,
    )
    assert rogue.returncode != 0
    assert get_value(etcdctl, url, "m", *good) == ["1"]

    # the same with Python gRPC: no certificate and a foreign certificate fail
    for creds in (
        pki.client_creds(with_cert=False),
        grpc.ssl_channel_credentials(
            root_certificates=pki.ca.read_bytes(),
            private_key=pki.rogue_key.read_bytes(),
            certificate_chain=pki.rogue_cert.read_bytes(),
        ),
    ):
        with grpc.secure_channel(s.endpoint, creds) as ch, pytest.raises(grpc.RpcError) as err:
            rpc_pb2_grpc.KVStub(ch).Put(pb.PutRequest(key=b"m", value=b"py-refused"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(s.endpoint, pki.client_creds()) as ch:
        resp = rpc_pb2_grpc.KVStub(ch).Put(pb.PutRequest(key=b"m", value=b"py"), timeout=10)
        assert resp.header.revision == 3
    assert get_value(etcdctl, url, "m", *good) == ["py"]
    assert s.proc is not None and s.proc.poll() is None


def test_client_cert_auth_needs_a_trusted_ca(k8s_sql_factory, pki: PKI) -> None:
    s = k8s_sql_factory(start=False)
    url = f"https://{s.endpoint}"
    argv = [a.replace(f"http://{s.endpoint}", url) for a in s.argv]
    argv += ["--cert-file", str(pki.server_cert), "--key-file", str(pki.server_key), "--client-cert-auth"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "--trusted-ca-file" in res.stderr


# -- keepalive ----------------------------------------------------------------------------

KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 1000),  # Kubernetes pings every 30 s; this is 30x more often
    ("grpc.keepalive_timeout_ms", 10000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),  # keep pinging however long the idle spell
]


class ConnectionWatch:
    """Records a channel's connectivity; ``dropped`` is set when it leaves READY."""

    def __init__(self, ch: grpc.Channel) -> None:
        self.states: list[str] = []
        self.dropped = threading.Event()
        self._ready = False
        grpc.channel_ready_future(ch).result(timeout=10)
        ch.subscribe(self._on_change, try_to_connect=False)

    def _on_change(self, state: grpc.ChannelConnectivity) -> None:
        self.states.append(state.name)
        if state == grpc.ChannelConnectivity.READY:
            self._ready = True
        elif self._ready:
            self.dropped.set()


def _idle_watch_stream(ch: grpc.Channel) -> tuple[queue.Queue, queue.Queue]:
    """Open a Watch stream on prefix ka/; responses (or the error ending it) go to a queue."""
    requests: queue.Queue[pb.WatchRequest | None] = queue.Queue()
    responses: queue.Queue[object] = queue.Queue()

    def gen() -> Iterator[pb.WatchRequest]:
        while (r := requests.get()) is not None:
            yield r

    def pump() -> None:
        try:
            for resp in rpc_pb2_grpc.WatchStub(ch).Watch(gen()):
                responses.put(resp)
        except grpc.RpcError as e:
            responses.put(e)
        responses.put(None)

    requests.put(pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"ka/", range_end=b"ka0")))
    threading.Thread(target=pump, daemon=True).start()
    return requests, responses


def test_idle_client_with_frequent_keepalive_pings_is_not_sent_away(k8s_sql_factory) -> None:
    k8s_sql = k8s_sql_factory()  # the gRPC layer's policy: the same on every backend
    with grpc.insecure_channel(k8s_sql.endpoint, options=KEEPALIVE_OPTIONS) as ch:
        conn = ConnectionWatch(ch)
        kv = rpc_pb2_grpc.KVStub(ch)
        kv.Put(pb.PutRequest(key=b"ka/before", value=b"1"), timeout=10)
        requests, responses = _idle_watch_stream(ch)
        created = responses.get(timeout=10)
        assert isinstance(created, pb.WatchResponse) and created.created, created

        # ~13 pings with nothing else on the connection; a GOAWAY too_many_pings would
        # drop the connection (a server with gRPC's default policy does so in ~4 s)
        assert not conn.dropped.wait(13), f"connection dropped while idle: {conn.states}"
        assert responses.empty(), responses.get()

        # the same connection and the same watch stream still work
        resp = kv.Put(pb.PutRequest(key=b"ka/after", value=b"2"), timeout=10)
        assert resp.header.revision == 3
        ev = responses.get(timeout=10)
        assert isinstance(ev, pb.WatchResponse), ev
        assert [(e.kv.key, e.kv.mod_revision) for e in ev.events] == [(b"ka/after", 3)]
        assert not conn.dropped.is_set(), conn.states
        requests.put(None)
    assert k8s_sql.proc is not None and k8s_sql.proc.poll() is None


def test_keepalive_detection_catches_a_strict_server() -> None:
    """Control for the test above: gRPC's default server policy answers these pings
    with GOAWAY too_many_pings, and ConnectionWatch sees the connection drop."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=KEEPALIVE_OPTIONS) as ch:
            conn = ConnectionWatch(ch)
            assert conn.dropped.wait(15), f"a default gRPC server tolerated 1 s pings: {conn.states}"
    finally:
        server.stop(None)


def test_https_metrics_url(tls_server, pki: PKI) -> None:
    """An https --listen-metrics-urls URL serves /metrics and /health with the client TLS
    files, and with --client-cert-auth refuses a scraper without a certificate, as
    etcd's does."""
    import ssl
    import urllib.request

    from conftest import free_port

    port = free_port()
    tls_server(
        "--trusted-ca-file",
        str(pki.ca),
        "--client-cert-auth",
        "--listen-metrics-urls",
        f"https://127.0.0.1:{port}",
    )
    trusted = ssl.create_default_context(cafile=str(pki.ca))
    trusted.check_hostname = False  # the test certificate names 127.0.0.1 as an IP SAN; urllib checks the name
    with_cert = ssl.create_default_context(cafile=str(pki.ca))
    with_cert.check_hostname = False
    with_cert.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=with_cert, timeout=10) as r:
        assert r.read() == b'{"health":"true","reason":""}'
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=with_cert, timeout=10) as r:
        assert b"etcd_server_has_leader 1.0" in r.read()
    with pytest.raises(OSError):  # no client certificate: the handshake fails
        urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=trusted, timeout=10).read()
