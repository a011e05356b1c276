"""Several k8s-sql frontends on one database serve one store."""

from __future__ import annotations

import queue
import statistics
import threading
import time

import grpc
import pytest

from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc

WRITES = 200


@pytest.fixture(params=["sqlite", "postgres", "mariadb"])
def two_frontends(request, k8s_sql_factory, tmp_path):
    if request.param == "sqlite":
        shared = tmp_path / "shared"
        a = k8s_sql_factory(data_dir=shared)
        b = k8s_sql_factory(data_dir=shared)
    else:
        dsn = request.getfixturevalue(f"{request.param}_server").new_dsn()
        a = k8s_sql_factory("--endpoint", dsn)
        b = k8s_sql_factory("--endpoint", dsn)
    return request.param, a, b


def test_writes_on_one_frontend_reach_reads_and_watches_on_another(two_frontends) -> None:
    backend, a, b = two_frontends
    ch_a, ch_b = grpc.insecure_channel(a.endpoint), grpc.insecure_channel(b.endpoint)
    kv_a, kv_b = rpc_pb2_grpc.KVStub(ch_a), rpc_pb2_grpc.KVStub(ch_b)
    watch_b = rpc_pb2_grpc.WatchStub(ch_b)

    events: queue.Queue[tuple[float, pb.WatchResponse]] = queue.Queue()
    stop = threading.Event()

    def requests():
        yield pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"mf/", range_end=b"mf0", prev_kv=True))
        stop.wait(60)

    stream = watch_b.Watch(requests(), timeout=60)

    def read() -> None:
        try:
            for resp in stream:
                events.put((time.monotonic(), resp))
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    created = events.get(timeout=10)[1]
    assert created.created

    sent_at: dict[int, float] = {}
    for i in range(WRITES):
        t = time.monotonic()
        rev = kv_a.Put(pb.PutRequest(key=b"mf/%03d" % (i % 50), value=b"%d" % i)).header.revision
        sent_at[rev] = t
        # Read-your-writes across frontends: the write is visible on B once acknowledged.
        got = kv_b.Range(pb.RangeRequest(key=b"mf/%03d" % (i % 50)))
        assert got.kvs[0].mod_revision == rev and got.kvs[0].value == b"%d" % i

    received: list[tuple[float, int]] = []
    deadline = time.monotonic() + 20
    while len(received) < WRITES and time.monotonic() < deadline:
        at, resp = events.get(timeout=max(0.1, deadline - time.monotonic()))
        received.extend((at, e.kv.mod_revision) for e in resp.events)
    stop.set()
    stream.cancel()
    ch_a.close()
    ch_b.close()

    revs = [r for _, r in received]
    assert revs == sorted(sent_at), "events missing, duplicated or out of order"
    latencies = sorted((at - sent_at[r]) * 1000 for at, r in received)
    p50 = statistics.median(latencies)
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(f"\ncross-frontend watch latency on {backend}: p50 {p50:.1f} ms, p99 {p99:.1f} ms ({len(latencies)} events)")
    assert p99 < 1000
