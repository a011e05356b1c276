"""Request semantics over a write transaction: etcd's apply functions, with no I/O of
their own and no knowledge of batching.

Each function takes a :class:`Request` (one request's view of the batch's
:class:`~k8s_sql.backend.base.WriteTx`) and does what etcd's ``applierV3`` does for
that request -- ``put``, ``deleteRange``, ``Range`` inside a txn, ``checkTxn``, the
compare evaluation (``applyCompares``/``compareKV``), revocation's deletes. They
read and write only through the transaction, so they run the same against any
database and against an in-memory fake (tests/unit/test_txn.py).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from k8s_sql import errors
from k8s_sql.backend.base import DELETE, PUT, KeyRange, LeaseRow, LogRow, Row, WriteTx
from k8s_sql.pb import rpc_pb2 as pb
from k8s_sql.store import ranges
from k8s_sql.store.ranges import to_kv

MAX_LEASE_TTL = 9_000_000_000


@dataclass
class Request:
    """One request's view of the batch: the revision it will produce, its changes."""

    tx: WriteTx
    begin_rev: int
    changes: list[LogRow] = field(default_factory=list)
    before: dict[bytes, Row | None] = field(default_factory=dict)  # each changed key's state before
    # What the request did, as etcd's mvcc metrics count it (published once committed).
    puts: int = 0
    deletes: int = 0
    ranges: int = 0
    txns: int = 0
    granted_ttl: int = 0  # a lease granted with this TTL
    revoked: int = 0  # leases revoked
    expiry_lag: float = -1.0  # an expired lease revoked this long after its deadline

    @property
    def new_rev(self) -> int:
        return self.begin_rev + 1

    @property
    def rev(self) -> int:
        """The revision as seen inside this request (etcd's ``txnWrite.Rev()`` + changes)."""
        return self.begin_rev + 1 if self.changes else self.begin_rev

    def record(self, kind: int, row: Row, prev: Row | None) -> None:
        # A txn can change a key twice (its DeleteRange with range_end "\0" escapes
        # etcd's duplicate-key check): every change of a key then records the key's
        # state before this revision, which is what etcd's watch prev_kv (read at
        # revision - 1) and historical reads return, not the state in between.
        prev = self.before.setdefault(row.key, prev)
        change = LogRow(self.new_rev, len(self.changes), kind, row, prev)
        self.changes.append(change)
        self.tx.log(change)


def txn_hints(r: pb.TxnRequest, keys: list[bytes], leases: list[int]) -> bool:
    """Add the single keys and the leases the txn names to ``keys`` and ``leases``;
    whether they are all it reads and writes (no compare or operation on a range)."""
    single = True
    for c in r.compare:
        if c.range_end:
            single = False
        else:
            keys.append(c.key)
    for op in (*r.success, *r.failure):
        kind = op.WhichOneof("request")
        if kind == "request_put":
            keys.append(op.request_put.key)
            if op.request_put.lease:
                leases.append(op.request_put.lease)
        elif kind == "request_range":
            if op.request_range.range_end:
                single = False
            else:
                keys.append(op.request_range.key)
        elif kind == "request_delete_range":
            if op.request_delete_range.range_end:
                single = False
            else:
                keys.append(op.request_delete_range.key)
        elif kind == "request_txn":
            single = txn_hints(op.request_txn, keys, leases) and single
    return single


# -- request semantics (etcd's applierV3) -----------------------------------------------


async def put(req: Request, r: pb.PutRequest) -> pb.PutResponse:
    tx = req.tx
    prev = await tx.get(r.key)
    if (r.ignore_value or r.ignore_lease) and prev is None:
        raise errors.KeyNotFound()
    value = prev.value if r.ignore_value and prev is not None else r.value
    lease = prev.lease if r.ignore_lease and prev is not None else r.lease
    rev = req.new_rev
    if prev is None:
        row = Row(r.key, rev, rev, 1, lease, value)
    else:
        row = Row(r.key, prev.create_rev, rev, prev.version + 1, lease, value)
    await tx.put(row)
    req.record(PUT, row, prev)
    req.puts += 1
    resp = pb.PutResponse()
    resp.header.revision = rev
    if r.prev_kv and prev is not None:
        resp.prev_kv.CopyFrom(to_kv(prev))
    return resp


