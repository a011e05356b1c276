"""What an operator sees of a running k8s-sql: /metrics, the health endpoints (against
etcd's own answers), the gRPC health service, the logs, and --workers' one scrape.

The Prometheus server end to end is tests/test_prometheus.py; the alert rules are
tests/test_alert_rules.py, whose list of metric names is checked here against what a
running server exposes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc

# promtool's lint findings on our /metrics: only etcd's own names, which etcd serves
# as gauges and histograms although they end in _total (promtool says the same of
# etcd's /metrics).
ETCD_LINT = {
    f'{name} non-counter metrics should not have "_total" suffix'
    for name in (
        "etcd_debugging_lease_ttl_total",
        "etcd_debugging_mvcc_keys_total",
        "etcd_debugging_mvcc_slow_watcher_total",
        "etcd_debugging_mvcc_watch_stream_total",
        "etcd_debugging_mvcc_watcher_total",
    )
}


def http(url: str, method: str = "GET") -> tuple[int, str, dict[str, str]]:
    """Status, body and headers, whatever the status."""
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """Every sample of a /metrics page: ``(name, labels) -> value``."""
    status, text, _ = http(url)
    assert status == 200, text
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples that carry ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def metrics_server(factory: Callable[..., object], *extra: str) -> tuple[object, str]:
    from conftest import free_port

    port = free_port()
    server = factory("--listen-metrics-urls", f"http://127.0.0.1:{port}", *extra)
    return server, f"http://127.0.0.1:{port}"


def test_metrics_count_what_clients_did(k8s_sql_factory, etcdctl) -> None:
    """The names the alerts and the dashboard use are all served; writes and answers are
    counted exactly; the client URL serves the same page as the metrics URL; promtool
    parses it and finds only what it finds in etcd's names."""
    from test_alert_rules import SERVER_HISTOGRAMS, SERVER_METRICS

    server, metrics_url = metrics_server(k8s_sql_factory)
    before = scrape(metrics_url + "/metrics")
    with grpc.insecure_channel(server.endpoint) as ch:
        kv = rpc_pb2_grpc.KVStub(ch)
        for i in range(7):
            kv.Put(pb.PutRequest(key=b"/m/%d" % i, value=b"v"))
        kv.DeleteRange(pb.DeleteRangeRequest(key=b"/m/0"))
        txn = pb.TxnRequest()
        txn.success.add().request_put.CopyFrom(pb.PutRequest(key=b"/m/t", value=b"x"))
        txn.success.add().request_range.CopyFrom(pb.RangeRequest(key=b"/m/", range_end=b"/m0"))
        kv.Txn(txn)
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as e:
                kv.Range(pb.RangeRequest(key=b"/m/1", revision=10_000))
            assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE
        lease = rpc_pb2_grpc.LeaseStub(ch)
        lease.LeaseGrant(pb.LeaseGrantRequest(TTL=60))
        with pytest.raises(grpc.RpcError) as e:
            lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=12345))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        watch = rpc_pb2_grpc.WatchStub(ch)
        responses = watch.Watch(iter([pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"/m/1"))]))
        next(responses)  # created: the stream and its watcher exist now
        after = scrape(metrics_url + "/metrics")
        responses.cancel()

    names = {n for n, _ in after}
    expected = set(SERVER_METRICS) | {h + s for h in SERVER_HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
    assert expected - names == set(), "served names the alerts and dashboard need"

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("etcd_mvcc_put_total") == 8  # 7 puts and the txn's
    assert delta("etcd_mvcc_delete_total") == 1
    assert delta("etcd_mvcc_txn_total") == 1  # the txn had two ops
    assert delta("etcd_debugging_lease_granted_total") == 1
    assert delta("grpc_server_handled_total", grpc_method="Put", grpc_code="OK") == 7
    assert delta("grpc_server_handled_total", grpc_method="Range", grpc_code="OutOfRange") == 3
    assert delta("grpc_server_handled_total", grpc_method="LeaseRevoke", grpc_code="NotFound") == 1
    assert delta("grpc_server_started_total", grpc_method="Put", grpc_type="unary") == 7
    assert delta("grpc_server_started_total", grpc_method="Watch", grpc_type="bidi_stream") == 1
    assert delta("grpc_server_handling_seconds_count", grpc_method="Put") == 7
    assert value(after, "etcd_debugging_mvcc_watch_stream_total") == 1
    assert value(after, "etcd_debugging_mvcc_watcher_total") == 1
    assert value(after, "etcd_server_has_leader") == 1 and value(after, "etcd_server_is_leader") == 1
    assert value(after, "etcd_debugging_mvcc_current_revision") >= 10
    assert value(after, "k8s_sql_database_up") == 1
    assert delta("k8s_sql_write_batch_requests_sum") >= 10  # puts, delete, txn, grant
    assert delta("k8s_sql_sql_statement_duration_seconds_count", statement="begin_write", error="") >= 1
    assert value(after, "etcd_disk_backend_commit_duration_seconds_count") >= 10

    # The plain-HTTP client URL serves the same page, next to gRPC (etcd's cmux).
    on_client_url = scrape(server.url + "/metrics")
    assert value(on_client_url, "etcd_mvcc_put_total") >= value(after, "etcd_mvcc_put_total")

    promtool = shutil.which("promtool")
    if promtool is None:
        from conftest import missing

        missing("promtool is not installed (Debian and Ubuntu: the prometheus package)")
    _, text, _ = http(metrics_url + "/metrics")
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    findings = {line.strip() for line in (res.stdout + res.stderr).splitlines() if line.strip()}
    assert findings == ETCD_LINT, findings


HEALTH_PATHS = [
    "/health",
    "/health?exclude=NOSPACE",
    "/health?serializable=true",
    "/livez",
    "/livez?verbose",
    "/readyz",
    "/readyz/linearizable_read",
    "/readyz/serializable_read?verbose",
    "/livez/nosuchcheck",
    "/readyz/nosuchcheck",
    "/version",
]


def test_health_endpoints_answer_as_etcd_does(k8s_sql_factory, etcd) -> None:
    """Where etcd has the endpoint, the status and body are etcd's (its /version names
    etcd's own server version: only the keys are compared); /readyz?verbose lists
    etcd's checks and ours; ?exclude drops a check; POST is refused alike."""
    server, metrics_url = metrics_server(k8s_sql_factory)
    for path in HEALTH_PATHS:
        want_status, want_body, want_headers = http(etcd.url + path)
        for base in (server.url, metrics_url):
            status, body, headers = http(base + path)
            assert status == want_status, (base, path, body)
            if path == "/version":
                assert json.loads(body).keys() == json.loads(want_body).keys()
            else:
                assert body == want_body, (base, path)
            assert headers.get("Content-Type") == want_headers.get("Content-Type"), (base, path)
    for path in ("/health", "/readyz"):
        assert http(metrics_url + path, "POST")[0] == http(etcd.url + path, "POST")[0] == 405

    _, etcd_verbose, _ = http(etcd.url + "/readyz?verbose")
    status, ours, _ = http(metrics_url + "/readyz?verbose")
    assert status == 200 and ours.endswith("ok\n")
    assert set(etcd_verbose.splitlines()) <= set(ours.splitlines())
    for ours_only in ("database_writable", "leader", "caught_up"):
        assert f"[+]{ours_only} ok" in ours
    status, excluded, _ = http(metrics_url + "/readyz?verbose&exclude=linearizable_read&exclude=leader")
    assert status == 200 and "linearizable_read" not in excluded and "leader" not in excluded
    assert "[+]caught_up ok" in excluded


def _health_watch(endpoint: str) -> tuple[grpc.Channel, object]:
    ch = grpc.insecure_channel(endpoint)
    stub = health_pb2_grpc.HealthStub(ch)
    return ch, stub.Watch(health_pb2.HealthCheckRequest(service=""))


def test_health_follows_the_database(k8s_sql_factory, tmp_path: Path) -> None:
    """PostgreSQL up, down, back: /health, /readyz and gRPC health fail while it is away
    and recover after; /livez stays ok (restarting a frontend cannot bring its
    database back); k8s_sql_database_up follows."""
    from conftest import free_port, missing
    from databases import PostgresServer

    reason = PostgresServer.available()
    if reason:
        missing(reason)
    db = PostgresServer(free_port())  # its own server: this test stops it
    db.start()
    try:
        server, metrics_url = metrics_server(k8s_sql_factory, "--endpoint", db.new_dsn())
        ch, statuses = _health_watch(server.endpoint)
        with ch:
            assert next(statuses).status == health_pb2.HealthCheckResponse.SERVING
            assert http(metrics_url + "/health")[:2] == (200, '{"health":"true","reason":""}')
            assert http(metrics_url + "/readyz")[0] == 200

            db.halt()
            # The gRPC health service's Watch streams the change: no polling needed.
            assert next(statuses).status == health_pb2.HealthCheckResponse.NOT_SERVING
            status, body, _ = http(metrics_url + "/health")
            assert status == 503
            reason_text = json.loads(body)["reason"]
            assert reason_text == "RAFT NO LEADER" or reason_text.startswith("RANGE ERROR:"), body
            status, body, _ = http(metrics_url + "/readyz")
            assert status == 503 and "[-]linearizable_read failed: " in body and body.endswith("readyz check failed\n")
            assert http(metrics_url + "/livez")[:2] == (200, "ok\n")
            assert value(scrape(metrics_url + "/metrics"), "k8s_sql_database_up") == 0

            db.start()
            assert next(statuses).status == health_pb2.HealthCheckResponse.SERVING
            assert http(metrics_url + "/health")[0] == 200
            deadline = time.monotonic() + 30
            while http(metrics_url + "/readyz")[0] != 200:  # the heartbeat's next write
                assert time.monotonic() < deadline, http(metrics_url + "/readyz?verbose")
                time.sleep(0.2)
            assert value(scrape(metrics_url + "/metrics"), "k8s_sql_database_up") == 1
            statuses.cancel()
    finally:
        db.stop()


def test_grpc_health_check_as_etcd(k8s_sql_factory, etcd) -> None:
    """grpc.health.v1.Health/Check with the empty service: SERVING from both; an
    unknown service: NOT_FOUND from both."""
    server = k8s_sql_factory()
    for endpoint in (etcd.endpoint, server.endpoint):
        with grpc.insecure_channel(endpoint) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            assert (
                stub.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
            )
            with pytest.raises(grpc.RpcError) as e:
                stub.Check(health_pb2.HealthCheckRequest(service="nosuch"))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_json_logs_and_slow_request_warnings(k8s_sql_factory, tmp_path: Path) -> None:
    """--log-format json writes etcd's keys; --log-outputs adds a file; a request slower
    than --warning-apply-duration is logged with its method and key, never its value."""
    log_file = tmp_path / "k8s-sql.json.log"
    server = k8s_sql_factory(
        "--log-level",
        "info",
        "--log-format",
        "json",
        "--log-outputs",
        f"stderr,{log_file}",
        "--warning-apply-duration",
        "1us",
    )
    with grpc.insecure_channel(server.endpoint) as ch:
        rpc_pb2_grpc.KVStub(ch).Put(pb.PutRequest(key=b"/registry/secrets/default/db", value=b"TOPSECRET-VALUE"))
    server.stop()
    lines = log_file.read_text().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert entries and all({"level", "ts", "caller", "msg"} <= e.keys() for e in entries)
    assert any(e["level"] == "info" and e["msg"].startswith("ready to serve client requests") for e in entries)
    slow = [e for e in entries if e["msg"].startswith("apply request took too long")]
    assert slow and slow[0]["level"] == "warn" and slow[0]["method"] == "Put"
    assert '"/registry/secrets/default/db"' in slow[0]["request"] and slow[0]["expected-duration"] == "1µs"
    assert "TOPSECRET" not in log_file.read_text() and "TOPSECRET" not in server.log()


def test_workers_are_gathered_into_one_scrape(k8s_sql_factory) -> None:
    """--workers 2: one scrape of the metrics URL shows both workers' series, each
    labelled with its worker, and their puts add up to what was written."""
    server, metrics_url = metrics_server(k8s_sql_factory, "--workers", "2")
    deadline = time.monotonic() + 30
    while http(metrics_url + "/readyz")[0] != 200:  # both workers ready (the fixture waited for one)
        assert time.monotonic() < deadline, http(metrics_url + "/readyz?verbose")
        time.sleep(0.1)
    puts = 40
    for i in range(puts):  # a new connection each: the kernel spreads them over the workers
        with grpc.insecure_channel(server.endpoint) as ch:
            rpc_pb2_grpc.KVStub(ch).Put(pb.PutRequest(key=b"/w/%d" % i, value=b"v"))
    samples = scrape(metrics_url + "/metrics")
    workers = {dict(ls).get("worker") for (n, ls) in samples if n == "etcd_mvcc_put_total"}
    assert workers == {"default-0", "default-1"}
    assert value(samples, "etcd_mvcc_put_total") == puts
    assert value(samples, "etcd_server_is_leader") == 1  # one of the two leads
    assert http(metrics_url + "/readyz")[:2] == (200, "ok\n")


def test_lease_expiry_is_counted_and_timed(k8s_sql_factory) -> None:
    """A lease left to expire: revoked once (etcd_debugging_lease_revoked_total), its
    lateness observed (k8s_sql_lease_expiry_lag_seconds), its key's delete counted."""
    server, metrics_url = metrics_server(k8s_sql_factory)
    before = scrape(metrics_url + "/metrics")
    with grpc.insecure_channel(server.endpoint) as ch:
        lease_id = rpc_pb2_grpc.LeaseStub(ch).LeaseGrant(pb.LeaseGrantRequest(TTL=2)).ID
        rpc_pb2_grpc.KVStub(ch).Put(pb.PutRequest(key=b"/lease/k", value=b"v", lease=lease_id))
        create = pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"/lease/k"))
        responses = rpc_pb2_grpc.WatchStub(ch).Watch(iter([create]))
        assert next(responses).created
        deleted = next(r for r in responses if r.events)  # the expiry's DELETE, after the TTL
        assert deleted.events[0].type == 1
        responses.cancel()
    after = scrape(metrics_url + "/metrics")
    assert value(after, "etcd_debugging_lease_revoked_total") - value(before, "etcd_debugging_lease_revoked_total") == 1
    lag = value(after, "k8s_sql_lease_expiry_lag_seconds_count") - value(
        before, "k8s_sql_lease_expiry_lag_seconds_count"
    )
    assert lag == 1
    late = value(after, "k8s_sql_lease_expiry_lag_seconds_sum") - value(before, "k8s_sql_lease_expiry_lag_seconds_sum")
    assert 0 <= late < 30  # the expirer looks every 0.5 s; a loaded CI machine may be late
    assert value(after, "etcd_mvcc_delete_total") - value(before, "etcd_mvcc_delete_total") == 1
