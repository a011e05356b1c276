"""The SQLite dialect: the embedded default for one host.

One writer connection and a few reader connections on threads, in WAL mode so
readers never block the writer. Statements of a write transaction are point
lookups and single-row changes that take microseconds, so they run inline on the
event loop; the two calls that can wait -- ``BEGIN IMMEDIATE`` (another process may
hold the lock) and ``COMMIT`` (the fsync) -- run on the writer thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from k8s_sql import errors
from k8s_sql.backend import migrations, sql
from k8s_sql.backend.base import (
    Backend,
    BackendUnavailable,
    CompactedError,
    DatabaseFull,
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

T = TypeVar("T")

# "lease <> 0" repeats kv_lease's partial-index condition: with only "lease = ?" SQLite
# cannot tell that the parameter is not 0 and scans the whole table (every value) per lease.
LEASE_KEYS = "SELECT key FROM kv WHERE lease = ? AND lease <> 0 ORDER BY key"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv (
    key BLOB PRIMARY KEY,
    create_rev INTEGER NOT NULL,
    mod_rev INTEGER NOT NULL,
    version INTEGER NOT NULL,
    lease INTEGER NOT NULL,
    value BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS log (
    rev INTEGER NOT NULL,
    sub INTEGER NOT NULL,
    key BLOB NOT NULL,
    kind INTEGER NOT NULL,
    create_rev INTEGER,
    version INTEGER,
    lease INTEGER,
    value BLOB,
    prev_create_rev INTEGER,
    prev_mod_rev INTEGER,
    prev_version INTEGER,
    prev_lease INTEGER,
    prev_value BLOB,
    PRIMARY KEY (rev, sub)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS log_key ON log (key, rev);
CREATE TABLE IF NOT EXISTS lease (
    id INTEGER PRIMARY KEY,
    ttl INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS lease_expiry ON lease (expires_at);
CREATE TABLE IF NOT EXISTS member (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    urls TEXT NOT NULL,
    heartbeat REAL NOT NULL
);
"""

D = sql.SQLITE


def _meta(conn: sqlite3.Connection) -> tuple[int, int]:
    rows = dict(conn.execute("SELECT name, value FROM meta WHERE name IN ('revision', 'compact_revision')"))
    return int(rows["revision"]), int(rows["compact_revision"])


def _head(
    conn: sqlite3.Connection, kr: KeyRange, limit: int, keys_only: bool, count_only: bool
) -> tuple[list[Row], int]:
    count_sql, rows_sql, params = sql.head_queries(D, kr, limit, keys_only)
    if count_only:
        return [], conn.execute(count_sql, params).fetchone()[0]
    rows = [Row(*r) for r in conn.execute(rows_sql, params)]
    if limit <= 0 or len(rows) < limit:
        return rows, len(rows)  # every row of the range is here: no need to count
    return rows, conn.execute(count_sql, params).fetchone()[0]


def _historical(
    conn: sqlite3.Connection, kr: KeyRange, rev: int, limit: int, keys_only: bool, count_only: bool
) -> tuple[list[Row], int]:
    count_sql, rows_sql, params = sql.historical_queries(D, kr, rev, limit, keys_only)
    count = conn.execute(count_sql, params).fetchone()[0]
    if count_only or count == 0:
        return [], count
    return [Row(*r) for r in conn.execute(rows_sql, params)], count


SQLITE_FULL = 13


def is_full(e: BaseException) -> bool:
    """SQLite's SQLITE_FULL: the disk (or max_page_count) is full."""
    return isinstance(e, sqlite3.Error) and getattr(e, "sqlite_errorcode", None) == SQLITE_FULL


async def _full(aw: Awaitable[T]) -> T:
    """Await ``aw``, reporting SQLITE_FULL as :class:`DatabaseFull`."""
    try:
        return await aw
    except sqlite3.Error as e:
        if is_full(e):
            raise DatabaseFull(str(e)) from e
        raise


def _rollback(conn: sqlite3.Connection) -> Callable[[], None]:
    def run() -> None:
        # A failed COMMIT (a full disk) may have ended the transaction already.
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    return run


