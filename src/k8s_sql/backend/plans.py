"""Every read and write of the store, written once for every database, with no I/O.

A *plan* is a generator that yields statements -- :class:`Fetch`, :class:`Execute`,
:class:`ExecuteMany` -- and is sent back each statement's result: the sans-IO
pattern of h11 and httpcore. A plan decides what to ask and what the answers mean;
a *driver* runs it: :func:`run_sync` on an SQLite connection (on SQLite's threads,
so one call is one snapshot and one thread hop), :func:`run_async` on a server
database's connection (PostgreSQL, MySQL). So a query exists once, whatever runs
it, and a plan can be tested by feeding it rows.

Results that may not fit in memory (a hash of the whole store, a snapshot) are read
in pages by key (keyset pagination inside one snapshot), never with a driver's
server-side cursor: asyncmy's unbuffered cursor has no flow control (the whole
result accumulates in its receive buffer, compacted by a memmove on every read;
measured, 30 ms stalls of the event loop and memory growing with the result).

Plans take a :class:`~k8s_sql.backend.sql.Dialect` for what differs in the text.
"""

from __future__ import annotations

import abc
import sqlite3
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any, TypeVar

from k8s_sql.backend import sql
from k8s_sql.backend.base import (
    CompactedError,
    FutureRevisionError,
    KeyRange,
    LeaseRow,
    LogRow,
    MemberRow,
    RangeResult,
    Row,
    SnapshotLost,
)
from k8s_sql.backend.hashing import StateHash
from k8s_sql.backend.sql import Dialect
from k8s_sql.metrics import observe_statement

T = TypeVar("T")
Record = Sequence[Any]


@dataclass(frozen=True, slots=True)
class Fetch:
    """Rows of a query."""

    sql: str
    params: Sequence[Any] = ()


@dataclass(frozen=True, slots=True)
class Execute:
    """A statement; its result is the number of rows it changed."""

    sql: str
    params: Sequence[Any] = ()


@dataclass(frozen=True, slots=True)
class ExecuteMany:
    sql: str
    rows: Sequence[Sequence[Any]]


@dataclass(frozen=True, slots=True)
class Load:
    """Bulk rows into a table (k8s-sql migrate): PostgreSQL's COPY where the driver has
    it, else one multi-row INSERT per batch. ``columns`` as the table names them."""

    table: str
    columns: tuple[str, ...]
    rows: Sequence[Sequence[Any]]

    @property
    def insert(self) -> str:
        return f"INSERT INTO {self.table} ({', '.join(self.columns)}) VALUES ({sql.marks(len(self.columns))})"


Step = Fetch | Execute | ExecuteMany


@dataclass(frozen=True, slots=True)
class Pipeline:
    """Statements none of which needs another's result, sent together where the driver
    can (MySQL's multi-statements: one round trip for all), else one after another; its
    result is the list of theirs, in order. A step may be the transaction's ``COMMIT``
    (:data:`COMMIT`), last: the transaction then ends with it."""

    steps: tuple[Step, ...]


COMMIT = Execute("COMMIT")

Statement = Fetch | Execute | ExecuteMany | Load | Pipeline
Plan = Generator[Statement, Any, T]

# Rows per page of a long read. Hashing a row costs about 13 us of loop CPU (measured:
# 60,000 rows of 1 KiB in 0.78 s), so 1,000-row pages held the loop for 13+ ms at a
# time; 250 keep a page near 3 ms, for one more round trip per 250 rows.
PAGE_ROWS = 250


# -- drivers --------------------------------------------------------------------------


def run_sync(conn: sqlite3.Connection, plan: Plan[T]) -> T:
    """Run a plan on an SQLite connection, in the calling thread. Each statement's
    latency is observed under the plan's name (k8s_sql_sql_statement_duration_seconds)."""
    result: Any = None
    name: str = getattr(plan, "__name__", "plan")  # the plan function's name
    try:
        while True:
            st = plan.send(result)
            started = perf_counter()
            try:
                if isinstance(st, Pipeline):
                    result = [_run_step(conn, step) for step in st.steps]
                elif isinstance(st, Load):
                    conn.executemany(st.insert, st.rows)
                    result = None
                else:
                    result = _run_step(conn, st)
            except Exception as e:
                observe_statement(name, type(e).__name__, perf_counter() - started)
                raise
            observe_statement(name, "", perf_counter() - started)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def _run_step(conn: sqlite3.Connection, st: Step) -> Any:
    if isinstance(st, Fetch):
        return conn.execute(st.sql, st.params).fetchall()
    if isinstance(st, Execute):
        return conn.execute(st.sql, st.params).rowcount
    conn.executemany(st.sql, st.rows)
    return None


