"""The semantics: revisions, ranges, txn evaluation, leases' effect on keys, compaction.

Writes are queued and applied in batches (group commit): one database transaction
holds the revision lock, applies every queued request in order -- each with its
own compare evaluation and its own revision -- commits once, and only then answers
all of them. One fsync serves many writes, and commit order is revision order.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from k8s_sql import errors
from k8s_sql.backend.base import (
    DELETE,
    PUT,
    Backend,
    BackendUnavailable,
    CompactedError,
    DatabaseFull,
    FutureRevisionError,
    KeyRange,
    LeaseRow,
    LogRow,
    Row,
    WriteTx,
)
from k8s_sql.pb import rpc_pb2 as pb
from k8s_sql.store import ranges
from k8s_sql.store.ranges import to_kv

log = logging.getLogger(__name__)

MAX_LEASE_TTL = 9_000_000_000

CommitListener = Callable[[int, list[LogRow]], None]


@dataclass
class _Request:
    """One request's view of the batch: the revision it will produce, its changes."""

    tx: WriteTx
    begin_rev: int
    changes: list[LogRow] = field(default_factory=list)
    before: dict[bytes, Row | None] = field(default_factory=dict)  # each changed key's state before

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


@dataclass
class _Queued:
    apply: Callable[[_Request], Awaitable[Any]]
    future: asyncio.Future[Any]
    keys: list[bytes]  # single keys the request will read: the batch reads them up front
    leases: list[int]
    adds_data: bool  # refused while the NOSPACE alarm is raised (etcd's applierV3Capped)


KV_OVERHEAD = 256  # etcd's quota: what a key costs on top of its key and value bytes
LEASE_OVERHEAD = 64  # etcd's quota: what a lease costs


def put_cost(r: pb.PutRequest) -> int:
    """etcd's costPut: the bytes a put may add, as the quota counts them."""
    return KV_OVERHEAD + len(r.key) + len(r.value)


def txn_cost(r: pb.TxnRequest) -> int:
    """etcd's costTxn: the costlier branch's puts (nested txns cost nothing there, as in etcd)."""

    def branch(ops: Any) -> int:
        return sum(put_cost(op.request_put) for op in ops if op.WhichOneof("request") == "request_put")

    return max(branch(r.success), branch(r.failure))


class _Replay(Exception):
    """A request failed after changing something: redo the batch with savepoints."""


class _Excluded(Exception):
    """A request's failure ended the whole transaction (SQLite rolls back on
    SQLITE_FULL; a savepoint cannot undo that): run the batch again without it."""

    def __init__(self, index: int, error: errors.EtcdError) -> None:
        super().__init__(index)
        self.index = index
        self.error = error


def _txn_hints(r: pb.TxnRequest, keys: list[bytes], leases: list[int]) -> None:
    for c in r.compare:
        if not c.range_end:
            keys.append(c.key)
    for op in (*r.success, *r.failure):
        kind = op.WhichOneof("request")
        if kind == "request_put":
            keys.append(op.request_put.key)
            if op.request_put.lease:
                leases.append(op.request_put.lease)
        elif kind == "request_range":
            if not op.request_range.range_end:
                keys.append(op.request_range.key)
        elif kind == "request_delete_range":
            if not op.request_delete_range.range_end:
                keys.append(op.request_delete_range.key)
        elif kind == "request_txn":
            _txn_hints(op.request_txn, keys, leases)


