"""Turning rows into a RangeResponse the way etcd's ``executeRange`` does.

The backend returns rows in key order; this applies etcd's revision filters,
sort, limit/``more`` and ``keys_only`` on top.
"""

from __future__ import annotations

from collections.abc import Sequence

from k8s_sql.backend.base import Row
from k8s_sql.pb import kv_pb2, rpc_pb2 as pb

RR = pb.RangeRequest
_SORT_KEY = {
    RR.KEY: lambda r: r.key,
    RR.VERSION: lambda r: r.version,
    RR.CREATE: lambda r: r.create_rev,
    RR.MOD: lambda r: r.mod_rev,
    RR.VALUE: lambda r: r.value,
}


UNLIMITED = 1 << 62  # a limit at or above this many keys is no limit


def fetch_limit(r: pb.RangeRequest) -> int:
    """How many rows to ask the backend for: all of them when etcd sorts or filters
    after reading, else one more than the limit so that ``more`` can be told."""
    if (
        r.sort_order != RR.NONE
        or r.min_mod_revision
        or r.max_mod_revision
        or r.min_create_revision
        or r.max_create_revision
    ):
        return 0
    if r.limit <= 0 or r.limit >= UNLIMITED:
        # A limit no store can reach reads everything: limit + 1 would overflow the
        # databases' 64-bit LIMIT (SQLite: "datatype mismatch"; PostgreSQL: "bigint out
        # of range"), failing the request -- and, inside a txn, its whole write batch.
        return 0
    return r.limit + 1


def sorts_by_value(r: pb.RangeRequest) -> bool:
    """The range is sorted by value (a non-KEY target is always sorted): etcd sorts
    before it drops values for ``keys_only``, so the values must be read."""
    return r.sort_target == RR.VALUE


def to_kv(row: Row) -> kv_pb2.KeyValue:
    return kv_pb2.KeyValue(
        key=row.key,
        create_revision=row.create_rev,
        mod_revision=row.mod_rev,
        version=row.version,
        lease=row.lease,
        value=row.value,
    )


def build_response(r: pb.RangeRequest, rows: Sequence[Row], count: int, revision: int) -> pb.RangeResponse:
    if r.max_mod_revision:
        rows = [x for x in rows if x.mod_rev <= r.max_mod_revision]
    if r.min_mod_revision:
        rows = [x for x in rows if x.mod_rev >= r.min_mod_revision]
    if r.max_create_revision:
        rows = [x for x in rows if x.create_rev <= r.max_create_revision]
    if r.min_create_revision:
        rows = [x for x in rows if x.create_rev >= r.min_create_revision]

    order = r.sort_order
    if r.sort_target != RR.KEY and order == RR.NONE:
        order = RR.ASCEND
    elif r.sort_target == RR.KEY and order == RR.ASCEND:
        order = RR.NONE  # rows already come in ascending key order
    if order != RR.NONE:
        # Stable sort from key order: etcd's sort is not stable, so the order of
        # ties is unspecified there; here ties stay in key order.
        rows = sorted(rows, key=_SORT_KEY[r.sort_target], reverse=order == RR.DESCEND)

    more = False
    if r.limit > 0 and len(rows) > r.limit:
        rows = rows[: r.limit]
        more = True
    resp = pb.RangeResponse(more=more, count=count)
    resp.header.revision = revision
    if rows:
        if r.keys_only:
            resp.kvs.extend(
                kv_pb2.KeyValue(
                    key=x.key, create_revision=x.create_rev, mod_revision=x.mod_rev, version=x.version, lease=x.lease
                )
                for x in rows
            )
        else:
            resp.kvs.extend(to_kv(x) for x in rows)
    return resp