class Conn(abc.ABC):
    """One server-database connection, taking ``?`` placeholders whatever the driver uses."""

    @abc.abstractmethod
    async def fetch(self, query: str, params: Sequence[Any]) -> list[Record]: ...

    @abc.abstractmethod
    async def execute(self, query: str, params: Sequence[Any]) -> int:
        """Run a statement; return the number of rows it changed."""

    @abc.abstractmethod
    async def executemany(self, query: str, rows: Sequence[Sequence[Any]]) -> None: ...

    async def load(self, st: Load) -> None:
        """Bulk rows (see :class:`Load`); a driver with a faster way overrides this."""
        await self.executemany(st.insert, st.rows)

    async def pipeline(self, steps: Sequence[Step]) -> list[Any]:
        """Run :class:`Pipeline` steps, one round trip each; a driver that can send them
        together overrides this."""
        out: list[Any] = []
        for st in steps:
            if isinstance(st, Fetch):
                out.append(await self.fetch(st.sql, st.params))
            elif isinstance(st, Execute):
                out.append(await self.execute(st.sql, st.params))
            else:
                await self.executemany(st.sql, st.rows)
                out.append(None)
        return out


async def run_async(conn: Conn, plan: Plan[T]) -> T:
    """Run a plan on a server database's connection (statements timed as in run_sync)."""
    result: Any = None
    name: str = getattr(plan, "__name__", "plan")  # the plan function's name
    try:
        while True:
            st = plan.send(result)
            started = perf_counter()
            try:
                if isinstance(st, Fetch):
                    result = await conn.fetch(st.sql, st.params)
                elif isinstance(st, Execute):
                    result = await conn.execute(st.sql, st.params)
                elif isinstance(st, Load):
                    await conn.load(st)
                    result = None
                elif isinstance(st, Pipeline):
                    result = await conn.pipeline(st.steps)
                else:
                    await conn.executemany(st.sql, st.rows)
                    result = None
            except Exception as e:
                observe_statement(name, type(e).__name__, perf_counter() - started)
                raise
            observe_statement(name, "", perf_counter() - started)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


# -- meta -------------------------------------------------------------------------------


def current() -> Plan[tuple[int, int]]:
    """``(revision, compact_revision)``, in one statement."""
    rows = yield Fetch("SELECT name, value FROM meta WHERE name IN ('revision', 'compact_revision')")
    held = {r[0]: r[1] for r in rows}
    if len(held) < 2:
        raise SnapshotLost("the meta rows are missing from this snapshot")
    return int(held["revision"]), int(held["compact_revision"])


def meta_get(names: Sequence[str]) -> Plan[dict[str, int]]:
    """The named meta rows that exist."""
    rows = yield Fetch(f"SELECT name, value FROM meta WHERE name IN ({sql.marks(len(names))})", list(names))
    return {str(r[0]): int(r[1]) for r in rows}


def meta_set(d: Dialect, name: str, value: int) -> Plan[None]:
    yield Execute(d.insert_meta_absent, (name, value))
    yield Execute("UPDATE meta SET value = ? WHERE name = ?", (value, name))


def meta_set_default(d: Dialect, name: str, value: int) -> Plan[int]:
    """Set ``name`` unless it is set; the stored value. (Frontends or --workers starting
    together race here: one insert wins.)"""
    yield Execute(d.insert_meta_absent, (name, value))
    rows = yield Fetch("SELECT value FROM meta WHERE name = ?", (name,))
    return int(rows[0][0])


