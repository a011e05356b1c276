"""Bounded resources, measured: each test drives a real server process and reads its
resident memory (``VmRSS`` in /proc/PID/status), failing past a stated bound.

- failing requests of every kind leave no memory behind;
- long write runs with watchers stay within the hub's byte bounds (ring and caches)
  and deliver every event;
- thousands of concurrent watch streams opened and closed fail none (a real etcd,
  the same client, is the control);
- watchers that never read hold a bounded amount, then get every event once, in order;
- unlimited Ranges over 50 MB give their memory back;
- ``--max-concurrent-streams`` queues a connection's calls past the limit, as etcd's;
- clients opening a connection per call, many at once, fail none and crash nothing.

Sizes fit CI (about a minute per backend); ``K8S_SQL_RESOURCE_SCALE=N`` multiplies the
counts and durations for longer local runs (the issue's numbers are at 1 where they
fit, noted per test).
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from conftest import ServerProcess

from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc

SCALE = float(os.environ.get("K8S_SQL_RESOURCE_SCALE", "1"))
MB = 1_000_000
MiB = 1 << 20
# Seconds for freed memory to reach the system. grpc.aio's glibc heap gives it back at
# once; tcmalloc, the heap of --transport envoy, took about 26 s (see the huge Ranges).
RETURN_WITHIN = 60


def scaled(n: float) -> int:
    return max(1, int(n * SCALE))


def rss(server: ServerProcess) -> int:
    """The server process's resident set size, in bytes."""
    assert server.proc is not None
    with open(f"/proc/{server.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def rss_below(server: ServerProcess, limit: float) -> tuple[int, float]:
    """Wait up to RETURN_WITHIN seconds for the server's RSS to fall below ``limit``
    (freed memory may reach the system late; a leak never does): the RSS it ended at,
    and the seconds waited."""
    start = time.monotonic()
    while (now := rss(server)) >= limit and time.monotonic() - start < RETURN_WITHIN:
        await asyncio.sleep(0.1)
    return now, time.monotonic() - start


class RssPeak:
    """Samples a server's RSS every 50 ms while a workload runs; ``peak`` is the highest."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.peak = rss(server)
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss(self.server))
            await asyncio.sleep(0.05)

    async def __aenter__(self) -> RssPeak:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.peak = max(self.peak, rss(self.server))


def report(request: pytest.FixtureRequest, **numbers: float) -> None:
    """Measured numbers, kept with the test's report (``-rA`` or the junit xml shows them)."""
    for k, v in numbers.items():
        request.node.user_properties.append((k, round(v / MB, 1) if k.startswith("rss") else v))
    print(" ".join(f"{k}={v / MB:.1f}MB" if k.startswith("rss") else f"{k}={v}" for k, v in numbers.items()))


def channels(endpoint: str, n: int) -> list[grpc.aio.Channel]:
    """``n`` channels, each its own TCP connection (gRPC shares one between channels
    with the same target and options otherwise)."""
    return [
        grpc.aio.insecure_channel(
            endpoint,
            options=[("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 256 * MiB)],
        )
        for _ in range(n)
    ]


async def put_many(endpoint: str, count: int, value: bytes, prefix: bytes, clients: int = 32) -> None:
    chans = channels(endpoint, 4)
    stubs = [rpc_pb2_grpc.KVStub(c) for c in chans]
    queue = iter(range(count))

    async def worker(i: int) -> None:
        stub = stubs[i % len(stubs)]
        for n in queue:
            await stub.Put(pb.PutRequest(key=prefix + b"%08d" % n, value=value), timeout=60)

    try:
        await asyncio.gather(*(worker(i) for i in range(clients)))
    finally:
        for c in chans:
            await c.close()


# -- 1. failing requests ------------------------------------------------------------------

UNKNOWN_LEASE = 0x5EED_0000_0001


def failing_requests(
    kv: rpc_pb2_grpc.KVStub,
    lease: rpc_pb2_grpc.LeaseStub,
    cluster: rpc_pb2_grpc.ClusterStub,
    raw: grpc.aio.UnaryUnaryMultiCallable,
    compacted: int,
    big: bytes,
) -> list[Callable[[], Awaitable[object]]]:
    """One request of every error kind etcd answers (and a malformed message)."""
    put = pb.RequestOp(request_put=pb.PutRequest(key=b"k", value=b"v"))

    async def keepalive_unknown() -> object:
        # etcd answers a keepalive of an unknown lease with TTL 0 on the open stream
        async def one() -> AsyncIterator[pb.LeaseKeepAliveRequest]:
            yield pb.LeaseKeepAliveRequest(ID=UNKNOWN_LEASE)

        async for resp in lease.LeaseKeepAlive(one(), timeout=30):
            assert resp.TTL <= 0
            break
        return None

    return [
        lambda: kv.Put(pb.PutRequest(key=b"", value=b"v")),  # key is not provided
        lambda: kv.Put(pb.PutRequest(key=b"k", value=b"v", lease=UNKNOWN_LEASE)),  # lease not found (in a batch)
        lambda: kv.Range(pb.RangeRequest(key=b"k", revision=compacted - 1)),  # compacted
        lambda: kv.Range(pb.RangeRequest(key=b"k", revision=1 << 40)),  # future revision
        lambda: kv.Range(pb.RangeRequest(key=b"k", sort_order=7)),  # type: ignore[arg-type]  # invalid sort option
        lambda: kv.Txn(pb.TxnRequest(success=[put] * 129)),  # too many operations
        lambda: kv.Txn(pb.TxnRequest(success=[put, put])),  # duplicate key
        lambda: kv.Put(pb.PutRequest(key=b"k", value=big)),  # request is too large
        lambda: kv.DeleteRange(pb.DeleteRangeRequest(key=b"")),  # key is not provided
        lambda: kv.Put(pb.PutRequest(key=b"k", ignore_value=True)),  # key not found (ignore_value)
        lambda: lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=UNKNOWN_LEASE)),  # lease not found
        lambda: lease.LeaseGrant(pb.LeaseGrantRequest(TTL=1 << 40)),  # too large lease TTL
        lambda: cluster.MemberAdd(pb.MemberAddRequest(peerURLs=["http://127.0.0.1:1"])),  # not capable
        lambda: raw(b"\xff\xff\xff"),  # undecodable: INTERNAL
        keepalive_unknown,
    ]


async def test_failing_requests_leave_no_memory(
    k8s_sql_factory: Callable[..., ServerProcess], backend_args: list[str], request: pytest.FixtureRequest
) -> None:
    """100,000 failing requests of every kind (the issue's number, at scale 1 on SQLite;
    the other backends run a quarter: most kinds fail before the database): the server's
    RSS ends within 10 MB of where it was after a warm-up of the same mix. Failing
    requests used to keep about 4 KB each through a shared exception's traceback."""
    server = k8s_sql_factory("--max-request-bytes", "4096", *backend_args)
    total = scaled(100_000 if not backend_args else 25_000)
    chans = channels(server.endpoint, 8)
    try:
        kv0 = rpc_pb2_grpc.KVStub(chans[0])
        for i in range(3):
            await kv0.Put(pb.PutRequest(key=b"c%d" % i, value=b"v"))
        compacted = (await kv0.Put(pb.PutRequest(key=b"c", value=b"v"))).header.revision
        await kv0.Compact(pb.CompactionRequest(revision=compacted, physical=True))
        kinds = [
            failing_requests(
                rpc_pb2_grpc.KVStub(c),
                rpc_pb2_grpc.LeaseStub(c),
                rpc_pb2_grpc.ClusterStub(c),
                c.unary_unary("/etcdserverpb.KV/Range"),
                compacted,
                b"x" * 5000,
            )
            for c in chans
        ]
        outcomes: collections.Counter[str] = collections.Counter()

        async def flood(n: int, clients: int = 64) -> None:
            counter = iter(range(n))

            async def worker(w: int) -> None:
                mine = kinds[w % len(kinds)]
                for i in counter:
                    try:
                        await mine[i % len(mine)]()
                        outcomes["ok"] += 1
                    except grpc.aio.AioRpcError as e:
                        outcomes[e.code().name] += 1

            await asyncio.gather(*(worker(w) for w in range(clients)))

        await flood(total // 5)  # warm-up: the same mix and concurrency
        before = rss(server)
        outcomes.clear()
        started = time.monotonic()
        async with RssPeak(server) as peak:
            await flood(total)
        elapsed = time.monotonic() - started
        after = rss(server)
    finally:
        for c in chans:
            await c.close()
    report(request, requests=total, seconds=round(elapsed, 1), rss_before=before, rss_after=after, rss_peak=peak.peak)
    # every request failed as etcd fails it, except the keepalives (TTL 0, not an error)
    kinds_count = len(kinds[0])
    assert outcomes["ok"] == (total + 1) // kinds_count, outcomes
    assert outcomes["UNKNOWN"] == 0, outcomes
    assert after - before < 10 * MB, f"RSS grew {(after - before) / MB:.1f} MB over {total} failing requests"


# -- 2. long write runs with watchers -----------------------------------------------------


async def read_events(call: grpc.aio.StreamStreamCall, want: int, prefix: bytes) -> list[int]:
    """Read a watch stream until ``want`` events arrived; the keys' numbers, in order."""
    got: list[int] = []
    while len(got) < want:
        resp = await call.read()
        assert resp is not grpc.aio.EOF, "watch stream ended"
        assert not resp.canceled, resp
        got += [int(ev.kv.key[len(prefix) :]) for ev in resp.events]
    return got


async def open_watch(stub: rpc_pb2_grpc.WatchStub, prefix: bytes, **kw: object) -> grpc.aio.StreamStreamCall:
    call = stub.Watch()
    end = prefix[:-1] + bytes([prefix[-1] + 1])
    await call.write(pb.WatchRequest(create_request=pb.WatchCreateRequest(key=prefix, range_end=end, **kw)))  # type: ignore[arg-type]
    created = await call.read()
    assert created.created and not created.canceled, created
    return call


async def test_write_run_with_watchers_is_bounded(k8s_sql: ServerProcess, request: pytest.FixtureRequest) -> None:
    """40,000 Puts of 1 KiB (the issue's run; measured on main before the hub's byte
    bounds: RSS 46 -> 375 MB, and it stayed there) with two watchers reading: every event
    is delivered, in order, and RSS stays within 100 MB of the idle server (the hub's
    bounds are 32 MiB of ring and 2 x 16 MiB of caches; the rest is gRPC's and the
    database driver's working memory). Measured on SQLite: +59 MB; with the hub of
    before (count bounds only) +175 MB."""
    count = scaled(40_000)
    prefix = b"/w/"
    value = random.randbytes(1024)
    chans = channels(k8s_sql.endpoint, 2)
    try:
        await put_many(k8s_sql.endpoint, 200, value, b"/warm/")
        before = rss(k8s_sql)
        watches = [await open_watch(rpc_pb2_grpc.WatchStub(c), prefix) for c in chans]
        async with RssPeak(k8s_sql) as peak:
            readers = [asyncio.create_task(read_events(w, count, prefix)) for w in watches]
            await put_many(k8s_sql.endpoint, count, value, prefix)
            results = await asyncio.wait_for(asyncio.gather(*readers), 120)
        for w in watches:
            w.cancel()
        after = rss(k8s_sql)
    finally:
        for c in chans:
            await c.close()
    report(request, puts=count, rss_before=before, rss_after=after, rss_peak=peak.peak)
    for got in results:
        assert sorted(got) == list(range(count)) and len(set(got)) == count
    assert peak.peak - before < 100 * MB, f"RSS peaked {(peak.peak - before) / MB:.0f} MB above the idle server"


# -- 3. thousands of concurrent watch streams -----------------------------------------------


async def churn_watch_streams(endpoint: str, streams: int, seconds: float) -> tuple[int, collections.Counter[str]]:
    """``streams`` concurrent watch streams on one connection, each opened, its watch
    created (the first response read) and cancelled by the client, again and again for
    ``seconds``: the number that succeeded, and the failures by status and message."""
    (chan,) = channels(endpoint, 1)
    stub = rpc_pb2_grpc.WatchStub(chan)
    errors: collections.Counter[str] = collections.Counter()
    ok = 0
    deadline = time.monotonic() + seconds

    async def one(i: int) -> None:
        nonlocal ok
        while time.monotonic() < deadline:
            call = stub.Watch()
            try:
                await call.write(pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"/s/%d" % i)))
                resp = await call.read()
                assert resp.created, resp
                ok += 1
            except grpc.aio.AioRpcError as e:
                errors[f"{e.code().name}: {e.details()}"] += 1
            finally:
                call.cancel()

    try:
        await asyncio.gather(*(one(i) for i in range(streams)))
    finally:
        await chan.close()
    return ok, errors


