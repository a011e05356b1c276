"""A database restart: requests fail with a retryable error while it is away, and
everything resumes when it returns; nothing acknowledged is lost."""

from __future__ import annotations

import time

import grpc
import pytest

from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc


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
            for call in (
                lambda: kv.Put(pb.PutRequest(key=b"during", value=b"x"), timeout=10),
                lambda: kv.Range(pb.RangeRequest(key=b"k0"), timeout=10),
            ):
                try:
                    call()
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                else:
                    raise AssertionError("a request succeeded while the database was down")

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
    finally:
        db.stop()
