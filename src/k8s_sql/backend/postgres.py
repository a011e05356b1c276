"""The PostgreSQL dialect (asyncpg).

Every write transaction first locks the ``meta`` revision row (``SELECT … FOR
UPDATE``) and holds it until commit, so committed revisions are always a contiguous
prefix however many frontends write. Reads run in ``REPEATABLE READ`` read-only
transactions: one consistent snapshot per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import urlparse, urlunparse

import asyncpg

from k8s_sql.backend import sql
from k8s_sql.backend.base import (
    SCHEMA_VERSION,
    Backend,
    BackendUnavailable,
    CompactedError,
    FutureRevisionError,
    KeyRange,
    LeaseRow,
    LogRow,
    RangeResult,
    Row,
    WriteTx,
)
from k8s_sql.backend.hashing import StateHash

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS kv (
        key BYTEA PRIMARY KEY,
        create_rev BIGINT NOT NULL,
        mod_rev BIGINT NOT NULL,
        version BIGINT NOT NULL,
        lease BIGINT NOT NULL,
        value BYTEA NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease <> 0",
    """CREATE TABLE IF NOT EXISTS log (
        rev BIGINT NOT NULL,
        sub INTEGER NOT NULL,
        key BYTEA NOT NULL,
        kind SMALLINT NOT NULL,
        create_rev BIGINT,
        version BIGINT,
        lease BIGINT,
        value BYTEA,
        prev_create_rev BIGINT,
        prev_mod_rev BIGINT,
        prev_version BIGINT,
        prev_lease BIGINT,
        prev_value BYTEA,
        PRIMARY KEY (rev, sub))""",
    "CREATE INDEX IF NOT EXISTS log_key ON log (key, rev)",
    """CREATE TABLE IF NOT EXISTS lease (
        id BIGINT PRIMARY KEY,
        ttl BIGINT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS lease_expiry ON lease (expires_at)",
]

D = sql.POSTGRES
N = sql.numbered
RETRYABLE = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError)


async def _meta(conn: asyncpg.Connection) -> tuple[int, int]:
    rows = dict(await conn.fetch("SELECT name, value FROM meta WHERE name IN ('revision', 'compact_revision')"))
    return int(rows["revision"]), int(rows["compact_revision"])


async def _head(conn: asyncpg.Connection, kr: KeyRange, limit: int, keys_only: bool, count_only: bool) -> tuple[list[Row], int]:
    count_sql, rows_sql, params = sql.head_queries(D, kr, limit, keys_only)
    count = int(await conn.fetchval(N(count_sql), *params))
    if count_only or count == 0:
        return [], count
    return [Row(*r) for r in await conn.fetch(N(rows_sql), *params)], count


async def _historical(
    conn: asyncpg.Connection, kr: KeyRange, rev: int, limit: int, keys_only: bool, count_only: bool
) -> tuple[list[Row], int]:
    count_sql, rows_sql, params = sql.historical_queries(D, kr, rev, limit, keys_only)
    count = int(await conn.fetchval(N(count_sql), *params))
    if count_only or count == 0:
        return [], count
    return [Row(*r) for r in await conn.fetch(N(rows_sql), *params)], count


