"""What the store asks of a database: row types, the write transaction, and the
backend's roles (etcd's maintenance server depends on role interfaces in the same way).

The store above speaks in rows of plain Python values (bytes and ints); a backend
knows SQL and its driver, never protobuf. Each role is a small protocol
(:class:`KeyValueLog`, :class:`LeaseTable`, :class:`ClusterTable`,
:class:`Maintenance`), so a consumer names the one it uses; one implementation
(engine.py) serves every database. Reads are coarse-grained (one call = one
consistent snapshot) because a snapshot costs a thread hop or a network round trip;
writes happen inside a :class:`WriteTx` that holds the revision lock until commit.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import NamedTuple, Protocol, TypeVar

T = TypeVar("T")


class Row(NamedTuple):
    """A key's state: the columns of ``kv`` (and the ``prev_*`` columns of ``log``)."""

    key: bytes
    create_rev: int
    mod_rev: int
    version: int
    lease: int
    value: bytes


class LogRow(NamedTuple):
    """One change: ``kind`` is 0 for a put, 1 for a delete; ``prev`` is the state before."""

    rev: int
    sub: int
    kind: int
    row: Row  # for a delete: the key with ``mod_rev == rev`` and zero metadata
    prev: Row | None


PUT = 0
DELETE = 1


@dataclass(frozen=True, slots=True)
class KeyRange:
    """``[key, end)`` with etcd's conventions already resolved.

    ``end is None`` means the single key ``key``; ``end == b""`` means "no upper
    bound" (etcd's ``range_end == "\\0"``).
    """

    key: bytes
    end: bytes | None

    @classmethod
    def from_etcd(cls, key: bytes, range_end: bytes) -> KeyRange:
        if not range_end:
            return cls(key, None)
        if range_end == b"\0":
            return cls(key, b"")
        return cls(key, range_end)

    def contains(self, k: bytes) -> bool:
        if self.end is None:
            return k == self.key
        if k < self.key:
            return False
        return self.end == b"" or k < self.end

    @property
    def is_empty(self) -> bool:
        return self.end is not None and self.end != b"" and self.end <= self.key


@dataclass(frozen=True, slots=True)
class RangeResult:
    rows: list[Row]
    count: int
    revision: int  # the store's current revision in the snapshot
    compact_revision: int


class LeaseRow(NamedTuple):
    id: int
    ttl: int
    expires_at: float  # unix seconds


class MemberRow(NamedTuple):
    """A frontend serving this database, as it last reported itself."""

    id: int
    name: str
    client_urls: str  # comma-separated
    heartbeat: float  # unix seconds


class CompactedError(Exception):
    """The requested revision is below the compaction point, ``compact_revision`` (as
    the database read it: possibly newer than this frontend had seen, when another
    frontend compacted)."""

    def __init__(self, compact_revision: int = 0) -> None:
        super().__init__(compact_revision)
        self.compact_revision = compact_revision


class FutureRevisionError(Exception):
    """The requested revision is above the current revision."""


class BackendUnavailable(Exception):
    """The database cannot be reached right now; the request may be retried."""


class SnapshotLost(BackendUnavailable):
    """A snapshot did not show the store's own ``meta`` rows: the database rebuilt the
    table under it (MariaDB's OPTIMIZE TABLE during a defragmentation, found by the
    fuzzer as a KeyError answered UNKNOWN). Nothing was read or written; the engine
    takes the transaction again, and answers UNAVAILABLE if it keeps happening."""


class NeedsLock(Exception):
    """An unlocked write batch (``write(..., unlocked=True)``) cannot finish without the
    revision lock: one of its requests needs a statement inside the transaction (a
    range, a lease change, a savepoint), an alarm is raised, or another batch committed
    since its read. It wrote nothing; the store runs the batch again, locked."""

    started_known = False  # the batch started from known rows without reading (backend/known.py)


class DatabaseFull(Exception):
    """The database refused to store more: its disk or file is full (SQLite's
    SQLITE_FULL, PostgreSQL's disk_full 53100, InnoDB's "table is full" 1114 and
    "disk full" 1021). Deletes and compaction may still succeed; the store raises
    etcd's NOSPACE alarm."""


