"""The SQLite dialect: the embedded default for one host.

One writer connection and a few reader connections on threads, in WAL mode so
readers never block the writer. Plans (plans.py) run by :func:`plans.run_sync`: a
read is one thread hop and one snapshot; in a write batch, point lookups and the
batch's row writes take microseconds and run inline on the event loop, while what
can wait -- ``BEGIN IMMEDIATE`` (another process may hold the lock), ``COMMIT``
(the fsync) and reads whose cost grows with the data -- runs on the writer thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import sqlite3
import struct
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from k8s_sql import errors
from k8s_sql.backend import migrations, plans, snapshot, sql
from k8s_sql.backend.base import BackendUnavailable, DatabaseFull, WriteTx
from k8s_sql.backend.engine import PlanFactory, SQLBackend
from k8s_sql.backend.plans import Plan
from k8s_sql.backend.writetx import SQLWriteTx

T = TypeVar("T")
log = logging.getLogger(__name__)

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

SQLITE_FULL = 13


def is_full(e: BaseException) -> bool:
    """SQLite's SQLITE_FULL: the disk (or max_page_count) is full."""
    return isinstance(e, sqlite3.Error) and getattr(e, "sqlite_errorcode", None) == SQLITE_FULL


def _refusal(e: sqlite3.Error) -> Exception:
    """SQLITE_FULL as :class:`DatabaseFull`; any other error as it is."""
    return DatabaseFull(str(e)) if is_full(e) else e


SQLITE_BUSY = 5
# Inline commits (synchronous NORMAL or OFF) run without SQLite's autocheckpoint, which
# would checkpoint (and fsync) on the event loop once the WAL holds this many pages; a
# checkpoint on the writer thread follows one that leaves as many not yet copied.
AUTOCHECKPOINT_PAGES = 1000  # SQLite's default
BUSY_TIMEOUT_MS = 30_000