class PostgresWriteTx(WriteTx):
    def __init__(self, conn: asyncpg.Connection, revision: int, compact_revision: int) -> None:
        self.conn = conn
        self.revision = revision
        self.compact_revision = compact_revision
        self.pending_log: list[tuple[Any, ...]] = []
        self._savepoint_log_len = 0

    async def get(self, key: bytes) -> Row | None:
        r = await self.conn.fetchrow(f"SELECT {sql.KV_COLUMNS} FROM kv WHERE key = $1", key)
        return None if r is None else Row(*r)

    async def range(self, kr: KeyRange, limit: int = 0) -> list[Row]:
        return (await _head(self.conn, kr, limit, False, False))[0]

    async def count(self, kr: KeyRange) -> int:
        return (await _head(self.conn, kr, 0, False, True))[1]

    async def range_at(self, kr: KeyRange, rev: int, limit: int = 0) -> tuple[list[Row], int]:
        await self._flush_log()  # the historical query reads this transaction's log rows too
        return await _historical(self.conn, kr, rev, limit, False, False)

    async def put(self, row: Row) -> None:
        await self.conn.execute(
            f"INSERT INTO kv ({sql.KV_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (key) DO UPDATE SET "
            "create_rev = EXCLUDED.create_rev, mod_rev = EXCLUDED.mod_rev, version = EXCLUDED.version, "
            "lease = EXCLUDED.lease, value = EXCLUDED.value",
            *row,
        )

    async def delete(self, key: bytes) -> None:
        await self.conn.execute("DELETE FROM kv WHERE key = $1", key)

    def log(self, change: LogRow) -> None:
        self.pending_log.append(sql.log_params(change))

    async def lease_get(self, lease_id: int) -> LeaseRow | None:
        r = await self.conn.fetchrow("SELECT id, ttl, expires_at FROM lease WHERE id = $1", lease_id)
        return None if r is None else LeaseRow(*r)

    async def lease_put(self, lease: LeaseRow) -> None:
        await self.conn.execute(
            "INSERT INTO lease (id, ttl, expires_at) VALUES ($1, $2, $3) "
            "ON CONFLICT (id) DO UPDATE SET ttl = EXCLUDED.ttl, expires_at = EXCLUDED.expires_at",
            *lease,
        )

    async def lease_delete(self, lease_id: int) -> None:
        await self.conn.execute("DELETE FROM lease WHERE id = $1", lease_id)

    async def lease_keys(self, lease_id: int) -> list[bytes]:
        return [r[0] for r in await self.conn.fetch("SELECT key FROM kv WHERE lease = $1 ORDER BY key", lease_id)]

    async def set_compact_revision(self, rev: int) -> None:
        await self.conn.execute("UPDATE meta SET value = $1 WHERE name = 'compact_revision'", rev)
        self.compact_revision = rev

    async def savepoint(self) -> None:
        await self.conn.execute("SAVEPOINT request")
        self._savepoint_log_len = len(self.pending_log)

    async def release_savepoint(self) -> None:
        await self.conn.execute("RELEASE SAVEPOINT request")

    async def rollback_to_savepoint(self) -> None:
        await self.conn.execute("ROLLBACK TO SAVEPOINT request")
        await self.conn.execute("RELEASE SAVEPOINT request")
        del self.pending_log[self._savepoint_log_len :]

    async def _flush_log(self) -> None:
        if self.pending_log:
            await self.conn.executemany(
                f"INSERT INTO log ({sql.LOG_COLUMNS}) VALUES ({', '.join(f'${i}' for i in range(1, 14))})",
                self.pending_log,
            )
            self.pending_log.clear()
            self._savepoint_log_len = 0

    async def flush(self) -> None:
        await self._flush_log()
        await self.conn.execute("UPDATE meta SET value = $1 WHERE name = 'revision'", self.revision)


