"""The store: everything the API layer asks of k8s-sql's storage, in etcd's terms.

Reads go straight to the backend (one snapshot each); writes go through the group
commit (batch.py), which applies each request's semantics (txn.py) inside a batch's
transaction; the compactor deletes history in the background (compactor.py); one
:class:`~k8s_sql.store.revisions.Revisions` owns the revisions this frontend knows.
The API never touches a backend: what maintenance, leases and the watch follower
need is offered here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Protocol

from k8s_sql import errors, metrics
from k8s_sql.backend import snapshot
from k8s_sql.backend.base import Backend, CompactedError, FutureRevisionError, KeyRange, LeaseRow, LogRow
from k8s_sql.formats import etcd_snapshot
from k8s_sql.pb import rpc_pb2 as pb
from k8s_sql.store import ranges, txn
from k8s_sql.store.batch import CommitListener, GroupCommit
from k8s_sql.store.compactor import Compactor
from k8s_sql.store.corruption import CATCH_UP_DELAYS, CorruptAlarm, LostCommits
from k8s_sql.store.replica import ReadReplica
from k8s_sql.store.revisions import Revisions
from k8s_sql.store.space import txn_cost
from k8s_sql.store.txn import MAX_LEASE_TTL, txn_hints

log = logging.getLogger(__name__)


class RangeCounts(Protocol):
    """Counts of key ranges remembered at a revision and carried to later ones without
    counting again (watch/counts.py, which follows every commit)."""

    def knows(self, kr: KeyRange) -> bool: ...

    def count(self, kr: KeyRange, revision: int) -> int | None: ...

    def remember(self, kr: KeyRange, revision: int, n: int) -> None: ...


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
        self.min_lease_ttl = min_lease_ttl
        self.clock = clock
        self.revisions = Revisions()
        self.commits = GroupCommit(backend, self.revisions, max_batch)
        self.corruption = CorruptAlarm(backend, self.revisions)
        self.replica: ReadReplica | None = None  # --read-endpoint (store/replica.py)
        self.counts: RangeCounts | None = None  # set by whoever follows every commit (server.py)
        self.commits.alarm = self.corruption
        self.compactor = Compactor(backend, self.revisions)
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        self.revisions.reset(*await self.backend.current())
        self._tasks = [
            asyncio.create_task(self.commits.run(), name="store-writer"),
            asyncio.create_task(self.compactor.run(), name="store-compactor"),
        ]
        if self.revisions.compacted:
            self.compactor.request()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self.commits.fail_queued()

    @property
    def started(self) -> bool:
        """Started, and its writer and compactor still running (livez: a dead one
        would never answer another write)."""
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    def subscribe(self, listener: CommitListener) -> None:
        """Call ``listener(revision, changes)`` after every commit, before answering."""
        self.commits.subscribe(listener)

    @property
    def on_database_full(self) -> Callable[[], None] | None:
        return self.commits.on_database_full

    @on_database_full.setter
    def on_database_full(self, raise_alarm: Callable[[], None] | None) -> None:
        self.commits.on_database_full = raise_alarm

    @property
    def revision(self) -> int:
        """The newest revision this frontend knows to be committed."""
        return self.revisions.current

    @property
    def compact_revision(self) -> int:
        return self.revisions.compacted

    @property
    def max_key_bytes(self) -> int | None:
        return self.backend.max_key_bytes

    @property
    def follow_interval(self) -> float:
        return self.backend.follow_interval

    # -- reads -------------------------------------------------------------------

    async def range(self, r: pb.RangeRequest) -> pb.RangeResponse:
        self.corruption.check()
        kr = KeyRange.from_etcd(r.key, r.range_end)
        seen = self.revisions.current
        if r.serializable and self.replica is not None:
            try:
                replica = await self.replica.range(
                    kr,
                    r.revision,
                    ranges.fetch_limit(r),
                    r.count_only,
                    r.keys_only and not ranges.sorts_by_value(r),
                    seen,
                )
            except CompactedError:
                raise errors.Compacted() from None
            if replica is not None:
                metrics.RANGES.inc()
                return ranges.build_response(r, replica.rows, replica.count, replica.revision)
        if r.count_only and r.revision <= 0 and (n := await self._remembered_count(kr)) is not None:
            metrics.RANGES.inc()
            metrics.RANGE_COUNTS.labels("memo").inc()
            return ranges.build_response(r, (), *n)
        for pause in (*CATCH_UP_DELAYS, None):
            try:
                res = await self.backend.range(
                    kr, r.revision, ranges.fetch_limit(r), r.count_only, r.keys_only and not ranges.sorts_by_value(r)
                )
            except CompactedError:
                raise errors.Compacted() from None
            except FutureRevisionError:
                raise errors.FutureRevision() from None
            try:
                self.corruption.verify(res.revision, seen)  # never answer from before what was served
                break
            except LostCommits:
                # A server behind (a replica, a node rejoining) or lost commits: the
                # write path tells them apart (CorruptAlarm.suspect). The read is taken
                # again after short pauses, then refused.
                if pause is None:
                    raise errors.DatabaseUnavailable() from None
                await asyncio.sleep(pause)
        self.revisions.observe(res.revision, res.compact_revision)
        if self.counts is not None and kr.end is not None:
            self.counts.remember(kr, r.revision if r.revision > 0 else res.revision, res.count)
        if r.count_only:
            metrics.RANGE_COUNTS.labels("database").inc()
        metrics.RANGES.inc()
        return ranges.build_response(r, res.rows, res.count, res.revision)

    async def _remembered_count(self, kr: KeyRange) -> tuple[int, int] | None:
        """``(count, revision)`` of ``kr`` now from the count memo, without counting:
        the revision is the database's own (one small statement), so the answer is as
        linearizable as a count read there. None when nothing is remembered of ``kr``
        or the memo cannot reach that revision."""
        if self.counts is None or kr.end is None or not self.counts.knows(kr):
            return None
        revision, _ = await self.current()
        n = self.counts.count(kr, revision)
        return None if n is None else (n, revision)

    async def current(self) -> tuple[int, int]:
        """The database's ``(revision, compact_revision)`` now (other frontends' commits included)."""
        seen = self.revisions.current
        revision, compacted = await self.backend.current()
        with contextlib.suppress(LostCommits):  # the alarm is raised; the numbers are still the database's
            self.corruption.verify(revision, seen)
        self.revisions.observe(revision, compacted)
        return revision, compacted

    async def changes(
        self, start_rev: int, end_rev: int, ranges: Sequence[KeyRange] | None, limit: int
    ) -> tuple[list[LogRow], int]:
        """The change log (see KeyValueLog.changes); CompactedError below the compaction point."""
        return await self.backend.changes(start_rev, end_rev, ranges, limit)

    async def count_keys(self) -> int:
        """How many keys exist now (etcd_debugging_mvcc_keys_total)."""
        kr = KeyRange.from_etcd(b"\0", b"\0")
        if (known := await self._remembered_count(kr)) is not None:
            metrics.RANGE_COUNTS.labels("memo").inc()
            return known[0]
        res = await self.backend.range(kr, 0, 0, True, True)
        metrics.RANGE_COUNTS.labels("database").inc()
        if self.counts is not None:
            self.counts.remember(kr, res.revision, res.count)
        return res.count

    async def follow_commits(self, on_commit: Callable[[int], None]) -> None:
        await self.backend.follow_commits(on_commit)

    # -- writes ------------------------------------------------------------------

    async def put(self, r: pb.PutRequest) -> pb.PutResponse:
        return await self.commits.submit(
            functools.partial(txn.put_request, r=r),
            [r.key],
            [r.lease] if r.lease else None,
            adds_data=True,
            single_keys=True,
        )

    async def delete_range(self, r: pb.DeleteRangeRequest) -> pb.DeleteRangeResponse:
        return await self.commits.submit(
            functools.partial(txn.delete_range, r=r),
            None if r.range_end else [r.key],
            single_keys=not r.range_end,
        )

    async def txn(self, r: pb.TxnRequest) -> pb.TxnResponse:
        keys: list[bytes] = []
        leases: list[int] = []
        single = txn_hints(r, keys, leases)
        return await self.commits.submit(
            functools.partial(txn.txn, r=r), keys, leases, adds_data=txn_cost(r) > 0, single_keys=single
        )

    async def compact(self, r: pb.CompactionRequest) -> pb.CompactionResponse:
        resp = await self.commits.submit(functools.partial(txn.compact, revision=r.revision))
        self.revisions.observe(0, r.revision)
        self.compactor.request()
        if r.physical:
            await self.compactor.wait_for(r.revision)
        return resp

    # -- leases (their effect on keys; timing is the lease manager's) -----------------

    async def lease_grant(self, lease_id: int, ttl: int) -> tuple[int, int]:
        if ttl > MAX_LEASE_TTL:
            raise errors.LeaseTTLTooLarge()
        ttl = max(ttl, self.min_lease_ttl)
        return await self.commits.submit(
            lambda req: txn.lease_grant(req, lease_id, ttl, self.clock()),
            None,
            [lease_id] if lease_id else None,
            adds_data=True,
        )

    async def lease_revoke(self, lease_id: int, only_if_expired: bool = False) -> int:
        """Delete the lease and its keys (one revision); return the response revision."""
        return await self.commits.submit(
            lambda req: txn.lease_revoke(req, lease_id, only_if_expired, self.clock()), None, [lease_id]
        )

    async def lease_keepalive(self, lease_id: int) -> int:
        """Renew the lease; its TTL, or 0 when it does not exist (see txn.lease_keepalive)."""
        return await self.commits.submit(lambda req: txn.lease_keepalive(req, lease_id, self.clock()), None, [lease_id])

    async def lease(self, lease_id: int) -> tuple[LeaseRow | None, list[bytes]]:
        """A lease and its keys, as stored."""
        return await self.backend.lease(lease_id)

    async def leases(self) -> list[LeaseRow]:
        return await self.backend.leases()

    async def expired_leases(self, limit: int) -> list[int]:
        """Leases whose deadline has passed by now (the oldest first)."""
        return await self.backend.expired_leases(self.clock(), limit)

    # -- maintenance ----------------------------------------------------------------

    async def size(self) -> tuple[int, int]:
        """``(bytes on disk, bytes in use)`` of the database's store."""
        return await self.backend.size()

    async def defragment(self) -> None:
        await self.backend.defragment()

    async def hash_kv(self, revision: int) -> tuple[int, int, int]:
        """etcd's HashKV: ``(hash, compact_revision, hash_revision)``."""
        try:
            return await self.backend.hash_kv(revision)
        except CompactedError:
            raise errors.Compacted() from None
        except FutureRevisionError:
            raise errors.FutureRevision() from None

    async def snapshot(self) -> AsyncGenerator[tuple[int, bytes], None]:
        """etcd's snapshot stream: ``(remaining bytes, blob)`` frames of a consistent copy
        in etcd's own format (a bbolt database: etcd_snapshot.export, written on a thread),
        the last one its SHA-256 -- what etcdctl, etcdutl and ``k8s-sql restore`` read."""
        async with self.backend.snapshot() as path, snapshot.temporary_path() as etcd_path:
            await etcd_snapshot.export_elsewhere(path, etcd_path)
            async for frame in snapshot.frames(etcd_path):
                yield frame


__all__ = ["Store"]
