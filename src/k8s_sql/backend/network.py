"""The engine's hooks for server databases (PostgreSQL, MySQL), reached over the network.

Plans run by :func:`plans.run_async` on a pooled connection. A dialect module
(postgres.py, mysql.py) supplies the connections -- a snapshot transaction, a
read-write transaction, autocommit -- its driver's adapter (:class:`plans.Conn`), its
schema, and which of its driver's errors mean "conflict" or "reported by the server".
"""

from __future__ import annotations

import abc
import contextlib
import functools
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeVar

from k8s_sql import errors
from k8s_sql.backend import plans, snapshot
from k8s_sql.backend.base import BackendUnavailable, NeedsLock, WriteTx
from k8s_sql.backend.engine import PlanFactory, SQLBackend
from k8s_sql.backend.known import KnownRows
from k8s_sql.backend.plans import Conn, Plan
from k8s_sql.backend.writetx import SQLWriteTx

T = TypeVar("T")


class NetworkBackend(SQLBackend):
    """A backend on a server database, given a dialect's connections."""

    # -- what a dialect provides -------------------------------------------------

    @abc.abstractmethod
    def reported_by_database(self, error: BaseException) -> bool:
        """Whether ``error`` is an error the database server reported (the driver's
        server-error classes), as opposed to one of k8s-sql's own."""

    @abc.abstractmethod
    def snapshot_conn(self) -> contextlib.AbstractAsyncContextManager[Conn]:
        """A connection inside a read-only transaction that reads one consistent snapshot."""

    @abc.abstractmethod
    def transaction(self) -> contextlib.AbstractAsyncContextManager[Conn]:
        """A connection inside a read-write transaction, committed on a clean exit."""

    @abc.abstractmethod
    def autocommit_conn(self) -> contextlib.AbstractAsyncContextManager[Conn]: ...

    # -- the engine's hooks ------------------------------------------------------------

    async def _read(self, make: PlanFactory[T]) -> T:
        """A read in a snapshot of its own, taken again if the database aborts it as a
        conflict: MySQL answers 1412 "Table definition has changed, please retry
        transaction" to a snapshot that meets a table rebuilt since it began (a
        defragmentation's OPTIMIZE TABLE; the fuzzer found it as an UNKNOWN)."""

        async def attempt() -> T:
            async with self.snapshot_conn() as conn:
                return await plans.run_async(conn, make())

        try:
            return await self.retrying(attempt)
        except Exception as e:
            # Any other error the database reports on a read is the database's trouble,
            # not the request's (seen: MariaDB losing an internal temporary table's file):
            # a retryable UNAVAILABLE, with the database's words in the log.
            if self.reported_by_database(e):
                raise BackendUnavailable(errors.one_line(e)) from e
            raise

    async def _statement(self, make: PlanFactory[T]) -> T:
        """One read statement, run again on a conflict as :meth:`_read` is (a prepared
        statement lost to a transaction-pooling proxy is one: CI's Status met it)."""

        async def attempt() -> T:
            async with self.autocommit_conn() as conn:
                return await plans.run_async(conn, make())

        return await self.retrying(attempt)

    async def _write(self, make: PlanFactory[T]) -> T:
        async def attempt() -> T:
            async with self.transaction() as conn:
                return await plans.run_async(conn, make())

        return await self.retrying(attempt)

    @property
    def unlocked_writes(self) -> bool:
        return self.dialect.read_for_write is not None

    def unlocked_conn(self) -> contextlib.AbstractAsyncContextManager[Conn]:
        """Where a batch begun from known rows writes: one statement needs no transaction
        around it (PostgreSQL's function); MySQL's pipeline carries its own."""
        return self.autocommit_conn()

    @functools.cached_property
    def known(self) -> KnownRows:
        """What this frontend's commits left (known.py), for unlocked batches to start from."""
        return KnownRows()

    async def current(self) -> tuple[int, int]:
        committed = self.known.revision  # before asking: the answer must include it
        revision, compacted = await super().current()
        if revision < committed:
            # The database lost commits this frontend made (a failover to a standby that
            # had not received them): what they left is not the database's state, even
            # if other frontends bring the revision back to the same number before the
            # CORRUPT alarm (store/corruption.py) stops them. The follower looks every
            # follow_interval. (Compared with what was known before the question was
            # sent: a commit made while it was on its way may be newer than the answer,
            # and forgetting for that, as at first, cost a remote database's batches a
            # read every few follower looks.)
            self.known.forget()
        return revision, compacted

    @contextlib.asynccontextmanager
    async def write(
        self,
        keys: Sequence[bytes] = (),
        lease_ids: Sequence[int] = (),
        alone: bool = False,
        unlocked: bool = False,
        newest: int | None = None,
    ) -> AsyncIterator[WriteTx]:
        if not self.unlocked_writes:
            async with self._write_locked(keys, lease_ids) as tx:
                yield tx
            return
        try:
            cached = None if not unlocked or newest is None or lease_ids else self.known.start(keys, newest)
            if cached is not None or (unlocked and self.dialect.read_for_write is not None):
                async with self._write_unlocked(keys, lease_ids, cached) as tx:
                    yield tx
            else:  # (MySQL reads with the lock: two round trips either way)
                async with self._write_locked(keys, lease_ids) as tx:
                    yield tx
        except BaseException as e:
            if isinstance(e, NeedsLock) and e.started_known:
                self.known.refused()  # forgets too, and backs off
            else:
                self.known.forget()
            raise
        if cached is not None:
            self.known.accepted()
        self.known.committed(tx.began_at(), tx.meta_after(), tx.rows_known())

    @contextlib.asynccontextmanager
    async def _write_locked(self, keys: Sequence[bytes], lease_ids: Sequence[int]) -> AsyncIterator[SQLWriteTx]:
        async with self.transaction() as conn:

            def run(plan: Plan[T], slow: bool = False) -> Any:
                return plans.run_async(conn, plan)

            start = await plans.run_async(conn, plans.begin_write(self.dialect, keys, lease_ids))
            tx = SQLWriteTx.started(self.dialect, run, start, keys, lease_ids)
            yield tx
            await tx.finish()

    @contextlib.asynccontextmanager
    async def _write_unlocked(
        self, keys: Sequence[bytes], lease_ids: Sequence[int], known: tuple[plans.WriteStart, list[bytes]] | None
    ) -> AsyncIterator[SQLWriteTx]:
        """A write batch in two statements and no transaction around them: the read
        (:func:`plans.begin_unlocked`, one snapshot) and the write, which takes the
        revision lock, checks that the ``meta`` rows the read saw are unchanged and its
        leases still there -- every change to ``kv`` moves the revision, and every writer
        of those rows and of leases holds the lock -- and only then writes (the function
        of migration 5). The read is as of a moment after every request of the batch
        arrived and the write commits as of that moment, or not at all (NeedsLock: the
        batch runs again, locked). Anything else a request asks of the database mid-batch
        raises NeedsLock before anything was written.

        Two round trips where the locked path takes five (BEGIN, lock, read, write,
        COMMIT); measured in docs/benchmarks.md's W1 at one client. With ``known``
        (known.py's state the batch starts from, and the keys it assumes absent) there
        is no read: one round trip, checked the same way and for those keys' absence --
        on MySQL, the only kind it has, by a guard statement in the pipeline that carries
        the lock, the writes and the COMMIT (sql.stale_guard, :meth:`unlocked_conn`).
        """

        def needs_lock(plan: Plan[T], slow: bool = False) -> Any:
            plan.close()
            raise NeedsLock("a statement inside the batch")

        try:
            if known is not None:
                start, absent = known

                async def write_later(plan: Plan[T], slow: bool = False) -> T:
                    async with self.unlocked_conn() as conn:
                        return await plans.run_async(conn, plan)

                tx = SQLWriteTx.started(self.dialect, needs_lock, start, keys, unlocked=write_later, absent=absent)
                yield tx
                await tx.finish()
                return
        except NeedsLock as e:
            e.started_known = True
            raise

        async with self.autocommit_conn() as conn:

            def run(plan: Plan[T], slow: bool = False) -> Any:
                return plans.run_async(conn, plan)

            start = await plans.run_async(conn, plans.begin_unlocked(self.dialect, keys, lease_ids))
            if start.nospace or start.corrupt:  # the locked path knows what to do
                raise NeedsLock("an alarm is raised")
            tx = SQLWriteTx.started(self.dialect, needs_lock, start, keys, lease_ids, unlocked=run)
            yield tx
            await tx.finish()

    # -- maintenance -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[str]:
        """A copy in k8s-sql's snapshot format, read a page at a time from one snapshot
        of the database, and written on a thread."""
        d = self.dialect
        async with snapshot.temporary_path() as path:
            async with self.snapshot_conn() as conn:

                async def rows(table: str, columns: str) -> AsyncIterator[Sequence[Sequence[Any]]]:
                    after: Sequence[Any] | None = None
                    while True:
                        page = await plans.run_async(conn, plans.table_page(d, table, after))
                        if page:
                            yield page
                        if len(page) < plans.PAGE_ROWS:
                            return
                        after = page[-1][: len(plans.TABLE_KEYS[table])]

                await snapshot.write(path, rows)
            yield path  # streamed after the database's snapshot is released
