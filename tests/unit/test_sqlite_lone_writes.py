"""SQLite's lone write batches: no thread hop where none can block.

A batch that nothing else waits for (one client, a lightly loaded cluster) begins on
the event loop when the write lock is free, and with synchronous NORMAL or OFF also
commits there; the WAL checkpoints SQLite would run inside such a commit run on the
writer thread instead. A write lock another process holds is still waited for on the
writer thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import pytest

from k8s_sql.backend import open_backend
from k8s_sql.backend.sqlite import SQLiteBackend, WalIndex
from k8s_sql.pb import rpc_pb2 as pb
from k8s_sql.store.store import Store

PUTS = 2500
VALUE = os.urandom(4096)  # PUTS of them: 10 MB, more than the WAL may hold


async def _open(path: Path, synchronous: str) -> tuple[SQLiteBackend, Store]:
    backend = open_backend(f"sqlite://{path}?synchronous={synchronous}")
    assert isinstance(backend, SQLiteBackend)
    await backend.open()
    store = Store(backend)
    await store.start()
    return backend, store


@pytest.mark.parametrize(("synchronous", "hops_per_put"), [("normal", 0), ("full", 1)])
async def test_lone_writes_skip_the_hops_that_cannot_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synchronous: str, hops_per_put: int
) -> None:
    """Sequential Puts: NORMAL begins and commits on the loop (the only hops left are
    the periodic checkpoints), FULL still commits (its fsync) on the writer thread;
    the WAL is checkpointed all along, and every write is there after a reopen."""
    path = tmp_path / "state.db"
    backend, store = await _open(path, synchronous)
    hops: list[str] = []
    real = backend._on_writer

    async def counting(fn):  # type: ignore[no-untyped-def]
        hops.append(getattr(fn, "__qualname__", repr(fn)))
        return await real(fn)

    monkeypatch.setattr(backend, "_on_writer", counting)
    wal_sizes = []
    try:
        for i in range(PUTS):
            await store.put(pb.PutRequest(key=b"/k/%05d" % i, value=VALUE))
            if i % 100 == 99:
                wal_sizes.append(os.path.getsize(f"{path}-wal"))
        checkpoints = sum("_checkpoint" in h for h in hops)
        assert len(hops) - checkpoints == hops_per_put * PUTS, hops[:10]
        if synchronous == "normal":
            assert checkpoints >= 1, "no checkpoint ran: the WAL would only grow"
        # Without checkpoints that finish, the WAL holds every frame written: about 4 MB
        # per 100 Puts here, over 60 MB in all (measured); with them it stays at what
        # a few intervals write.
        assert max(wal_sizes) < 8 * 2**20, wal_sizes
    finally:
        await store.stop()
        await backend.close()
    db = sqlite3.connect(path)
    try:
        n, value = db.execute("SELECT COUNT(*), MIN(value) = MAX(value) FROM kv WHERE key >= '/k/'").fetchone()
        assert (n, value) == (PUTS, 1)
        assert db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0] == PUTS + 1
    finally:
        db.close()


async def test_a_write_lock_held_elsewhere_is_waited_for_off_the_loop(tmp_path: Path) -> None:
    """Another connection (another process on the file: ``--workers``) holds the write
    lock: a lone Put does not begin, the event loop keeps running, and the Put commits
    once the lock is released."""
    path = tmp_path / "state.db"
    backend, store = await _open(path, "normal")
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        await store.put(pb.PutRequest(key=b"/first", value=b"1"))
        other.execute("BEGIN IMMEDIATE")
        put = asyncio.ensure_future(store.put(pb.PutRequest(key=b"/second", value=b"2")))
        ticks = 0
        while ticks < 50:  # the loop runs on while the Put waits for the lock
            await asyncio.sleep(0.002)
            ticks += 1
            assert not put.done(), put
        await asyncio.get_running_loop().run_in_executor(None, lambda: other.execute("ROLLBACK"))
        resp = await asyncio.wait_for(put, 30)
        assert resp.header.revision == 3
    finally:
        other.close()
        await store.stop()
        await backend.close()


def test_the_wal_index_tells_the_frames_not_yet_copied(tmp_path: Path) -> None:
    """WalIndex reads SQLite's own count: frames appear with commits, a checkpoint copies
    them, and a database without a WAL-index has nothing to read."""
    path = str(tmp_path / "wal.db")
    assert WalIndex(path).pending() is None
    db = sqlite3.connect(path, isolation_level=None)
    index = WalIndex(path)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA wal_autocheckpoint = 0")
        db.execute("CREATE TABLE t (v BLOB)")
        before = index.pending()
        assert before is not None
        for _ in range(20):
            db.execute("INSERT INTO t VALUES (?)", (os.urandom(8192),))  # 3 pages each at least
        written = index.pending()
        assert written is not None and written >= before + 60, (before, written)
        busy, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert (busy, frames - copied, index.pending()) == (0, 0, 0)
        assert frames == written
    finally:
        index.close()
        db.close()
