"""The shared implementation of network database backends (PostgreSQL, MySQL).

Everything but connecting, placeholders, types and a few statements is the same
for every server database, so it lives here once, written against :class:`Conn`, a
minimal async driver adapter. A dialect module (postgres.py, mysql.py) supplies the
adapter, the schema and the handful of statements whose syntax differs.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import os
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from typing import Any, ParamSpec, TypeVar

from k8s_sql import errors
from k8s_sql.backend import migrations, sql
from k8s_sql.backend.base import (
    Backend,
    BackendUnavailable,
    CompactedError,
    FutureRevisionError,
    KeyRange,
    LeaseRow,
    LogRow,
    MemberRow,
    RangeResult,
    Row,
    WriteTx,
)
from k8s_sql.backend.buffered import BufferedWriteTx
from k8s_sql.backend.hashing import StateHash

Record = Sequence[Any]
P = ParamSpec("P")
T = TypeVar("T")


class Conn(abc.ABC):
    """One database connection, with ``?`` placeholders whatever the driver uses."""

    @abc.abstractmethod
    async def fetch(self, query: str, *params: Any) -> list[Record]: ...

    @abc.abstractmethod
    async def execute(self, query: str, *params: Any) -> int:
        """Run a statement; return the number of rows it changed."""

    @abc.abstractmethod
    async def executemany(self, query: str, rows: Sequence[Sequence[Any]]) -> None: ...

    async def fetchrow(self, query: str, *params: Any) -> Record | None:
        rows = await self.fetch(query, *params)
        return rows[0] if rows else None

    async def fetchval(self, query: str, *params: Any) -> Any:
        row = await self.fetchrow(query, *params)
        return None if row is None else row[0]


def _row(r: Record) -> Row:
    return Row(bytes(r[0]), r[1], r[2], r[3], r[4], bytes(r[5]))


class Queries:
    """The statements of one dialect, built once."""

    def __init__(self, d: sql.Dialect, upsert_kv: str, upsert_lease: str, insert_meta_absent: str) -> None:
        self.d = d
        self.get = f"SELECT {d.kv_columns} FROM kv WHERE {d.key} = ?"
        self._get_many: dict[int, str] = {}
        self.upsert_kv = upsert_kv
        self.delete_kv = f"DELETE FROM kv WHERE {d.key} = ?"
        self.insert_log = f"INSERT INTO log ({d.log_columns}) VALUES ({', '.join('?' * 13)})"
        # "lease <> 0" repeats the partial index's condition: with only "lease = ?" the
        # planner cannot tell that the parameter is not 0, and scans the whole table.
        self.lease_keys = f"SELECT {d.key} FROM kv WHERE lease = ? AND lease <> 0 ORDER BY {d.key}"
        self.upsert_lease = upsert_lease
        self.insert_meta_absent = insert_meta_absent  # (name, value) unless name exists

    def get_many(self, n: int) -> str:
        q = self._get_many.get(n)
        if q is None:
            q = self._get_many[n] = f"SELECT {self.d.kv_columns} FROM kv WHERE {self.d.key} IN ({_marks(n)})"
        return q


async def read_meta(conn: Conn) -> tuple[int, int]:
    rows = {
        r[0]: r[1]
        for r in await conn.fetch("SELECT name, value FROM meta WHERE name IN ('revision', 'compact_revision')")
    }
    return int(rows["revision"]), int(rows["compact_revision"])


async def head(
    conn: Conn, d: sql.Dialect, kr: KeyRange, limit: int, keys_only: bool, count_only: bool
) -> tuple[list[Row], int]:
    count_sql, rows_sql, params = sql.head_queries(d, kr, limit, keys_only)
    if count_only:
        return [], int(await conn.fetchval(count_sql, *params))
    rows = [_row(r) for r in await conn.fetch(rows_sql, *params)]
    if limit <= 0 or len(rows) < limit:
        return rows, len(rows)  # every row of the range is here: no need to count
    return rows, int(await conn.fetchval(count_sql, *params))


async def historical(
    conn: Conn, d: sql.Dialect, kr: KeyRange, rev: int, limit: int, keys_only: bool, count_only: bool
) -> tuple[list[Row], int]:
    count_sql, rows_sql, params = sql.historical_queries(d, kr, rev, limit, keys_only)
    count = int(await conn.fetchval(count_sql, *params))
    if count_only or count == 0:
        return [], count
    return [_row(r) for r in await conn.fetch(rows_sql, *params)], count


def _in_chunks(items: Sequence[Any], size: int = 64) -> Iterator[Sequence[Any]]:
    """Chunks of at most ``size``, the last padded (repeating its last item) to a power
    of two, so an ``IN (?, …)`` statement comes in a handful of shapes that drivers
    can keep prepared."""
    for i in range(0, len(items), size):
        chunk = list(items[i : i + size])
        width = 1 << (len(chunk) - 1).bit_length()
        yield chunk + [chunk[-1]] * (width - len(chunk))


def _marks(n: int) -> str:
    return ", ".join("?" * n)


class GenericWriteTx(BufferedWriteTx):
    def __init__(self, conn: Conn, q: Queries, revision: int, compact_revision: int) -> None:
        super().__init__(revision, compact_revision)
        self.conn = conn
        self.q = q

    async def _db_rows(self, keys: Sequence[bytes]) -> list[Row]:
        if len(keys) == 1:
            r = await self.conn.fetchrow(self.q.get, keys[0])
            return [] if r is None else [_row(r)]
        out: list[Row] = []
        for chunk in _in_chunks(keys):
            out += [_row(r) for r in await self.conn.fetch(self.q.get_many(len(chunk)), *chunk)]
        return out

    async def _db_leases(self, ids: Sequence[int]) -> list[LeaseRow]:
        out: list[LeaseRow] = []
        for chunk in _in_chunks(ids):
            rows = await self.conn.fetch(
                f"SELECT id, ttl, expires_at FROM lease WHERE id IN ({_marks(len(chunk))})", *chunk
            )
            out += [LeaseRow(int(r[0]), int(r[1]), float(r[2])) for r in rows]
        return out

    async def _db_range(self, kr: KeyRange, limit: int) -> list[Row]:
        return (await head(self.conn, self.q.d, kr, limit, False, False))[0]

    async def _db_count(self, kr: KeyRange) -> int:
        return (await head(self.conn, self.q.d, kr, 0, False, True))[1]

    async def _db_range_at(self, kr: KeyRange, rev: int, limit: int) -> tuple[list[Row], int]:
        return await historical(self.conn, self.q.d, kr, rev, limit, False, False)

    async def _db_upsert_rows(self, rows: Sequence[Row]) -> None:
        await self.conn.executemany(self.q.upsert_kv, rows)

    async def _db_delete_rows(self, keys: Sequence[bytes]) -> None:
        for chunk in _in_chunks(keys):
            await self.conn.execute(f"DELETE FROM kv WHERE {self.q.d.key} IN ({_marks(len(chunk))})", *chunk)

    async def _db_insert_log(self, rows: Sequence[tuple[Any, ...]]) -> None:
        await self.conn.executemany(self.q.insert_log, rows)

    async def _db_lease_put(self, lease: LeaseRow) -> None:
        await self.conn.execute(self.q.upsert_lease, *lease)

    async def _db_lease_delete(self, lease_id: int) -> None:
        await self.conn.execute("DELETE FROM lease WHERE id = ?", lease_id)

    async def _db_lease_keys(self, lease_id: int) -> list[bytes]:
        return [bytes(r[0]) for r in await self.conn.fetch(self.q.lease_keys, lease_id)]

    async def _db_set_meta(self, name: str, value: int) -> None:
        await self.conn.execute("UPDATE meta SET value = ? WHERE name = ?", value, name)

    async def _db_execute(self, statement: str) -> None:
        await self.conn.execute(statement)


def snapshot_read(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """A read in a snapshot of its own, taken again if the database aborts it as a
    conflict: MySQL answers 1412 "Table definition has changed, please retry
    transaction" to a snapshot that meets a table rebuilt since it began (a
    defragmentation's OPTIMIZE TABLE; the fuzzer found it as an UNKNOWN)."""

    @functools.wraps(fn)
    async def read(*args: P.args, **kwargs: P.kwargs) -> T:
        backend = args[0]
        assert isinstance(backend, GenericBackend)
        try:
            return await backend.retrying(lambda: fn(*args, **kwargs))
        except Exception as e:
            # Any other error the database reports on a read is the database's trouble,
            # not the request's (seen: MariaDB losing an internal temporary table's file):
            # a retryable UNAVAILABLE, with the database's words in the log.
            if backend.reported_by_database(e):
                raise BackendUnavailable(errors.one_line(e)) from e
            raise

    return read