STREAMS = 5000  # the number


async def test_concurrent_watch_streams_fail_none(
    k8s_sql_factory: Callable[..., ServerProcess], request: pytest.FixtureRequest
) -> None:
    """5,000 concurrent watch streams opened and closed for 30 s (a minute with
    K8S_SQL_RESOURCE_SCALE=2) fail none, and the server's RSS ends within 80 MB of its
    level after a first, short round. Measured:
    108,128 streams in a minute, +54 MB; five rounds of 20 s (about 35,000 streams each)
    ended at 123, 115, 142, 129 and 140 MB from 52 MB idle: a plateau of gRPC core's
    and the allocator's, not a growth per stream. Before: 10,712 of 64,288 failed with
    "INTERNAL: Internal error from Core":
    gRPC core's pending-call queue (calls the grpc.aio server had not yet taken) refused
    calls at random past 1,000 (see server.grpc_options). Creating a watch reads no
    database, so this runs on SQLite only."""
    k8s_sql = k8s_sql_factory()
    seconds = 30 * SCALE
    ok0, errors0 = await churn_watch_streams(k8s_sql.endpoint, STREAMS, 3)  # warm-up round
    before = rss(k8s_sql)
    async with RssPeak(k8s_sql) as peak:
        ok, errors = await churn_watch_streams(k8s_sql.endpoint, STREAMS, seconds)
    after, _ = await rss_below(k8s_sql, before + 80 * MB)
    report(request, streams_ok=ok0 + ok, stream_errors=sum(errors0.values()) + sum(errors.values()))
    report(request, rss_before=before, rss_after=after, rss_peak=peak.peak)
    assert not errors0 and not errors, (errors0 + errors).most_common(5)
    assert ok >= STREAMS
    assert after - before < 80 * MB, f"RSS {(after - before) / MB:.1f} MB above the first round"