def meta_compare_and_set(d: Dialect, expect: dict[str, int], new: dict[str, int]) -> Plan[bool]:
    """Set the ``new`` values if the rows hold the ``expect``-ed ones (an absent row
    holds 0), atomically: the rows are locked (or the database is, on SQLite) until the
    transaction running this plan commits."""
    names = sorted({*expect, *new})
    for name in names:  # rows must exist to be locked; frontends starting together may both insert
        yield Execute(d.insert_meta_absent, (name, 0))
    rows = yield Fetch(f"SELECT name, value FROM meta WHERE name IN ({sql.marks(len(names))}){d.for_update}", names)
    held = {str(r[0]): int(r[1]) for r in rows}
    if any(held.get(name, 0) != value for name, value in expect.items()):
        return False
    for name, value in new.items():
        yield Execute("UPDATE meta SET value = ? WHERE name = ?", (value, name))
    return True


@dataclass(frozen=True, slots=True)
class WriteStart:
    """What a write batch reads first: the revision lock's rows, and the current rows
    of the keys and leases its requests name (absent ones are missing here)."""

    revision: int
    compact_revision: int
    nospace: bool
    corrupt: bool
    rows: dict[bytes, Row]
    leases: dict[int, LeaseRow]
    # The values of sql.META_LOCKED as read (an absent row: 0): what an unlocked batch's
    # finish_batch checks are still there.
    meta: tuple[int, ...] = ()

    @classmethod
    def from_meta(cls, held: dict[str, int], rows: dict[bytes, Row], leases: dict[int, LeaseRow]) -> WriteStart:
        if "revision" not in held or "compact_revision" not in held:
            raise SnapshotLost("the meta rows are missing from this transaction")
        return cls(
            int(held["revision"]),
            int(held["compact_revision"]),
            bool(held.get("alarm_nospace")),
            bool(held.get("alarm_corrupt")),
            rows,
            leases,
            tuple(int(held.get(name) or 0) for name in sql.META_LOCKED),
        )


def begin_write(d: Dialect, keys: Sequence[bytes] = (), lease_ids: Sequence[int] = ()) -> Plan[WriteStart]:
    """The revision lock of a write batch, the rows locked until commit so that commits
    happen in revision order (compact_revision is locked along with it: only writers
    change it; the NOSPACE and CORRUPT alarms are read under the same lock, so a batch
    never writes past an alarm raised before it began), and then ``keys`` and
    ``lease_ids`` -- one pipeline: on MySQL, with the transaction's start, one round
    trip where there were four."""
    steps: list[Step] = [Fetch(sql.lock_meta(d))]
    steps += _rows_steps(d, keys)
    n_kv = len(steps) - 1
    steps += _leases_steps(lease_ids)
    results = yield Pipeline(tuple(steps))
    return WriteStart.from_meta(
        {r[0]: r[1] for r in results[0]},
        {row.key: row for part in results[1 : 1 + n_kv] for row in map(sql.to_row, part)},
        {lease.id: lease for part in results[1 + n_kv :] for lease in map(_lease_row, part)},
    )


def begin_unlocked(d: Dialect, keys: Sequence[bytes] = (), lease_ids: Sequence[int] = ()) -> Plan[WriteStart]:
    """What :func:`begin_write` reads, without the lock, in one statement (one snapshot):
    for a batch whose finish_batch checks that it still holds (``d.read_for_write``)."""
    assert d.read_for_write is not None
    rows = yield Fetch(d.read_for_write, (list(lease_ids), list(keys)))
    names, values, ids, ttls, expiries = rows[0][:5]
    return WriteStart.from_meta(
        dict(zip(names or (), values or (), strict=True)),
        {row.key: row for row in (sql.to_row(r[5:]) for r in rows if r[5] is not None)},
        {lease.id: lease for lease in map(_lease_row, zip(ids or (), ttls or (), expiries or (), strict=True))},
    )


# -- ranges ----------------------------------------------------------------------------------


def head(
    d: Dialect, kr: KeyRange, limit: int, keys_only: bool = False, count_only: bool = False, known: int | None = None
) -> Plan[tuple[list[Row], int]]:
    """Rows (at most ``limit``, 0 = all) and count of the range's current state (the
    count not asked for when ``known``)."""
    count_sql, rows_sql, params = sql.head_queries(d, kr, limit, keys_only)
    if count_only:
        return [], known if known is not None else int((yield Fetch(count_sql, params))[0][0])
    rows = [sql.to_row(r) for r in (yield Fetch(rows_sql, params))]
    if limit <= 0 or len(rows) < limit:
        return rows, len(rows)  # every row of the range is here: no need to count
    if known is not None:
        return rows, known
    return rows, int((yield Fetch(count_sql, params))[0][0])