class GenericBackend(Backend):
    """A backend on a server database, given a dialect's connections and statements."""

    q: Queries

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

    # -- writes ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[WriteTx]:
        async with self.transaction() as conn:
            # The revision lock: held until commit, so commits happen in revision order.
            # (compact_revision is locked along with it: only writers change it.)
            meta: dict[str, Any] = dict(
                (r[0], r[1])
                for r in await conn.fetch(
                    "SELECT name, value FROM meta WHERE name IN ('revision', 'compact_revision', 'alarm_nospace') "
                    "FOR UPDATE"
                )
            )
            tx = GenericWriteTx(conn, self.q, int(meta["revision"]), int(meta["compact_revision"]))
            tx.nospace = bool(meta.get("alarm_nospace"))
            yield tx
            await tx.finish()

    async def meta_set_default(self, name: str, value: int) -> int:
        return await self.retrying(lambda: self._meta_set_default(name, value))

    async def _meta_set_default(self, name: str, value: int) -> int:
        # Frontends (or --workers) starting together race here: one insert wins.
        async with self.autocommit_conn() as conn:
            await conn.execute(self.q.insert_meta_absent, name, value)
            return int(await conn.fetchval("SELECT value FROM meta WHERE name = ?", name))

    async def meta_set(self, name: str, value: int) -> None:
        await self.retrying(lambda: self._meta_set(name, value))

    async def _meta_set(self, name: str, value: int) -> None:
        async with self.transaction() as conn:
            await conn.execute(self.q.insert_meta_absent, name, value)
            await conn.execute("UPDATE meta SET value = ? WHERE name = ?", value, name)

    async def heartbeat(self, member: MemberRow) -> None:
        await self.retrying(lambda: self._heartbeat(member))

    async def _heartbeat(self, member: MemberRow) -> None:
        async with self.transaction() as conn:
            if (
                await conn.execute(
                    "UPDATE member SET name = ?, urls = ?, heartbeat = ? WHERE id = ?",
                    member.name,
                    member.client_urls,
                    member.heartbeat,
                    member.id,
                )
                == 0
            ):
                await conn.execute("INSERT INTO member (id, name, urls, heartbeat) VALUES (?, ?, ?, ?)", *member)

    @snapshot_read
    async def members(self, alive_since: float) -> list[MemberRow]:
        async with self.snapshot_conn() as conn:
            rows = await conn.fetch(
                "SELECT id, name, urls, heartbeat FROM member WHERE heartbeat >= ? ORDER BY id", alive_since
            )
            return [MemberRow(int(r[0]), str(r[1]), str(r[2]), float(r[3])) for r in rows]

    async def remove_member(self, member_id: int) -> None:
        async with self.autocommit_conn() as conn:
            await conn.execute("DELETE FROM member WHERE id = ?", member_id)

    async def try_lead(self, member_id: int, now: float, until: float) -> int:
        return await self.retrying(lambda: self._try_lead(member_id, now, until))

    async def _try_lead(self, member_id: int, now: float, until: float) -> int:
        async with self.transaction() as conn:
            # The rows must exist to be locked; frontends starting together may both
            # insert them, so the insert tolerates the other's.
            for name in ("leader", "leader_until"):
                await conn.execute(self.q.insert_meta_absent, name, 0)
            rows = await conn.fetch("SELECT name, value FROM meta WHERE name IN ('leader', 'leader_until') FOR UPDATE")
            held = {str(r[0]): int(r[1]) for r in rows}
            leader, leader_until = held["leader"], held["leader_until"] / 1000
            if leader not in (0, member_id) and leader_until > now:
                return leader
            for name, value in (("leader", member_id), ("leader_until", int(until * 1000))):
                await conn.execute("UPDATE meta SET value = ? WHERE name = ?", value, name)
            return member_id

    async def compact_log(self, below_rev: int, batch_revs: int) -> int:
        total = 0
        while True:
            async with self.autocommit_conn() as conn:
                lowest = await conn.fetchval("SELECT MIN(rev) FROM log")
                if lowest is None or lowest >= below_rev:
                    return total
                total += await conn.execute("DELETE FROM log WHERE rev < ?", min(below_rev, int(lowest) + batch_revs))

    # -- reads ---------------------------------------------------------------------

    async def current(self) -> tuple[int, int]:
        # One statement reads one snapshot: no transaction (and its two extra round
        # trips) needed. Other frontends' followers call this many times a second.
        async with self.autocommit_conn() as conn:
            return await read_meta(conn)

    @snapshot_read
    async def range(self, kr: KeyRange, rev: int, limit: int, count_only: bool, keys_only: bool) -> RangeResult:
        async with self.snapshot_conn() as conn:
            current, compact = await read_meta(conn)
            if rev > current:
                raise FutureRevisionError
            if 0 < rev < compact:
                raise CompactedError
            if kr.is_empty:
                return RangeResult([], 0, current, compact)
            if rev <= 0 or rev == current:
                rows, count = await head(conn, self.q.d, kr, limit, keys_only, count_only)
            else:
                rows, count = await historical(conn, self.q.d, kr, rev, limit, keys_only, count_only)
            return RangeResult(rows, count, current, compact)

    @snapshot_read
    async def changes(
        self, start_rev: int, end_rev: int, ranges: Sequence[KeyRange] | None, limit: int
    ) -> tuple[list[LogRow], int]:
        async with self.snapshot_conn() as conn:
            _, compact = await read_meta(conn)
            if start_rev < compact:
                raise CompactedError
            query = sql.changes_query(self.q.d, start_rev, end_rev, ranges)
            if query is None:
                return [], end_rev
            where, params = query
            base = f"SELECT {self.q.d.log_columns} FROM log WHERE {where} ORDER BY rev, sub"
            rows = await conn.fetch(base + f" LIMIT {int(limit) + 1}", *params)
            if len(rows) <= limit:
                return [sql.log_row(r) for r in rows], end_rev
            last = rows[-1][0]
            kept = [r for r in rows if r[0] != last]
            if kept:
                return [sql.log_row(r) for r in kept], kept[-1][0]
            # one revision with more than `limit` matching rows: take all of it
            rows = await conn.fetch(base, last, last, *params[2:])
            return [sql.log_row(r) for r in rows], last

    @snapshot_read
    async def leases(self) -> list[LeaseRow]:
        async with self.snapshot_conn() as conn:
            rows = await conn.fetch("SELECT id, ttl, expires_at FROM lease ORDER BY id")
            return [LeaseRow(int(r[0]), int(r[1]), float(r[2])) for r in rows]

    @snapshot_read
    async def lease(self, lease_id: int) -> tuple[LeaseRow | None, list[bytes]]:
        async with self.snapshot_conn() as conn:
            r = await conn.fetchrow("SELECT id, ttl, expires_at FROM lease WHERE id = ?", lease_id)
            if r is None:
                return None, []
            keys = [bytes(k[0]) for k in await conn.fetch(self.q.lease_keys, lease_id)]
            return LeaseRow(int(r[0]), int(r[1]), float(r[2])), keys

    @snapshot_read
    async def expired_leases(self, now: float, limit: int) -> list[int]:
        async with self.snapshot_conn() as conn:
            rows = await conn.fetch(
                f"SELECT id FROM lease WHERE expires_at <= ? ORDER BY expires_at LIMIT {int(limit)}", now
            )
            return [int(r[0]) for r in rows]

    @snapshot_read
    async def meta_get(self, name: str) -> int | None:
        async with self.snapshot_conn() as conn:
            v = await conn.fetchval("SELECT value FROM meta WHERE name = ?", name)
            return None if v is None else int(v)

    # -- maintenance -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[tuple[int, AsyncIterator[bytes]]]:
        """A consistent copy in k8s-sql's portable snapshot format: an SQLite database."""
        from k8s_sql.backend.sqlite import SCHEMA as SQLITE_SCHEMA

        fd, tmp = tempfile.mkstemp(prefix="k8s-sql-snapshot-", suffix=".db")
        os.close(fd)
        try:
            out = sqlite3.connect(tmp)
            try:
                # The portable format is an SQLite database at this k8s-sql's schema version
                # (the meta rows copied below carry the same version number).
                for stmt in [*SQLITE_SCHEMA.split(";"), *migrations.all_statements("sqlite")]:
                    if stmt.strip():
                        out.execute(stmt)
                async with self.snapshot_conn() as conn:
                    for table, columns, src in (
                        ("meta", "name, value", "name, value"),
                        ("kv", sql.KV_COLUMNS, self.q.d.kv_columns),
                        ("log", sql.LOG_COLUMNS, self.q.d.log_columns),
                        ("lease", "id, ttl, expires_at", "id, ttl, expires_at"),
                    ):
                        marks = ", ".join("?" * (columns.count(",") + 1))
                        rows = await conn.fetch(f"SELECT {src} FROM {table}")
                        out.executemany(
                            f"INSERT INTO {table} ({columns}) VALUES ({marks})",
                            [tuple(bytes(v) if isinstance(v, (bytearray, memoryview)) else v for v in r) for r in rows],
                        )
                out.commit()
            finally:
                out.close()
            size = os.path.getsize(tmp)

            async def chunks() -> AsyncIterator[bytes]:
                loop = asyncio.get_running_loop()
                with open(tmp, "rb") as f:
                    while chunk := await loop.run_in_executor(None, f.read, 32 * 1024):
                        yield chunk

            yield size, chunks()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    @snapshot_read
    async def hash_kv(self, rev: int) -> tuple[int, int, int]:
        async with self.snapshot_conn() as conn:
            current, compact = await read_meta(conn)
            at = current if rev <= 0 else rev
            if at > current:
                raise FutureRevisionError
            if at < compact:
                raise CompactedError
            h = StateHash()
            changes = await conn.fetch(
                f"SELECT {self.q.d.log_columns} FROM log WHERE rev >= ? AND rev <= ? ORDER BY rev, sub", compact, at
            )
            for r in changes:
                h.add_change(sql.log_row(r))
            for row in (await historical(conn, self.q.d, KeyRange(b"\0", b""), at, 0, False, False))[0]:
                h.add_row(row)
            return h.value, compact, at
