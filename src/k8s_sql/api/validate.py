"""Request checks done before a request reaches the database (etcd's v3rpc checks).

A request that fails here never enters a write batch, so one bad request cannot
fail the requests it would have been batched with.
"""

from __future__ import annotations

from collections.abc import Iterable

from k8s_sql import errors
from k8s_sql.pb import rpc_pb2 as pb

_SORT_ORDERS = frozenset(pb.RangeRequest.SortOrder.values())
_SORT_TARGETS = frozenset(pb.RangeRequest.SortTarget.values())


def check_range(r: pb.RangeRequest) -> None:
    if not r.key:
        raise errors.EmptyKey()
    if r.sort_order not in _SORT_ORDERS or r.sort_target not in _SORT_TARGETS:
        raise errors.InvalidSortOption()


def check_put(r: pb.PutRequest) -> None:
    if not r.key:
        raise errors.EmptyKey()
    if r.ignore_value and r.value:
        raise errors.ValueProvided()
    if r.ignore_lease and r.lease != 0:
        raise errors.LeaseProvided()


def check_delete(r: pb.DeleteRangeRequest) -> None:
    if not r.key:
        raise errors.EmptyKey()


def check_txn(r: pb.TxnRequest, max_ops: int) -> None:
    """Limits, empty keys, then etcd's rule against a key put twice (or put and
    deleted) by one txn, checked per branch."""
    _check_txn_ops(r, max_ops)
    _intervals(r.success)
    _intervals(r.failure)


def is_read_only(r: pb.TxnRequest) -> bool:
    """etcd's IsTxnReadonly: both branches hold ranges only (a nested txn counts as a write)."""
    return all(op.WhichOneof("request") == "request_range" for op in (*r.success, *r.failure))


def _check_txn_ops(r: pb.TxnRequest, max_ops: int) -> None:
    opc = max(len(r.compare), len(r.success), len(r.failure))
    if opc > max_ops:
        raise errors.TooManyOps()
    for c in r.compare:
        if not c.key:
            raise errors.EmptyKey()
    for op in (*r.success, *r.failure):
        _check_op(op, max_ops - opc)


def _check_op(op: pb.RequestOp, max_ops: int) -> None:
    kind = op.WhichOneof("request")
    if kind == "request_range":
        check_range(op.request_range)
    elif kind == "request_put":
        check_put(op.request_put)
    elif kind == "request_delete_range":
        check_delete(op.request_delete_range)
    elif kind == "request_txn":
        _check_txn_ops(op.request_txn, max_ops)
    else:
        raise errors.KeyNotFound()


class _Deletes:
    """The key intervals deleted by a branch, compared as etcd's affine intervals.

    An interval is ``[begin, end)`` with ``end == b""`` meaning unbounded. etcd builds
    a DeleteRange's interval from its raw ``range_end`` (so ``"\\0"`` gives an
    interval that contains no key) and a point from an empty one; we do the same.
    """

    def __init__(self) -> None:
        self.intervals: list[tuple[bytes, bytes]] = []

    def add(self, key: bytes, range_end: bytes) -> None:
        self.intervals.append((key, range_end) if range_end else (key, key + b"\0"))

    def extend(self, other: _Deletes) -> None:
        self.intervals.extend(other.intervals)

    def contains(self, k: bytes) -> bool:
        return any(begin <= k and (end == b"" or k < end) for begin, end in self.intervals)


def _intervals(ops: Iterable[pb.RequestOp]) -> tuple[set[bytes], _Deletes]:
    ops = list(ops)
    dels = _Deletes()
    for op in ops:
        if op.WhichOneof("request") == "request_delete_range":
            d = op.request_delete_range
            dels.add(d.key, d.range_end)
    puts: set[bytes] = set()
    for op in ops:
        if op.WhichOneof("request") != "request_txn":
            continue
        puts_then, dels_then = _intervals(op.request_txn.success)
        puts_else, dels_else = _intervals(op.request_txn.failure)
        for k in puts_then:
            if k in puts or dels.contains(k):
                raise errors.DuplicateKey()
            puts.add(k)
        for k in puts_else:
            if (k in puts and k not in puts_then) or dels.contains(k):
                raise errors.DuplicateKey()
            puts.add(k)
        dels.extend(dels_then)
        dels.extend(dels_else)
    for op in ops:
        if op.WhichOneof("request") != "request_put":
            continue
        k = op.request_put.key
        if k in puts or dels.contains(k):
            raise errors.DuplicateKey()
        puts.add(k)
    return puts, dels


def check_key_length(r: pb.PutRequest | pb.TxnRequest, max_key_bytes: int | None) -> None:
    """Refuse keys the backend cannot index (MySQL's index limit) before they reach it."""
    if max_key_bytes is None:
        return
    if isinstance(r, pb.PutRequest):
        if len(r.key) > max_key_bytes:
            raise errors.KeyTooLong(max_key_bytes)
        return
    for op in (*r.success, *r.failure):
        kind = op.WhichOneof("request")
        if kind == "request_put":
            check_key_length(op.request_put, max_key_bytes)
        elif kind == "request_txn":
            check_key_length(op.request_txn, max_key_bytes)
