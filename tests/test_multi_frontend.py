"""Several k8s-sql frontends on one database serve one store."""

from __future__ import annotations

import queue
import statistics
import threading
import time

import grpc
import pytest

from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc

WRITES = 200


@pytest.fixture
def pgbouncer(postgres_server):
    """PgBouncer in transaction-pooling mode in front of the session's PostgreSQL."""
    from conftest import free_port, missing

    from testing.databases import PgBouncer

    why = PgBouncer.available()
    if why:
        missing(why)
    bouncer = PgBouncer(free_port(), postgres_server.port)
    bouncer.start()
    yield bouncer
    bouncer.stop()


@pytest.fixture(params=["sqlite", "postgres", "mariadb"])
def two_frontends(request, k8s_sql_factory, tmp_path):
    return _two_frontends(request, k8s_sql_factory, tmp_path)


# pgbouncer: the frontends find out by themselves that prepared statements and
# LISTEN/NOTIFY do not work through it; pgbouncer-flag: told so by ?pgbouncer=true
@pytest.fixture(params=["sqlite", "postgres", "mariadb", "pgbouncer", "pgbouncer-flag"])
def two_frontends_or_pgbouncer(request, k8s_sql_factory, tmp_path):
    return _two_frontends(request, k8s_sql_factory, tmp_path)


def _two_frontends(request, k8s_sql_factory, tmp_path):
    if request.param == "sqlite":
        shared = tmp_path / "shared"
        a = k8s_sql_factory(data_dir=shared)
        b = k8s_sql_factory(data_dir=shared)
    elif request.param.startswith("pgbouncer"):
        bouncer = request.getfixturevalue("pgbouncer")
        name = request.getfixturevalue("postgres_server").new_dsn().rsplit("/", 1)[1]
        dsn = f"postgres://postgres@127.0.0.1:{bouncer.port}/{name}"
        if request.param == "pgbouncer-flag":
            dsn += "?pgbouncer=true"
        a = k8s_sql_factory("--endpoint", dsn)
        b = k8s_sql_factory("--endpoint", dsn)
    else:
        dsn = request.getfixturevalue(f"{request.param}_server").new_dsn()
        a = k8s_sql_factory("--endpoint", dsn)
        b = k8s_sql_factory("--endpoint", dsn)
    return request.param, a, b


def test_writes_on_one_frontend_reach_reads_and_watches_on_another(two_frontends_or_pgbouncer) -> None:
    backend, a, b = two_frontends_or_pgbouncer
    ch_a, ch_b = grpc.insecure_channel(a.endpoint), grpc.insecure_channel(b.endpoint)
    kv_a, kv_b = rpc_pb2_grpc.KVStub(ch_a), rpc_pb2_grpc.KVStub(ch_b)
    watch_b = rpc_pb2_grpc.WatchStub(ch_b)

    events: queue.Queue[tuple[float, pb.WatchResponse]] = queue.Queue()
    stop = threading.Event()

    def requests():
        yield pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"mf/", range_end=b"mf0", prev_kv=True))
        stop.wait(60)

    stream = watch_b.Watch(requests(), timeout=60)

    def read() -> None:
        try:
            for resp in stream:
                events.put((time.monotonic(), resp))
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    created = events.get(timeout=10)[1]
    assert created.created

    sent_at: dict[int, float] = {}
    for i in range(WRITES):
        t = time.monotonic()
        rev = kv_a.Put(pb.PutRequest(key=b"mf/%03d" % (i % 50), value=b"%d" % i)).header.revision
        sent_at[rev] = t
        # Read-your-writes across frontends: the write is visible on B once acknowledged.
        got = kv_b.Range(pb.RangeRequest(key=b"mf/%03d" % (i % 50)))
        assert got.kvs[0].mod_revision == rev and got.kvs[0].value == b"%d" % i

    received: list[tuple[float, int]] = []
    deadline = time.monotonic() + 20
    while len(received) < WRITES and time.monotonic() < deadline:
        at, resp = events.get(timeout=max(0.1, deadline - time.monotonic()))
        received.extend((at, e.kv.mod_revision) for e in resp.events)
    stop.set()
    stream.cancel()
    ch_a.close()
    ch_b.close()

    revs = [r for _, r in received]
    assert revs == sorted(sent_at), "events missing, duplicated or out of order"
    latencies = sorted((at - sent_at[r]) * 1000 for at, r in received)
    p50 = statistics.median(latencies)
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(f"\ncross-frontend watch latency on {backend}: p50 {p50:.1f} ms, p99 {p99:.1f} ms ({len(latencies)} events)")
    assert p99 < 1000