async def delete_range(req: Request, r: pb.DeleteRangeRequest) -> pb.DeleteRangeResponse:
    tx = req.tx
    kr = KeyRange.from_etcd(r.key, r.range_end)
    rows = [] if kr.is_empty else await tx.range(kr)
    for prev in rows:
        await tx.delete(prev.key)
        req.record(DELETE, Row(prev.key, 0, req.new_rev, 0, 0, b""), prev)
    req.deletes += 1
    resp = pb.DeleteRangeResponse(deleted=len(rows))
    resp.header.revision = req.rev
    if r.prev_kv:
        resp.prev_kvs.extend(to_kv(x) for x in rows)
    return resp


async def range_in_txn(req: Request, r: pb.RangeRequest) -> pb.RangeResponse:
    tx, current = req.tx, req.rev
    req.ranges += 1
    if r.revision > current:
        raise errors.FutureRevision()
    if 0 < r.revision < tx.compact_revision:
        raise errors.Compacted()
    kr = KeyRange.from_etcd(r.key, r.range_end)
    limit = ranges.fetch_limit(r)
    if kr.is_empty:
        rows, count = [], 0
    elif r.revision <= 0 or r.revision == current:
        rows = await tx.range(kr, limit)
        count = len(rows) if not limit or len(rows) < limit else await tx.count(kr)
    else:
        rows, count = await tx.range_at(kr, r.revision, limit)
    if r.count_only:
        rows = []
    return ranges.build_response(r, rows, count, current)


async def compare_path(tx: WriteTx, r: pb.TxnRequest) -> Any:
    """Yield the compare outcome of ``r`` and then, depth first, of every nested
    txn on the chosen branch -- all against the state before the txn runs."""
    ok = True
    for c in r.compare:
        if not await compare(tx, c):
            ok = False
            break
    yield ok
    for op in r.success if ok else r.failure:
        if op.WhichOneof("request") == "request_txn":
            async for x in compare_path(tx, op.request_txn):
                yield x


async def compare(tx: WriteTx, c: pb.Compare) -> bool:
    kr = KeyRange.from_etcd(c.key, c.range_end)
    if kr.end is None:
        row = await tx.get(c.key)
        rows = [] if row is None else [row]
    else:
        rows = [] if kr.is_empty else await tx.range(kr)
    if not rows:
        if c.target == pb.Compare.VALUE:
            return False  # a missing key has no value to compare
        return compare_row(c, None)
    return all(compare_row(c, row) for row in rows)


async def check_txn(req: Request, r: pb.TxnRequest, path: Iterator[bool]) -> None:
    """etcd's ``checkTxn``: errors found before any op of the chosen path runs."""
    for op in r.success if next(path) else r.failure:
        kind = op.WhichOneof("request")
        if kind == "request_range":
            rr = op.request_range
            if rr.revision > req.tx.revision:
                raise errors.FutureRevision()
            # etcd's checkRange compares any non-zero revision with the compaction
            # point, which is -1 until the first compaction: a negative revision in
            # a txn is "compacted" (a plain Range reads it as "current").
            first = req.tx.compact_revision if req.tx.compact_revision > 0 else -1
            if rr.revision != 0 and rr.revision < first:
                raise errors.Compacted()
        elif kind == "request_put":
            p = op.request_put
            if (p.ignore_value or p.ignore_lease) and await req.tx.get(p.key) is None:
                raise errors.KeyNotFound()
            if p.lease and await req.tx.lease_get(p.lease) is None:
                raise errors.LeaseNotFound()
        elif kind == "request_txn":
            await check_txn(req, op.request_txn, path)


async def execute_txn(req: Request, r: pb.TxnRequest, path: Iterator[bool]) -> pb.TxnResponse:
    ok = next(path)
    resp = pb.TxnResponse(succeeded=ok)
    resp.header.SetInParent()
    for op in r.success if ok else r.failure:
        kind = op.WhichOneof("request")
        out = resp.responses.add()
        if kind == "request_range":
            out.response_range.CopyFrom(await range_in_txn(req, op.request_range))
        elif kind == "request_put":
            out.response_put.CopyFrom(await put(req, op.request_put))
        elif kind == "request_delete_range":
            out.response_delete_range.CopyFrom(await delete_range(req, op.request_delete_range))
        elif kind == "request_txn":
            out.response_txn.CopyFrom(await execute_txn(req, op.request_txn, path))
    return resp


