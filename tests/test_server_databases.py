"""The server-database backends serve etcd clients like the SQLite one."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("database", ["postgres_server", "mariadb_server"])
def test_server_database_store_with_etcdctl(request, database, k8s_sql_factory, etcdctl) -> None:
    dsn = request.getfixturevalue(database).new_dsn()
    server = k8s_sql_factory("--endpoint", dsn)
    etcdctl(server.url, "put", "a", "1")
    etcdctl(server.url, "put", "a", "2")
    out = json.loads(etcdctl(server.url, "get", "a", "-w", "json").stdout)
    assert out["kvs"][0]["version"] == 2 and out["kvs"][0]["mod_revision"] == 3
    old = json.loads(etcdctl(server.url, "get", "a", "--rev=2", "-w", "json").stdout)
    assert old["kvs"][0]["mod_revision"] == 2
    txn = etcdctl(server.url, "txn", input='mod("a") = "3"\n\nput b 1\nput c 1\n\n\n').stdout
    assert txn.startswith("SUCCESS")
    # The same database served by a restarted frontend keeps everything.
    server.restart()
    out = json.loads(etcdctl(server.url, "get", "", "--prefix", "-w", "json").stdout)
    assert [kv["mod_revision"] for kv in out["kvs"]] == [3, 4, 4]


@pytest.mark.parametrize("database", ["postgres_server", "mariadb_server"])
async def test_pipelines_keep_every_byte_and_fail_whole(request, database) -> None:
    """A write batch's statements go in pipelines (plans.Pipeline): on MySQL its start
    (begin, revision lock, keys) and its end (kv, log, meta and COMMIT) as
    multi-statements, the parameters escaped into the text; on PostgreSQL one statement
    at a time with binary parameters (sending them as one simple-query text was
    measured slower: bench/limits.md). Keys and values of every byte -- quotes,
    backslashes, NULs, ';', '%s', '?', '$1' -- come back as written, leases too, a batch
    too big for one pipeline goes a statement at a time, and a pipeline whose statement
    fails applies nothing and leaves its connection usable."""
    import asyncio

    from k8s_sql.backend import open_backend, plans
    from k8s_sql.pb import rpc_pb2 as pb
    from k8s_sql.store.store import Store

    server = request.getfixturevalue(database)
    from k8s_sql.backend.mysql import PIPELINE_BYTES

    backend = open_backend(server.new_dsn())
    await backend.open()
    store = Store(backend)
    await store.start()
    try:
        nasty = [bytes([i]) + b"';\\%s?$1\x00" + bytes(range(256)) for i in range(0, 256, 8)]
        lease_id = 0x7FFF_0000_0000_0001
        await store.lease_grant(lease_id, 3600)
        await asyncio.gather(*(store.put(pb.PutRequest(key=k, value=k[::-1], lease=lease_id)) for k in nasty))
        big = [b"big/%d" % i for i in range(3)]  # 3 x 400 KB: past one pipeline's size
        value = bytes(range(256)) * (400_000 // 256)
        assert 3 * len(value) > PIPELINE_BYTES
        await asyncio.gather(*(store.put(pb.PutRequest(key=k, value=value)) for k in big))
        got = await store.range(pb.RangeRequest(key=b"\x00", range_end=b"\x00"))
        assert {kv.key: kv.value for kv in got.kvs} == {**{k: k[::-1] for k in nasty}, **{k: value for k in big}}
        assert {kv.lease for kv in got.kvs if kv.key in nasty} == {lease_id}
        deleted = await store.delete_range(pb.DeleteRangeRequest(key=nasty[3]))
        assert deleted.deleted == 1
        revision = got.header.revision + 1

        def failing() -> plans.Plan[None]:
            yield plans.Pipeline(
                (
                    plans.Execute("UPDATE meta SET value = value + ? WHERE name = 'revision'", (100,)),
                    plans.Execute("INSERT INTO no_such_table VALUES (?)", (nasty[0],)),
                    plans.COMMIT,
                )
            )

        with pytest.raises(Exception, match=r"does(n't| not) exist"):
            async with backend.transaction() as conn:  # type: ignore[attr-defined]
                await plans.run_async(conn, failing())
        assert (await backend.current())[0] == revision  # the UPDATE before the failure was rolled back
        assert not (await store.range(pb.RangeRequest(key=nasty[3]))).kvs
        assert len((await store.range(pb.RangeRequest(key=b"\x00", range_end=b"\x00"))).kvs) == len(nasty) + 2
        # the lease's keys, found through the lease: the lease rows read with the lock
        assert await store.lease_revoke(lease_id) == revision + 1
        assert len((await store.range(pb.RangeRequest(key=b"\x00", range_end=b"\x00"))).kvs) == len(big)
    finally:
        await store.stop()
        await backend.close()
