"""A database restart: requests fail with a retryable error while it is away, and
everything resumes when it returns; nothing acknowledged is lost."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest

from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc

UNAVAILABLE = "etcdserver: request timed out, database unavailable"


@pytest.mark.parametrize("kind", ["postgres", "mariadb"])
def test_database_restart_is_survived(kind: str, k8s_sql_factory, tmp_path) -> None:
    from conftest import free_port, missing
    from databases import MariaDBServer, PostgresServer

    server_class = {"postgres": PostgresServer, "mariadb": MariaDBServer}[kind]
    reason = server_class.available()
    if reason:
        missing(reason)
    db = server_class(free_port())  # its own server: this test stops it
    db.start()
    try:
        server = k8s_sql_factory("--endpoint", db.new_dsn())
        with grpc.insecure_channel(server.endpoint) as ch:
            kv = rpc_pb2_grpc.KVStub(ch)
            acked = [kv.Put(pb.PutRequest(key=b"k%d" % i, value=b"v")).header.revision for i in range(10)]

            db.halt()
            lease = rpc_pb2_grpc.LeaseStub(ch)
            maint = rpc_pb2_grpc.MaintenanceStub(ch)
            txn = pb.TxnRequest()
            txn.success.add().request_put.CopyFrom(pb.PutRequest(key=b"during", value=b"x"))
            calls: dict[str, Callable[[], object]] = {
                "Put": lambda: kv.Put(pb.PutRequest(key=b"during", value=b"x"), timeout=10),
                "Range": lambda: kv.Range(pb.RangeRequest(key=b"k0"), timeout=10),
                "Range(prefix)": lambda: kv.Range(pb.RangeRequest(key=b"k", range_end=b"l"), timeout=10),
                "DeleteRange": lambda: kv.DeleteRange(pb.DeleteRangeRequest(key=b"k0"), timeout=10),
                "Txn": lambda: kv.Txn(txn, timeout=10),
                "Compact": lambda: kv.Compact(pb.CompactionRequest(revision=2), timeout=10),
                "RangeStream": lambda: list(kv.RangeStream(pb.RangeRequest(key=b"k", range_end=b"l"), timeout=10)),
                "LeaseGrant": lambda: lease.LeaseGrant(pb.LeaseGrantRequest(TTL=60), timeout=10),
                "LeaseRevoke": lambda: lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=7), timeout=10),
                "LeaseTimeToLive": lambda: lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=7), timeout=10),
                "LeaseLeases": lambda: lease.LeaseLeases(pb.LeaseLeasesRequest(), timeout=10),
                "LeaseKeepAlive": lambda: list(lease.LeaseKeepAlive(iter([pb.LeaseKeepAliveRequest(ID=7)]), timeout=9)),
                "Status": lambda: maint.Status(pb.StatusRequest(), timeout=10),
                "HashKV": lambda: maint.HashKV(pb.HashKVRequest(), timeout=10),
                "Hash": lambda: maint.Hash(pb.HashRequest(), timeout=10),
                "Alarm": lambda: maint.Alarm(pb.AlarmRequest(), timeout=10),
                "Defragment": lambda: maint.Defragment(pb.DefragmentRequest(), timeout=10),
                "Snapshot": lambda: list(maint.Snapshot(pb.SnapshotRequest(), timeout=10)),
                "MemberList": lambda: rpc_pb2_grpc.ClusterStub(ch).MemberList(pb.MemberListRequest(), timeout=10),
            }
            answers = {}
            for name, call in calls.items():
                try:
                    call()
                except grpc.RpcError as e:
                    answers[name] = (e.code(), e.details())
                else:
                    answers[name] = (grpc.StatusCode.OK, "")
            # Every RPC that needs the database answers as etcd does when it cannot serve:
            # UNAVAILABLE with one message, which clients retry.
            assert answers == dict.fromkeys(calls, (grpc.StatusCode.UNAVAILABLE, UNAVAILABLE)), answers

            db.start()
            deadline = time.monotonic() + 30
            while True:
                try:
                    rev = kv.Put(pb.PutRequest(key=b"after", value=b"y"), timeout=5).header.revision
                    break
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                    assert time.monotonic() < deadline, "k8s-sql did not recover after the database came back"
                    time.sleep(0.2)
            assert rev == acked[-1] + 1  # nothing half-written in between
            got = kv.Range(pb.RangeRequest(key=b"k", range_end=b"l"))
            assert [x.mod_revision for x in got.kvs] == acked
        assert "Traceback" not in server.log()
    finally:
        db.stop()
