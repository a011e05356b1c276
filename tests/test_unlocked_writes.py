"""Unlocked write batches (network.py's ``_write_unlocked``).

On PostgreSQL a batch of single-key requests reads its keys without the revision lock
and writes everything at the end in one call of ``k8s_sql_finish_batch`` (migration
5), which takes the lock and checks that what the read saw still holds. These tests
put another frontend's commit, an alarm and a lease revocation between the read and
the write, and check that the stale batch writes nothing and says so (NeedsLock).

On PostgreSQL and MariaDB a batch may start from the rows this frontend's last commit
left, without reading (backend/known.py), checked under the lock by the function or by
MySQL's guard statement (sql.stale_guard) in the same pipeline as the writes. Two
frontends' compare-and-swap loops on one key then run against each other through the
whole store, where every batch that loses the race runs again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from k8s_sql import metrics
from k8s_sql.backend import open_backend, plans
from k8s_sql.backend.base import KeyRange, LeaseRow, LogRow, NeedsLock, Row
from k8s_sql.backend.network import NetworkBackend
from k8s_sql.pb import rpc_pb2 as pb
from k8s_sql.store.store import Store


@pytest.fixture(params=["postgres", "mariadb"])
def database(request):  # type: ignore[no-untyped-def]
    """The server of each database whose batches may start from known rows."""
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture
async def frontends(database) -> AsyncIterator[tuple[NetworkBackend, NetworkBackend]]:
    """Two backends on one fresh database, as two frontends would have."""
    async for pair in _two_backends(database.new_dsn()):
        yield pair


@pytest.fixture
async def pg_frontends(postgres_server) -> AsyncIterator[tuple[NetworkBackend, NetworkBackend]]:
    """Two backends on one fresh PostgreSQL database (unlocked batches that read)."""
    async for pair in _two_backends(postgres_server.new_dsn()):
        yield pair


async def _two_backends(dsn: str) -> AsyncIterator[tuple[NetworkBackend, NetworkBackend]]:
    a, b = open_backend(dsn), open_backend(dsn)
    await a.open()
    await b.open()
    assert isinstance(a, NetworkBackend) and isinstance(b, NetworkBackend)
    assert a.unlocked_writes
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def _put(backend: NetworkBackend, key: bytes, value: bytes, lease: int = 0) -> int:
    """A locked batch of one put; its revision."""
    async with backend.write([key]) as tx:
        prev = await tx.get(key)
        tx.revision += 1
        row = Row(
            key, prev.create_rev if prev else tx.revision, tx.revision, (prev.version if prev else 0) + 1, lease, value
        )
        await tx.put(row)
        tx.log(LogRow(tx.revision, 0, 0, row, prev))
        return tx.revision


async def _state(backend: NetworkBackend, key: bytes) -> tuple[int, Row | None]:
    res = await backend.range(KeyRange(key, None), 0, 0, False, False)
    return res.revision, (res.rows[0] if res.rows else None)


async def test_a_commit_after_the_read_sends_the_batch_to_the_lock(pg_frontends) -> None:
    a, b = pg_frontends
    first = await _put(a, b"k", b"v1")
    with pytest.raises(NeedsLock, match="another write committed"):
        async with a.write([b"k"], unlocked=True) as tx:
            prev = await tx.get(b"k")
            assert prev is not None and prev.value == b"v1"  # read without the lock
            theirs = await _put(b, b"k", b"theirs")  # another frontend commits meanwhile
            assert theirs == first + 1
            tx.revision += 1
            row = Row(b"k", prev.create_rev, tx.revision, prev.version + 1, 0, b"ours")
            await tx.put(row)
            tx.log(LogRow(tx.revision, 0, 0, row, prev))
    revision, row = await _state(a, b"k")
    assert revision == theirs and row is not None and row.value == b"theirs" and row.version == 2
    changes, _ = await a.changes(first + 1, revision + 5, None, 100)
    assert [(c.rev, c.row.value) for c in changes] == [(theirs, b"theirs")]  # nothing of ours in the log

    # Unchanged since the read: it commits, in two statements.
    async with a.write([b"k"], unlocked=True) as tx:
        prev = await tx.get(b"k")
        assert prev is not None
        tx.revision += 1
        row = Row(b"k", prev.create_rev, tx.revision, prev.version + 1, 0, b"ours")
        await tx.put(row)
        tx.log(LogRow(tx.revision, 0, 0, row, prev))
    revision, row = await _state(b, b"k")
    assert revision == theirs + 1 and row is not None and (row.value, row.version) == (b"ours", 3)


async def test_an_alarm_raised_after_the_read_sends_the_batch_to_the_lock(pg_frontends) -> None:
    a, b = pg_frontends
    await _put(a, b"k", b"v1")
    with pytest.raises(NeedsLock):
        async with a.write([b"k"], unlocked=True) as tx:
            assert not tx.nospace
            assert await b.meta_compare_and_set({"alarm_nospace": 0}, {"alarm_nospace": 42})
            tx.revision += 1
            row = Row(b"big", tx.revision, tx.revision, 1, 0, b"x" * 1000)
            await tx.put(row)
            tx.log(LogRow(tx.revision, 0, 0, row, None))
    assert (await _state(a, b"big"))[1] is None
    # With the alarm up, an unlocked batch does not even start: the locked path decides.
    with pytest.raises(NeedsLock, match="alarm"):
        async with a.write([b"k"], unlocked=True):
            pass


async def test_a_lease_revoked_after_the_read_sends_the_batch_to_the_lock(pg_frontends) -> None:
    a, b = pg_frontends
    async with a.write(lease_ids=[7]) as tx:
        await tx.lease_put(LeaseRow(7, 60, 2e9))
    with pytest.raises(NeedsLock):
        async with a.write([b"k"], [7], unlocked=True) as tx:
            assert await tx.lease_get(7) is not None
            async with b.write(lease_ids=[7]) as other:  # revoked: no keys, no new revision
                await other.lease_delete(7)
            tx.revision += 1
            row = Row(b"k", tx.revision, tx.revision, 1, 7, b"v")
            await tx.put(row)
            tx.log(LogRow(tx.revision, 0, 0, row, None))
    assert (await _state(a, b"k"))[1] is None  # no key left attached to a lease that is gone


async def test_a_statement_inside_the_batch_sends_it_to_the_lock_before_it_writes(pg_frontends) -> None:
    a, _ = pg_frontends
    await _put(a, b"k", b"v1")
    for needs in (
        lambda tx: tx.range(KeyRange(b"a", b"z")),
        lambda tx: tx.get(b"not-read-first"),
        lambda tx: tx.lease_put(LeaseRow(9, 60, 2e9)),
        lambda tx: tx.savepoint(),
    ):
        with pytest.raises(NeedsLock, match="inside the batch"):
            async with a.write([b"k"], unlocked=True) as tx:
                tx.revision += 1
                row = Row(b"k", 2, tx.revision, 2, 0, b"v2")
                await tx.put(row)
                tx.log(LogRow(tx.revision, 0, 0, row, None))
                await needs(tx)
        revision, row = await _state(a, b"k")
        assert revision == 2 and row is not None and row.value == b"v1"


async def test_two_frontends_compare_and_swap_one_counter(database) -> None:
    """Kubernetes' GuaranteedUpdate from both sides at once: read, then a txn that puts
    n+1 if the key is unchanged. Every success must count exactly once, revisions must
    be gap-free, and the batches that lost the race ran again (PostgreSQL: with a read,
    then with the lock; MySQL: with the lock)."""
    dsn = database.new_dsn()
    stores = [Store(open_backend(dsn)) for _ in range(2)]
    for s in stores:
        await s.backend.open()  # type: ignore[attr-defined]
        await s.start()
    reruns = {started: metrics.UNLOCKED_BATCHES_RETRIED.labels(started).value for started in ("known", "read")}
    key = b"/registry/counter"
    try:
        await stores[0].put(pb.PutRequest(key=key, value=b"0"))
        per_writer, successes = 25, []

        async def writer(store: Store) -> None:
            done = 0
            while done < per_writer:
                got = (await store.range(pb.RangeRequest(key=key))).kvs[0]
                cmp = pb.Compare(key=key, target=pb.Compare.MOD, result=pb.Compare.EQUAL, mod_revision=got.mod_revision)
                put = pb.RequestOp(request_put=pb.PutRequest(key=key, value=b"%d" % (int(got.value) + 1)))
                resp = await store.txn(pb.TxnRequest(compare=[cmp], success=[put]))
                if resp.succeeded:
                    successes.append(resp.header.revision)
                    done += 1

        await asyncio.gather(*(writer(s) for s in stores for _ in range(3)))
        final = (await stores[1].range(pb.RangeRequest(key=key))).kvs[0]
        assert int(final.value) == len(successes) == 6 * per_writer
        assert final.version == len(successes) + 1
        assert sorted(successes) == list(range(successes and min(successes), max(successes) + 1))
        changes, _ = await stores[0].backend.changes(1, final.mod_revision, None, 1000)
        assert [int(c.row.value) for c in changes] == list(range(len(changes)))  # one put per revision, in order
        after = {started: metrics.UNLOCKED_BATCHES_RETRIED.labels(started).value for started in ("known", "read")}
        assert after["known"] > reruns["known"], (reruns, after)
        reads = stores[0].backend.dialect.read_for_write is not None  # type: ignore[attr-defined]
        assert (after["read"] > reruns["read"]) == reads, (reruns, after)
    finally:
        for s in stores:
            await s.stop()
            await s.backend.close()  # type: ignore[attr-defined]


async def test_a_batch_after_this_frontends_own_commit_does_not_read(frontends, monkeypatch) -> None:
    a, b = frontends
    first = await _put(a, b"k", b"v1")
    assert a.known.revision == first  # what the commit left

    def no_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("read the keys")

    monkeypatch.setattr(plans, "begin_unlocked", no_read)
    async with a.write([b"k", b"new"], unlocked=True, newest=first) as tx:
        prev = await tx.get(b"k")
        assert prev is not None and prev.value == b"v1"
        assert await tx.get(b"new") is None  # never seen: assumed absent
        tx.revision += 1
        for key, before in ((b"k", prev), (b"new", None)):
            row = Row(key, before.create_rev if before else tx.revision, tx.revision, 2 if before else 1, 0, b"v2")
            await tx.put(row)
            tx.log(LogRow(tx.revision, key == b"new", 0, row, before))
    revision, row = await _state(b, b"k")
    assert revision == first + 1 and row is not None and (row.value, row.version) == (b"v2", 2)
    assert (await _state(b, b"new"))[1] is not None

    # Another frontend writes: the known rows are stale, and the check says so.
    await _put(b, b"k", b"theirs")
    with pytest.raises(NeedsLock) as e:
        async with a.write([b"k"], unlocked=True, newest=first + 1) as tx:
            prev = await tx.get(b"k")
            tx.revision += 1
            row = Row(b"k", prev.create_rev, tx.revision, prev.version + 1, 0, b"stale")  # type: ignore[union-attr]
            await tx.put(row)
            tx.log(LogRow(tx.revision, 0, 0, row, prev))
    assert e.value.started_known
    assert (await _state(a, b"k"))[1].value == b"theirs"  # type: ignore[union-attr]
    assert a.known.revision == -1  # forgotten


async def test_a_key_assumed_absent_that_exists_is_caught(frontends) -> None:
    a, _ = frontends
    first = await _put(a, b"k", b"v1")
    a.known.forget()  # as if evicted: k is assumed absent
    a.known.committed(-1, (first, 0, 0, 0), {})
    with pytest.raises(NeedsLock) as e:
        async with a.write([b"k"], unlocked=True, newest=first) as tx:
            assert await tx.get(b"k") is None
            tx.revision += 1
            row = Row(b"k", tx.revision, tx.revision, 1, 0, b"recreated")
            await tx.put(row)
            tx.log(LogRow(tx.revision, 0, 0, row, None))
    assert e.value.started_known
    revision, row = await _state(a, b"k")
    assert revision == first and row is not None and (row.value, row.version) == (b"v1", 1)

    # After a refusal the next batch does not start from known rows (known.py's backoff
    # for frontends writing in turn), even if they are as of the newest revision: it reads.
    a.known.committed(-1, (first, 0, 0, 0), {})
    async with a.write([b"k"], unlocked=True, newest=first) as tx:
        got = await tx.get(b"k")
        assert got is not None and got.value == b"v1"

    # A batch that would write nothing has nothing to check its answers with: it reads.
    a.known.committed(-1, (first, 0, 0, 0), {})
    with pytest.raises(NeedsLock, match="writes nothing"):
        async with a.write([b"k"], unlocked=True, newest=first) as tx:
            assert await tx.get(b"k") is None  # a failed compare would answer from this


async def test_a_database_behind_this_frontends_commits_forgets_them(frontends) -> None:
    """A failover to a standby that lost this frontend's last commits: the rows those
    commits left are not the database's, even if the revision later comes back to the
    same number."""
    a, b = frontends
    await _put(a, b"k", b"v1")
    second = await _put(a, b"k", b"v2")
    assert a.known.revision == second
    await b.meta_set("revision", second - 1)  # as the standby holds it: the second commit never arrived
    assert (await a.current())[0] == second - 1
    assert a.known.revision == -1 and len(a.known) == 0