def test_leader_failover_expires_leases_once(two_frontends) -> None:
    """Kill the leader: another frontend takes over lease expiry within seconds, and
    a lease that expires meanwhile is revoked exactly once (one DELETE event)."""
    backend, a, b = two_frontends
    ch_a, ch_b = grpc.insecure_channel(a.endpoint), grpc.insecure_channel(b.endpoint)
    try:
        members = rpc_pb2_grpc.ClusterStub(ch_a).MemberList(pb.MemberListRequest()).members
        assert sorted(u for m in members for u in m.clientURLs) == sorted([a.url, b.url])
        leader_id = rpc_pb2_grpc.MaintenanceStub(ch_a).Status(pb.StatusRequest()).leader
        assert leader_id == rpc_pb2_grpc.MaintenanceStub(ch_b).Status(pb.StatusRequest()).leader
        a_leads = {m.ID: m for m in members}[leader_id].clientURLs == [a.url]
        leader, ch = (a, ch_b) if a_leads else (b, ch_a)

        kv, lease = rpc_pb2_grpc.KVStub(ch), rpc_pb2_grpc.LeaseStub(ch)
        lid = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=2)).ID
        put_rev = kv.Put(pb.PutRequest(key=b"lf/key", value=b"v", lease=lid)).header.revision

        events: queue.Queue[pb.WatchResponse] = queue.Queue()
        stop = threading.Event()

        def requests():
            yield pb.WatchRequest(
                create_request=pb.WatchCreateRequest(key=b"lf/", range_end=b"lf0", start_revision=put_rev + 1)
            )
            stop.wait(60)

        stream = rpc_pb2_grpc.WatchStub(ch).Watch(requests(), timeout=60)

        def read() -> None:
            try:
                for resp in stream:
                    events.put(resp)
            except grpc.RpcError:
                pass  # cancelled at the end of the test

        threading.Thread(target=read, daemon=True).start()

        killed = time.monotonic()
        leader.kill9()
        deletes = []
        deadline = time.monotonic() + 20
        while not deletes and time.monotonic() < deadline:
            try:
                resp = events.get(timeout=0.5)
            except queue.Empty:
                continue
            deletes += [e for e in resp.events if e.type == e.DELETE]
        failover = time.monotonic() - killed
        assert deletes and deletes[0].kv.key == b"lf/key", "the lease was not expired after the leader died"
        # exactly once: nothing more arrives, and the key and lease are gone
        with pytest.raises(queue.Empty):
            events.get(timeout=1.5)
        assert kv.Range(pb.RangeRequest(key=b"lf/key")).count == 0
        assert lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lid)).TTL == -1
        new_leader = rpc_pb2_grpc.MaintenanceStub(ch).Status(pb.StatusRequest()).leader
        assert new_leader != leader_id
        print(f"\nleader failover on {backend}: lease expired {failover:.1f} s after the leader was killed")
        stop.set()
        stream.cancel()
    finally:
        ch_a.close()
        ch_b.close()