class WriteTx(abc.ABC):
    """A write transaction holding the revision lock until :meth:`commit`.

    Changes to ``kv`` are visible to later reads in the same transaction; log rows
    may be buffered and written at commit.
    """

    revision: int
    compact_revision: int
    savepoints: bool  # give each request a savepoint (else see begin_request)
    dirty: bool  # the current request changed something
    nospace: bool  # etcd's NOSPACE alarm is raised (read under the revision lock)
    corrupt: bool  # the CORRUPT alarm is raised (read under the revision lock)

    @abc.abstractmethod
    async def prefetch(self, keys: Iterable[bytes], lease_ids: Iterable[int]) -> None:
        """A hint: the batch's requests will read these keys and leases."""

    @abc.abstractmethod
    def begin_request(self) -> None:
        """Start one request's changes without a savepoint: if it fails with
        :attr:`dirty` set, the caller must abandon the whole transaction."""

    @abc.abstractmethod
    async def get(self, key: bytes) -> Row | None: ...

    @abc.abstractmethod
    async def range(self, kr: KeyRange, limit: int = 0) -> list[Row]:
        """Head rows in the range, ordered by key (``limit`` 0 = all)."""

    @abc.abstractmethod
    async def count(self, kr: KeyRange) -> int: ...

    @abc.abstractmethod
    async def range_at(self, kr: KeyRange, rev: int, limit: int = 0) -> tuple[list[Row], int]:
        """Rows and count of the range as of an older revision ``rev``."""

    @abc.abstractmethod
    async def put(self, row: Row) -> None:
        """Insert or replace the ``kv`` row of ``row.key``."""

    @abc.abstractmethod
    async def delete(self, key: bytes) -> None: ...

    @abc.abstractmethod
    def log(self, change: LogRow) -> None:
        """Record a change in ``log`` (may be buffered until commit)."""

    @abc.abstractmethod
    async def lease_get(self, lease_id: int) -> LeaseRow | None: ...

    @abc.abstractmethod
    async def lease_put(self, lease: LeaseRow) -> None: ...

    @abc.abstractmethod
    async def lease_delete(self, lease_id: int) -> None: ...

    @abc.abstractmethod
    async def lease_keys(self, lease_id: int) -> list[bytes]: ...

    @abc.abstractmethod
    async def set_compact_revision(self, rev: int) -> None: ...

    @abc.abstractmethod
    async def flush(self) -> None:
        """Write what is buffered now (so that a database refusal surfaces here)."""

    @abc.abstractmethod
    async def savepoint(self) -> None:
        """Mark the start of one request's changes (see :meth:`rollback_to_savepoint`)."""

    @abc.abstractmethod
    async def release_savepoint(self) -> None: ...

    @abc.abstractmethod
    async def rollback_to_savepoint(self) -> None: ...