def historical(
    d: Dialect,
    kr: KeyRange,
    rev: int,
    limit: int,
    keys_only: bool = False,
    count_only: bool = False,
    known: int | None = None,
) -> Plan[tuple[list[Row], int]]:
    """Rows and count of the range as of an older revision ``rev`` (the count not asked
    for when ``known``)."""
    count_sql, rows_sql, params = sql.historical_queries(d, kr, rev, limit, keys_only)
    count = known if known is not None else int((yield Fetch(count_sql, params))[0][0])
    if count_only or count == 0:
        return [], count
    return [sql.to_row(r) for r in (yield Fetch(rows_sql, params))], count


def range_(
    d: Dialect, kr: KeyRange, rev: int, limit: int, count_only: bool, keys_only: bool, known: int | None = None
) -> Plan[RangeResult]:
    """etcd's Range in one snapshot (mvcc's ``rangeKeys``): the revision checks, then
    the current state or a historical one. ``known``: the range's count at ``rev``
    (> 0), already known (see SQLBackend.range): not counted again."""
    now, compact = yield from current()
    if rev > now:
        raise FutureRevisionError
    if 0 < rev < compact:
        raise CompactedError(compact)
    if kr.is_empty:
        return RangeResult([], 0, now, compact)
    if rev <= 0 or rev == now:
        rows, count = yield from head(d, kr, limit, keys_only, count_only, known if rev == now else None)
    else:
        rows, count = yield from historical(d, kr, rev, limit, keys_only, count_only, known)
    return RangeResult(rows, count, now, compact)


def point(d: Dialect, key: bytes, keys_only: bool, count_only: bool) -> Plan[RangeResult]:
    """etcd's Range of one key at the current revision, in one statement (see
    sql.point_query): what Kubernetes' GETs and most of its txn compares read."""
    rows = yield Fetch(sql.point_query(d, keys_only or count_only), (key,))
    now, compact = rows[0][0], rows[0][1]
    if now is None or compact is None:
        raise SnapshotLost("the meta rows are missing from this snapshot")
    found = rows[0][2] is not None
    kvs = [sql.to_row(rows[0][2:])] if found and not count_only else []
    return RangeResult(kvs, int(found), int(now), int(compact))


def changes(
    d: Dialect, start_rev: int, end_rev: int, ranges: Sequence[KeyRange] | None, limit: int
) -> Plan[tuple[list[LogRow], int]]:
    """Log rows in ``[start_rev, end_rev]`` (in ranges, if given), whole revisions only,
    about ``limit`` of them, and the highest revision the answer covers."""
    _, compact = yield from current()
    if start_rev < compact:
        raise CompactedError(compact)
    query = sql.changes_where(start_rev, end_rev, ranges, d.key)
    if query is None:
        return [], end_rev
    where, params = query
    base = f"SELECT {d.log_columns} FROM log WHERE {where} ORDER BY rev, sub"
    rows = yield Fetch(base + f" LIMIT {int(limit) + 1}", params)
    if len(rows) <= limit:
        return [sql.log_row(r) for r in rows], end_rev
    last = rows[-1][0]
    kept = [r for r in rows if r[0] != last]
    if kept:
        return [sql.log_row(r) for r in kept], kept[-1][0]
    # one revision with more than `limit` matching rows: take all of it
    rows = yield Fetch(base, [last, last, *params[2:]])
    return [sql.log_row(r) for r in rows], last