class Store:
    """An etcd MVCC key-value store kept in a SQL backend."""

    def __init__(
        self,
        backend: Backend,
        *,
        max_txn_ops: int = 128,
        max_batch: int = 256,
        min_lease_ttl: int = 2,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.max_txn_ops = max_txn_ops
        self.max_batch = max_batch
        self.min_lease_ttl = min_lease_ttl
        self.clock = clock
        self.revision = 0
        self.compact_revision = 0
        # The revision of this frontend's latest commit, set as the commit is sent: a
        # database that announces commits (PostgreSQL) may announce it before the
        # commit's own publication, and the follower need not read it back.
        self.committing_revision = 0
        self._queue: asyncio.Queue[_Queued] = asyncio.Queue()
        self._listeners: list[CommitListener] = []
        self._writer: asyncio.Task[None] | None = None
        self._compactor: asyncio.Task[None] | None = None
        self._compact_wanted = asyncio.Event()
        self._compacted_to = 0
        self._compact_done = asyncio.Condition()
        # Called when the database reports that it is full (the NOSPACE alarm's raiser).
        self.on_database_full: Callable[[], None] | None = None

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        self.revision, self.compact_revision = await self.backend.current()
        self._compacted_to = 0
        self._writer = asyncio.create_task(self._write_loop(), name="store-writer")
        self._compactor = asyncio.create_task(self._compact_loop(), name="store-compactor")
        if self.compact_revision:
            self._compact_wanted.set()

    async def stop(self) -> None:
        for task in (self._writer, self._compactor):
            if task is not None:
                task.cancel()
        for task in (self._writer, self._compactor):
            if task is not None:
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        while not self._queue.empty():
            q = self._queue.get_nowait()
            if not q.future.done():
                q.future.set_exception(errors.Stopped())

    def on_commit(self, listener: CommitListener) -> None:
        """Call ``listener(revision, changes)`` after every commit, before answering."""
        self._listeners.append(listener)

    def observe_revision(self, rev: int) -> None:
        if rev > self.revision:
            self.revision = rev

    # -- reads -------------------------------------------------------------------

    async def range(self, r: pb.RangeRequest) -> pb.RangeResponse:
        kr = KeyRange.from_etcd(r.key, r.range_end)
        try:
            res = await self.backend.range(
                kr, r.revision, ranges.fetch_limit(r), r.count_only, r.keys_only and not ranges.sorts_by_value(r)
            )
        except CompactedError:
            raise errors.Compacted() from None
        except FutureRevisionError:
            raise errors.FutureRevision() from None
        self.observe_revision(res.revision)
        return ranges.build_response(r, res.rows, res.count, res.revision)

    # -- writes ------------------------------------------------------------------

    async def _submit(
        self,
        apply: Callable[[_Request], Awaitable[Any]],
        keys: list[bytes] | None = None,
        leases: list[int] | None = None,
        adds_data: bool = False,
    ) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Queued(apply, fut, keys or [], leases or [], adds_data))
        return await fut

    async def put(self, r: pb.PutRequest) -> pb.PutResponse:
        async def apply(req: _Request) -> pb.PutResponse:
            if r.lease and await req.tx.lease_get(r.lease) is None:
                raise errors.LeaseNotFound()
            return await self._put(req, r)

        return await self._submit(apply, [r.key], [r.lease] if r.lease else None, adds_data=True)

    async def delete_range(self, r: pb.DeleteRangeRequest) -> pb.DeleteRangeResponse:
        return await self._submit(lambda req: self._delete(req, r), None if r.range_end else [r.key])

    async def txn(self, r: pb.TxnRequest) -> pb.TxnResponse:
        async def apply(req: _Request) -> pb.TxnResponse:
            path = [x async for x in self._compare_path(req.tx, r)]
            await self._check_txn(req, r, iter(path))
            resp = await self._execute_txn(req, r, iter(path))
            resp.header.revision = req.rev
            return resp

        keys: list[bytes] = []
        leases: list[int] = []
        _txn_hints(r, keys, leases)
        return await self._submit(apply, keys, leases, adds_data=txn_cost(r) > 0)

    async def compact(self, r: pb.CompactionRequest) -> pb.CompactionResponse:
        async def apply(req: _Request) -> pb.CompactionResponse:
            if r.revision <= req.tx.compact_revision:
                raise errors.Compacted()
            if r.revision > req.tx.revision:
                raise errors.FutureRevision()
            await req.tx.set_compact_revision(r.revision)
            resp = pb.CompactionResponse()
            resp.header.revision = req.rev
            return resp

        resp = await self._submit(apply)
        self.compact_revision = max(self.compact_revision, r.revision)
        self._compact_wanted.set()
        if r.physical:
            async with self._compact_done:
                await self._compact_done.wait_for(lambda: self._compacted_to >= r.revision)
        return resp

    # -- leases (their effect on keys; timing is the lease manager's) -----------------

    async def lease_grant(self, lease_id: int, ttl: int) -> tuple[int, int]:
        if ttl > MAX_LEASE_TTL:
            raise errors.LeaseTTLTooLarge()
        ttl = max(ttl, self.min_lease_ttl)

        async def apply(req: _Request) -> tuple[int, int]:
            lid = lease_id
            if lid == 0:
                while True:
                    lid = random.getrandbits(63) or 1
                    if await req.tx.lease_get(lid) is None:
                        break
            elif await req.tx.lease_get(lid) is not None:
                raise errors.LeaseExists()
            await req.tx.lease_put(LeaseRow(lid, ttl, self.clock() + ttl))
            return lid, ttl

        return await self._submit(apply, None, [lease_id] if lease_id else None, adds_data=True)

    async def lease_revoke(self, lease_id: int, only_if_expired: bool = False) -> int:
        """Delete the lease and its keys (one revision); return the response revision."""

        async def apply(req: _Request) -> int:
            lease = await req.tx.lease_get(lease_id)
            if lease is None:
                raise errors.LeaseNotFound()
            if only_if_expired and lease.expires_at > self.clock():
                return req.rev
            await self._revoke(req, lease_id)
            return req.rev

        return await self._submit(apply, None, [lease_id])

    async def _revoke(self, req: _Request, lease_id: int) -> None:
        keys = await req.tx.lease_keys(lease_id)
        await req.tx.prefetch(keys, ())
        for key in keys:
            prev = await req.tx.get(key)
            if prev is not None:
                await req.tx.delete(key)
                req.record(DELETE, Row(key, 0, req.new_rev, 0, 0, b""), prev)
        await req.tx.lease_delete(lease_id)

    async def lease_keepalive(self, lease_id: int) -> int:
        """Renew the lease; its TTL, or 0 when it does not exist (or has expired).

        An expired lease is revoked right here, in the keepalive's own revision, so
        that "TTL 0" always means its keys are gone -- as etcd's keepalive of an
        expired lease waits for the revocation before answering. (Answering 0 and
        leaving the revocation to the expirer let a client see the lease gone while a
        Put could still attach keys to it, for up to the expirer's interval.)"""

        async def apply(req: _Request) -> int:
            lease = await req.tx.lease_get(lease_id)
            now = self.clock()
            if lease is None:
                return 0
            if lease.expires_at <= now:
                await self._revoke(req, lease_id)
                return 0
            await req.tx.lease_put(LeaseRow(lease.id, lease.ttl, now + lease.ttl))
            return lease.ttl

        return await self._submit(apply, None, [lease_id])

    # -- request semantics --------------------------------------------------------

    async def _put(self, req: _Request, r: pb.PutRequest) -> pb.PutResponse:
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
        resp = pb.PutResponse()
        resp.header.revision = rev
        if r.prev_kv and prev is not None:
            resp.prev_kv.CopyFrom(to_kv(prev))
        return resp

    async def _delete(self, req: _Request, r: pb.DeleteRangeRequest) -> pb.DeleteRangeResponse:
        tx = req.tx
        kr = KeyRange.from_etcd(r.key, r.range_end)
        rows = [] if kr.is_empty else await tx.range(kr)
        for prev in rows:
            await tx.delete(prev.key)
            req.record(DELETE, Row(prev.key, 0, req.new_rev, 0, 0, b""), prev)
        resp = pb.DeleteRangeResponse(deleted=len(rows))
        resp.header.revision = req.rev
        if r.prev_kv:
            resp.prev_kvs.extend(to_kv(x) for x in rows)
        return resp

    async def _range_in_txn(self, req: _Request, r: pb.RangeRequest) -> pb.RangeResponse:
        tx, current = req.tx, req.rev
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

    async def _compare_path(self, tx: WriteTx, r: pb.TxnRequest) -> Any:
        """Yield the compare outcome of ``r`` and then, depth first, of every nested
        txn on the chosen branch -- all against the state before the txn runs."""
        ok = True
        for c in r.compare:
            if not await self._compare(tx, c):
                ok = False
                break
        yield ok
        for op in r.success if ok else r.failure:
            if op.WhichOneof("request") == "request_txn":
                async for x in self._compare_path(tx, op.request_txn):
                    yield x

    async def _compare(self, tx: WriteTx, c: pb.Compare) -> bool:
        kr = KeyRange.from_etcd(c.key, c.range_end)
        if kr.end is None:
            row = await tx.get(c.key)
            rows = [] if row is None else [row]
        else:
            rows = [] if kr.is_empty else await tx.range(kr)
        if not rows:
            if c.target == pb.Compare.VALUE:
                return False  # a missing key has no value to compare
            return _compare_row(c, None)
        return all(_compare_row(c, row) for row in rows)

    async def _check_txn(self, req: _Request, r: pb.TxnRequest, path: Iterator[bool]) -> None:
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
                await self._check_txn(req, op.request_txn, path)

    async def _execute_txn(self, req: _Request, r: pb.TxnRequest, path: Iterator[bool]) -> pb.TxnResponse:
        ok = next(path)
        resp = pb.TxnResponse(succeeded=ok)
        resp.header.SetInParent()
        for op in r.success if ok else r.failure:
            kind = op.WhichOneof("request")
            out = resp.responses.add()
            if kind == "request_range":
                out.response_range.CopyFrom(await self._range_in_txn(req, op.request_range))
            elif kind == "request_put":
                out.response_put.CopyFrom(await self._put(req, op.request_put))
            elif kind == "request_delete_range":
                out.response_delete_range.CopyFrom(await self._delete(req, op.request_delete_range))
            elif kind == "request_txn":
                out.response_txn.CopyFrom(await self._execute_txn(req, op.request_txn, path))
        return resp

    # -- the batch loop -------------------------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._apply_batch(batch)
            except asyncio.CancelledError:
                for q in batch:
                    if not q.future.done():
                        q.future.set_exception(errors.Stopped())
                raise
            except Exception as e:  # the database failed the batch as a whole: nothing in it is acknowledged
                log.warning("write batch of %d failed: %s", len(batch), errors.one_line(e))
                full = isinstance(e, DatabaseFull)
                if full:
                    self._database_full()
                for q in batch:
                    if not q.future.done():
                        q.future.set_exception(errors.NoSpace() if full else errors.DatabaseUnavailable())

    async def _apply_batch(self, batch: list[_Queued]) -> None:
        async def attempt() -> tuple[int, int, list[LogRow], list[tuple[bool, Any]]]:
            refused: dict[int, errors.EtcdError] = {}
            try:
                return await self._run_batch(batch, False, refused)
            except _Replay:
                pass
            except Exception as e:
                if not self._may_be_one_request(e):
                    raise
                # The database refused something in the batch (a constraint, a value it
                # cannot store, a full disk): find out which request, each in a savepoint.
                log.debug("write batch refused, replaying with savepoints: %s", errors.one_line(e))
            while True:  # at most once per request: each pass excludes one more
                try:
                    return await self._run_batch(batch, True, refused)
                except _Excluded as x:
                    refused[x.index] = x.error

        # A transaction the database aborted as a conflict applied nothing: run it again.
        revision, compact, committed, results = await self.backend.retrying(attempt)
        self.observe_revision(revision)
        self.compact_revision = max(self.compact_revision, compact)
        if committed:
            for listener in self._listeners:
                listener(revision, committed)
        for q, (ok, value) in zip(batch, results, strict=True):
            if q.future.done():
                continue
            if ok:
                q.future.set_result(value)
            else:
                q.future.set_exception(value)

    def _may_be_one_request(self, e: BaseException) -> bool:
        """Whether a failed batch may owe its failure to one of its requests, so that a
        replay with savepoints lets the others commit. A lost database and a conflict
        (retried whole by the backend) are the batch's, not a request's."""
        return not isinstance(e, BackendUnavailable) and not self.backend.conflicted(e)

    def _refused(self, e: BaseException) -> errors.EtcdError:
        """The answer to a request the database refused on its own (savepoint replay)."""
        if isinstance(e, DatabaseFull):
            self._database_full()
            return errors.NoSpace()
        log.warning("the database refused a request: %s", errors.one_line(e))
        return errors.RequestRejected()

    def _database_full(self) -> None:
        """The database is out of space: raise etcd's NOSPACE alarm (see on_database_full)."""
        if self.on_database_full is not None:
            self.on_database_full()

    async def _run_batch(
        self, batch: list[_Queued], savepoints: bool, refused: dict[int, errors.EtcdError]
    ) -> tuple[int, int, list[LogRow], list[tuple[bool, Any]]]:
        """Apply the batch in one database transaction. Without savepoints, a request
        that fails after changing something raises :class:`_Replay` (the transaction
        is rolled back), and a statement the database refuses fails the transaction;
        with them, each request's statements run inside its own savepoint, so a failed
        request -- an etcd error or a database refusal -- is undone on its own and the
        rest of the batch commits as if it had been sent alone."""
        results: list[tuple[bool, Any]] = []
        committed: list[LogRow] = []
        async with self.backend.write() as tx:
            tx.savepoints = savepoints
            await tx.prefetch(
                (k for q in batch if not q.future.done() for k in q.keys),
                (i for q in batch if not q.future.done() for i in q.leases),
            )
            for index, q in enumerate(batch):
                if q.future.done():  # the caller went away before we started
                    results.append((False, None))
                    continue
                if index in refused:  # its failure ended an earlier attempt's transaction
                    results.append((False, refused[index]))
                    continue
                req = _Request(tx, tx.revision)
                if savepoints:
                    await tx.savepoint()
                else:
                    tx.begin_request()
                try:
                    if tx.nospace and q.adds_data:
                        raise errors.NoSpace()  # etcd's applierV3Capped
                    value = await q.apply(req)
                    if savepoints:
                        await tx.flush()  # the request's statements, inside its savepoint
                except errors.EtcdError as e:
                    if savepoints:
                        await tx.rollback_to_savepoint()
                    elif tx.dirty:
                        raise _Replay from e
                    results.append((False, e))
                    continue
                except Exception as e:
                    if not savepoints or not self._may_be_one_request(e):
                        raise
                    answer = self._refused(e)
                    try:
                        await tx.rollback_to_savepoint()
                    except Exception:
                        raise _Excluded(index, answer) from e
                    results.append((False, answer))
                    continue
                if savepoints:
                    await tx.release_savepoint()
                if req.changes:
                    tx.revision = req.new_rev
                    committed.extend(req.changes)
                results.append((True, value))
            revision, compact = tx.revision, tx.compact_revision
            if committed:
                self.committing_revision = revision
        return revision, compact, committed, results

    # -- physical compaction ---------------------------------------------------------

    async def _compact_loop(self) -> None:
        while True:
            await self._compact_wanted.wait()
            self._compact_wanted.clear()
            target = self.compact_revision
            try:
                await self.backend.compact_log(target, batch_revs=1000)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("compaction to %d failed, will retry: %s", target, e)
                await asyncio.sleep(1)
                self._compact_wanted.set()
                continue
            async with self._compact_done:
                self._compacted_to = max(self._compacted_to, target)
                self._compact_done.notify_all()


def _compare_row(c: pb.Compare, row: Row | None) -> bool:
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


__all__ = ["BackendUnavailable", "Store"]