class SQLiteWriteTx(BufferedWriteTx):
    """Statements run inline: in-process SQLite answers them in microseconds."""

    def __init__(self, conn: sqlite3.Connection, revision: int, compact_revision: int) -> None:
        super().__init__(revision, compact_revision)
        self.conn = conn

    async def flush(self) -> None:
        await _full(super().flush())

    async def _db_rows(self, keys: Sequence[bytes]) -> list[Row]:
        get = f"SELECT {sql.KV_COLUMNS} FROM kv WHERE key = ?"
        return [Row(*r) for k in keys for r in self.conn.execute(get, (k,))]

    async def _db_leases(self, ids: Sequence[int]) -> list[LeaseRow]:
        get = "SELECT id, ttl, expires_at FROM lease WHERE id = ?"
        return [LeaseRow(*r) for i in ids for r in self.conn.execute(get, (i,))]

    async def _db_range(self, kr: KeyRange, limit: int) -> list[Row]:
        return _head(self.conn, kr, limit, False, False)[0]

    async def _db_count(self, kr: KeyRange) -> int:
        return _head(self.conn, kr, 0, False, True)[1]

    async def _db_range_at(self, kr: KeyRange, rev: int, limit: int) -> tuple[list[Row], int]:
        return _historical(self.conn, kr, rev, limit, False, False)

    async def _db_upsert_rows(self, rows: Sequence[Row]) -> None:
        self.conn.executemany(f"INSERT OR REPLACE INTO kv ({sql.KV_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", rows)

    async def _db_delete_rows(self, keys: Sequence[bytes]) -> None:
        self.conn.executemany("DELETE FROM kv WHERE key = ?", [(k,) for k in keys])

    async def _db_insert_log(self, rows: Sequence[tuple[Any, ...]]) -> None:
        self.conn.executemany(f"INSERT INTO log ({sql.LOG_COLUMNS}) VALUES ({', '.join('?' * 13)})", rows)

    async def _db_lease_put(self, lease: LeaseRow) -> None:
        self.conn.execute("INSERT OR REPLACE INTO lease (id, ttl, expires_at) VALUES (?, ?, ?)", lease)

    async def _db_lease_delete(self, lease_id: int) -> None:
        self.conn.execute("DELETE FROM lease WHERE id = ?", (lease_id,))

    async def _db_lease_keys(self, lease_id: int) -> list[bytes]:
        return [r[0] for r in self.conn.execute(LEASE_KEYS, (lease_id,))]

    async def _db_set_meta(self, name: str, value: int) -> None:
        self.conn.execute("UPDATE meta SET value = ? WHERE name = ?", (value, name))

    async def _db_execute(self, statement: str) -> None:
        self.conn.execute(statement)