def hash_kv(d: Dialect, rev: int) -> Plan[tuple[int, int, int]]:
    """etcd's HashKV over the history up to ``rev`` (see hashing.py), read in pages."""
    now, compact = yield from current()
    at = now if rev <= 0 else rev
    if at > now:
        raise FutureRevisionError
    if at < compact:
        raise CompactedError(compact)
    h = StateHash()
    last: tuple[int, int] | None = None
    # The changes after the compaction point, in (rev, sub) order, a page at a time. The
    # compaction revision's own change is part of the compacted state (its prev_kv is
    # no longer served, as from etcd), which the state below hashes: an etcd snapshot of
    # the store, which cannot hold that prev, hashes the same after a round trip.
    while True:
        rows = yield from log_page(d, last, compact + 1, at)
        for r in rows:
            h.add_change(sql.log_row(r))
        if len(rows) < PAGE_ROWS:
            break
        last = (rows[-1][0], rows[-1][1])
    after: bytes | None = None
    while True:  # the state at `at`, in key order
        page, after = yield from state_page(d, at, now, after)
        for row in page:
            h.add_row(row)
        if after is None:
            return h.value, compact, at


def log_page(d: Dialect, after: Sequence[Any] | None, low: int, high: int) -> Plan[list[Record]]:
    """A page of log rows with ``low <= rev <= high`` after the row ``after = (rev, sub)``
    (None: from the first), in (rev, sub) order. Two plain ranges of the primary key --
    the rest of ``after``'s revision, then the revisions above it -- rather than one
    ``rev > ? OR (rev = ? AND sub > ?)``, which SQLite answered by scanning the table
    for every page (HashKV of 100,000 changes: 37 s instead of 3)."""
    rows: list[Record] = []
    if after is not None:
        rows = list(
            (
                yield Fetch(
                    f"SELECT {d.log_columns} FROM log WHERE rev = ? AND sub > ? ORDER BY sub LIMIT {PAGE_ROWS}",
                    (after[0], after[1]),
                )
            )
        )
        low = max(low, after[0] + 1)
    if len(rows) < PAGE_ROWS:
        rows += yield Fetch(
            f"SELECT {d.log_columns} FROM log WHERE rev >= ? AND rev <= ? ORDER BY rev, sub "
            f"LIMIT {PAGE_ROWS - len(rows)}",
            (low, high),
        )
    return rows


def state_page(d: Dialect, at: int, now: int, after: bytes | None) -> Plan[tuple[list[Row], bytes | None]]:
    """The keys after ``after`` (None: from the first) as of revision ``at``, about a
    page of them, and the last key the page covers (None: the end). At the current
    revision that is ``kv`` itself; before it, the keys of ``kv`` and the keys changed
    since ``at`` bound the page, and the historical query runs on that key range
    only, so no page reads more of the log than its own keys' changes."""
    k = d.key
    start = b"" if after is None else after
    kv_page = yield Fetch(f"SELECT {d.kv_columns} FROM kv WHERE {k} > ? ORDER BY {k} LIMIT {PAGE_ROWS}", (start,))
    if at == now:
        rows = [sql.to_row(r) for r in kv_page]
        return rows, (rows[-1].key if len(rows) == PAGE_ROWS else None)
    changed = yield Fetch(
        f"SELECT DISTINCT {k} FROM log WHERE {k} > ? AND rev > ? ORDER BY {k} LIMIT {PAGE_ROWS}", (start, at)
    )
    bounds = [bytes(page[-1][0]) for page in (kv_page, changed) if len(page) == PAGE_ROWS]
    end = min(bounds) if bounds else None
    kr = KeyRange(start + b"\0", b"" if end is None else end + b"\0")
    rows = (yield from historical(d, kr, at, 0))[0]
    return rows, end


def table_page(d: Dialect, table: str, after: Sequence[Any] | None) -> Plan[list[Record]]:
    """A page of a table's rows (sql.TABLES' columns) in primary-key order, after the
    row whose key columns (the leading ones) are ``after`` (None: from the first)."""
    if table == "log":
        return (yield from log_page(d, after, 0, 1 << 62))
    columns = {"kv": d.kv_columns}.get(table, dict(sql.TABLES)[table])
    key = {"kv": d.key, "meta": "name", "lease": "id"}[table]
    if after is None:
        return list((yield Fetch(f"SELECT {columns} FROM {table} ORDER BY {key} LIMIT {PAGE_ROWS}")))
    query = f"SELECT {columns} FROM {table} WHERE {key} > ? ORDER BY {key} LIMIT {PAGE_ROWS}"
    return list((yield Fetch(query, (after[0],))))