async def test_concurrent_watch_streams_on_real_etcd(etcd: ServerProcess, request: pytest.FixtureRequest) -> None:
    """The control: the same client against a real etcd fails none."""
    ok, errors = await churn_watch_streams(etcd.endpoint, STREAMS, 10 * SCALE)
    report(request, streams_ok=ok, stream_errors=sum(errors.values()))
    assert not errors, errors.most_common(5)
    assert ok >= STREAMS


# -- 4. watchers that never read ------------------------------------------------------------


async def test_watchers_that_do_not_read(k8s_sql: ServerProcess, request: pytest.FixtureRequest) -> None:
    """Four streams watch a prefix (with prev_kv, so each event carries two values) and
    read nothing while 24,000 Puts of 1 KiB overwrite 2,000 keys (about 50 MB of events
    per watcher): the server holds at most one batch per stream (stream.BATCH_BYTES),
    gRPC's flow-control window and the hub's bounds, so RSS stays within 130 MB of the
    idle server; then the watchers read, and each gets every event exactly once, in
    revision order (caught up from the log, as etcd's unsynced watchers). Measured on
    SQLite: +88 MB; before the byte bounds +216 MB."""
    count = scaled(24_000)
    prefix = b"/slow/"
    value = random.randbytes(1024)
    chans = channels(k8s_sql.endpoint, 4)
    try:
        await put_many(k8s_sql.endpoint, 2000, value, prefix)  # the keys exist: every event has a prev_kv
        start = (await rpc_pb2_grpc.KVStub(chans[0]).Range(pb.RangeRequest(key=b"x"))).header.revision + 1
        before = rss(k8s_sql)
        watches = [await open_watch(rpc_pb2_grpc.WatchStub(c), prefix, prev_kv=True) for c in chans]
        async with RssPeak(k8s_sql) as peak:
            kv = rpc_pb2_grpc.KVStub(chans[0])
            sem = asyncio.Semaphore(32)

            async def put(n: int) -> None:
                async with sem:
                    await kv.Put(pb.PutRequest(key=prefix + b"%08d" % (n % 2000), value=value), timeout=60)

            await asyncio.gather(*(put(n) for n in range(count)))
            written = rss(k8s_sql)

            async def read_all(call: grpc.aio.StreamStreamCall) -> list[tuple[int, int]]:
                got: list[tuple[int, int]] = []
                while len(got) < count:
                    resp = await call.read()
                    assert resp is not grpc.aio.EOF and not resp.canceled, resp
                    got += [(ev.kv.mod_revision, len(ev.prev_kv.value)) for ev in resp.events]
                return got

            results = await asyncio.wait_for(asyncio.gather(*(read_all(w) for w in watches)), 180)
        for w in watches:
            w.cancel()
    finally:
        for c in chans:
            await c.close()
    report(request, events=count, rss_before=before, rss_written=written, rss_peak=peak.peak)
    for got in results:
        assert [rev for rev, _ in got] == list(range(start, start + count))  # each once, in order
        assert all(n == 1024 for _, n in got)
    assert peak.peak - before < 130 * MB, f"RSS peaked {(peak.peak - before) / MB:.0f} MB above the idle server"


