"""One SQL engine for every database: each operation is a plan (plans.py) run by the
database's driver, so a query, a policy or a retry is written once.

A database's backend provides only how statements run:

- :meth:`SQLBackend._read`: a plan in one consistent snapshot (SQLite: a reader
  thread; a server: a read-only repeatable-read transaction, taken again when the
  database aborts it as a conflict);
- :meth:`SQLBackend._statement`: a one-statement plan with no transaction around it;
- :meth:`SQLBackend._write`: a small write transaction of its own (membership,
  leadership, meta rows, a compaction step), retried on conflicts;
- :meth:`SQLBackend.write`: the write batch's transaction (writetx.py);

plus what is physical: its schema, size, defragmentation and snapshot.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

from k8s_sql.backend import plans
from k8s_sql.backend.base import KeyRange, LeaseRow, LogRow, MemberRow, RangeResult, SnapshotLost, WriteTx
from k8s_sql.backend.plans import Plan
from k8s_sql.backend.sql import Dialect

T = TypeVar("T")
CONFLICT_RETRIES = 6  # attempts of a transaction aborted as a conflict
CONFLICT_BACKOFF_CAP = 0.2  # seconds: the longest pause between two attempts
PlanFactory = Callable[[], Plan[T]]  # a plan made afresh for each attempt
# Paginated LISTs whose next page's count is remembered (SQLBackend.range): the oldest
# is forgotten past this many, and no page whose keys are longer than this is kept, so
# the memo holds at most about 4 MiB of keys.
PAGE_COUNTS = 4096
PAGE_COUNT_KEY_BYTES = 1024


class SQLBackend(abc.ABC):
    """Every role of :class:`~k8s_sql.backend.base.Backend`, over four hooks."""

    dialect: Dialect
    max_key_bytes: int | None = None
    conflict_retries = CONFLICT_RETRIES  # see retrying()
    follow_interval: float = 0.025

    @property
    def unlocked_writes(self) -> bool:
        return False  # see KeyValueLog.write

    @functools.cached_property
    def _page_counts(self) -> OrderedDict[tuple[bytes, bytes | None, int], int]:
        """(next page's key, range end, revision) -> the count of keys from that key
        (see :meth:`_remember_next_page`)."""
        return OrderedDict()

    # -- what a database provides ---------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def _read(self, make: PlanFactory[T]) -> T:
        """Run a plan in one consistent snapshot."""

    @abc.abstractmethod
    async def _statement(self, make: PlanFactory[T]) -> T:
        """Run a read plan of one statement outside any transaction (its own snapshot)."""

    @abc.abstractmethod
    async def _write(self, make: PlanFactory[T]) -> T:
        """Run a plan in a small write transaction of its own, committed at its end."""

    @abc.abstractmethod
    def write(
        self,
        keys: Sequence[bytes] = (),
        lease_ids: Sequence[int] = (),
        alone: bool = False,
        unlocked: bool = False,
        newest: int | None = None,
    ) -> AbstractAsyncContextManager[WriteTx]: ...

    @abc.abstractmethod
    async def size(self) -> tuple[int, int]: ...

    @abc.abstractmethod
    async def defragment(self) -> None: ...

    @abc.abstractmethod
    def snapshot(self) -> AbstractAsyncContextManager[str]: ...

    def conflicted(self, error: BaseException) -> bool:
        return False

    def pool_stats(self) -> dict[str, int]:
        return {}

    async def follow_commits(self, on_commit: Callable[[int], None]) -> None:
        return

    # -- written once ------------------------------------------------------------------

    async def retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run a transaction again if the database aborts it as a conflict (see
        :meth:`conflicted`): InnoDB can report a deadlock when frontends starting
        together insert and lock ``meta`` rows at once, and Galera a certification
        failure; a snapshot that lost sight of ``meta`` (SnapshotLost) too. Up to
        ``conflict_retries`` attempts, backing off with jitter: 0-10 ms, doubling, at
        most ``CONFLICT_BACKOFF_CAP`` seconds."""
        attempts = self.conflict_retries
        for n in range(attempts):
            try:
                return await attempt()
            except Exception as e:
                if n == attempts - 1 or not (self.conflicted(e) or isinstance(e, SnapshotLost)):
                    raise
                await asyncio.sleep(random.uniform(0, min(0.01 * 2**n, CONFLICT_BACKOFF_CAP)))
        raise AssertionError("unreachable")

    async def current(self) -> tuple[int, int]:
        # One statement reads one snapshot: no transaction (and its two extra round
        # trips) needed. Other frontends' followers call this many times a second.
        return await self._statement(plans.current)

    async def range(self, kr: KeyRange, rev: int, limit: int, count_only: bool, keys_only: bool) -> RangeResult:
        d = self.dialect
        if kr.end is None and rev <= 0:  # one key now: one statement, its own snapshot
            return await self._statement(lambda: plans.point(d, kr.key, keys_only, count_only))
        known = self._page_counts.get((kr.key, kr.end, rev)) if rev > 0 else None
        res = await self._read(lambda: plans.range_(d, kr, rev, limit, count_only, keys_only, known))
        if limit > 0 and not count_only and len(res.rows) == limit < res.count and kr.end is not None:
            self._remember_next_page(kr, rev if rev > 0 else res.revision, res)
        return res

    def _remember_next_page(self, kr: KeyRange, rev: int, res: RangeResult) -> None:
        """A paginated LIST's next page (kube-apiserver's: the key after this page's
        last, the same end, at this page's revision) counts the range's keys less this
        page's: no COUNT of the rest of the range, which per page made a LIST of n keys
        cost O(n^2) rows counted (PostgreSQL, 100,000 keys in pages of 500: 7 s of the
        database's CPU per LIST). The state at a revision never changes; a compacted
        one is refused before the memo is read (plans.range_). The store reads one row
        more than the client's limit to tell ``more`` (ranges.fetch_limit), so the
        client's next page starts after the next-to-last row read: both are kept."""
        counts = self._page_counts
        for n in (len(res.rows), len(res.rows) - 1):
            if n <= 0:
                continue
            after = res.rows[n - 1].key + b"\x00"
            if len(after) + len(kr.end or b"") > PAGE_COUNT_KEY_BYTES:
                continue
            counts[(after, kr.end, rev)] = res.count - n
            counts.move_to_end((after, kr.end, rev))
        while len(counts) > PAGE_COUNTS:
            counts.popitem(last=False)

    async def changes(
        self, start_rev: int, end_rev: int, ranges: Sequence[KeyRange] | None, limit: int
    ) -> tuple[list[LogRow], int]:
        d = self.dialect
        return await self._read(lambda: plans.changes(d, start_rev, end_rev, ranges, limit))

    async def hash_kv(self, rev: int) -> tuple[int, int, int]:
        d = self.dialect
        return await self._read(lambda: plans.hash_kv(d, rev))

    async def leases(self) -> list[LeaseRow]:
        return await self._read(plans.leases)

    async def lease(self, lease_id: int) -> tuple[LeaseRow | None, list[bytes]]:
        d = self.dialect
        return await self._read(lambda: plans.lease(d, lease_id))

    async def expired_leases(self, now: float, limit: int) -> list[int]:
        return await self._read(lambda: plans.expired_leases(now, limit))

    async def heartbeat(self, member: MemberRow) -> None:
        await self._write(lambda: plans.heartbeat(member))

    async def members(self, alive_since: float) -> list[MemberRow]:
        return await self._read(lambda: plans.members(alive_since))

    async def remove_member(self, member_id: int) -> None:
        await self._write(lambda: plans.remove_member(member_id))

    async def meta(self, names: Sequence[str]) -> dict[str, int]:
        return await self._read(lambda: plans.meta_get(names))

    async def meta_get(self, name: str) -> int | None:
        return (await self.meta([name])).get(name)

    async def meta_set(self, name: str, value: int) -> None:
        d = self.dialect
        await self._write(lambda: plans.meta_set(d, name, value))

    async def meta_set_default(self, name: str, value: int) -> int:
        d = self.dialect
        return await self._write(lambda: plans.meta_set_default(d, name, value))

    async def meta_compare_and_set(self, expect: dict[str, int], new: dict[str, int]) -> bool:
        d = self.dialect
        return await self._write(lambda: plans.meta_compare_and_set(d, expect, new))

    async def compact_log(self, below_rev: int, batch_revs: int) -> int:
        total = 0
        while n := await self._write(lambda: plans.compact_step(below_rev, batch_revs)):
            total += n
        return total
