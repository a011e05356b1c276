"""etcd's request checks, done before a request reaches the database."""

from __future__ import annotations

import pytest

from k8s_sql import errors
from k8s_sql.api import validate
from k8s_sql.backend.base import KeyRange
from k8s_sql.pb import rpc_pb2 as pb


def put(key: bytes) -> pb.RequestOp:
    return pb.RequestOp(request_put=pb.PutRequest(key=key, value=b"v"))


def delete(key: bytes, end: bytes = b"") -> pb.RequestOp:
    return pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=key, range_end=end))


def txn(success=(), failure=()) -> pb.RequestOp:
    return pb.RequestOp(request_txn=pb.TxnRequest(success=list(success), failure=list(failure)))


@pytest.mark.parametrize(
    "ops",
    [
        [put(b"a"), put(b"a")],
        [put(b"b"), delete(b"a", b"c")],
        [put(b"a"), delete(b"a")],
        [txn([put(b"a")]), put(b"a")],
        [txn([put(b"a")]), txn([put(b"a")])],
        [delete(b"a", b"z"), txn([put(b"b")])],
    ],
)
def test_duplicate_keys_rejected(ops) -> None:
    with pytest.raises(errors.EtcdError) as e:
        validate.check_txn(pb.TxnRequest(success=ops), 128)
    assert type(e.value) is errors.DuplicateKey


@pytest.mark.parametrize(
    "ops",
    [
        [put(b"a"), put(b"b")],
        [txn([put(b"a")], [put(b"a")])],  # then/else of one nested txn may both put a key
        [put(b"b"), delete(b"a")],
        [put(b"b"), delete(b"a", b"\0")],  # etcd treats a from-key delete as an empty interval here
        [delete(b"a", b"c"), delete(b"b", b"d")],
    ],
)
def test_allowed_txns(ops) -> None:
    validate.check_txn(pb.TxnRequest(success=ops), 128)


def test_too_many_ops_and_empty_keys() -> None:
    with pytest.raises(errors.EtcdError) as e:
        validate.check_txn(pb.TxnRequest(success=[put(b"k%d" % i) for i in range(129)]), 128)
    assert type(e.value) is errors.TooManyOps
    with pytest.raises(errors.EtcdError) as e:
        validate.check_txn(pb.TxnRequest(compare=[pb.Compare(key=b"")]), 128)
    assert type(e.value) is errors.EmptyKey
    with pytest.raises(errors.EtcdError) as e:
        validate.check_txn(pb.TxnRequest(success=[pb.RequestOp()]), 128)
    assert type(e.value) is errors.KeyNotFound


def test_key_range_conventions() -> None:
    assert KeyRange.from_etcd(b"a", b"") == KeyRange(b"a", None)
    assert KeyRange.from_etcd(b"a", b"\0") == KeyRange(b"a", b"")
    single, from_key, span = KeyRange(b"a", None), KeyRange(b"b", b""), KeyRange(b"b", b"d")
    assert single.contains(b"a") and not single.contains(b"a\0")
    assert from_key.contains(b"\xff\xff") and not from_key.contains(b"a")
    assert span.contains(b"c\xff") and not span.contains(b"d")
    assert KeyRange(b"d", b"b").is_empty and not span.is_empty
