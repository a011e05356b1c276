"""One bad request never fails another: requests that SQL would refuse are refused
before SQL, and a request the database does refuse fails alone inside its write
batch (group commit), on every backend.

Measured before this was fixed (issue 10): a Range with ``limit = 2^63-1`` inside a
Txn failed its whole write batch, and 12 of 300 innocent concurrent Puts got
UNAVAILABLE on SQLite (1 of 300 on PostgreSQL); a 1,000,000-byte key did the same
on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import grpc
import pytest
from conftest import ServerProcess

from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc

INT64_MAX = 2**63 - 1
INNOCENT = 300


def _txn_with_huge_limit(i: int) -> pb.TxnRequest:
    t = pb.TxnRequest()
    t.success.add().request_range.CopyFrom(pb.RangeRequest(key=b"iso/", range_end=b"iso0", limit=INT64_MAX))
    t.success.add().request_put.CopyFrom(pb.PutRequest(key=b"txn/%d" % i, value=b"t"))
    return t


def _max_key_bytes(server: ServerProcess) -> int | None:
    argv = " ".join(server.argv)
    if "postgres://" in argv:
        return 2680
    if "mysql://" in argv:
        return 3000
    return None


async def test_one_bad_request_never_fails_another(k8s_sql: ServerProcess) -> None:
    limit = _max_key_bytes(k8s_sql)
    async with grpc.aio.insecure_channel(k8s_sql.endpoint) as ch:
        kv = rpc_pb2_grpc.KVStub(ch)
        for i in range(5):
            await kv.Put(pb.PutRequest(key=b"iso/seed%d" % i, value=b"s"))

        async def innocent(i: int) -> int:
            resp = await kv.Put(pb.PutRequest(key=b"iso/k%03d" % i, value=b"v%d" % i), timeout=30)
            return int(resp.header.revision)

        async def outcome(call: Any) -> tuple[str, str]:
            try:
                await call
            except grpc.aio.AioRpcError as e:
                return e.code().name, e.details() or ""
            return "OK", ""

        bad: list[Any] = []
        for i in range(30):
            bad.append(kv.Range(pb.RangeRequest(key=b"iso/", range_end=b"iso0", limit=INT64_MAX), timeout=30))
            bad.append(kv.Txn(_txn_with_huge_limit(i), timeout=30))
            bad.append(kv.Put(pb.PutRequest(key=b"iso/leased%d" % i, value=b"x", lease=12345 + i), timeout=30))
            if limit is not None:
                bad.append(kv.Put(pb.PutRequest(key=b"iso/" + os.urandom(limit + 1), value=b"x"), timeout=30))
        results = await asyncio.gather(
            *(innocent(i) for i in range(INNOCENT)), *(outcome(b) for b in bad), return_exceptions=True
        )
        revisions, answers = results[:INNOCENT], results[INNOCENT:]
        failed = [r for r in revisions if not isinstance(r, int)]
        assert not failed, f"{len(failed)} of {INNOCENT} innocent Puts failed: {failed[:3]}"
        expected = {
            ("OK", ""),
            ("NOT_FOUND", "etcdserver: requested lease not found"),
            ("INVALID_ARGUMENT", f"etcdserver: key is too long for this database (at most {limit} bytes)"),
        }
        assert set(answers) <= expected, set(answers) - expected
        assert answers.count(("OK", "")) == 60  # every Range and Txn with the huge limit

        # The huge limit means "everything": the answer is the whole range, with no `more`.
        got = await kv.Range(pb.RangeRequest(key=b"iso/", range_end=b"iso0", limit=INT64_MAX))
        assert len(got.kvs) == INNOCENT + 5 and not got.more and got.count == INNOCENT + 5
        in_txn = await kv.Txn(_txn_with_huge_limit(999))
        assert len(in_txn.responses[0].response_range.kvs) == INNOCENT + 5
        # Every write got its own revision, with no gaps: 300 puts and 30 txns.
        txns = await kv.Range(pb.RangeRequest(key=b"txn/", range_end=b"txn0"))
        writes = sorted([*revisions, *(x.mod_revision for x in txns.kvs if x.key != b"txn/999")])
        assert writes == list(range(writes[0], writes[0] + INNOCENT + 30))
    assert "Traceback" not in k8s_sql.log()


@pytest.mark.parametrize("extra", [0, 1])
async def test_the_longest_key_each_database_can_index(k8s_sql: ServerProcess, extra: int) -> None:
    """Keys up to the database's index limit are stored byte for byte (incompressible
    keys: PostgreSQL compresses before it checks); one byte more is refused before SQL.
    SQLite has no such limit below etcd's request size."""
    limit = _max_key_bytes(k8s_sql)
    size = (limit or 1_000_000) + extra
    key = os.urandom(size)
    async with grpc.aio.insecure_channel(k8s_sql.endpoint) as ch:
        kv = rpc_pb2_grpc.KVStub(ch)
        if limit is not None and extra:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await kv.Put(pb.PutRequest(key=key, value=b"v"))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details() == f"etcdserver: key is too long for this database (at most {limit} bytes)"
            return
        put = await kv.Put(pb.PutRequest(key=key, value=b"v"))
        got = await kv.Range(pb.RangeRequest(key=key))
        assert [(x.key, x.mod_revision) for x in got.kvs] == [(key, put.header.revision)]
        deleted = await kv.DeleteRange(pb.DeleteRangeRequest(key=key, prev_kv=True))
        assert [x.key for x in deleted.prev_kvs] == [key]


def _nested_txn(depth: int) -> bytes:
    """A TxnRequest nested ``depth`` levels deep, encoded by hand: Python's protobuf
    cannot even build one past about 50 levels (upb's depth limit of 100 messages)."""

    def field(number: int, payload: bytes) -> bytes:
        size, n = b"", len(payload)
        while True:
            byte, n = n & 0x7F, n >> 7
            size += bytes([byte | (0x80 if n else 0)])
            if not n:
                break
        return bytes([number << 3 | 2]) + size + payload

    txn = pb.TxnRequest(success=[pb.RequestOp(request_put=pb.PutRequest(key=b"deep", value=b"v"))]).SerializeToString()
    for _ in range(depth):
        txn = field(2, field(4, txn))  # TxnRequest.success[0].request_txn
    return txn


@pytest.mark.parametrize("depth", [40, 60, 200])
async def test_deeply_nested_txns(k8s_sql: ServerProcess, depth: int) -> None:
    """etcd's checkTxnRequest answers "too many operations" once nesting uses up the op
    budget; a txn deeper than the decoder goes gets that answer here (not INTERNAL),
    and a shallower one runs."""
    async with grpc.aio.insecure_channel(k8s_sql.endpoint) as ch:
        txn = ch.unary_unary("/etcdserverpb.KV/Txn")
        if depth < 49:
            reply = pb.TxnResponse.FromString(await txn(_nested_txn(depth)))
            assert reply.succeeded
            return
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await txn(_nested_txn(depth))
        assert (e.value.code(), e.value.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "etcdserver: too many operations in txn request",
        )
    assert "Traceback" not in k8s_sql.log()
