"""PostgreSQL failovers, with real servers: a primary, a streaming standby, frontends
on a multi-host DSN (``…@h1:p1,h2:p2/db?target_session_attrs=read-write``).

- **A failover that loses commits**: an asynchronous standby stops receiving WAL, the
  primary acknowledges more writes, dies (kill -9), and the standby is promoted without
  them. The database is now behind revisions the frontends served: they must not hand
  those numbers out again. Shown: every request answers etcd's ``corrupt cluster``
  (DATA_LOSS), the CORRUPT alarm is listed, exported and logged, watches are canceled,
  a frontend started afterwards refuses too; after ``etcdctl alarm disarm`` the next
  write gets a revision above every one acknowledged before, and older revisions are
  answered as compacted (kube-apiserver: 410 Gone, relist).
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import free_port, missing

from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc
from testing.databases import PostgresServer

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def primary() -> Iterator[PostgresServer]:
    why = PostgresServer.available()
    if why:
        missing(why)
    server = PostgresServer(free_port())
    server.start()
    yield server
    server.stop()


def _multi_host(database: str, *servers: PostgresServer) -> str:
    hosts = ",".join(f"127.0.0.1:{s.port}" for s in servers)
    return f"postgres://postgres@{hosts}/{database}?target_session_attrs=read-write"


def _put(endpoint: str, key: bytes, value: bytes = b"v") -> int:
    with grpc.insecure_channel(endpoint) as ch:
        return int(rpc_pb2_grpc.KVStub(ch).Put(pb.PutRequest(key=key, value=value), timeout=10).header.revision)


def _error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


class Watcher:
    """A watch of every key from a revision, its responses collected on a thread."""

    def __init__(self, endpoint: str, start: int) -> None:
        self.channel = grpc.insecure_channel(endpoint)
        create = pb.WatchCreateRequest(key=b"\0", range_end=b"\0", start_revision=start)
        self.call = rpc_pb2_grpc.WatchStub(self.channel).Watch(iter([pb.WatchRequest(create_request=create)]))
        self.responses: list[pb.WatchResponse] = []
        self.error: grpc.RpcError | None = None
        self.done = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for r in self.call:
                self.responses.append(r)
                if r.canceled:
                    break
        except grpc.RpcError as e:
            self.error = e
        self.done.set()

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()


def test_lost_commits_raise_corrupt_and_revisions_are_never_reused(
    primary: PostgresServer, k8s_sql_factory, etcdctl, tmp_path: Path
) -> None:
    standby = primary.standby(free_port())
    standby.start()
    try:
        database = f"lost_{int(time.time())}"
        dsn = _multi_host(database, primary, standby)
        fe1 = k8s_sql_factory("--endpoint", dsn)
        fe2 = k8s_sql_factory("--endpoint", dsn)
        acknowledged = [_put((fe1, fe2)[i % 2].endpoint, b"/before/%d" % i) for i in range(100)]
        watcher = Watcher(fe2.endpoint, 1)

        # the standby has all of that, then stops receiving WAL ...
        lsn = primary.psql("SELECT pg_current_wal_lsn()")
        deadline = time.monotonic() + 30
        while standby.psql(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn") != "t":
            assert time.monotonic() < deadline, "the standby did not catch up"
            time.sleep(0.1)
        replicated = max(acknowledged)
        standby.psql("ALTER SYSTEM SET primary_conninfo = ''")
        standby.psql("SELECT pg_reload_conf()")
        while standby.psql("SELECT count(*) FROM pg_stat_wal_receiver") != "0":
            assert time.monotonic() < deadline, "the standby kept receiving WAL"
            time.sleep(0.1)
        # ... while the primary acknowledges 50 more writes, which the standby never sees
        lost = [_put((fe1, fe2)[i % 2].endpoint, b"/lost/%d" % i) for i in range(50)]
        assert min(lost) > replicated
        highest = max(lost)
        deadline = time.monotonic() + 30
        while sum(len(r.events) for r in watcher.responses) < 150:
            assert time.monotonic() < deadline, "the watcher did not see the writes"
            time.sleep(0.05)

        primary.kill9()
        standby.psql("SELECT pg_promote()")

        # the frontends find the promoted standby, behind what they served, and stop
        deadline = time.monotonic() + 30
        while True:
            e = _error(lambda: _put(fe1.endpoint, b"/after"))
            if e.code() == grpc.StatusCode.DATA_LOSS:
                break
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            assert time.monotonic() < deadline, "no DATA_LOSS within 30 s of the promotion"
            time.sleep(0.2)
        assert e.details() == "etcdserver: corrupt cluster"
        with grpc.insecure_channel(fe2.endpoint) as ch:
            kv = rpc_pb2_grpc.KVStub(ch)
            deadline = time.monotonic() + 10
            while True:  # fe2 learns it from its own look at the database, or from the alarm row
                e = _error(lambda kv=kv: kv.Range(pb.RangeRequest(key=b"/before/1"), timeout=5))
                if e.code() == grpc.StatusCode.DATA_LOSS or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert e.code() == grpc.StatusCode.DATA_LOSS, e
            alarms = rpc_pb2_grpc.MaintenanceStub(ch).Alarm(pb.AlarmRequest(action=pb.AlarmRequest.GET), timeout=10)
            assert [a.alarm for a in alarms.alarms] == [pb.CORRUPT]
        assert watcher.done.wait(10), "the watch was not canceled"
        assert watcher.responses[-1].canceled and watcher.responses[-1].cancel_reason == "etcdserver: corrupt cluster"
        assert "the database lost committed revisions" in fe1.log() + fe2.log()
        with urllib.request.urlopen(f"http://{fe1.endpoint}/metrics", timeout=10) as r:
            assert 'k8s_sql_alarm_active{alarm="CORRUPT"} 1.0' in r.read().decode()
        listed = etcdctl(fe1.endpoint, "alarm", "list").stdout
        assert "alarm:CORRUPT" in listed, listed
        # a frontend started now knows nothing it served, and still refuses: the alarm is in the database
        fe3 = k8s_sql_factory("--endpoint", dsn)
        assert _error(lambda: _put(fe3.endpoint, b"/fe3")).code() == grpc.StatusCode.DATA_LOSS

        # the operator accepts the loss
        etcdctl(fe1.endpoint, "alarm", "disarm")
        after = _put(fe1.endpoint, b"/after")
        assert after > highest, (after, highest)
        with grpc.insecure_channel(fe1.endpoint) as ch:
            kv = rpc_pb2_grpc.KVStub(ch)
            assert kv.Range(pb.RangeRequest(key=b"/before/7"), timeout=5).kvs[0].value == b"v"
            assert kv.Range(pb.RangeRequest(key=b"/lost/0"), timeout=5).count == 0  # the database's loss
            e = _error(lambda: kv.Range(pb.RangeRequest(key=b"/before/7", revision=replicated), timeout=5))
            assert e.code() == grpc.StatusCode.OUT_OF_RANGE
        old = Watcher(fe1.endpoint, replicated)
        assert old.done.wait(10) and old.responses[-1].canceled and old.responses[-1].compact_revision >= highest
        old.close()
        # every frontend serves again, each write at a revision never handed out before
        deadline = time.monotonic() + 10
        later = []
        for fe in (fe2, fe3):
            while True:
                try:
                    later.append(_put(fe.endpoint, b"/later"))
                    break
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.DATA_LOSS and time.monotonic() < deadline, e
                    time.sleep(0.2)
        assert min([after, *later]) > highest
        assert not set(acknowledged + lost) & {after, *later}
        watcher.close()
    finally:
        standby.stop()


@pytest.fixture
def auto_failover() -> Iterator[Any]:
    from testing.databases import AutoFailoverCluster

    why = AutoFailoverCluster.available()
    if why:
        missing(why)
    cluster = AutoFailoverCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class Writers:
    """Threads putting keys of their own through the frontends in turn, one at a time:
    each acknowledged key with its revision, and how long no write succeeded."""

    def __init__(self, endpoints: list[str], threads: int = 8) -> None:
        self.endpoints = endpoints
        self.acked: dict[bytes, int] = {}
        self.failed = 0
        self.last_ok = time.monotonic()
        self.longest_gap = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(threads)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def _run(self, t: int) -> None:
        channels = [grpc.insecure_channel(e) for e in self.endpoints]
        stubs = [rpc_pb2_grpc.KVStub(c) for c in channels]
        n = 0
        while not self._stop.is_set():
            key = b"/w/%d/%06d" % (t, n)
            n += 1
            try:
                rev = stubs[n % len(stubs)].Put(pb.PutRequest(key=key, value=key), timeout=5).header.revision
            except grpc.RpcError as e:
                assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), e
                with self._lock:
                    self.failed += 1
                time.sleep(0.05)
                continue
            now = time.monotonic()
            with self._lock:
                self.acked[key] = rev
                self.longest_gap = max(self.longest_gap, now - self.last_ok)
                self.last_ok = now
        for c in channels:
            c.close()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def test_sync_standby_failover_loses_nothing(auto_failover: Any, k8s_sql_factory) -> None:
    """kill -9 of the primary (its pg_autoctl and PostgreSQL, as a host crash) under 8
    writers: pg_auto_failover promotes the synchronous standby, the frontends find it
    through the multi-host DSN, and no acknowledged write is lost, no revision is
    repeated or skipped, and the watches on both frontends see every write in order."""
    dsn = auto_failover.new_dsn()
    frontends = [k8s_sql_factory("--endpoint", dsn) for _ in range(2)]
    start = _put(frontends[0].endpoint, b"/start") + 1
    watchers = [Watcher(f.endpoint, start) for f in frontends]
    writers = Writers([f.endpoint for f in frontends])
    writers.start()
    time.sleep(3)
    before = len(writers.acked)
    killed = time.monotonic()
    auto_failover.kill9_node(0)
    deadline = killed + 60
    while len(writers.acked) == before or writers.last_ok < killed + 0.5:
        assert time.monotonic() < deadline, (
            f"no write succeeded within 60 s of the kill: {auto_failover.states()}\n{frontends[0].log()[-3000:]}"
        )
        time.sleep(0.05)
    resumed = writers.last_ok - killed
    time.sleep(3)
    writers.stop()
    end = max(writers.acked.values())
    print(
        f"\npg_auto_failover: {len(writers.acked)} writes acknowledged ({before} before the kill), "
        f"{writers.failed} failed; longest time without a write {writers.longest_gap:.2f} s; "
        f"writes again {resumed:.2f} s after the kill; states {auto_failover.states()}"
    )

    with grpc.insecure_channel(frontends[1].endpoint) as ch:
        kv = rpc_pb2_grpc.KVStub(ch)
        got = {x.key: x.mod_revision for x in kv.Range(pb.RangeRequest(key=b"/w/", range_end=b"/w0"), timeout=30).kvs}
        alarms = rpc_pb2_grpc.MaintenanceStub(ch).Alarm(pb.AlarmRequest(action=pb.AlarmRequest.GET), timeout=10)
    lost = {k: r for k, r in writers.acked.items() if got.get(k) != r}
    assert not lost, f"{len(lost)} acknowledged writes lost or changed, e.g. {sorted(lost.items())[:5]}"
    assert not alarms.alarms, alarms
    revisions = sorted(writers.acked.values())
    assert len(set(revisions)) == len(revisions), "a revision was acknowledged twice"

    # the whole history since the start: every revision present once, in order, no gap
    history = Watcher(frontends[0].endpoint, start)
    deadline = time.monotonic() + 30
    while not any(ev.kv.mod_revision >= end for r in history.responses for ev in r.events):
        assert time.monotonic() < deadline and not history.done.is_set(), "the history watch stopped short"
        time.sleep(0.05)
    history.close()
    seen = [ev.kv.mod_revision for r in history.responses for ev in r.events]
    assert seen[: seen.index(end) + 1] == list(range(start, end + 1)), "revisions skipped or repeated"
    for w in watchers:  # the watches held through the failover, complete and in order
        deadline = time.monotonic() + 30
        while not any(ev.kv.mod_revision >= end for r in w.responses for ev in r.events):
            assert time.monotonic() < deadline and not w.done.is_set(), f"a watch stopped short: {w.error}"
            time.sleep(0.05)
        events = [(ev.kv.key, ev.kv.mod_revision) for r in w.responses for ev in r.events]
        assert [rev for _, rev in events] == sorted({rev for _, rev in events}), "events out of order or repeated"
        assert set(writers.acked.items()) <= set(events), "a watch missed acknowledged writes"
        w.close()


def _replica_counts(endpoint: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("k8s_sql_read_replica_ranges_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('result="', 1)[1].split('"', 1)[0]] = float(value)
    return out


def test_serializable_reads_from_a_hot_standby(primary: PostgresServer, k8s_sql_factory) -> None:
    """--read-endpoint: serializable Ranges served by a streaming standby, never older
    than what the frontend already answered (a standby whose replay is paused is
    passed over for the primary), linearizable ones always by the primary, and the
    primary when the standby is down."""
    database = f"replica_{int(time.time())}"
    primary.psql(f"CREATE DATABASE {database}")
    standby = primary.standby(free_port())
    standby.start()
    try:
        fe = k8s_sql_factory(
            "--endpoint",
            f"postgres://postgres@127.0.0.1:{primary.port}/{database}",
            "--read-endpoint",
            f"postgres://postgres@127.0.0.1:{standby.port}/{database}",
        )
        with grpc.insecure_channel(fe.endpoint) as ch:
            kv = rpc_pb2_grpc.KVStub(ch)

            def serializable(key: bytes) -> pb.RangeResponse:
                return kv.Range(pb.RangeRequest(key=key, serializable=True), timeout=10)

            for i in range(20):
                kv.Put(pb.PutRequest(key=b"/r/%d" % i, value=b"v1"), timeout=10)
            deadline = time.monotonic() + 30
            while _replica_counts(fe.endpoint).get("served", 0) < 10:  # the standby catches up
                assert serializable(b"/r/19").kvs[0].value == b"v1"
                assert time.monotonic() < deadline, _replica_counts(fe.endpoint)
                time.sleep(0.1)

            before = _replica_counts(fe.endpoint)
            for _ in range(5):
                assert kv.Range(pb.RangeRequest(key=b"/r/1"), timeout=10).kvs[0].value == b"v1"
            assert _replica_counts(fe.endpoint) == before, "a linearizable Range went to the replica"

            standby.psql("SELECT pg_wal_replay_pause()")
            rev = kv.Put(pb.PutRequest(key=b"/r/1", value=b"v2"), timeout=10).header.revision
            for _ in range(5):  # never older than what this frontend answered
                got = serializable(b"/r/1")
                assert got.kvs[0].value == b"v2" and got.header.revision >= rev
            after = _replica_counts(fe.endpoint)
            assert after["behind"] >= before.get("behind", 0) + 5, after
            standby.psql("SELECT pg_wal_replay_resume()")

            standby.halt()
            for _ in range(3):
                assert serializable(b"/r/1").kvs[0].value == b"v2"
            assert _replica_counts(fe.endpoint).get("unavailable", 0) >= 3
    finally:
        standby.stop()