# -- 5. huge unlimited Ranges -----------------------------------------------------------------


async def test_huge_ranges_give_memory_back(k8s_sql: ServerProcess, request: pytest.FixtureRequest) -> None:
    """60 values of 1 MiB (a 63 MB unlimited Range), read by four clients at once, three
    rounds: RSS ends within 20 MB of where the first round left it and within 40 MB of
    the idle server's, and peaks below 1.2 GB above it
    (each Range holds its rows, the response message and its encoding: about 2.5 x 63
    MB). Before glibc's mmap threshold was fixed (server.return_large_allocations), the
    rounds left PostgreSQL- and MariaDB-backed servers 81 and 89 MB larger for good;
    with it, +0.0 to +0.7 MB on every backend (peaks 560-720 MB above idle). Under CI's
    load the first round once left 22 MB in glibc's heap (PostgreSQL, the gRPC relay
    of mux.py in the path) that the next rounds reused without growing: that is
    fragmentation, not a leak, hence the second bound."""
    prefix = b"/big/"
    chans = channels(k8s_sql.endpoint, 4)
    try:
        kv = rpc_pb2_grpc.KVStub(chans[0])
        for i in range(60):
            await kv.Put(pb.PutRequest(key=prefix + b"%03d" % i, value=random.randbytes(MiB)), timeout=60)
        idle = rss(k8s_sql)

        async def one(c: grpc.aio.Channel) -> None:
            resp = await rpc_pb2_grpc.KVStub(c).Range(pb.RangeRequest(key=prefix, range_end=b"/big0"), timeout=120)
            assert len(resp.kvs) == 60 and resp.count == 60

        async def round_() -> None:
            await asyncio.gather(*(one(c) for c in chans))

        await round_()
        before = rss(k8s_sql)
        async with RssPeak(k8s_sql) as peak:
            for _ in range(scaled(2)):
                await round_()
        # A response's buffers are freed once gRPC has finished with its call, which
        # may come after the client holds the response: CI, with other servers busy on
        # both cores, twice measured 71 and 381 MB a moment after the last round. Wait
        # for the memory to come back (a leak never does), and report how long it took.
        # On --transport envoy the heap is tcmalloc's, which keeps freed pages for as
        # long as its recent peak says they may be needed again: measured 94-106 MB
        # above idle 15 s after the rounds, back below idle by 26 s (its /memory admin
        # page: the difference was all "pageheap_free", then "pageheap_unmapped").
        after, returned_after = await rss_below(k8s_sql, min(idle, before) + 20 * MB)
    finally:
        for c in chans:
            await c.close()
    report(
        request, rss_idle=idle, rss_before=before, rss_after=after, rss_peak=peak.peak, seconds_to_return=returned_after
    )
    late = f"{RETURN_WITHIN} s after the rounds"
    assert after - before < 20 * MB, f"RSS {(after - before) / MB:.1f} MB above the first round's {late}"
    assert after - idle < 40 * MB, f"RSS {(after - idle) / MB:.1f} MB above the idle server {late}"
    assert peak.peak - idle < 1200 * MB


