"""The write transaction of a batch: one implementation for every database, talking
to it once per batch, not once per request.

A batch of Kubernetes-shaped txns (compare one key's mod revision, put it) would
cost a network database about five round trips per request: a savepoint, two
reads, a write and a release, all while the batch holds the revision lock. This
class cuts that to a handful per *batch*:

- the keys and leases the queued requests name are read up front in one query
  each (:meth:`prefetch`), and every single-key read is then answered from memory;
- ``kv`` changes are buffered and written at commit (or before a read that the
  cache cannot answer) in one statement per kind;
- there are no savepoints on the common path: the store marks each request's start
  with :meth:`begin_request`, and a request that fails *after* it changed something
  makes the store roll the whole transaction back and replay the batch in the
  savepoint mode (:attr:`savepoints`), where each request gets a real savepoint.
  Requests fail before changing anything in every case etcd itself does not panic
  on, so the replay is a rare path.

On PostgreSQL a batch of single-key requests runs unlocked (network.py's
``_write_unlocked``): everything it may need is read up front, without the lock, any
other statement raises NeedsLock, and :meth:`finish` hands the read's ``meta`` values
and live leases to a ``finish_batch`` that checks them under the lock before writing.

Statements are plans (plans.py) handed to the backend's :class:`Runner`, with a
``slow`` flag on those whose cost grows with the data (a range without a limit, a
count, a historical read, a lease's keys): SQLite runs the others inline on the
event loop (microseconds each) and the slow ones on its writer thread.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from k8s_sql.backend import plans, sql
from k8s_sql.backend.base import KeyRange, LeaseRow, LogRow, NeedsLock, Row, WriteTx
from k8s_sql.backend.plans import Plan
from k8s_sql.backend.sql import Dialect

T = TypeVar("T")
_MISSING = object()
# A range read in a write txn with at most this many rows runs inline; more may take
# milliseconds (an unbounded range of a big prefix: seconds), so they go to a thread.
INLINE_ROWS = 64


class Runner(Protocol):
    def __call__(self, plan: Plan[T], slow: bool = False) -> Awaitable[T]: ...


class SQLWriteTx(WriteTx):
    @classmethod
    def started(
        cls,
        d: Dialect,
        run: Runner,
        start: plans.WriteStart,
        keys: Iterable[bytes] = (),
        lease_ids: Iterable[int] = (),
        unlocked: Runner | None = None,
        absent: Sequence[bytes] | None = None,
    ) -> SQLWriteTx:
        """The transaction :func:`plans.begin_write` began, knowing the state of the
        ``keys`` and ``lease_ids`` it read with the lock (what :meth:`prefetch` reads).

        ``unlocked``: :func:`plans.begin_unlocked` read them, without the lock, and
        ``run`` raises NeedsLock; the batch is written at the end by ``unlocked``, in
        one statement that checks the read still holds. ``absent``: nothing was read
        (backend/known.py); these keys are assumed absent, and the statement checks that
        too. Such a batch must write something to be checked: one that would not raises
        NeedsLock."""
        tx = cls(d, run, start.revision, start.compact_revision, start.nospace, start.corrupt)
        for k in keys:
            tx._rows[k] = start.rows.get(k)
        for i in lease_ids:
            tx._leases[i] = start.leases.get(i)
        tx.read_meta = start.meta
        tx._unlocked = unlocked
        tx._absent = absent
        return tx

    def __init__(
        self, d: Dialect, run: Runner, revision: int, compact_revision: int, nospace: bool, corrupt: bool = False
    ) -> None:
        self.d = d
        self._run = run
        self.revision = revision
        self._stored_revision = revision  # the revision in meta when the transaction began
        self.compact_revision = compact_revision
        self.savepoints = False  # set by the store when replaying a batch
        self.dirty = False  # changed something since begin_request()
        self.nospace = nospace
        self.corrupt = corrupt  # the CORRUPT alarm is raised (store/corruption.py)
        self._rows: dict[bytes, Row | None] = {}  # known state of keys (None: absent)
        self._leases: dict[int, LeaseRow | None] = {}
        self._pending_kv: dict[bytes, Row | None] = {}  # to write (None: delete)
        self._pending_log: list[tuple[Any, ...]] = []
        self._unlocked: Runner | None = None  # see started()
        self._absent: Sequence[bytes] | None = None
        self.read_meta: tuple[int, ...] = ()  # sql.META_LOCKED's values as the batch began

    # -- batch and request boundaries ------------------------------------------------

    async def prefetch(self, keys: Iterable[bytes], lease_ids: Iterable[int]) -> None:
        """Read these keys and leases in one query each, so the requests of the batch
        find them in memory."""
        want = [k for k in dict.fromkeys(keys) if k not in self._rows]
        if want:
            found = {r.key: r for r in await self._run(plans.get_rows(self.d, want))}
            for k in want:
                self._rows[k] = found.get(k)
        ids = [i for i in dict.fromkeys(lease_ids) if i not in self._leases]
        if ids:
            found_leases = {lease.id: lease for lease in await self._run(plans.get_leases(ids))}
            for i in ids:
                self._leases[i] = found_leases.get(i)

    def begin_request(self) -> None:
        self.dirty = False

    async def savepoint(self) -> None:
        await self.flush()  # so that a rollback only has to forget this request's buffer
        await self._run(plans.statement("SAVEPOINT request"))
        self.dirty = False

    async def release_savepoint(self) -> None:
        await self._run(plans.statement("RELEASE SAVEPOINT request"))

    async def rollback_to_savepoint(self) -> None:
        self._pending_kv.clear()
        self._pending_log.clear()
        self._rows.clear()  # may hold this request's changes: read again from the database
        self._leases.clear()
        await self._run(plans.statement("ROLLBACK TO SAVEPOINT request"))
        await self._run(plans.statement("RELEASE SAVEPOINT request"))

    async def flush(self) -> None:
        """Write the buffered changes (before a read the cache cannot answer, and at commit)."""
        if self._pending_kv:
            puts = [r for r in self._pending_kv.values() if r is not None]
            deletes = [k for k, r in self._pending_kv.items() if r is None]
            self._pending_kv.clear()
            # A batch writes a few hundred rows at most: inline, like every point write.
            await self._run(plans.write_kv(self.d, puts, deletes))
        if self._pending_log:
            rows, self._pending_log = self._pending_log, []
            await self._run(plans.insert_log(self.d, rows))

    async def finish(self) -> None:
        """Everything the commit needs: the buffered changes and the new revision."""
        if self.revision == self._stored_revision:  # a batch of failed compares changes nothing
            if self._absent is not None:
                raise NeedsLock("a batch that did not read writes nothing to check its answers with")
            await self.flush()
            return
        puts = [r for r in self._pending_kv.values() if r is not None]
        deletes = [k for k, r in self._pending_kv.items() if r is None]
        rows, self._pending_log = self._pending_log, []
        self._pending_kv.clear()
        if self._unlocked is None:
            await self._run(plans.finish_batch(self.d, puts, deletes, rows, self.revision, commit=self.d.pipelines))
            return
        live = [i for i, lease in self._leases.items() if lease is not None]
        expect = self.read_meta
        plan = plans.finish_batch(
            self.d, puts, deletes, rows, self.revision, self.d.pipelines, expect, live, self._absent or ()
        )
        await self._unlocked(plan)

    def began_at(self) -> int:
        return self._stored_revision

    def rows_known(self) -> Mapping[bytes, Row | None]:
        """The state of every single key the batch read or wrote, as of its commit."""
        return self._rows

    def meta_after(self) -> tuple[int, ...]:
        """sql.META_LOCKED's values as of its commit."""
        return (self.revision, self.compact_revision, *self.read_meta[2:])

    # -- WriteTx -------------------------------------------------------------------------

    async def get(self, key: bytes) -> Row | None:
        row = self._rows.get(key, _MISSING)
        if row is _MISSING:
            found = await self._run(plans.get_rows(self.d, [key]))
            row = self._rows[key] = found[0] if found else None
        return row  # type: ignore[return-value]

    async def range(self, kr: KeyRange, limit: int = 0) -> list[Row]:
        if kr.end is None:
            row = await self.get(kr.key)
            return [] if row is None else [row]
        await self.flush()
        slow = limit <= 0 or limit > INLINE_ROWS
        return (await self._run(plans.head(self.d, kr, limit), slow))[0]

    async def count(self, kr: KeyRange) -> int:
        if kr.end is None:
            return 0 if await self.get(kr.key) is None else 1
        await self.flush()
        return (await self._run(plans.head(self.d, kr, 0, count_only=True), True))[1]

    async def range_at(self, kr: KeyRange, rev: int, limit: int = 0) -> tuple[list[Row], int]:
        await self.flush()  # the historical query reads this transaction's log rows too
        return await self._run(plans.historical(self.d, kr, rev, limit), True)

    async def put(self, row: Row) -> None:
        self.dirty = True
        self._rows[row.key] = self._pending_kv[row.key] = row

    async def delete(self, key: bytes) -> None:
        self.dirty = True
        self._rows[key] = self._pending_kv[key] = None

    def log(self, change: LogRow) -> None:
        self.dirty = True
        self._pending_log.append(sql.log_params(change))

    async def lease_get(self, lease_id: int) -> LeaseRow | None:
        lease = self._leases.get(lease_id, _MISSING)
        if lease is _MISSING:
            found = await self._run(plans.get_leases([lease_id]))
            lease = self._leases[lease_id] = found[0] if found else None
        return lease  # type: ignore[return-value]

    async def lease_put(self, lease: LeaseRow) -> None:
        self.dirty = True
        await self._run(plans.lease_put(self.d, lease))
        self._leases[lease.id] = lease

    async def lease_delete(self, lease_id: int) -> None:
        self.dirty = True
        await self._run(plans.lease_delete(lease_id))
        self._leases[lease_id] = None

    async def lease_keys(self, lease_id: int) -> list[bytes]:
        await self.flush()
        return await self._run(plans.lease_keys(self.d, lease_id), True)

    async def set_compact_revision(self, rev: int) -> None:
        self.dirty = True
        await self._run(plans.set_meta("compact_revision", rev))
        self.compact_revision = rev