def _begin_at_once(conn: sqlite3.Connection) -> bool:
    """``BEGIN IMMEDIATE`` on the calling thread if the write lock is free now; False
    (nothing begun) if another connection holds it. Taking a free lock is a few
    microseconds; only waiting for a held one (another process on the same file:
    ``--workers``) belongs on a thread, where the busy timeout may sleep."""
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        conn.execute("BEGIN IMMEDIATE")
        return True
    except sqlite3.OperationalError as e:
        if (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF == SQLITE_BUSY:
            return False
        raise
    finally:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")


class WalIndex:
    """How many WAL frames are not yet copied into the database file, read from the
    WAL-index that every connection maps (the ``-shm`` file; sqlite.org/walformat.html:
    the header's ``mxFrame`` at byte 16, ``nBackfill`` at byte 96, native byte order),
    through a read-only mapping of our own: no system call and no statement per look.
    The file's size cannot tell it (SQLite reuses the WAL from its start without
    shrinking it), and truncating the WAL at each restart (``journal_size_limit``) so
    that it could tell looked costly: W1 at 16 clients with Envoy, NORMAL, 321 -> 360 µs of
    server CPU per txn, and in a second round 353 -> 372 against 350 without it."""

    MX_FRAME = 16
    N_BACKFILL = 96

    def __init__(self, db_path: str) -> None:
        self.path = f"{db_path}-shm"
        self._map: mmap.mmap | None = None

    def pending(self) -> int | None:
        """Frames written and not checkpointed; None when there is no WAL-index to read."""
        m = self._map
        if m is None:
            try:
                with open(self.path, "rb") as f:
                    m = self._map = mmap.mmap(f.fileno(), self.N_BACKFILL + 4, access=mmap.ACCESS_READ)
            except (OSError, ValueError):
                return None
        (frames,) = struct.unpack_from("=I", m, self.MX_FRAME)
        (copied,) = struct.unpack_from("=I", m, self.N_BACKFILL)
        return frames - copied

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


def _log_checkpoint_failure(fut: asyncio.Task[None]) -> None:
    e = None if fut.cancelled() else fut.exception()
    if e is not None:
        log.warning("WAL checkpoint failed: %s", errors.one_line(e))


def _rollback(conn: sqlite3.Connection) -> Callable[[], None]:
    def run() -> None:
        # A failed COMMIT (a full disk) may have ended the transaction already.
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    return run


class SQLiteBackend(SQLBackend):
    """A store in one SQLite file (WAL mode)."""

    dialect = sql.SQLITE
    follow_interval = 0.005  # a local read of two rows: cheap enough to look often

    def __init__(self, path: str, synchronous: str = "FULL", readers: int = 4) -> None:
        self.path = path
        self.synchronous = synchronous
        self.readers = readers
        self._writer_thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._reader_threads = ThreadPoolExecutor(readers, thread_name_prefix="sqlite-reader")
        self._local = threading.local()
        self._writer: sqlite3.Connection | None = None
        self._write_lock = asyncio.Lock()
        self._reader_conns: list[sqlite3.Connection] = []
        self._inline: sqlite3.Connection | None = None
        # Without an fsync per commit (NORMAL, OFF), COMMIT is a few write() calls into
        # the page cache and runs inline when the batch is alone; the checkpoint SQLite
        # would otherwise run inside such a COMMIT (with its fsyncs) runs on the writer
        # thread instead (see _checkpoint_soon). Other commits are as they were.
        self._inline_commit = synchronous.upper() in ("OFF", "NORMAL")
        self._checkpointing: asyncio.Task[None] | None = None
        self._wal_index = WalIndex(path)

    # -- connections --------------------------------------------------------

    def pool_stats(self) -> dict[str, int]:
        """No pool: the writer's connection and one per reader thread, opened as needed."""
        return {"open": len(self._reader_conns) + (self._writer is not None), "max": self.readers + 1}

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
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

    def _inline_conn(self) -> sqlite3.Connection:
        """The event loop's own read connection, for point reads: a point lookup in WAL
        mode takes microseconds and never waits for a lock, so the thread hop would
        cost more than the read."""
        conn = self._inline
        if conn is None:
            conn = self._inline = self._connect()
            conn.execute("PRAGMA query_only = ON")
            self._reader_conns.append(conn)
        return conn

    async def _on_writer(self, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._writer_thread, fn)
        except sqlite3.Error as e:
            raise _refusal(e) from e

    def _checkpoint_soon(self) -> None:
        """After an inline commit: a PASSIVE checkpoint on the writer thread if the WAL
        holds AUTOCHECKPOINT_PAGES not yet copied and none is queued. It takes the write lock, as
        the autocheckpoint inside a COMMIT holds it: a checkpoint that writers append to
        while it copies never finishes the WAL, which is then never started over and
        only grows (measured: 4 MB per 100 lone 1 KiB Puts, checkpointed from another
        connection meanwhile). The answers of the batch that triggered it do not wait."""
        running = self._checkpointing
        if running is not None and not running.done():
            return
        pending = self._wal_index.pending()
        if pending is None or pending < AUTOCHECKPOINT_PAGES:
            return
        task = asyncio.get_running_loop().create_task(self._checkpoint())
        task.add_done_callback(_log_checkpoint_failure)
        self._checkpointing = task

    async def _checkpoint(self) -> None:
        conn = self._writer_conn
        async with self._write_lock:
            # fetched to the end: a statement left holding its row stays in progress,
            # and the next COMMIT on the connection fails ("SQL statements in progress")
            await self._on_writer(lambda: conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall())

    @property
    def _writer_conn(self) -> sqlite3.Connection:
        assert self._writer is not None, "backend is not open"
        return self._writer

    # -- the engine's hooks ----------------------------------------------------

    async def _read(self, make: PlanFactory[T]) -> T:
        def run(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN")
            try:
                return plans.run_sync(conn, make())
            finally:
                conn.execute("COMMIT")

        try:
            return await asyncio.get_running_loop().run_in_executor(self._reader_threads, lambda: run(self._reader()))
        except sqlite3.Error as e:
            # The file cannot be read (an I/O error, a lock held past busy_timeout): the
            # database's trouble, not the request's -- a retryable UNAVAILABLE.
            raise BackendUnavailable(errors.one_line(e)) from e

    async def _statement(self, make: PlanFactory[T]) -> T:
        # On the event loop: a one-statement point read in WAL mode takes microseconds
        # and never waits for a lock, so the thread hop would cost more than the read.
        try:
            return plans.run_sync(self._inline_conn(), make())
        except sqlite3.Error as e:
            raise BackendUnavailable(errors.one_line(e)) from e

    async def _write(self, make: PlanFactory[T]) -> T:
        conn = self._writer_conn

        def run() -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = plans.run_sync(conn, make())
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        async with self._write_lock:
            return await self._on_writer(run)

    @contextlib.asynccontextmanager
    async def write(
        self,
        keys: Sequence[bytes] = (),
        lease_ids: Sequence[int] = (),
        alone: bool = False,
        unlocked: bool = False,
        newest: int | None = None,
    ) -> AsyncIterator[WriteTx]:
        conn = self._writer_conn

        async def run(plan: Plan[T], slow: bool = False) -> T:
            if slow:
                return await self._on_writer(lambda: plans.run_sync(conn, plan))
            try:
                return plans.run_sync(conn, plan)
            except sqlite3.Error as e:
                raise _refusal(e) from e

        def started() -> plans.WriteStart:  # what the batch needs, read with the lock
            return plans.run_sync(conn, plans.begin_write(self.dialect, keys, lease_ids))

        def begin() -> plans.WriteStart:
            conn.execute("BEGIN IMMEDIATE")
            return started()

        async with self._write_lock:
            start: plans.WriteStart | None = None
            if alone:  # nothing waits: begin here if the lock is free, without the hop
                try:
                    if _begin_at_once(conn):
                        start = started()
                except sqlite3.Error as e:
                    _rollback(conn)()
                    raise _refusal(e) from e
            if start is None:
                start = await self._on_writer(begin)
            tx = SQLWriteTx.started(self.dialect, run, start, keys, lease_ids)
            try:
                yield tx
                await tx.finish()
                if alone and self._inline_commit and self._wal_index.pending() is not None:
                    try:
                        conn.execute("PRAGMA wal_autocheckpoint = 0")
                        try:
                            conn.execute("COMMIT")
                        finally:
                            conn.execute(f"PRAGMA wal_autocheckpoint = {AUTOCHECKPOINT_PAGES}")
                    except sqlite3.Error as e:
                        raise _refusal(e) from e
                    self._checkpoint_soon()
                else:
                    await self._on_writer(lambda: conn.execute("COMMIT"))
            except BaseException:
                await self._on_writer(_rollback(conn))
                raise

    # -- schema -------------------------------------------------------------------

    async def open_for_reads(self) -> None:
        await self.open()  # (a replica of an SQLite file is not offered: see Config.validate)

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
        if self._checkpointing is not None:
            with contextlib.suppress(Exception):
                await self._checkpointing
        if self._writer is not None:
            writer = self._writer
            await self._on_writer(writer.close)
            self._writer = None
        self._wal_index.close()
        self._reader_threads.shutdown(wait=True)
        self._writer_thread.shutdown(wait=True)

    # -- maintenance -----------------------------------------------------------

    async def size(self) -> tuple[int, int]:
        def run(c: sqlite3.Connection) -> tuple[int, int]:
            page_size = c.execute("PRAGMA page_size").fetchone()[0]
            pages = c.execute("PRAGMA page_count").fetchone()[0]
            free = c.execute("PRAGMA freelist_count").fetchone()[0]
            return pages * page_size, (pages - free) * page_size

        return await asyncio.get_running_loop().run_in_executor(self._reader_threads, lambda: run(self._reader()))

    async def defragment(self) -> None:
        conn = self._writer_conn

        def run() -> None:
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

        async with self._write_lock:
            await self._on_writer(run)

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[str]:
        async with snapshot.temporary_path() as path:
            # VACUUM INTO writes a consistent, compact copy from one read snapshot: the
            # snapshot format is this backend's own file layout.
            def vacuum_into() -> None:
                conn = self._connect()  # VACUUM INTO cannot run inside a transaction
                try:
                    conn.execute("VACUUM INTO ?", (path,))
                finally:
                    conn.close()

            await asyncio.get_running_loop().run_in_executor(self._reader_threads, vacuum_into)
            yield path