# -- 6. --max-concurrent-streams --------------------------------------------------------------


async def streams_past_the_limit(endpoint: str) -> None:
    """With a limit of 2 streams per connection: two open watch streams, and a third
    call on the same connection waits (its deadline passes) until one of them ends."""
    (chan,) = channels(endpoint, 1)
    try:
        stub = rpc_pb2_grpc.WatchStub(chan)
        kv = rpc_pb2_grpc.KVStub(chan)
        await kv.Put(pb.PutRequest(key=b"a", value=b"1"))
        w1 = await open_watch(stub, b"/a/")
        w2 = await open_watch(stub, b"/b/")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await kv.Range(pb.RangeRequest(key=b"a"), timeout=1.5)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        queued = asyncio.ensure_future(kv.Range(pb.RangeRequest(key=b"a"), timeout=30))
        w1.cancel()
        assert (await queued).kvs[0].value == b"1"  # the stream's end let it through
        w2.cancel()
    finally:
        await chan.close()


async def test_max_concurrent_streams(k8s_sql_factory: Callable[..., ServerProcess]) -> None:
    """A gRPC setting: the backend plays no part, so SQLite only."""
    server = k8s_sql_factory("--max-concurrent-streams", "2")
    await streams_past_the_limit(server.endpoint)


async def test_max_concurrent_streams_on_real_etcd(etcd_factory: Callable[..., ServerProcess]) -> None:
    await streams_past_the_limit(etcd_factory("--max-concurrent-streams", "2").endpoint)


