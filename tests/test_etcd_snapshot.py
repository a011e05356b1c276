"""An etcd snapshot (``etcdctl snapshot save`` from a real etcd 3.6) restored into k8s-sql:
every key with its create revision, mod revision, version, value and lease; the same
history from the compaction point on (reads at every revision, a watch replaying it);
the same revision counter, so the next write gets the same next revision; the
leases. A truncated or corrupt snapshot is one line and leaves nothing behind.
"""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc

from k8s_sql.pb import kv_pb2, rpc_pb2 as pb, rpc_pb2_grpc

ALL = pb.RangeRequest(key=b"\0", range_end=b"\0")


def _state(ch: grpc.Channel, revision: int = 0) -> tuple[int, list[tuple[object, ...]]]:
    r = rpc_pb2_grpc.KVStub(ch).Range(pb.RangeRequest(key=b"\0", range_end=b"\0", revision=revision), timeout=30)
    return r.header.revision, [
        (kv.key, kv.create_revision, kv.mod_revision, kv.version, kv.value, kv.lease) for kv in r.kvs
    ]


def _events(ch: grpc.Channel, start: int, end: int) -> list[tuple[object, ...]]:
    """Every event from ``start`` to ``end`` (with prev_kv), as a watch replays them."""
    create = pb.WatchCreateRequest(key=b"\0", range_end=b"\0", start_revision=start, prev_kv=True)
    responses = rpc_pb2_grpc.WatchStub(ch).Watch(iter([pb.WatchRequest(create_request=create)]), timeout=60)
    out: list[tuple[object, ...]] = []

    def kv(k: kv_pb2.KeyValue) -> tuple[object, ...]:
        return (k.key, k.create_revision, k.mod_revision, k.version, k.value, k.lease)

    for r in responses:
        for e in r.events:
            out.append((e.type, kv(e.kv), kv(e.prev_kv) if e.HasField("prev_kv") else None))
        if out and out[-1][1][2] >= end:  # type: ignore[index]
            break
    responses.cancel()
    return out


def _write_history(ch: grpc.Channel, rng: random.Random) -> int:
    """Puts, overwrites, deletes, multi-op txns (several changes in one revision) and a
    leased key; returns the lease."""
    kv = rpc_pb2_grpc.KVStub(ch)
    lease = rpc_pb2_grpc.LeaseStub(ch).LeaseGrant(pb.LeaseGrantRequest(TTL=600)).ID
    kv.Put(pb.PutRequest(key=b"/leased", value=b"x", lease=lease))
    for i in range(300):
        key = b"/k/%d" % rng.randrange(40)
        action = rng.random()
        if action < 0.7:
            kv.Put(pb.PutRequest(key=key, value=rng.randbytes(rng.randrange(1, 64))))
        elif action < 0.85:
            kv.DeleteRange(pb.DeleteRangeRequest(key=key))
        else:
            txn = pb.TxnRequest()
            txn.success.add().request_put.CopyFrom(pb.PutRequest(key=key, value=b"t%d" % i))
            txn.success.add().request_put.CopyFrom(pb.PutRequest(key=key + b"/b", value=b"t"))
            other = b"/k/1" if key == b"/k/0" else b"/k/0"  # etcd refuses a key twice in a txn
            txn.success.add().request_delete_range.CopyFrom(pb.DeleteRangeRequest(key=other))
            kv.Txn(txn)
    return lease


def test_etcd_snapshot_restores_with_revisions(etcd, k8s_sql_factory, etcdctl, tmp_path: Path) -> None:
    rng = random.Random(20261130)
    with grpc.insecure_channel(etcd.endpoint) as ch:
        lease = _write_history(ch, rng)
        compact_at = _state(ch)[0] - 120
        rpc_pb2_grpc.KVStub(ch).Compact(pb.CompactionRequest(revision=compact_at, physical=True))
        for i in range(50):  # history after the compaction too
            rpc_pb2_grpc.KVStub(ch).Put(pb.PutRequest(key=b"/k/%d" % (i % 7), value=b"after%d" % i))
        revision, etcd_state = _state(ch)
        etcd_history = {rev: _state(ch, rev)[1] for rev in range(compact_at, revision + 1)}
        etcd_events = _events(ch, compact_at, revision)  # the compaction revision's own events too
        etcd_ttl = rpc_pb2_grpc.LeaseStub(ch).LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lease, keys=True))
    snapshot = tmp_path / "etcd.snapshot"
    etcdctl(etcd.endpoint, "snapshot", "save", str(snapshot))

    data_dir = tmp_path / "restored"
    out = subprocess.run(
        [sys.executable, "-m", "k8s_sql", "restore", str(snapshot), "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert f"revision {revision}, compacted at {compact_at}" in out.stdout

    server = k8s_sql_factory(data_dir=data_dir)
    with grpc.insecure_channel(server.endpoint) as ch:
        assert _state(ch) == (revision, etcd_state)
        for rev in range(compact_at, revision + 1):  # every revision still readable on etcd
            assert _state(ch, rev)[1] == etcd_history[rev], rev
        assert _events(ch, compact_at, revision) == etcd_events
        kv = rpc_pb2_grpc.KVStub(ch)
        try:
            kv.Range(pb.RangeRequest(key=b"/k/1", revision=compact_at - 1))
            raise AssertionError("a read below the compaction point succeeded")
        except grpc.RpcError as e:
            assert e.details() == "etcdserver: mvcc: required revision has been compacted"
        ttl = rpc_pb2_grpc.LeaseStub(ch).LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lease, keys=True))
        assert (ttl.grantedTTL, list(ttl.keys)) == (etcd_ttl.grantedTTL, list(etcd_ttl.keys))
        assert 0 < ttl.TTL <= 600
        # resourceVersions never go backwards: the next write is the source's next revision
        assert kv.Put(pb.PutRequest(key=b"/new", value=b"n")).header.revision == revision + 1


def _restore(snapshot: Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "k8s_sql", "restore", str(snapshot), "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _damaged(snapshot: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    data = snapshot.read_bytes()
    cut = tmp_path / "truncated"
    cut.write_bytes(data[: len(data) // 3])
    yield "truncated", cut
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    corrupt = tmp_path / "corrupt"
    corrupt.write_bytes(bytes(flipped))
    yield "corrupt", corrupt


def test_damaged_etcd_snapshot_is_one_line(etcd, etcdctl, tmp_path: Path) -> None:
    etcdctl(etcd.endpoint, "put", "a", "b")
    snapshot = tmp_path / "etcd.snapshot"
    etcdctl(etcd.endpoint, "snapshot", "save", str(snapshot))
    for what, path in _damaged(snapshot, tmp_path):
        data_dir = tmp_path / f"restored-{what}"
        out = _restore(path, data_dir)
        assert out.returncode != 0, what
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), out.stderr
        assert "Traceback" not in out.stderr
        assert not data_dir.exists(), f"{what}: the destination was touched"
