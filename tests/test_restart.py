"""Durability: kill -9 during writes loses no acknowledged write, and revision,
leases (with their deadlines) and the compaction point survive a restart."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc

WRITERS = 8


def _stubs(endpoint: str) -> tuple[grpc.Channel, rpc_pb2_grpc.KVStub, rpc_pb2_grpc.LeaseStub]:
    ch = grpc.insecure_channel(endpoint)
    return ch, rpc_pb2_grpc.KVStub(ch), rpc_pb2_grpc.LeaseStub(ch)


@pytest.mark.slow
def test_kill9_during_writes_keeps_every_acknowledged_write(k8s_sql_factory, backend_args) -> None:
    server = k8s_sql_factory(*backend_args)
    ch, kv, lease = _stubs(server.endpoint)

    # State that must survive: a long lease with a key, a short lease that will be due
    # while the server is down, and a compaction point.
    t0 = time.time()
    long_lease = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=3600)).ID
    short_lease = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=3)).ID
    kv.Put(pb.PutRequest(key=b"leased/long", value=b"1", lease=long_lease))
    kv.Put(pb.PutRequest(key=b"leased/short", value=b"1", lease=short_lease))
    for i in range(20):
        kv.Put(pb.PutRequest(key=b"early/%d" % i, value=b"x"))
    compact_rev = kv.Range(pb.RangeRequest(key=b"early/0")).header.revision
    kv.Compact(pb.CompactionRequest(revision=compact_rev))

    acked: dict[bytes, tuple[bytes, int]] = {}
    acked_lock = threading.Lock()
    enough = threading.Event()
    stop = threading.Event()

    def writer(n: int) -> int:
        wch, wkv, _ = _stubs(server.endpoint)
        i = 0
        try:
            while not stop.is_set():
                key, value = b"w/%d/%d" % (n, i), b"v%d" % i
                try:
                    resp = wkv.Put(pb.PutRequest(key=key, value=value), timeout=10)
                except grpc.RpcError:
                    break  # the server died under us: this write was never acknowledged
                with acked_lock:
                    acked[key] = (value, resp.header.revision)
                    if len(acked) >= 400:
                        enough.set()
                i += 1
        finally:
            wch.close()
        return i

    with ThreadPoolExecutor(WRITERS) as pool:
        futures = [pool.submit(writer, n) for n in range(WRITERS)]
        assert enough.wait(120), "writers did not get 400 acknowledgements"
        server.kill9()  # while the writers are mid-request
        stop.set()
        for f in futures:
            f.result()
    ch.close()
    killed_at = time.time()

    # The short lease's deadline passes while the server is down.
    time.sleep(max(0.0, t0 + 3.5 - time.time()))
    server.start()
    ch, kv, lease = _stubs(server.endpoint)
    try:
        max_acked = max(rev for _, rev in acked.values())
        head = kv.Range(pb.RangeRequest(key=b"w/", range_end=b"w0"))
        assert head.header.revision >= max_acked
        stored = {x.key: (x.value, x.mod_revision) for x in head.kvs}
        lost = {k: v for k, v in acked.items() if stored.get(k) != v}
        assert not lost, f"{len(lost)} acknowledged writes lost or changed, e.g. {list(lost.items())[:3]}"

        # Compaction point survived.
        with pytest.raises(grpc.RpcError) as exc:
            kv.Range(pb.RangeRequest(key=b"early/0", revision=compact_rev - 1))
        assert exc.value.details() == "etcdserver: mvcc: required revision has been compacted"

        # The long lease kept its deadline (not reset to a fresh 3600 s).
        ttl = lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=long_lease, keys=True))
        assert ttl.grantedTTL == 3600
        assert ttl.TTL <= 3600 - int(killed_at - t0)
        assert list(ttl.keys) == [b"leased/long"]

        # The short lease expired during the outage: after restart it is revoked and its key deleted.
        deadline = time.monotonic() + 10
        while kv.Range(pb.RangeRequest(key=b"leased/short")).count and time.monotonic() < deadline:
            time.sleep(0.1)
        assert kv.Range(pb.RangeRequest(key=b"leased/short")).count == 0
        assert lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=short_lease)).TTL == -1

        # One gap-free sequence of revisions: every revision after the compaction point
        # has its events in the log, in order.
        watch = rpc_pb2_grpc.WatchStub(ch)
        current = kv.Range(pb.RangeRequest(key=b"x")).header.revision
        create = pb.WatchRequest(
            create_request=pb.WatchCreateRequest(key=b"\0", range_end=b"\0", start_revision=compact_rev)
        )
        done = threading.Event()

        def requests():
            yield create
            done.wait(30)

        seen: list[int] = []
        for resp in watch.Watch(requests(), timeout=30):
            seen.extend(e.kv.mod_revision for e in resp.events)
            if seen and seen[-1] >= current:
                done.set()
                break
        revisions = sorted(set(seen))
        assert revisions == list(range(compact_rev, current + 1))
    finally:
        ch.close()
