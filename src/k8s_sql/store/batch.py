"""Group commit: queued writes applied in batches, one database transaction each.

One transaction holds the revision lock, applies every queued request in order --
each with its own compare evaluation and its own revision (txn.py) -- commits
once, and only then answers all of them and tells the subscribers. One fsync
serves many writes, and commit order is revision order.

A request that fails stays alone in its failure: a batch is replayed with
savepoints when a request fails after changing something or the database refuses
a statement, and run again without a request whose refusal ended the whole
transaction (see :meth:`GroupCommit._run_batch`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

from k8s_sql import errors, metrics
from k8s_sql.backend.base import BackendUnavailable, DatabaseFull, KeyValueLog, LogRow, NeedsLock
from k8s_sql.store.corruption import CATCH_UP_DELAYS, CorruptAlarm, LostCommits
from k8s_sql.store.revisions import Revisions
from k8s_sql.store.txn import Request

log = logging.getLogger(__name__)

CommitListener = Callable[[int, list[LogRow]], None]
MAX_BATCH = 256  # requests per transaction
# Gathering a batch (GroupCommit.run): when fewer requests are queued than the last
# batch held, wait for as many, at most this long and at most LINGER_SHARE of the last
# batch's own time. A batch's fixed cost (its round trips, its commit, publishing) is
# paid per batch, so batches that shrink because commits got faster cost CPU per
# request: MySQL's two-round-trip batches, taken as soon as one request was queued,
# held 1.8 requests at 16 W1 clients and ran at 780 txn/s where seven-round-trip ones
# ran at 1,160. A lone client (last batch of one) never waits.
LINGER_MAX = 0.002
LINGER_SHARE = 1.0


@dataclass
class _Queued:
    apply: Callable[[Request], Awaitable[Any]]
    future: asyncio.Future[Any]
    keys: list[bytes]  # single keys the request will read: the batch reads them up front
    leases: list[int]
    adds_data: bool  # refused while the NOSPACE alarm is raised (etcd's applierV3Capped)
    # Reads and writes only the single keys and leases named above, so it can run in an
    # unlocked batch (KeyValueLog.write): puts, single-key deletes, txns of such.
    single_keys: bool = False
    queued_at: float = field(default_factory=perf_counter)


@dataclass
class Tally:
    """What a batch's successful requests did, published to the metrics once it
    committed (a batch replayed or rolled back counts nothing)."""

    puts: int = 0
    deletes: int = 0
    ranges: int = 0
    txns: int = 0
    revoked: int = 0
    granted_ttls: list[int] = field(default_factory=list)
    expiry_lags: list[float] = field(default_factory=list)

    def add(self, req: Request) -> None:
        self.puts += req.puts
        self.deletes += req.deletes
        self.ranges += req.ranges
        self.txns += req.txns
        self.revoked += req.revoked
        if req.granted_ttl:
            self.granted_ttls.append(req.granted_ttl)
        if req.expiry_lag >= 0:
            self.expiry_lags.append(req.expiry_lag)

    def publish(self) -> None:
        if self.puts:
            metrics.PUTS.inc(self.puts)
        if self.deletes:
            metrics.DELETES.inc(self.deletes)
        if self.ranges:
            metrics.RANGES.inc(self.ranges)
        if self.txns:
            metrics.TXNS.inc(self.txns)
        if self.revoked:
            metrics.LEASES_REVOKED.inc(self.revoked)
        for ttl in self.granted_ttls:
            metrics.LEASES_GRANTED.inc()
            metrics.LEASE_TTL.observe(ttl)
        for lag in self.expiry_lags:
            metrics.LEASE_EXPIRY_LAG_SECONDS.observe(lag)


class _Replay(Exception):
    """A request failed after changing something: redo the batch with savepoints."""


class _Excluded(Exception):
    """A request's failure ended the whole transaction (SQLite rolls back on
    SQLITE_FULL; a savepoint cannot undo that): run the batch again without it."""

    def __init__(self, index: int, error: errors.EtcdError) -> None:
        super().__init__(index)
        self.index = index
        self.error = error


class GroupCommit:
    def __init__(self, backend: KeyValueLog, revisions: Revisions, max_batch: int = MAX_BATCH) -> None:
        self.backend = backend
        self.revisions = revisions
        self.max_batch = max_batch
        self._queue: asyncio.Queue[_Queued] = asyncio.Queue()
        self._subscribers: list[CommitListener] = []
        self._last_size = 0  # requests in the last batch
        self._last_seconds = 0.0  # and how long it took
        self._want = 0  # while gathering: wake when this many are queued
        self._enough = asyncio.Event()
        # Called when the database reports that it is full (the NOSPACE alarm's raiser).
        self.on_database_full: Callable[[], None] | None = None
        # The CORRUPT alarm: a batch that finds the database behind what was served
        # rolls back rather than hand out a revision again (see store/corruption.py).
        self.alarm: CorruptAlarm | None = None

    def subscribe(self, listener: CommitListener) -> None:
        """Call ``listener(revision, changes)`` after every commit, before answering."""
        self._subscribers.append(listener)

    async def submit(
        self,
        apply: Callable[[Request], Awaitable[Any]],
        keys: list[bytes] | None = None,
        leases: list[int] | None = None,
        adds_data: bool = False,
        single_keys: bool = False,
    ) -> Any:
        """Apply ``apply`` in a coming batch; its result once the batch committed.
        ``single_keys``: it reads and writes nothing but ``keys`` and ``leases``."""
        if self.alarm is not None:
            self.alarm.check()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Queued(apply, fut, keys or [], leases or [], adds_data, single_keys=single_keys))
        if self._want and self._queue.qsize() >= self._want:
            self._enough.set()
        return await fut

    def fail_queued(self) -> None:
        """Answer what is still queued with etcd's "server stopped"."""
        while not self._queue.empty():
            q = self._queue.get_nowait()
            if not q.future.done():
                q.future.set_exception(errors.Stopped())

    async def _gather(self) -> list[_Queued]:
        """The next batch: what is queued once a request is, or, when that is fewer than
        the last batch held, as many as that after a short wait (LINGER_MAX)."""
        first = await self._queue.get()
        want = min(self._last_size, self.max_batch) - 1
        if want > 0 and self._queue.qsize() < want:
            linger = min(LINGER_MAX, self._last_seconds * LINGER_SHARE)
            self._want = want
            self._enough.clear()
            try:
                await asyncio.wait_for(self._enough.wait(), linger)
            except TimeoutError:
                pass
            finally:
                self._want = 0
        batch = [first]
        while len(batch) < self.max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def run(self) -> None:
        while True:
            batch = await self._gather()
            began = perf_counter()
            try:
                await self._apply_catching_up(batch)
            except asyncio.CancelledError:
                for q in batch:
                    if not q.future.done():
                        q.future.set_exception(errors.Stopped())
                raise
            except LostCommits as lost:  # rolled back: nothing in it is acknowledged
                raised = self.alarm is not None and (lost.seen == 0 or self.alarm.suspect(lost))
                for q in batch:
                    if not q.future.done():
                        q.future.set_exception(errors.Corrupt() if raised else errors.DatabaseUnavailable())
            except Exception as e:  # the database failed the batch as a whole: nothing in it is acknowledged
                log.warning("write batch of %d failed: %s", len(batch), errors.one_line(e))
                full = isinstance(e, DatabaseFull)
                if full:
                    self._database_full()
                for q in batch:
                    if not q.future.done():
                        q.future.set_exception(errors.NoSpace() if full else errors.DatabaseUnavailable())
            self._last_size, self._last_seconds = len(batch), perf_counter() - began

    async def _apply_catching_up(self, batch: list[_Queued]) -> None:
        """Apply the batch; one that finds the database behind what was served (rolled
        back, nothing acknowledged) is run again after short pauses (CATCH_UP_DELAYS)
        before LostCommits reaches :meth:`run`: a server merely behind catches up within
        them, and one that lost commits stays behind."""
        for pause in CATCH_UP_DELAYS:
            try:
                return await self._apply_batch(batch)
            except LostCommits as lost:
                if lost.seen == 0:  # the alarm is raised: no point asking again
                    raise
            await asyncio.sleep(pause)
        await self._apply_batch(batch)

    async def _apply_batch(self, batch: list[_Queued]) -> None:
        began = perf_counter()
        metrics.BATCH_REQUESTS.observe(len(batch))
        wait = metrics.QUEUE_WAIT_SECONDS
        for q in batch:
            wait.observe(began - q.queued_at)

        async def attempt() -> tuple[int, int, list[LogRow], list[tuple[bool, Any]], Tally]:
            refused: dict[int, errors.EtcdError] = {}
            try:
                if self.backend.unlocked_writes and all(q.single_keys for q in batch if not q.future.done()):
                    # First from what this frontend's own commits left, if they are the
                    # newest it knows of (no read: one round trip), then with a read.
                    newest: int | None = self.revisions.current
                    while True:
                        try:
                            return await self._run_batch(batch, False, refused, unlocked=True, newest=newest)
                        except NeedsLock as e:
                            metrics.UNLOCKED_BATCHES_RETRIED.labels("known" if e.started_known else "read").inc()
                            log.debug("unlocked write batch runs again: %s", errors.one_line(e))
                            if not e.started_known:
                                break
                            newest = None
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
        revision, compact, committed, results, tally = await self.backend.retrying(attempt)
        if self.alarm is not None:
            self.alarm.committed()
        tally.publish()
        self.revisions.observe(revision, compact)
        if committed:
            for listener in self._subscribers:
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
        return not isinstance(e, (BackendUnavailable, LostCommits)) and not self.backend.conflicted(e)

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
        self,
        batch: list[_Queued],
        savepoints: bool,
        refused: dict[int, errors.EtcdError],
        unlocked: bool = False,
        newest: int | None = None,
    ) -> tuple[int, int, list[LogRow], list[tuple[bool, Any]], Tally]:
        """Apply the batch in one database transaction. Without savepoints, a request
        that fails after changing something raises :class:`_Replay` (the transaction
        is rolled back), and a statement the database refuses fails the transaction;
        with them, each request's statements run inside its own savepoint, so a failed
        request -- an etcd error or a database refusal -- is undone on its own and the
        rest of the batch commits as if it had been sent alone.

        ``unlocked``: read first and write at the end, checked (KeyValueLog.write); it
        raises NeedsLock, having written nothing, when it cannot. ``newest``: it may
        start from the backend's known rows as of this revision instead of reading."""
        results: list[tuple[bool, Any]] = []
        committed: list[LogRow] = []
        tally = Tally()
        live = [q for q in batch if not q.future.done()]
        keys = list(dict.fromkeys(k for q in live for k in q.keys))
        lease_ids = list(dict.fromkeys(i for q in live for i in q.leases))
        alone = len(live) == 1 and self._queue.empty()
        seen = self.revisions.current  # all committed before an unlocked batch reads
        before = self.revisions.committing
        try:
            async with self.backend.write(
                keys, lease_ids, alone, unlocked, newest
            ) as tx:  # with the revision lock, their rows
                alarm = self.alarm
                if alarm is not None:
                    if tx.corrupt or alarm.raised:
                        raise LostCommits(tx.revision, 0)
                    # Under the revision lock the row holds the newest commit: nothing seen
                    # before may be newer (the revision about to be handed out was never
                    # served). An unlocked read holds every commit made before it began.
                    alarm.verify(tx.revision, seen if unlocked else self.revisions.current)
                tx.savepoints = savepoints
                for index, q in enumerate(batch):
                    if q.future.done():  # the caller went away before we started
                        results.append((False, None))
                        continue
                    if index in refused:  # its failure ended an earlier attempt's transaction
                        results.append((False, refused[index]))
                        continue
                    req = Request(tx, tx.revision)
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
                    tally.add(req)
                revision, compact = tx.revision, tx.compact_revision
                if committed:
                    self.revisions.committing = revision
                # etcd's backend commit: leaving the block writes what the transaction
                # buffered (writetx.py) and commits.
                began = perf_counter()
        except NeedsLock:
            # Not committed, and the revision it meant to use may be another frontend's:
            # the follower must not take that one for this frontend's own.
            self.revisions.committing = before
            raise
        metrics.COMMIT_SECONDS.observe(perf_counter() - began)
        return revision, compact, committed, results, tally
