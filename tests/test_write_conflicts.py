"""A write the database aborts as a deadlock is run again, not failed.

InnoDB resolves a deadlock by rolling back one of the transactions in it. Here another
client of the database provokes one with k8s-sql's write transaction and makes sure
k8s-sql's is the one rolled back (InnoDB picks the transaction that changed less). The
client's Put must still succeed, once, at the next revision.
"""

from __future__ import annotations

import asyncio
import time

import asyncmy
import grpc
import pytest

from k8s_sql.backend.engine import CONFLICT_RETRIES
from k8s_sql.backend.mysql import parse_dsn
from k8s_sql.backend.sqlite import SQLiteBackend
from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc


async def _waiting_kv_writes(conn: asyncmy.Connection) -> int:
    """Statements writing ``kv`` that are running now (here: waiting for a row lock)."""
    async with conn.cursor() as cur:
        await cur.execute("SELECT COUNT(*) FROM information_schema.processlist WHERE info LIKE 'INSERT INTO kv %'")
        return int((await cur.fetchone())[0])


async def test_deadlocked_write_is_retried(mariadb_server, k8s_sql_factory) -> None:
    dsn = mariadb_server.new_dsn()
    server = k8s_sql_factory("--endpoint", dsn)
    async with grpc.aio.insecure_channel(server.endpoint) as ch:
        kv = rpc_pb2_grpc.KVStub(ch)
        first = (await kv.Put(pb.PutRequest(key=b"a", value=b"v1"))).header.revision

        other = await asyncmy.connect(**parse_dsn(dsn))
        watcher = await asyncmy.connect(**parse_dsn(dsn), autocommit=True)
        try:
            async with other.cursor() as cur:
                await cur.execute("CREATE TABLE IF NOT EXISTS ballast (n INT PRIMARY KEY)")
                await other.commit()
                await cur.execute("START TRANSACTION")
                # Weight: InnoDB rolls back the transaction with the fewest changed rows.
                await cur.executemany("INSERT INTO ballast VALUES (%s)", [(n,) for n in range(200)])
                await cur.execute("SELECT value FROM kv WHERE `key` = 'a' FOR UPDATE")

                put = asyncio.ensure_future(kv.Put(pb.PutRequest(key=b"a", value=b"v2"), timeout=30))
                deadline = time.monotonic() + 10
                while await _waiting_kv_writes(watcher) == 0:  # k8s-sql holds the revision, waits for 'a'
                    assert not put.done(), put
                    assert time.monotonic() < deadline, "k8s-sql's write never waited for the row lock"
                    await asyncio.sleep(0.01)
                # The revision row k8s-sql holds: a deadlock, and k8s-sql's is rolled back.
                await cur.execute("SELECT value FROM meta WHERE name = 'revision' FOR UPDATE")
                await other.rollback()
        finally:
            other.close()
            watcher.close()

        resp = await put
        assert resp.header.revision == first + 1
        got = await kv.Range(pb.RangeRequest(key=b"a"))
        assert [(x.value, x.mod_revision, x.version) for x in got.kvs] == [(b"v2", first + 1, 2)]
    assert "write batch" not in server.log()  # nothing failed on the way


class _Conflict(Exception):
    pass


def _backend() -> SQLiteBackend:
    """A backend (never opened) whose ``_Conflict`` counts as a conflict."""
    backend = SQLiteBackend.__new__(SQLiteBackend)
    backend.conflicted = lambda e: isinstance(e, _Conflict)  # type: ignore[method-assign]
    return backend


async def test_retrying_runs_conflicted_attempts_again_up_to_a_limit() -> None:
    calls = 0

    async def attempt(conflicts: int, error: type[Exception] = _Conflict) -> int:
        nonlocal calls
        calls += 1
        if calls <= conflicts:
            raise error
        return calls

    assert await _backend().retrying(lambda: attempt(2)) == 3
    calls = 0
    with pytest.raises(_Conflict):
        await _backend().retrying(lambda: attempt(CONFLICT_RETRIES))
    assert calls == CONFLICT_RETRIES
    calls = 0
    with pytest.raises(ValueError):  # anything else is not retried
        await _backend().retrying(lambda: attempt(1, ValueError))
    assert calls == 1
