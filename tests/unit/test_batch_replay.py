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
        run_batch = store._run_batch

        async def recording(batch, savepoints):  # type: ignore[no-untyped-def]
            modes.append(savepoints)
            return await run_batch(batch, savepoints)

        store._run_batch = recording  # type: ignore[method-assign]
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
            assert results[1].message == errors.KEY_NOT_FOUND.message
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
