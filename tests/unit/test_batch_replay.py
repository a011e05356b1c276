"""Group commit without savepoints: a request that fails after it changed something
makes the store replay its batch with savepoints, so the failure undoes only that
request and the others in the batch still commit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from k8s_sql import errors
from k8s_sql.backend import open_backend
from k8s_sql.pb import rpc_pb2 as pb
from k8s_sql.store.store import Store


def _failing_after_a_change() -> pb.TxnRequest:
    """Deletes every key, then puts ``b`` keeping its value: ``b`` existed when the txn
    was checked but not when its put runs, so the put fails after the delete happened.
    (etcd 3.6 panics on this input; k8s-sql answers "key not found".)"""
    t = pb.TxnRequest()
    t.success.add().request_delete_range.CopyFrom(pb.DeleteRangeRequest(key=b"\0", range_end=b"\0"))
    t.success.add().request_put.CopyFrom(pb.PutRequest(key=b"b", ignore_value=True))
    return t


def test_failure_after_a_change_undoes_only_that_request(tmp_path: Path) -> None:
    async def run() -> None:
        backend = open_backend(f"sqlite://{tmp_path}/state.db")
        await backend.open()
        store = Store(backend)
        modes: list[bool] = []
        run_batch = store.commits._run_batch

        async def recording(batch, savepoints, refused):  # type: ignore[no-untyped-def]
            modes.append(savepoints)
            return await run_batch(batch, savepoints, refused)

        store.commits._run_batch = recording  # type: ignore[method-assign]
        await store.start()
        try:
            for k in (b"a", b"b"):
                await store.put(pb.PutRequest(key=k, value=b"v"))
            before = store.revision
            # Queued together, so they are applied in one batch.
            results = await asyncio.gather(
                store.put(pb.PutRequest(key=b"x", value=b"1")),
                store.txn(_failing_after_a_change()),
                store.put(pb.PutRequest(key=b"y", value=b"2")),
                return_exceptions=True,
            )
            assert isinstance(results[0], pb.PutResponse)
            assert isinstance(results[1], errors.EtcdError)
            assert isinstance(results[1], errors.KeyNotFound)
            assert modes[-2:] == [False, True]  # the batch was replayed with savepoints
            assert isinstance(results[2], pb.PutResponse)
            assert [results[0].header.revision, results[2].header.revision] == [before + 1, before + 2]
            everything = await store.range(pb.RangeRequest(key=b"\0", range_end=b"\0"))
            assert [kv.key for kv in everything.kvs] == [b"a", b"b", b"x", b"y"]
            assert everything.header.revision == before + 2
        finally:
            await store.stop()
            await backend.close()

    asyncio.run(run())


async def _batch(store: Store, *requests: pb.PutRequest) -> list[object]:
    """Queue the puts together (so they are applied in one batch) and gather them."""
    return await asyncio.gather(*(store.put(r) for r in requests), return_exceptions=True)


def test_a_request_the_database_refuses_fails_alone(tmp_path: Path) -> None:
    """A statement the database itself refuses (here a trigger: the same path as a
    value it cannot store) fails only its request: the batch is replayed with a
    savepoint per request, and the others commit with consecutive revisions."""

    async def run() -> None:
        backend = open_backend(f"sqlite://{tmp_path}/state.db")
        await backend.open()
        writer = backend._writer  # type: ignore[attr-defined]
        writer.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON kv WHEN NEW.key = x'626164' BEGIN SELECT RAISE(ABORT, 'no'); END"
        )
        store = Store(backend)
        await store.start()
        try:
            before = store.revision
            ok1, bad, ok2 = await _batch(
                store,
                pb.PutRequest(key=b"x", value=b"1"),
                pb.PutRequest(key=b"bad", value=b"2"),
                pb.PutRequest(key=b"y", value=b"3"),
            )
            assert isinstance(bad, errors.RequestRejected)
            assert isinstance(ok1, pb.PutResponse) and isinstance(ok2, pb.PutResponse)
            assert [ok1.header.revision, ok2.header.revision] == [before + 1, before + 2]
            everything = await store.range(pb.RangeRequest(key=b"\0", range_end=b"\0"))
            assert [kv.key for kv in everything.kvs] == [b"x", b"y"]
        finally:
            await store.stop()
            await backend.close()

    asyncio.run(run())


def test_a_full_database_fails_only_what_does_not_fit(tmp_path: Path) -> None:
    """SQLITE_FULL (max_page_count reached) on one large value: that request gets etcd's
    "database space exceeded" and raises the alarm; the small writes with it commit."""

    async def run() -> None:
        backend = open_backend(f"sqlite://{tmp_path}/state.db")
        await backend.open()
        writer = backend._writer  # type: ignore[attr-defined]
        pages = writer.execute("PRAGMA page_count").fetchone()[0]
        writer.execute(f"PRAGMA max_page_count = {pages + 64}")
        store = Store(backend)
        full: list[bool] = []
        store.on_database_full = lambda: full.append(True)
        await store.start()
        try:
            small, big, small2 = await _batch(
                store,
                pb.PutRequest(key=b"a", value=b"1"),
                pb.PutRequest(key=b"big", value=b"x" * (4 << 20)),
                pb.PutRequest(key=b"b", value=b"2"),
            )
            assert isinstance(big, errors.NoSpace), big
            assert big.text == "etcdserver: mvcc: database space exceeded"
            assert full == [True]
            assert isinstance(small, pb.PutResponse) and isinstance(small2, pb.PutResponse)
            got = await store.range(pb.RangeRequest(key=b"\0", range_end=b"\0", keys_only=True))
            assert [kv.key for kv in got.kvs] == [b"a", b"b"]
        finally:
            await store.stop()
            await backend.close()

    asyncio.run(run())


@pytest.mark.parametrize("n", [1, 3, 64, 65, 200])
def test_prefetch_reads_every_key(tmp_path: Path, n: int) -> None:
    """Keys read up front in chunks (padded to a few statement shapes) are all found."""

    async def run() -> None:
        backend = open_backend(f"sqlite://{tmp_path}/state.db")
        await backend.open()
        store = Store(backend)
        await store.start()
        try:
            keys = [b"k%04d" % i for i in range(n)]
            await asyncio.gather(*(store.put(pb.PutRequest(key=k, value=k)) for k in keys))
            # Creates of existing keys, all in one batch: each compare must see its key.
            txns = []
            for k in keys:
                t = pb.TxnRequest()
                c = t.compare.add()
                c.key, c.target, c.result, c.mod_revision = k, pb.Compare.MOD, pb.Compare.EQUAL, 0
                t.failure.add().request_range.CopyFrom(pb.RangeRequest(key=k))
                txns.append(t)
            got = await asyncio.gather(*(store.txn(t) for t in txns))
            assert [r.succeeded for r in got] == [False] * n
            assert [r.responses[0].response_range.kvs[0].value for r in got] == keys
        finally:
            await store.stop()
            await backend.close()

    asyncio.run(run())