def test_workers_share_one_port(k8s_sql_factory, backend_args) -> None:
    """--workers 2: two processes accept connections on one port and serve one store.
    They start together on a database that does not exist yet, so they also race to
    create it, its schema and its first rows."""
    server = k8s_sql_factory("--workers", "2", *backend_args)
    # The factory saw one worker answer; the other may still be opening the database
    # (answering UNAVAILABLE meanwhile, as a frontend does): wait until both answer.
    ready: set[int] = set()
    deadline = time.monotonic() + 60
    while len(ready) < 2:
        assert time.monotonic() < deadline, f"only workers {ready} became ready; log:\n{server.log()}"
        with grpc.insecure_channel(server.endpoint, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            try:
                ready.add(rpc_pb2_grpc.MaintenanceStub(ch).Status(pb.StatusRequest(), timeout=5).header.member_id)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
    seen: set[int] = set()
    revisions = []
    for i in range(24):
        with grpc.insecure_channel(server.endpoint, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            resp = rpc_pb2_grpc.KVStub(ch).Put(pb.PutRequest(key=b"w/%d" % i, value=b"v"))
            seen.add(resp.header.member_id)
            revisions.append(resp.header.revision)
    assert len(seen) == 2, "connections were not spread over both workers"
    assert revisions == list(range(2, 26))  # one store, one revision sequence
    with grpc.insecure_channel(server.endpoint) as ch:
        members = rpc_pb2_grpc.ClusterStub(ch).MemberList(pb.MemberListRequest()).members
    assert sorted(m.name for m in members) == ["default-0", "default-1"]


async def test_postgres_announces_each_commit(postgres_server, k8s_sql_factory) -> None:
    """On PostgreSQL a commit is announced (NOTIFY, from migration 4's trigger) with its
    revision, so other frontends' followers need not wait for their next poll. A
    listener of our own hears every revision a frontend commits, and only committed
    ones: a txn whose compare fails commits no revision and is not announced."""
    import asyncio

    from k8s_sql.backend import open_backend

    dsn = postgres_server.new_dsn()
    server = k8s_sql_factory("--endpoint", dsn)
    listener = open_backend(dsn)
    await listener.open()
    heard: asyncio.Queue[int] = asyncio.Queue()
    follow = asyncio.create_task(listener.follow_commits(heard.put_nowait))
    try:
        async with grpc.aio.insecure_channel(server.endpoint) as ch:
            kv = rpc_pb2_grpc.KVStub(ch)
            # The listener connects on its own: write until one write is heard.
            deadline = time.monotonic() + 10
            while heard.empty():
                assert time.monotonic() < deadline, "no commit was announced"
                last = (await kv.Put(pb.PutRequest(key=b"n/0", value=b"v"))).header.revision
                await asyncio.sleep(0.05)
            while (rev := await asyncio.wait_for(heard.get(), 10)) != last:
                assert rev < last
            for i in range(1, 4):
                await kv.Txn(
                    pb.TxnRequest(
                        compare=[pb.Compare(key=b"n/0", target=pb.Compare.MOD, mod_revision=1)],  # never true
                        success=[pb.RequestOp(request_put=pb.PutRequest(key=b"n/x", value=b"v"))],
                    )
                )
                put = await kv.Put(pb.PutRequest(key=b"n/%d" % i, value=b"v"))
                assert await asyncio.wait_for(heard.get(), 10) == put.header.revision
            assert heard.empty()
    finally:
        follow.cancel()
        await asyncio.gather(follow, return_exceptions=True)
        await listener.close()


async def test_a_vanished_prepared_statement_is_retried_without_the_cache(postgres_server) -> None:
    """What a transaction-pooling proxy does to a request mid-flight (PgBouncer handed the
    connection another server): the transaction is run again on a pool without asyncpg's
    statement cache, and the request succeeds."""
    import asyncpg

    from k8s_sql.backend.postgres import PostgresBackend

    backend = PostgresBackend(postgres_server.new_dsn())
    await backend.open()
    try:
        assert not backend.pgbouncer
        calls = 0

        async def attempt() -> int:
            nonlocal calls
            calls += 1
            async with backend.snapshot_conn() as conn:
                if calls == 1:
                    raise asyncpg.InvalidSQLStatementNameError('prepared statement "__asyncpg_stmt_7__" does not exist')
                return int((await conn.fetch("SELECT 41 + 1", ()))[0][0])

        assert await backend.retrying(attempt) == 42
        assert calls == 2 and backend.pgbouncer and backend.connect_args == {"statement_cache_size": 0}
    finally:
        await backend.close()
