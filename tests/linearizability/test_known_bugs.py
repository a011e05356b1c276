"""Minimal reproductions of k8s-sql bugs the linearizability checker found, each run
against a real etcd (which must behave as asserted) and against k8s-sql (fixed: each
would fail without its fix).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest

from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc


def _server(target: str, request: pytest.FixtureRequest) -> str:
    if target == "etcd":
        return request.getfixturevalue("etcd").endpoint  # type: ignore[no-any-return]
    factory: Callable[..., object] = request.getfixturevalue("k8s_sql_factory")
    return factory().endpoint  # type: ignore[attr-defined,no-any-return]


@pytest.mark.parametrize("target", ["etcd", "k8s-sql"])
def test_lease_reported_gone_is_gone(target: str, request: pytest.FixtureRequest) -> None:
    """Once a keepalive answers TTL 0 ("this lease is gone"), the lease must be gone:
    a put attaching a key to it fails with "requested lease not found". etcd's lessor
    makes a keepalive of an expired lease wait until the revocation is applied
    (``lessor.Renew`` waits on ``revokec``), so its TTL 0 always follows the deletion
    of the lease's keys. k8s-sql answers TTL 0 as soon as the deadline has passed, but
    Put and Txn accept the lease until the expirer runs, and those keys are deleted
    later, at the revocation that the keepalive had already reported."""
    endpoint = _server(target, request)
    with grpc.insecure_channel(endpoint) as ch:
        kv, lease = rpc_pb2_grpc.KVStub(ch), rpc_pb2_grpc.LeaseStub(ch)
        lid = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=2)).ID
        granted = time.monotonic()
        kv.Put(pb.PutRequest(key=b"a", value=b"1", lease=lid))
        time.sleep(max(0.0, granted + 2.05 - time.monotonic()))  # just past the lease's deadline: what is tested
        answer = next(lease.LeaseKeepAlive(iter([pb.LeaseKeepAliveRequest(ID=lid)]), timeout=10))
        assert answer.TTL <= 0, "the lease outlived its TTL"
        with pytest.raises(grpc.RpcError) as e:
            kv.Put(pb.PutRequest(key=b"b", value=b"2", lease=lid))
        assert e.value.details() == "etcdserver: requested lease not found"
        assert kv.Range(pb.RangeRequest(key=b"a")).count == 0, "the lease was reported gone with its key still there"