def test_connection_churn_fails_no_one(k8s_sql_factory: Callable[..., ServerProcess]) -> None:
    """Clients that open a connection per call, many at once, through the plain-HTTP
    client URL (its relay): every call succeeds and the server
    lives. Before, passing a client's end-of-stream on to the other side (write_eof)
    let uvloop free a transport twice when it was closed with the shutdown pending:
    the process aborted ("double free or corruption") within seconds of this."""
    import threading

    from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc

    # One process: a second --workers process still opening the store answers
    # UNAVAILABLE meanwhile (CI: 6 calls of 2,220), which is not what this is about.
    server = k8s_sql_factory()
    stop = time.monotonic() + 6 * SCALE
    calls, errors = collections.Counter[str](), collections.Counter[str]()

    def churn() -> None:
        while time.monotonic() < stop:
            with grpc.insecure_channel(server.endpoint, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                try:
                    rpc_pb2_grpc.KVStub(ch).Put(pb.PutRequest(key=b"/churn", value=b"v"), timeout=10)
                    calls["ok"] += 1
                except grpc.RpcError as e:
                    errors[e.code().name] += 1

    threads = [threading.Thread(target=churn) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.proc is not None and server.proc.poll() is None, f"the server died:\n{server.log()}"
    assert not errors, f"{dict(errors)} failed of {calls['ok'] + sum(errors.values())}:\n{server.log()}"
    assert calls["ok"] > 500, calls
