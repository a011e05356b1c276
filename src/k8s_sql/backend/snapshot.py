"""k8s-sql's snapshot format, in one place: how it is written, streamed and restored.

A snapshot is an SQLite database file holding the ``meta``, ``kv``, ``log`` and
``lease`` tables (sql.TABLES) at this k8s-sql's schema version, whatever database
it was taken from, followed -- as etcd's snapshot stream is -- by the SHA-256 of
those bytes (etcdctl checks that the trailer is there). An SQLite database's size
is a multiple of its page size (512 bytes or more), so ``size % 512 == 32``
tells a complete snapshot. ``k8s-sql restore`` verifies the digest and turns the
file into a data directory for the SQLite backend.

Nothing here runs on the event loop for long: files are written and read on
threads, and rows arrive in steps from the database's cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from k8s_sql.backend import migrations, sql

CHUNK = 32 * 1024  # bytes per streamed message, as etcd sends its snapshot
DIGEST = hashlib.sha256().digest_size

TableRows = Callable[[str, str], AsyncIterator[Sequence[Sequence[Any]]]]


class SnapshotError(Exception):
    """A file that is not a complete, intact k8s-sql snapshot (one line, for the user)."""


@contextlib.asynccontextmanager
async def temporary_path() -> AsyncIterator[str]:
    """A path for a snapshot file that does not exist yet, removed afterwards."""
    fd, path = tempfile.mkstemp(prefix="k8s-sql-snapshot-", suffix=".db")
    os.close(fd)
    os.unlink(path)
    try:
        yield path
    finally:
        # Removing a file of a gigabyte frees its blocks: 100+ ms, not for the loop.
        await asyncio.get_running_loop().run_in_executor(None, _remove, path)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _create(path: str) -> sqlite3.Connection:
    from k8s_sql.backend.sqlite import SCHEMA  # the format's layout is the SQLite backend's

    out = sqlite3.connect(path, check_same_thread=False)
    # The meta rows copied in carry this k8s-sql's schema version: build the layout to match.
    for stmt in [*SCHEMA.split(";"), *migrations.all_statements("sqlite")]:
        if stmt.strip():
            out.execute(stmt)
    return out


async def write(path: str, rows: TableRows) -> None:
    """Write a snapshot file from ``rows(table, columns)``, which yields each table's rows
    in steps (from one consistent snapshot of the source); the inserts run on a thread
    of their own while the next step is read."""
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1, thread_name_prefix="snapshot-writer") as thread:
        out = await loop.run_in_executor(thread, _create, path)
        try:
            for table, columns in sql.TABLES:
                insert = f"INSERT INTO {table} ({columns}) VALUES ({sql.marks(columns.count(',') + 1)})"
                async for step in rows(table, columns):
                    plain = [tuple(bytes(v) if isinstance(v, (bytearray, memoryview)) else v for v in r) for r in step]
                    await loop.run_in_executor(thread, out.executemany, insert, plain)
            await loop.run_in_executor(thread, out.commit)
        finally:
            await loop.run_in_executor(thread, out.close)


async def frames(path: str) -> AsyncIterator[tuple[int, bytes]]:
    """``(remaining bytes, blob)`` of the snapshot stream: the file in chunks read on a
    thread, then the SHA-256 of what was sent."""
    loop = asyncio.get_running_loop()
    remaining = os.path.getsize(path) + DIGEST
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := await loop.run_in_executor(None, f.read, CHUNK):
            digest.update(chunk)
            remaining -= len(chunk)
            yield remaining, chunk
    yield 0, digest.digest()


def restore(snapshot: str, data_dir: str) -> tuple[str, int]:
    """Create ``data_dir/state.db`` from a snapshot file: ``(the file, its revision)``.

    The digest is checked while copying, SQLite's integrity check after; nothing is
    left behind on failure. Raises :class:`SnapshotError`."""
    target = os.path.join(data_dir, "state.db")
    if os.path.exists(target):
        raise SnapshotError(f"{target} exists; restore into a new --data-dir")
    os.makedirs(data_dir, exist_ok=True)
    partial = target + ".part"
    try:
        _copy_verified(snapshot, partial)
        conn = sqlite3.connect(f"file:{os.path.abspath(partial)}?mode=ro", uri=True)
        try:
            ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
            rev = conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        except sqlite3.DatabaseError as e:
            raise SnapshotError(f"{snapshot} is not a k8s-sql snapshot: {e}") from e
        finally:
            conn.close()
        if ok != "ok" or rev is None:
            raise SnapshotError(f"{snapshot} is not a valid k8s-sql snapshot ({ok})")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target, int(rev[0])


def _copy_verified(snapshot: str, dest: str) -> None:
    """Copy the database part of a snapshot, checking the SHA-256 that ends it."""
    size = os.path.getsize(snapshot)
    if size % 512 != DIGEST:
        raise SnapshotError(f"{snapshot} has no SHA-256 trailer: not a complete snapshot")
    digest = hashlib.sha256()
    with open(snapshot, "rb") as src, open(dest, "wb") as out:
        left = size - DIGEST
        while left:
            chunk = src.read(min(left, 1 << 20))
            if not chunk:
                raise SnapshotError(f"{snapshot} is truncated")
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
        if src.read(DIGEST) != digest.digest():
            raise SnapshotError(f"{snapshot} is corrupt: SHA-256 mismatch")
        out.flush()
        os.fsync(out.fileno())
