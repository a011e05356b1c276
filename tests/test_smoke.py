"""The server starts, answers etcdctl, and a real etcd starts for comparison."""

from __future__ import annotations

import json


def test_put_get_with_etcdctl(k8s_sql, etcdctl) -> None:
    etcdctl(k8s_sql.url, "put", "greeting", "hello")
    out = etcdctl(k8s_sql.url, "get", "greeting", "-w", "json").stdout
    kv = json.loads(out)["kvs"][0]
    assert kv["version"] == 1
    assert kv["create_revision"] == kv["mod_revision"] == 2


def test_oracle_etcd_starts(etcd, etcdctl) -> None:
    etcdctl(etcd.url, "put", "greeting", "hello")
    out = json.loads(etcdctl(etcd.url, "get", "greeting", "-w", "json").stdout)
    assert out["kvs"][0]["mod_revision"] == 2


def _watch_after_half_close(endpoint: str, value: bytes) -> tuple[bytes, int, int]:
    """Create a watch on a stream whose request side then ends (the iterator runs out),
    put, and return the event's (value, mod_revision) and the put's revision."""
    import grpc

    from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc

    with grpc.insecure_channel(endpoint) as ch:
        responses = rpc_pb2_grpc.WatchStub(ch).Watch(
            iter([pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"w"))]), timeout=20
        )
        assert next(responses).created
        put = rpc_pb2_grpc.KVStub(ch).Put(pb.PutRequest(key=b"w", value=value))
        event = next(responses).events[0]
        responses.cancel()
    return event.kv.value, event.kv.mod_revision, put.header.revision


def test_watch_outlives_the_closed_request_side(k8s_sql, etcd) -> None:
    """A client that closes its side of a Watch stream after creating its watches keeps
    receiving their events from etcd; k8s-sql once ended the stream there instead."""
    assert _watch_after_half_close(etcd.endpoint, b"x") == (b"x", 2, 2)
    assert _watch_after_half_close(k8s_sql.endpoint, b"x") == (b"x", 2, 2)


def test_either_event_loop_serves_puts_and_watches(k8s_sql_factory) -> None:
    """uvloop is the default loop; --event-loop asyncio (the standard loop) must serve
    as well, watches included."""
    for loop in ("asyncio", "uvloop"):
        server = k8s_sql_factory("--event-loop", loop)
        assert _watch_after_half_close(server.endpoint, loop.encode()) == (loop.encode(), 2, 2), loop
        server.stop()
