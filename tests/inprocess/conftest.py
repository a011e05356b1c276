"""The in-process tier: the store itself, over a database, without gRPC or a subprocess.

Two functions are all this tier knows of how k8s-sql is assembled: :func:`open_store`
(how a store is built on a database, as ``server.py`` builds it minus gRPC, the hub,
the lease expirer and membership) and :func:`call` (what the API layer does around
the store for one request: etcd's request checks, the store call, the header's
identity, etcd's error codes). When the store's construction or interface changes,
these two change and the tests stay as they are.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from differential.compare import Result, RpcError
from google.protobuf.message import Message

from k8s_sql import errors
from k8s_sql.api import validate
from k8s_sql.api.status import to_status
from k8s_sql.backend import open_backend
from k8s_sql.backend.base import BackendUnavailable, DatabaseFull
from k8s_sql.config import MAX_REQUEST_BYTES
from k8s_sql.pb import rpc_pb2 as pb
from k8s_sql.store.store import Store


@contextlib.asynccontextmanager
async def open_store(endpoint: str, *, clock: Callable[[], float] = time.time) -> AsyncIterator[Store]:
    """A started store on the database ``endpoint`` names (created if absent), stopped
    and closed on exit. ``clock`` is the store's time (lease deadlines)."""
    backend = open_backend(endpoint)
    await backend.open()
    store = Store(backend, max_txn_ops=128, clock=clock)
    try:
        await store.start()
        yield store
    finally:
        await store.stop()
        await backend.close()


def _fill(h: pb.ResponseHeader, store: Store) -> None:
    """api/common.py's Context.fill: identity always, the current revision when unset."""
    h.cluster_id = h.member_id = h.raft_term = 1
    if h.revision == 0:
        h.revision = store.revision


def _header(store: Store) -> pb.ResponseHeader:
    h = pb.ResponseHeader()
    _fill(h, store)
    return h


def _check_size(r: Message) -> None:
    if r.ByteSize() > MAX_REQUEST_BYTES:
        raise errors.RequestTooLarge()


async def _answer(store: Store, kind: str, r: Message) -> Message:
    """One request as the servicers in api/ handle it (no quota: Space is not wired)."""
    max_key = store.max_key_bytes
    resp: Message
    if kind == "Range":
        assert isinstance(r, pb.RangeRequest)
        validate.check_range(r)
        resp = await store.range(r)
    elif kind == "Put":
        assert isinstance(r, pb.PutRequest)
        validate.check_put(r)
        _check_size(r)
        validate.check_key_length(r, max_key)
        resp = await store.put(r)
    elif kind == "DeleteRange":
        assert isinstance(r, pb.DeleteRangeRequest)
        validate.check_delete(r)
        _check_size(r)
        resp = await store.delete_range(r)
    elif kind == "Txn":
        assert isinstance(r, pb.TxnRequest)
        validate.check_txn(r, store.max_txn_ops)
        if not validate.is_read_only(r):
            _check_size(r)
        validate.check_key_length(r, max_key)
        resp = await store.txn(r)
    elif kind == "Compact":
        assert isinstance(r, pb.CompactionRequest)
        resp = await store.compact(r)
    elif kind == "LeaseGrant":
        assert isinstance(r, pb.LeaseGrantRequest)
        lease_id, ttl = await store.lease_grant(r.ID, r.TTL)
        return pb.LeaseGrantResponse(header=_header(store), ID=lease_id, TTL=ttl)
    elif kind == "LeaseRevoke":
        assert isinstance(r, pb.LeaseRevokeRequest)
        resp = pb.LeaseRevokeResponse()
        resp.header.revision = await store.lease_revoke(r.ID)
    elif kind == "LeaseKeepAlive":
        assert isinstance(r, pb.LeaseKeepAliveRequest)
        ttl = await store.lease_keepalive(r.ID)
        return pb.LeaseKeepAliveResponse(header=_header(store), ID=r.ID, TTL=ttl)
    elif kind == "LeaseTimeToLive":
        assert isinstance(r, pb.LeaseTimeToLiveRequest)
        lease, keys = await store.lease(r.ID)
        if lease is None:
            return pb.LeaseTimeToLiveResponse(header=_header(store), ID=r.ID, TTL=-1)
        remaining = max(0, math.floor(lease.expires_at - store.clock()))
        out = pb.LeaseTimeToLiveResponse(header=_header(store), ID=lease.id, TTL=remaining, grantedTTL=lease.ttl)
        if r.keys:
            out.keys.extend(keys)
        return out
    elif kind == "LeaseLeases":
        leases = [pb.LeaseStatus(ID=x.id) for x in await store.leases()]
        return pb.LeaseLeasesResponse(header=_header(store), leases=leases)
    else:
        raise ValueError(f"unknown request kind {kind}")
    _fill(resp.header, store)  # type: ignore[attr-defined]
    return resp


async def call(store: Store, kind: str, request: Message) -> Result:
    """Answer ``request`` (a gRPC method's name and its request message) as a k8s-sql
    frontend would, with errors as the client would see them."""
    try:
        return await _answer(store, kind, request)
    except (errors.EtcdError, BackendUnavailable, DatabaseFull) as e:
        status = to_status(e)
        assert status is not None
        return RpcError(status[0].name, status[1])


@pytest.fixture
def endpoint(backend_args: list[str], tmp_path: Path) -> str:
    """A fresh store's DSN, once per backend (tests/conftest.py's ``backend_args``:
    SQLite in tmp_path; a new database on the session's throwaway PostgreSQL or
    MariaDB, skipped where it is not installed and failed in strict mode)."""
    if backend_args:
        return backend_args[backend_args.index("--endpoint") + 1]
    # synchronous=OFF: nothing here survives a crash on purpose, and an fsync per
    # write would be most of this tier's time.
    return f"sqlite://{tmp_path}/state.db?synchronous=OFF"