TABLE_KEYS = {"meta": ("name",), "kv": ("key",), "log": ("rev", "sub"), "lease": ("id",)}


# -- inside a write transaction --------------------------------------------------------------


def _in_chunks(items: Sequence[Any], size: int = 64) -> Iterable[list[Any]]:
    """Chunks of at most ``size``, the last padded (repeating its last item) to a power
    of two, so an ``IN (?, …)`` statement comes in a handful of shapes that drivers
    can keep prepared."""
    for i in range(0, len(items), size):
        chunk = list(items[i : i + size])
        width = 1 << (len(chunk) - 1).bit_length()
        yield chunk + [chunk[-1]] * (width - len(chunk))


def _rows_steps(d: Dialect, keys: Sequence[bytes]) -> list[Step]:
    """The statements reading these keys' rows (in chunks of a few IN-list shapes)."""
    if len(keys) == 1:
        return [Fetch(d.get_kv, (keys[0],))]
    return [Fetch(d.get_kv_many(len(chunk)), chunk) for chunk in _in_chunks(keys)]


def _leases_steps(ids: Sequence[int]) -> list[Step]:
    return [
        Fetch(f"SELECT id, ttl, expires_at FROM lease WHERE id IN ({sql.marks(len(chunk))})", chunk)
        for chunk in _in_chunks(ids)
    ]


def _lease_row(r: Record) -> LeaseRow:
    return LeaseRow(int(r[0]), int(r[1]), float(r[2]))


def _write_kv_steps(d: Dialect, puts: Sequence[Row], deletes: Sequence[bytes]) -> list[Step]:
    steps: list[Step] = [
        Execute(f"DELETE FROM kv WHERE {d.key} IN ({sql.marks(len(chunk))})", chunk) for chunk in _in_chunks(deletes)
    ]
    if puts:
        steps.append(ExecuteMany(d.upsert_kv, puts))
    return steps


def get_rows(d: Dialect, keys: Sequence[bytes]) -> Plan[list[Row]]:
    out: list[Row] = []
    for st in _rows_steps(d, keys):
        out += [sql.to_row(r) for r in (yield st)]
    return out


def get_leases(ids: Sequence[int]) -> Plan[list[LeaseRow]]:
    out: list[LeaseRow] = []
    for st in _leases_steps(ids):
        out += [_lease_row(r) for r in (yield st)]
    return out


def write_kv(d: Dialect, puts: Sequence[Row], deletes: Sequence[bytes]) -> Plan[None]:
    for st in _write_kv_steps(d, puts, deletes):  # noqa: UP028 - a list cannot take the driver's send()
        yield st


def insert_log(d: Dialect, rows: Sequence[tuple[Any, ...]]) -> Plan[None]:
    yield ExecuteMany(d.insert_log, rows)


def lease_put(d: Dialect, lease: LeaseRow) -> Plan[None]:
    yield Execute(d.upsert_lease, tuple(lease))


def lease_delete(lease_id: int) -> Plan[None]:
    yield Execute("DELETE FROM lease WHERE id = ?", (lease_id,))


def lease_keys(d: Dialect, lease_id: int) -> Plan[list[bytes]]:
    return [bytes(r[0]) for r in (yield Fetch(d.lease_keys, (lease_id,)))]