class KeyValueLog(Protocol):
    """The keys, their history and the revision counter: what the store reads and writes."""

    @property
    def max_key_bytes(self) -> int | None:
        """The longest key the database can index, if limited."""

    @property
    def follow_interval(self) -> float:
        """How often other frontends' commits are looked for (see watch/follower.py): the
        longest a watcher on one frontend waits for a change written through another,
        unless the database announces commits (follow_commits)."""

    def write(
        self,
        keys: Sequence[bytes] = (),
        lease_ids: Sequence[int] = (),
        alone: bool = False,
        unlocked: bool = False,
        newest: int | None = None,
    ) -> AbstractAsyncContextManager[WriteTx]:
        """A write transaction; it commits durably on a clean exit and rolls back otherwise.
        ``keys`` and ``lease_ids`` are read as it begins (the batch's requests name them):
        single-key reads of them cost nothing more. ``alone``: no other write waits for
        this one, so nothing gains from the event loop staying free while it begins and
        commits (SQLite then skips its thread hops where they cannot block: see there).

        The revision stored in ``meta`` is set to ``tx.revision`` at commit.

        ``unlocked``: where the backend can (:attr:`unlocked_writes`), read the state
        without the revision lock and write it all at the end in one statement that
        first takes the lock and checks that nothing the read saw has changed; the
        batch may then raise :class:`NeedsLock` and must be run again without it.
        ``newest``: the newest revision the store has seen; a backend that knows the
        state of ``keys`` as of that revision may start from it without reading, one
        round trip fewer (a NeedsLock then says ``started_known``).
        """

    @property
    def unlocked_writes(self) -> bool:
        """Whether ``write(..., unlocked=True)`` does anything but the locked write."""

    async def current(self) -> tuple[int, int]:
        """``(revision, compact_revision)``."""

    async def range(self, kr: KeyRange, rev: int, limit: int, count_only: bool, keys_only: bool) -> RangeResult:
        """Rows (at most ``limit``, 0 = all) and total count of the range at ``rev``
        (0 = current), from one consistent snapshot.

        Raises :class:`CompactedError` / :class:`FutureRevisionError`.
        """

    async def changes(
        self, start_rev: int, end_rev: int, ranges: Sequence[KeyRange] | None, limit: int
    ) -> tuple[list[LogRow], int]:
        """Log rows with ``start_rev <= rev <= end_rev`` (in ranges, if given), in order,
        about ``limit`` of them, and the highest revision the answer fully covers.
        Whole revisions only: a revision with more than ``limit`` rows comes whole.

        Raises :class:`CompactedError` when ``start_rev`` is below the compaction point.
        """

    def conflicted(self, error: BaseException) -> bool:
        """Whether the database aborted a transaction for conflicting with another one
        (a deadlock or serialization failure): nothing of it was applied, and running it
        again may well succeed."""

    async def retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt`` again (a few times, with jitter) while it fails as a conflict."""

    async def follow_commits(self, on_commit: Callable[[int], None]) -> None:
        """Call ``on_commit(revision)`` soon after any frontend commits ``revision``,
        until cancelled, for databases that can tell (PostgreSQL's LISTEN/NOTIFY).
        Returns at once where they cannot: the follower then relies on polling alone.
        Notifications only hurry the follower; a lost one costs one poll interval."""


class LeaseTable(Protocol):
    """Leases as rows (grants, revocations and attachments are written in write txs)."""

    async def leases(self) -> list[LeaseRow]: ...

    async def lease(self, lease_id: int) -> tuple[LeaseRow | None, list[bytes]]:
        """A lease and the keys attached to it."""

    async def expired_leases(self, now: float, limit: int) -> list[int]: ...


class ClusterTable(Protocol):
    """The frontends sharing the database, and the ``meta`` rows they coordinate through."""

    async def heartbeat(self, member: MemberRow) -> None:
        """Record that this frontend is alive (insert or refresh its ``member`` row)."""

    async def members(self, alive_since: float) -> list[MemberRow]:
        """Frontends whose last heartbeat is at or after ``alive_since``."""

    async def remove_member(self, member_id: int) -> None: ...

    async def meta(self, names: Sequence[str]) -> dict[str, int]:
        """The named ``meta`` rows that exist, read in one snapshot."""

    async def meta_get(self, name: str) -> int | None: ...

    async def meta_set(self, name: str, value: int) -> None:
        """Set ``name`` to ``value``, creating the row if absent."""

    async def meta_set_default(self, name: str, value: int) -> int:
        """Set ``name`` unless it is set; return the stored value."""

    async def meta_compare_and_set(self, expect: dict[str, int], new: dict[str, int]) -> bool:
        """Atomically: if every row of ``expect`` holds its value (an absent row holds 0),
        set the rows of ``new``; whether it did."""


class Maintenance(Protocol):
    """What etcd's maintenance service asks of the storage (and the compactor)."""

    async def compact_log(self, below_rev: int, batch_revs: int) -> int:
        """Delete log rows with ``rev < below_rev`` in batches; return rows deleted."""

    async def size(self) -> tuple[int, int]:
        """``(bytes on disk, bytes in use)``."""

    async def defragment(self) -> None: ...

    def snapshot(self) -> AbstractAsyncContextManager[str]:
        """A consistent backup: the path of a file in k8s-sql's snapshot format
        (backend/snapshot.py, without its digest trailer), removed afterwards."""

    async def hash_kv(self, rev: int) -> tuple[int, int, int]:
        """``(crc32 of the store's history up to rev, compact_revision, hash revision)``."""

    def pool_stats(self) -> dict[str, int]:
        """The connection pool's ``in_use``, ``idle`` and ``max`` connections, where
        the database has a pool (for k8s_sql_db_pool_connections)."""


class Backend(KeyValueLog, LeaseTable, ClusterTable, Maintenance, Protocol):
    """A database holding one k8s-sql store: every role, and its lifetime."""

    async def open(self) -> None:
        """Connect, create the schema if absent, migrate it forward."""

    async def open_for_reads(self) -> None:
        """Connect to a read-only replica of a store: create nothing, and check that it
        holds a store (BackendUnavailable while it cannot be reached)."""

    async def close(self) -> None: ...