class PostgresBackend(Backend):
    """A store in a PostgreSQL database, created (with its schema) if absent."""

    def __init__(self, dsn: str, pool_size: int = 8) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "backend is not open"
        return self._pool

    async def _create_database(self) -> None:
        u = urlparse(self.dsn)
        name = u.path.lstrip("/")
        admin = urlunparse(u._replace(path="/postgres"))
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute('CREATE DATABASE "{}"'.format(name.replace('"', '""')))
        except asyncpg.DuplicateDatabaseError:
            pass
        finally:
            await conn.close()

    async def open(self) -> None:
        try:
            conn = await asyncpg.connect(self.dsn)
        except asyncpg.InvalidCatalogNameError:
            await self._create_database()
            conn = await asyncpg.connect(self.dsn)
        try:
            async with conn.transaction():
                # Several frontends may start at once: one creates the schema.
                await conn.execute("SELECT pg_advisory_xact_lock(7238945)")
                for stmt in SCHEMA:
                    await conn.execute(stmt)
                await conn.execute(
                    "INSERT INTO meta VALUES ('revision', 1), ('compact_revision', 0), ('schema_version', $1) "
                    "ON CONFLICT (name) DO NOTHING",
                    SCHEMA_VERSION,
                )
                version = await conn.fetchval("SELECT value FROM meta WHERE name = 'schema_version'")
                if int(version) > SCHEMA_VERSION:
                    raise RuntimeError(f"database schema version {version} is newer than this k8s-sql")
        finally:
            await conn.close()
        self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self.pool_size)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @contextlib.asynccontextmanager
    async def _snapshot_conn(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
                yield conn
        except RETRYABLE as e:
            raise BackendUnavailable(str(e)) from e

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[WriteTx]:
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                rev = int(await conn.fetchval("SELECT value FROM meta WHERE name = 'revision' FOR UPDATE"))
                compact = int(await conn.fetchval("SELECT value FROM meta WHERE name = 'compact_revision'"))
                tx = PostgresWriteTx(conn, rev, compact)
                yield tx
                await tx.flush()
        except RETRYABLE as e:
            raise BackendUnavailable(str(e)) from e

    async def current(self) -> tuple[int, int]:
        async with self._snapshot_conn() as conn:
            return await _meta(conn)

    async def range(self, kr: KeyRange, rev: int, limit: int, count_only: bool, keys_only: bool) -> RangeResult:
        async with self._snapshot_conn() as conn:
            current, compact = await _meta(conn)
            if rev > current:
                raise FutureRevisionError
            if 0 < rev < compact:
                raise CompactedError
            if kr.is_empty:
                return RangeResult([], 0, current, compact)
            if rev <= 0 or rev == current:
                rows, count = await _head(conn, kr, limit, keys_only, count_only)
            else:
                rows, count = await _historical(conn, kr, rev, limit, keys_only, count_only)
            return RangeResult(rows, count, current, compact)

    async def changes(
        self, start_rev: int, end_rev: int, ranges: Sequence[KeyRange] | None, limit: int
    ) -> tuple[list[LogRow], int]:
        async with self._snapshot_conn() as conn:
            _, compact = await _meta(conn)
            if start_rev < compact:
                raise CompactedError
            q = sql.changes_query(start_rev, end_rev, ranges)
            if q is None:
                return [], end_rev
            where, params = q
            base = f"SELECT {sql.LOG_COLUMNS} FROM log WHERE {where} ORDER BY rev, sub"
            rows = await conn.fetch(N(base + f" LIMIT {int(limit) + 1}"), *params)
            if len(rows) <= limit:
                return [sql.log_row(r) for r in rows], end_rev
            last = rows[-1][0]
            kept = [r for r in rows if r[0] != last]
            if kept:
                return [sql.log_row(r) for r in kept], kept[-1][0]
            rows = await conn.fetch(N(base), last, last, *params[2:])
            return [sql.log_row(r) for r in rows], last

    async def leases(self) -> list[LeaseRow]:
        async with self._snapshot_conn() as conn:
            return [LeaseRow(*r) for r in await conn.fetch("SELECT id, ttl, expires_at FROM lease ORDER BY id")]

    async def lease(self, lease_id: int) -> tuple[LeaseRow | None, list[bytes]]:
        async with self._snapshot_conn() as conn:
            r = await conn.fetchrow("SELECT id, ttl, expires_at FROM lease WHERE id = $1", lease_id)
            if r is None:
                return None, []
            keys = [k for (k,) in await conn.fetch("SELECT key FROM kv WHERE lease = $1 ORDER BY key", lease_id)]
            return LeaseRow(*r), keys

    async def expired_leases(self, now: float, limit: int) -> list[int]:
        async with self._snapshot_conn() as conn:
            rows = await conn.fetch(
                "SELECT id FROM lease WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2", now, limit
            )
            return [r[0] for r in rows]

    async def meta_get(self, name: str) -> int | None:
        async with self._snapshot_conn() as conn:
            v = await conn.fetchval("SELECT value FROM meta WHERE name = $1", name)
            return None if v is None else int(v)

    async def meta_set_default(self, name: str, value: int) -> int:
        async with self.pool.acquire() as conn:
            await conn.execute("INSERT INTO meta VALUES ($1, $2) ON CONFLICT (name) DO NOTHING", name, value)
            return int(await conn.fetchval("SELECT value FROM meta WHERE name = $1", name))

    async def compact_log(self, below_rev: int, batch_revs: int) -> int:
        total = 0
        while True:
            async with self.pool.acquire() as conn:
                lowest = await conn.fetchval("SELECT MIN(rev) FROM log")
                if lowest is None or lowest >= below_rev:
                    return total
                status = await conn.execute(
                    "DELETE FROM log WHERE rev < $1", min(below_rev, int(lowest) + batch_revs)
                )
            total += int(status.split()[-1])

    async def size(self) -> tuple[int, int]:
        async with self.pool.acquire() as conn:
            total = await conn.fetchval(
                "SELECT SUM(pg_total_relation_size(c)) FROM unnest(ARRAY['meta', 'kv', 'log', 'lease']::regclass[]) c"
            )
            return int(total), int(total)

    async def defragment(self) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute("VACUUM (ANALYZE) meta, kv, log, lease")

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[tuple[int, AsyncIterator[bytes]]]:
        """A consistent copy in k8s-sql's portable snapshot format: an SQLite database."""
        from k8s_sql.backend.sqlite import SCHEMA as SQLITE_SCHEMA

        fd, tmp = tempfile.mkstemp(prefix="k8s-sql-snapshot-", suffix=".db")
        os.close(fd)
        try:
            out = sqlite3.connect(tmp)
            try:
                for stmt in SQLITE_SCHEMA.split(";"):
                    if stmt.strip():
                        out.execute(stmt)
                async with self._snapshot_conn() as conn:
                    for table, columns in (
                        ("meta", "name, value"),
                        ("kv", sql.KV_COLUMNS),
                        ("log", sql.LOG_COLUMNS),
                        ("lease", "id, ttl, expires_at"),
                    ):
                        marks = ", ".join("?" * (columns.count(",") + 1))
                        batch: list[tuple[Any, ...]] = []
                        async for r in conn.cursor(f"SELECT {columns} FROM {table}"):
                            batch.append(tuple(r))
                            if len(batch) >= 1000:
                                out.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", batch)
                                batch.clear()
                        out.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", batch)
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

    async def hash_kv(self, rev: int) -> tuple[int, int, int]:
        async with self._snapshot_conn() as conn:
            current, compact = await _meta(conn)
            at = current if rev <= 0 else rev
            if at > current:
                raise FutureRevisionError
            if at < compact:
                raise CompactedError
            h = StateHash()
            async for r in conn.cursor(
                f"SELECT {sql.LOG_COLUMNS} FROM log WHERE rev >= $1 AND rev <= $2 ORDER BY rev, sub", compact, at
            ):
                h.add_change(sql.log_row(r))
            rows, _ = await _historical(conn, KeyRange(b"\0", b""), at, 0, False, False)
            for row in rows:
                h.add_row(row)
            return h.value, compact, at