def finish_batch(
    d: Dialect,
    puts: Sequence[Row],
    deletes: Sequence[bytes],
    log: Sequence[tuple[Any, ...]],
    revision: int,
    commit: bool = False,
    expect: Sequence[int] | None = None,
    live_leases: Sequence[int] = (),
    absent: Sequence[bytes] = (),
) -> Plan[None]:
    """A write batch's buffered rows and its new revision: one statement where the
    dialect has one (PostgreSQL: two or three round trips fewer per batch; W1 at one
    client 1,270 -> 1,110-1,135 µs of server CPU per txn, p50 1.81 -> 1.69-1.78 ms),
    else the deletes, the upserts, the log rows and the revision row as one pipeline --
    with ``commit``, the transaction's COMMIT too (MySQL: one round trip for all).

    ``expect``: the batch read without the revision lock (:func:`begin_unlocked`); the
    statement takes the lock and fails with NeedsLock unless the ``sql.META_LOCKED``
    values are still these, the ``live_leases`` still exist and the ``absent`` keys do
    not (a batch that started from backend/known.py's rows instead of reading). On MySQL,
    which has only the latter kind, a guard statement does the check (sql.stale_guard)."""
    if d.finish_batch is None:
        steps: list[Step] = []
        if expect is not None:
            # MySQL: a batch begun from known rows, in one pipeline with its BEGIN and
            # COMMIT -- the lock, the guard, then the writes (one round trip).
            assert d.pipelines and commit and not live_leases, "a batch that did not read, on MySQL"
            steps += [Fetch(sql.lock_meta(d)), Fetch(sql.stale_guard(d, len(absent)), (*expect, *absent))]
        steps += _write_kv_steps(d, puts, deletes)
        if log:
            steps.append(ExecuteMany(d.insert_log, log))
        steps.append(Execute("UPDATE meta SET value = ? WHERE name = ?", (revision, "revision")))
        if commit:
            steps.append(COMMIT)
        yield Pipeline(tuple(steps))
        return
    kv_columns = [list(c) for c in zip(*puts, strict=True)] if puts else [[] for _ in range(6)]
    log_columns = [list(c) for c in zip(*log, strict=True)] if log else [[] for _ in range(13)]
    checked = None if expect is None else list(expect)
    params = [checked, list(live_leases), list(absent), list(deletes), *kv_columns, *log_columns, revision]
    yield Execute(d.finish_batch, params)


def set_meta(name: str, value: int) -> Plan[None]:
    """Update an existing meta row (inside a write batch: the row is locked)."""
    yield Execute("UPDATE meta SET value = ? WHERE name = ?", (value, name))


def statement(text: str) -> Plan[None]:
    """A parameterless statement (savepoints)."""
    yield Execute(text)


# -- leases, members, compaction -----------------------------------------------------------


def leases() -> Plan[list[LeaseRow]]:
    rows = yield Fetch("SELECT id, ttl, expires_at FROM lease ORDER BY id")
    return [_lease_row(r) for r in rows]


def lease(d: Dialect, lease_id: int) -> Plan[tuple[LeaseRow | None, list[bytes]]]:
    rows = yield Fetch("SELECT id, ttl, expires_at FROM lease WHERE id = ?", (lease_id,))
    if not rows:
        return None, []
    r = rows[0]
    keys = yield from lease_keys(d, lease_id)
    return _lease_row(r), keys


def expired_leases(now: float, limit: int) -> Plan[list[int]]:
    rows = yield Fetch(f"SELECT id FROM lease WHERE expires_at <= ? ORDER BY expires_at LIMIT {int(limit)}", (now,))
    return [int(r[0]) for r in rows]


def heartbeat(member: MemberRow) -> Plan[None]:
    """Insert or refresh this frontend's ``member`` row."""
    changed = yield Execute(
        "UPDATE member SET name = ?, urls = ?, heartbeat = ? WHERE id = ?",
        (member.name, member.client_urls, member.heartbeat, member.id),
    )
    if changed == 0:
        yield Execute("INSERT INTO member (id, name, urls, heartbeat) VALUES (?, ?, ?, ?)", tuple(member))


def members(alive_since: float) -> Plan[list[MemberRow]]:
    rows = yield Fetch("SELECT id, name, urls, heartbeat FROM member WHERE heartbeat >= ? ORDER BY id", (alive_since,))
    return [MemberRow(int(r[0]), str(r[1]), str(r[2]), float(r[3])) for r in rows]


def remove_member(member_id: int) -> Plan[None]:
    yield Execute("DELETE FROM member WHERE id = ?", (member_id,))


def compact_step(below_rev: int, batch_revs: int) -> Plan[int]:
    """Delete the log rows of the oldest ``batch_revs`` revisions below ``below_rev``; the
    rows deleted (0: nothing is left below it). Small steps keep each transaction, and
    the locks it holds, short."""
    rows = yield Fetch("SELECT MIN(rev) FROM log")
    lowest = rows[0][0]
    if lowest is None or lowest >= below_rev:
        return 0
    return int((yield Execute("DELETE FROM log WHERE rev < ?", (min(below_rev, int(lowest) + batch_revs),))))