async def revoke(req: Request, lease_id: int) -> None:
    keys = await req.tx.lease_keys(lease_id)
    await req.tx.prefetch(keys, ())
    for key in keys:
        prev = await req.tx.get(key)
        if prev is not None:
            await req.tx.delete(key)
            req.record(DELETE, Row(key, 0, req.new_rev, 0, 0, b""), prev)
            req.deletes += 1  # etcd revokes with one DeleteRange per key
    await req.tx.lease_delete(lease_id)
    req.revoked += 1


def compare_row(c: pb.Compare, row: Row | None) -> bool:
    target = c.target
    if target == pb.Compare.VALUE:
        a: Any = row.value if row else b""
        b: Any = c.value
    elif target == pb.Compare.CREATE:
        a, b = (row.create_rev if row else 0), c.create_revision
    elif target == pb.Compare.MOD:
        a, b = (row.mod_rev if row else 0), c.mod_revision
    elif target == pb.Compare.VERSION:
        a, b = (row.version if row else 0), c.version
    elif target == pb.Compare.LEASE:
        a, b = (row.lease if row else 0), c.lease
    else:
        # etcd's compareKV: an unknown target compares as equal, so the result
        # decides (EQUAL holds; NOT_EQUAL, GREATER and LESS do not).
        a = b = 0
    result = c.result
    if result == pb.Compare.EQUAL:
        return bool(a == b)
    if result == pb.Compare.NOT_EQUAL:
        return bool(a != b)
    if result == pb.Compare.GREATER:
        return bool(a > b)
    if result == pb.Compare.LESS:
        return bool(a < b)
    return True


# -- whole requests, as the group commit applies them --------------------------------------


async def put_request(req: Request, r: pb.PutRequest) -> pb.PutResponse:
    if r.lease and await req.tx.lease_get(r.lease) is None:
        raise errors.LeaseNotFound()
    return await put(req, r)


async def txn(req: Request, r: pb.TxnRequest) -> pb.TxnResponse:
    """etcd's ``Txn``: every compare on the chosen path is evaluated against the state
    before the txn, then ``checkTxn``, then the ops, all in one revision."""
    path = [x async for x in compare_path(req.tx, r)]
    await check_txn(req, r, iter(path))
    resp = await execute_txn(req, r, iter(path))
    resp.header.revision = req.rev
    if req.puts + req.deletes + req.ranges > 1:  # etcd's metricsTxnWrite.End counts these as txns
        req.txns += 1
    return resp


async def compact(req: Request, revision: int) -> pb.CompactionResponse:
    if revision <= req.tx.compact_revision:
        raise errors.Compacted()
    if revision > req.tx.revision:
        raise errors.FutureRevision()
    await req.tx.set_compact_revision(revision)
    resp = pb.CompactionResponse()
    resp.header.revision = req.rev
    return resp


async def lease_grant(req: Request, lease_id: int, ttl: int, now: float) -> tuple[int, int]:
    """Grant ``lease_id`` (0: a fresh random id) for ``ttl`` seconds from ``now``."""
    lid = lease_id
    if lid == 0:
        while True:
            lid = random.getrandbits(63) or 1
            if await req.tx.lease_get(lid) is None:
                break
    elif await req.tx.lease_get(lid) is not None:
        raise errors.LeaseExists()
    await req.tx.lease_put(LeaseRow(lid, ttl, now + ttl))
    req.granted_ttl = ttl
    return lid, ttl


async def lease_revoke(req: Request, lease_id: int, only_if_expired: bool, now: float) -> int:
    """Delete the lease and its keys (one revision); the response revision."""
    lease = await req.tx.lease_get(lease_id)
    if lease is None:
        raise errors.LeaseNotFound()
    if only_if_expired:
        if lease.expires_at > now:
            return req.rev
        req.expiry_lag = now - lease.expires_at
    await revoke(req, lease_id)
    return req.rev


async def lease_keepalive(req: Request, lease_id: int, now: float) -> int:
    """Renew the lease; its TTL, or 0 when it does not exist (or has expired).

    An expired lease is revoked right here, in the keepalive's own revision, so
    that "TTL 0" always means its keys are gone -- as etcd's keepalive of an
    expired lease waits for the revocation before answering. (Answering 0 and
    leaving the revocation to the expirer let a client see the lease gone while a
    Put could still attach keys to it, for up to the expirer's interval.)"""
    lease = await req.tx.lease_get(lease_id)
    if lease is None:
        return 0
    if lease.expires_at <= now:
        await revoke(req, lease_id)
        return 0
    await req.tx.lease_put(LeaseRow(lease.id, lease.ttl, now + lease.ttl))
    return lease.ttl
