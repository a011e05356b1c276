"""Request semantics (store/txn.py) against an in-memory write transaction: no database.

The fake keeps ``kv`` rows and leases in dicts, the way the SQL write transaction's
contract (backend/base.py WriteTx) describes them, so these tests pin etcd's
apply-level behaviour -- compares, checkTxn, nested txns, ignore_value/ignore_lease,
lease revocation -- independently of any SQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import pytest

from k8s_sql import errors
from k8s_sql.backend.base import DELETE, PUT, KeyRange, LeaseRow, LogRow, Row, WriteTx
from k8s_sql.pb import rpc_pb2 as pb
from k8s_sql.store import txn
from k8s_sql.store.txn import Request, compare_row

C = pb.Compare


class MemoryTx(WriteTx):
    def __init__(self, revision: int = 1, compact_revision: int = 0) -> None:
        self.revision = revision
        self.compact_revision = compact_revision
        self.savepoints = False
        self.dirty = False
        self.nospace = False
        self.kv: dict[bytes, Row] = {}
        self.leases: dict[int, LeaseRow] = {}
        self.logged: list[LogRow] = []

    async def prefetch(self, keys: Iterable[bytes], lease_ids: Iterable[int]) -> None:
        return None

    def begin_request(self) -> None:
        self.dirty = False

    async def get(self, key: bytes) -> Row | None:
        return self.kv.get(key)

    async def range(self, kr: KeyRange, limit: int = 0) -> list[Row]:
        rows = [self.kv[k] for k in sorted(self.kv) if kr.contains(k)]
        return rows[:limit] if limit > 0 else rows

    async def count(self, kr: KeyRange) -> int:
        return len(await self.range(kr))

    async def range_at(self, kr: KeyRange, rev: int, limit: int = 0) -> tuple[list[Row], int]:
        raise NotImplementedError

    async def put(self, row: Row) -> None:
        self.dirty = True
        self.kv[row.key] = row

    async def delete(self, key: bytes) -> None:
        self.dirty = True
        del self.kv[key]

    def log(self, change: LogRow) -> None:
        self.logged.append(change)

    async def lease_get(self, lease_id: int) -> LeaseRow | None:
        return self.leases.get(lease_id)

    async def lease_put(self, lease: LeaseRow) -> None:
        self.leases[lease.id] = lease

    async def lease_delete(self, lease_id: int) -> None:
        del self.leases[lease_id]

    async def lease_keys(self, lease_id: int) -> list[bytes]:
        return sorted(k for k, r in self.kv.items() if r.lease == lease_id)

    async def set_compact_revision(self, rev: int) -> None:
        self.compact_revision = rev

    async def flush(self) -> None:
        return None

    async def savepoint(self) -> None:
        return None

    async def release_savepoint(self) -> None:
        return None

    async def rollback_to_savepoint(self) -> None:
        return None


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def apply(tx: MemoryTx, fn: Any, *args: Any) -> Any:
    """One request in its own revision, as the group commit runs it."""
    req = Request(tx, tx.revision)
    out = run(fn(req, *args))
    if req.changes:
        tx.revision = req.new_rev
    return out


def put(tx: MemoryTx, key: bytes, value: bytes = b"v", lease: int = 0) -> pb.PutResponse:
    return apply(tx, txn.put_request, pb.PutRequest(key=key, value=value, lease=lease))


ROW = Row(b"k", 2, 5, 3, 7, b"val")


@pytest.mark.parametrize(
    ("target", "field", "value", "expect"),
    [
        (C.VALUE, "value", b"val", {C.EQUAL: True, C.NOT_EQUAL: False, C.GREATER: False, C.LESS: False}),
        (C.VALUE, "value", b"vak", {C.EQUAL: False, C.NOT_EQUAL: True, C.GREATER: True, C.LESS: False}),
        (C.CREATE, "create_revision", 3, {C.EQUAL: False, C.NOT_EQUAL: True, C.GREATER: False, C.LESS: True}),
        (C.MOD, "mod_revision", 5, {C.EQUAL: True, C.NOT_EQUAL: False, C.GREATER: False, C.LESS: False}),
        (C.VERSION, "version", 2, {C.EQUAL: False, C.NOT_EQUAL: True, C.GREATER: True, C.LESS: False}),
        (C.LEASE, "lease", 7, {C.EQUAL: True, C.NOT_EQUAL: False, C.GREATER: False, C.LESS: False}),
    ],
)
def test_compare_row_follows_etcds_compare_kv(target: int, field: str, value: Any, expect: dict[int, bool]) -> None:
    for result, want in expect.items():
        c = C(key=b"k", target=target, result=result, **{field: value})
        assert compare_row(c, ROW) is want, (target, result)


def test_a_missing_key_compares_as_zero_and_has_no_value() -> None:
    tx = MemoryTx()
    assert run(txn.compare(tx, C(key=b"absent", target=C.MOD, result=C.EQUAL, mod_revision=0)))
    assert run(txn.compare(tx, C(key=b"absent", target=C.VERSION, result=C.LESS, version=1)))
    assert not run(txn.compare(tx, C(key=b"absent", target=C.VALUE, result=C.EQUAL, value=b"")))
    assert not run(txn.compare(tx, C(key=b"absent", target=C.VALUE, result=C.NOT_EQUAL, value=b"x")))


def test_an_unknown_compare_target_compares_as_equal() -> None:
    assert compare_row(C(key=b"k", target=99, result=C.EQUAL), ROW)  # type: ignore[arg-type]
    assert not compare_row(C(key=b"k", target=99, result=C.NOT_EQUAL), ROW)  # type: ignore[arg-type]


def test_a_range_compare_must_hold_for_every_key() -> None:
    tx = MemoryTx()
    put(tx, b"a/1", b"x")
    put(tx, b"a/2", b"y")
    c = C(key=b"a/", range_end=b"a0", target=C.VALUE, result=C.EQUAL, value=b"x")
    assert not run(txn.compare(tx, c))
    c = C(key=b"a/", range_end=b"a0", target=C.VERSION, result=C.EQUAL, version=1)
    assert run(txn.compare(tx, c))


def test_put_creates_then_updates_with_etcds_revisions_and_versions() -> None:
    tx = MemoryTx(revision=10)
    assert put(tx, b"k", b"1").header.revision == 11
    resp = apply(tx, txn.put_request, pb.PutRequest(key=b"k", value=b"2", prev_kv=True))
    assert resp.header.revision == 12
    assert resp.prev_kv.value == b"1" and resp.prev_kv.mod_revision == 11
    assert tx.kv[b"k"] == Row(b"k", 11, 12, 2, 0, b"2")
    assert [(c.rev, c.kind, c.prev is None) for c in tx.logged] == [(11, PUT, True), (12, PUT, False)]


def test_ignore_value_and_ignore_lease_need_the_key() -> None:
    tx = MemoryTx()
    with pytest.raises(errors.KeyNotFound):
        apply(tx, txn.put_request, pb.PutRequest(key=b"k", ignore_value=True))
    put(tx, b"k", b"old")
    apply(tx, txn.put_request, pb.PutRequest(key=b"k", ignore_value=True))
    assert tx.kv[b"k"].value == b"old" and tx.kv[b"k"].version == 2


def test_put_with_an_unknown_lease_fails_before_changing_anything() -> None:
    tx = MemoryTx()
    with pytest.raises(errors.LeaseNotFound):
        put(tx, b"k", lease=42)
    assert tx.kv == {} and not tx.dirty


def test_txn_evaluates_every_compare_before_its_ops_and_nests() -> None:
    tx = MemoryTx()
    put(tx, b"a", b"1")
    inner = pb.TxnRequest(
        compare=[C(key=b"a", target=C.VALUE, result=C.EQUAL, value=b"1")],  # before the outer put: still "1"
        success=[pb.RequestOp(request_put=pb.PutRequest(key=b"inner", value=b"yes"))],
        failure=[pb.RequestOp(request_put=pb.PutRequest(key=b"inner", value=b"no"))],
    )
    outer = pb.TxnRequest(
        compare=[C(key=b"a", target=C.VERSION, result=C.EQUAL, version=1)],
        success=[
            pb.RequestOp(request_put=pb.PutRequest(key=b"a", value=b"2")),
            pb.RequestOp(request_txn=inner),
            pb.RequestOp(request_range=pb.RangeRequest(key=b"a")),
        ],
    )
    resp = apply(tx, txn.txn, outer)
    assert resp.succeeded and resp.responses[1].response_txn.succeeded
    assert tx.kv[b"inner"].value == b"yes"
    assert resp.responses[2].response_range.kvs[0].value == b"2"  # ops see earlier ops
    assert resp.header.revision == 3  # one revision for the whole txn
    assert {c.rev for c in tx.logged[1:]} == {3}


def test_check_txn_refuses_before_any_op_runs() -> None:
    tx = MemoryTx(revision=5)
    bad = pb.TxnRequest(
        success=[
            pb.RequestOp(request_put=pb.PutRequest(key=b"x", value=b"1")),
            pb.RequestOp(request_range=pb.RangeRequest(key=b"x", revision=99)),
        ]
    )
    with pytest.raises(errors.FutureRevision):
        apply(tx, txn.txn, bad)
    assert tx.kv == {}
    tx.compact_revision = 0
    negative = pb.TxnRequest(success=[pb.RequestOp(request_range=pb.RangeRequest(key=b"x", revision=-2))])
    with pytest.raises(errors.Compacted):  # checkRange: -2 is below the "no compaction" point, -1
        apply(tx, txn.txn, negative)


def test_a_txn_that_deletes_and_recreates_a_key_records_the_state_before_its_revision() -> None:
    tx = MemoryTx()
    put(tx, b"k", b"old")
    t = pb.TxnRequest(
        success=[
            pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=b"k", range_end=b"\0")),
            pb.RequestOp(request_put=pb.PutRequest(key=b"k", value=b"new")),
        ]
    )
    apply(tx, txn.txn, t)
    delete, recreate = tx.logged[-2:]
    assert delete.kind == DELETE and recreate.kind == PUT
    assert delete.prev is not None and recreate.prev is not None
    assert delete.prev.value == recreate.prev.value == b"old"
    assert tx.kv[b"k"].create_rev == tx.kv[b"k"].mod_rev == 3


def test_revoking_a_lease_deletes_its_keys_in_one_revision() -> None:
    tx = MemoryTx()
    lid, ttl = apply(tx, txn.lease_grant, 7, 10, 1000.0)
    assert (lid, ttl) == (7, 10)
    with pytest.raises(errors.LeaseExists):
        apply(tx, txn.lease_grant, 7, 10, 1000.0)
    put(tx, b"a", lease=7)
    put(tx, b"b", lease=7)
    put(tx, b"c")
    assert apply(tx, txn.lease_revoke, 7, True, 1005.0) == tx.revision  # not expired yet: nothing
    assert b"a" in tx.kv
    rev = apply(tx, txn.lease_revoke, 7, False, 1005.0)
    assert sorted(tx.kv) == [b"c"] and 7 not in tx.leases
    assert [(c.row.key, c.rev) for c in tx.logged[-2:]] == [(b"a", rev), (b"b", rev)]


def test_keepalive_renews_and_revokes_an_expired_lease() -> None:
    tx = MemoryTx()
    apply(tx, txn.lease_grant, 7, 10, 1000.0)
    put(tx, b"a", lease=7)
    assert apply(tx, txn.lease_keepalive, 7, 1005.0) == 10
    assert tx.leases[7].expires_at == 1015.0
    assert apply(tx, txn.lease_keepalive, 7, 1016.0) == 0  # expired: revoked here, keys gone
    assert b"a" not in tx.kv
    assert apply(tx, txn.lease_keepalive, 8, 1016.0) == 0


def test_compaction_bounds() -> None:
    tx = MemoryTx(revision=10, compact_revision=4)
    with pytest.raises(errors.Compacted):
        apply(tx, txn.compact, 4)
    with pytest.raises(errors.FutureRevision):
        apply(tx, txn.compact, 11)
    apply(tx, txn.compact, 8)
    assert tx.compact_revision == 8