class SQLiteBackend(Backend):
    """A store in one SQLite file (WAL mode)."""

    follow_interval = 0.005  # a local read of two rows: cheap enough to look often

    def __init__(self, path: str, synchronous: str = "FULL", readers: int = 4) -> None:
        self.path = path
        self.synchronous = synchronous
        self._writer_thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._reader_threads = ThreadPoolExecutor(readers, thread_name_prefix="sqlite-reader")
        self._local = threading.local()
        self._writer: sqlite3.Connection | None = None
        self._write_lock = asyncio.Lock()
        self._reader_conns: list[sqlite3.Connection] = []
        self._inline: sqlite3.Connection | None = None

    # -- connections --------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        conn.execute("PRAGMA foreign_keys = OFF")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only = ON")
            self._local.conn = conn
            self._reader_conns.append(conn)
        return conn

    async def _on_writer(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._writer_thread, fn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            conn = self._reader()
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")

        try:
            return await asyncio.get_running_loop().run_in_executor(self._reader_threads, run)
        except sqlite3.Error as e:
            # The file cannot be read (an I/O error, a lock held past busy_timeout): the
            # database's trouble, not the request's -- a retryable UNAVAILABLE.
            raise BackendUnavailable(errors.one_line(e)) from e

    def _read_inline(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A read on the event loop's own connection, for single-key reads: a point
        lookup in WAL mode takes microseconds and never waits for a lock, so the
        thread hop would cost more than the read."""
        conn = self._inline
        if conn is None:
            conn = self._inline = self._connect()
            conn.execute("PRAGMA query_only = ON")
            self._reader_conns.append(conn)
        conn.execute("BEGIN")
        try:
            return fn(conn)
        finally:
            conn.execute("COMMIT")

    async def open(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)

        def setup() -> sqlite3.Connection:
            conn = self._connect()
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("BEGIN IMMEDIATE")
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('revision', 1)")
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('compact_revision', 0)")
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (migrations.BASELINE_VERSION,))
            version = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()[0]
            try:
                for to, statements in migrations.pending(int(version), "sqlite"):
                    for stmt in statements:
                        conn.execute(stmt)
                    conn.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (to,))
            except BaseException:
                conn.execute("ROLLBACK")
                conn.close()
                raise
            conn.execute("COMMIT")
            return conn

        self._writer = await self._on_writer(setup)

    async def close(self) -> None:
        def close_all() -> None:
            for conn in self._reader_conns:
                with contextlib.suppress(Exception):
                    conn.close()

        await asyncio.get_running_loop().run_in_executor(self._reader_threads, close_all)
        if self._writer is not None:
            writer = self._writer
            await self._on_writer(writer.close)
            self._writer = None
        self._reader_threads.shutdown(wait=True)
        self._writer_thread.shutdown(wait=True)

    # -- writes --------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[WriteTx]:
        conn = self._writer
        assert conn is not None, "backend is not open"
        async with self._write_lock:

            def begin() -> tuple[int, int, bool]:
                conn.execute("BEGIN IMMEDIATE")
                alarm = conn.execute("SELECT value FROM meta WHERE name = 'alarm_nospace'").fetchone()
                return (*_meta(conn), bool(alarm and alarm[0]))

            rev, compact, nospace = await _full(self._on_writer(begin))
            tx = SQLiteWriteTx(conn, rev, compact)
            tx.nospace = nospace
            try:
                yield tx
                await _full(tx.finish())
            except BaseException:
                await self._on_writer(_rollback(conn))
                raise
            try:
                await _full(self._on_writer(lambda: conn.execute("COMMIT")))
            except BaseException:
                await self._on_writer(_rollback(conn))
                raise

    # -- reads ---------------------------------------------------------------

    async def current(self) -> tuple[int, int]:
        return await self._read(_meta)

    async def range(self, kr: KeyRange, rev: int, limit: int, count_only: bool, keys_only: bool) -> RangeResult:
        def run(conn: sqlite3.Connection) -> RangeResult:
            current, compact = _meta(conn)
            if rev > current:
                raise FutureRevisionError
            if 0 < rev < compact:
                raise CompactedError
            if kr.is_empty:
                return RangeResult([], 0, current, compact)
            if rev <= 0 or rev == current:
                rows, count = _head(conn, kr, limit, keys_only, count_only)
            else:
                rows, count = _historical(conn, kr, rev, limit, keys_only, count_only)
            return RangeResult(rows, count, current, compact)

        if kr.end is None and rev <= 0:
            return self._read_inline(run)
        return await self._read(run)

    async def changes(
        self, start_rev: int, end_rev: int, ranges: Sequence[KeyRange] | None, limit: int
    ) -> tuple[list[LogRow], int]:
        def run(conn: sqlite3.Connection) -> tuple[list[LogRow], int]:
            _, compact = _meta(conn)
            if start_rev < compact:
                raise CompactedError
            q = sql.changes_query(D, start_rev, end_rev, ranges)
            if q is None:
                return [], end_rev
            where, params = q
            base = f"SELECT {sql.LOG_COLUMNS} FROM log WHERE {where} ORDER BY rev, sub"
            rows = conn.execute(base + f" LIMIT {int(limit) + 1}", params).fetchall()
            if len(rows) <= limit:
                return [sql.log_row(r) for r in rows], end_rev
            last = rows[-1][0]
            kept = [r for r in rows if r[0] != last]
            if kept:
                return [sql.log_row(r) for r in kept], kept[-1][0]
            # one revision with more than `limit` matching rows: take all of it
            rows = conn.execute(base, [last, last, *params[2:]]).fetchall()
            return [sql.log_row(r) for r in rows], last

        return await self._read(run)

    async def leases(self) -> list[LeaseRow]:
        return await self._read(
            lambda c: [LeaseRow(*r) for r in c.execute("SELECT id, ttl, expires_at FROM lease ORDER BY id")]
        )

    async def lease(self, lease_id: int) -> tuple[LeaseRow | None, list[bytes]]:
        def run(c: sqlite3.Connection) -> tuple[LeaseRow | None, list[bytes]]:
            r = c.execute("SELECT id, ttl, expires_at FROM lease WHERE id = ?", (lease_id,)).fetchone()
            if r is None:
                return None, []
            keys = [k for (k,) in c.execute(LEASE_KEYS, (lease_id,))]
            return LeaseRow(*r), keys

        return await self._read(run)

    async def expired_leases(self, now: float, limit: int) -> list[int]:
        return await self._read(
            lambda c: [
                r[0]
                for r in c.execute(
                    "SELECT id FROM lease WHERE expires_at <= ? ORDER BY expires_at LIMIT ?", (now, limit)
                )
            ]
        )

    async def _write_small(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A short write transaction of its own (membership, leadership, metadata)."""
        conn = self._writer
        assert conn is not None, "backend is not open"

        def run() -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        async with self._write_lock:
            return await _full(self._on_writer(run))

    async def heartbeat(self, member: MemberRow) -> None:
        await self._write_small(
            lambda c: c.execute("INSERT OR REPLACE INTO member (id, name, urls, heartbeat) VALUES (?, ?, ?, ?)", member)
        )

    async def members(self, alive_since: float) -> list[MemberRow]:
        return await self._read(
            lambda c: [
                MemberRow(*r)
                for r in c.execute(
                    "SELECT id, name, urls, heartbeat FROM member WHERE heartbeat >= ? ORDER BY id", (alive_since,)
                )
            ]
        )

    async def remove_member(self, member_id: int) -> None:
        await self._write_small(lambda c: c.execute("DELETE FROM member WHERE id = ?", (member_id,)))

    async def try_lead(self, member_id: int, now: float, until: float) -> int:
        def run(c: sqlite3.Connection) -> int:
            held = dict(c.execute("SELECT name, value FROM meta WHERE name IN ('leader', 'leader_until')"))
            leader, leader_until = int(held.get("leader", 0)), int(held.get("leader_until", 0)) / 1000
            if leader not in (0, member_id) and leader_until > now:
                return leader
            c.execute("INSERT OR REPLACE INTO meta VALUES ('leader', ?)", (member_id,))
            c.execute("INSERT OR REPLACE INTO meta VALUES ('leader_until', ?)", (int(until * 1000),))
            return member_id

        return await self._write_small(run)

    async def meta_get(self, name: str) -> int | None:
        r = await self._read(lambda c: c.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone())
        return None if r is None else int(r[0])

    async def meta_set(self, name: str, value: int) -> None:
        await self._write_small(lambda c: c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value)))

    async def meta_set_default(self, name: str, value: int) -> int:
        def run(c: sqlite3.Connection) -> int:
            c.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (name, value))
            return int(c.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()[0])

        return await self._write_small(run)

    # -- maintenance -----------------------------------------------------------

    async def compact_log(self, below_rev: int, batch_revs: int) -> int:
        conn = self._writer
        assert conn is not None
        total = 0
        while True:

            def step() -> int:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    lowest = conn.execute("SELECT MIN(rev) FROM log").fetchone()[0]
                    if lowest is None or lowest >= below_rev:
                        n = 0
                    else:
                        upto = min(below_rev, lowest + batch_revs)
                        n = conn.execute("DELETE FROM log WHERE rev < ?", (upto,)).rowcount
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                return n

            async with self._write_lock:
                n = await self._on_writer(step)
            if n == 0:
                return total
            total += n

    async def size(self) -> tuple[int, int]:
        def run(c: sqlite3.Connection) -> tuple[int, int]:
            page_size = c.execute("PRAGMA page_size").fetchone()[0]
            pages = c.execute("PRAGMA page_count").fetchone()[0]
            free = c.execute("PRAGMA freelist_count").fetchone()[0]
            return pages * page_size, (pages - free) * page_size

        return await self._read(run)

    async def defragment(self) -> None:
        conn = self._writer
        assert conn is not None

        def run() -> None:
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

        async with self._write_lock:
            await self._on_writer(run)

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[tuple[int, AsyncIterator[bytes]]]:
        fd, tmp = tempfile.mkstemp(prefix="k8s-sql-snapshot-", suffix=".db")
        os.close(fd)
        os.unlink(tmp)
        try:
            # VACUUM INTO writes a consistent, compact copy from one read snapshot.
            def vacuum_into() -> None:
                conn = self._connect()  # VACUUM INTO cannot run inside a transaction
                try:
                    conn.execute("VACUUM INTO ?", (tmp,))
                finally:
                    conn.close()

            await asyncio.get_running_loop().run_in_executor(self._reader_threads, vacuum_into)
            size = os.path.getsize(tmp)

            async def chunks() -> AsyncIterator[bytes]:
                loop = asyncio.get_running_loop()
                with open(tmp, "rb") as f:
                    while True:
                        chunk = await loop.run_in_executor(None, f.read, 32 * 1024)
                        if not chunk:
                            return
                        yield chunk

            yield size, chunks()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    async def hash_kv(self, rev: int) -> tuple[int, int, int]:
        def run(c: sqlite3.Connection) -> tuple[int, int, int]:
            current, compact = _meta(c)
            at = current if rev <= 0 else rev
            if at > current:
                raise FutureRevisionError
            if at < compact:
                raise CompactedError
            h = StateHash()
            query = f"SELECT {sql.LOG_COLUMNS} FROM log WHERE rev >= ? AND rev <= ? ORDER BY rev, sub"
            for r in c.execute(query, (compact, at)):
                h.add_change(sql.log_row(r))
            for row in _historical(c, KeyRange(b"\0", b""), at, 0, False, False)[0]:
                h.add_row(row)
            return h.value, compact, at

        return await self._read(run)
