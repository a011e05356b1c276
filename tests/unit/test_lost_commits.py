"""A database that went back in time (store/corruption.py), simulated on SQLite: the
frontend has seen revisions the database no longer has."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from k8s_sql import errors
from k8s_sql.backend import open_backend
from k8s_sql.pb import rpc_pb2 as pb
from k8s_sql.store.store import Store


async def _store(tmp_path: Path) -> Store:
    backend = open_backend(f"sqlite://{tmp_path}/state.db")
    await backend.open()
    store = Store(backend)
    await store.start()
    return store


def _lose(tmp_path: Path, back_to: int) -> None:
    """As a failover to a replica that stopped at ``back_to`` would leave the database."""
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute("DELETE FROM log WHERE rev > ?", (back_to,))
        db.execute("DELETE FROM kv WHERE mod_rev > ?", (back_to,))
        db.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (back_to,))


def test_lost_commits_stop_writes_and_reads_until_disarmed(tmp_path: Path) -> None:
    async def run() -> None:
        store = await _store(tmp_path)
        canceled: list[bool] = []
        store.corruption.on_change = canceled.append
        try:
            revs = [(await store.put(pb.PutRequest(key=b"k%d" % i, value=b"v"))).header.revision for i in range(5)]
            _lose(tmp_path, revs[1])
            # behind, but maybe only for a while (a server catching up): refused, no alarm yet
            with pytest.raises(errors.DatabaseUnavailable):
                await store.range(pb.RangeRequest(key=b"k0"))
            with pytest.raises(errors.DatabaseUnavailable):
                await store.put(pb.PutRequest(key=b"new", value=b"v"))
            assert not store.corruption.raised and canceled == []
            store.corruption.confirm_seconds = 0  # it lasted: the alarm
            with pytest.raises(errors.Corrupt):  # the batch saw the revision row behind
                await store.put(pb.PutRequest(key=b"new", value=b"v"))
            assert store.corruption.raised and canceled == [True]
            with pytest.raises(errors.Corrupt):
                await store.range(pb.RangeRequest(key=b"k0"))
            await asyncio.sleep(0)  # the alarm is recorded in the database in the background
            for _ in range(100):
                if not store.corruption._unwritten:
                    break
                await asyncio.sleep(0.01)
            held = await store.backend.meta(["alarm_corrupt", "alarm_corrupt_revision", "revision"])
            assert held["alarm_corrupt"] != 0 and held["alarm_corrupt_revision"] == revs[-1]
            assert held["revision"] == revs[1]  # nothing was written past the loss

            assert await store.corruption.disarm(0)
            assert canceled == [True, False]
            after = (await store.put(pb.PutRequest(key=b"new", value=b"v"))).header.revision
            assert after == revs[-1] + 1  # above every revision handed out before
            with pytest.raises(errors.Compacted):
                await store.range(pb.RangeRequest(key=b"k0", revision=revs[1]))
            got = await store.range(pb.RangeRequest(key=b"k", range_end=b"l"))
            assert [kv.key for kv in got.kvs] == [b"k0", b"k1"]  # the database's loss, now visible
        finally:
            await store.stop()
            await store.backend.close()

    asyncio.run(run())


def test_a_read_whose_snapshot_predates_a_commit_is_not_a_loss(tmp_path: Path) -> None:
    """The check compares with what was seen before the database was asked."""

    async def run() -> None:
        store = await _store(tmp_path)
        try:
            await store.put(pb.PutRequest(key=b"a", value=b"v"))
            seen = store.revisions.current
            store.revisions.observe(seen + 5)  # a commit made while the read ran
            store.corruption.verify(seen, seen)  # the read's snapshot from before it: fine
            assert not store.corruption.raised
        finally:
            await store.stop()
            await store.backend.close()

    asyncio.run(run())


def test_a_frontend_that_learns_of_the_alarm_adds_the_revisions_it_served(tmp_path: Path) -> None:
    """Two frontends; the one that served the newest revisions learns of the alarm from
    the other (its rows, not a look of its own at the database): it records its newest
    revision, so a disarm asked of either never hands that revision out again."""

    async def run() -> None:
        a = await _store(tmp_path)
        b_backend = open_backend(f"sqlite://{tmp_path}/state.db")
        await b_backend.open()
        b = Store(b_backend)  # not started: it learns of the alarm only from the rows
        try:
            revs = [(await a.put(pb.PutRequest(key=b"k%d" % i, value=b"v"))).header.revision for i in range(5)]
            served_by_b = revs[-1] + 3  # b served three more revisions that a never saw
            b.revisions.observe(served_by_b)
            _lose(tmp_path, revs[1])
            a.corruption.confirm_seconds = 0
            with pytest.raises(errors.Corrupt):
                await a.put(pb.PutRequest(key=b"new", value=b"v"))

            async def recorded(store: Store) -> None:
                for _ in range(200):
                    if not store.corruption._unwritten:
                        return
                    await asyncio.sleep(0.01)
                raise AssertionError("the alarm's rows were not written")

            await recorded(a)
            assert (await a.backend.meta(["alarm_corrupt_revision"]))["alarm_corrupt_revision"] == revs[-1]
            await b.corruption.refresh()
            assert b.corruption.raised
            await recorded(b)
            assert (await a.backend.meta(["alarm_corrupt_revision"]))["alarm_corrupt_revision"] == served_by_b

            assert await a.corruption.disarm(0)
            after = (await a.put(pb.PutRequest(key=b"new", value=b"v"))).header.revision
            assert after == served_by_b + 1
        finally:
            await a.stop()
            await a.backend.close()
            await b_backend.close()

    asyncio.run(run())
