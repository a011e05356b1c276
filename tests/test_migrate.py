"""``k8s-sql migrate`` between backends and from etcd: every revision's state, the watch
history, leases and the revision counter survive SQLite → PostgreSQL → MariaDB →
SQLite (``--verify`` at each step), and etcd → PostgreSQL; a non-empty destination is
refused; an interrupted copy is never served and a rerun completes it."""

from __future__ import annotations

import itertools
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from test_etcd_snapshot import _events, _state, _write_history

from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc


def _migrate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "k8s_sql", "migrate", *args], capture_output=True, text=True, timeout=300
    )


def _recorded(endpoint: str) -> tuple[int, int, dict[int, list[tuple[object, ...]]], list[tuple[object, ...]]]:
    """revision, compaction point, the state at every revision since, the events."""
    with grpc.insecure_channel(endpoint) as ch:
        revision, _ = _state(ch)
        status = rpc_pb2_grpc.MaintenanceStub(ch).HashKV(pb.HashKVRequest())
        compact = max(status.compact_revision, 0)  # etcd says -1 before its first compaction
        history = {rev: _state(ch, rev)[1] for rev in range(max(compact, 1), revision + 1)}
        return revision, compact, history, _events(ch, max(compact, 1), revision)


def test_between_backends_and_back(k8s_sql_factory, postgres_server, mariadb_server, tmp_path: Path) -> None:
    rng = random.Random(7)
    source_dir = tmp_path / "source"
    source = k8s_sql_factory(data_dir=source_dir)
    with grpc.insecure_channel(source.endpoint) as ch:
        _write_history(ch, rng)
        kv = rpc_pb2_grpc.KVStub(ch)
        kv.Compact(pb.CompactionRequest(revision=_state(ch)[0] - 100, physical=True))
        for i in range(30):
            kv.Put(pb.PutRequest(key=b"/k/%d" % (i % 5), value=b"late%d" % i))
    want = _recorded(source.endpoint)
    source.stop()

    chain = [
        f"sqlite://{source_dir / 'state.db'}",
        postgres_server.new_dsn(),
        mariadb_server.new_dsn(),
        f"sqlite://{tmp_path / 'back' / 'state.db'}",
    ]
    for src, dest in itertools.pairwise(chain):
        out = _migrate(src, dest, "--verify")
        assert out.returncode == 0, out.stderr
        assert f"copied revision {want[0]}" in out.stdout and "HashKV equal" in out.stdout, out.stdout
        # not a terminal: plain progress lines (rows done of the total, rate, time left)
        kv_rows = len(want[2][want[0]])
        assert f"kv: {kv_rows}/{kv_rows} rows, " in out.stderr and " s left" in out.stderr, out.stderr

    for dsn in chain[1:]:
        server = k8s_sql_factory("--endpoint", dsn)
        assert _recorded(server.endpoint) == want, dsn
        with grpc.insecure_channel(server.endpoint) as ch:  # resourceVersions go on from the source's
            rev = rpc_pb2_grpc.KVStub(ch).Put(pb.PutRequest(key=b"/after-move", value=b"x")).header.revision
        assert rev == want[0] + 1
        server.stop()

    # a destination that holds data is refused, untouched
    out = _migrate(chain[0], chain[1])
    assert out.returncode == 1 and out.stderr.strip().endswith(
        "is not empty: migrate into a new database, or --replace its contents"
    )
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    # told to, it replaces what the destination holds: MariaDB's copy becomes the SQLite source's again
    out = _migrate(chain[0], chain[2], "--replace", "--verify")
    assert out.returncode == 0 and "HashKV equal" in out.stdout and "--replace" in out.stderr, out.stderr
    server = k8s_sql_factory("--endpoint", chain[2])
    assert _recorded(server.endpoint) == want


def test_from_etcd_into_postgres(etcd, etcdctl, k8s_sql_factory, postgres_server, tmp_path: Path) -> None:
    with grpc.insecure_channel(etcd.endpoint) as ch:
        _write_history(ch, random.Random(11))
    want = _recorded(etcd.endpoint)
    snapshot = tmp_path / "etcd.snapshot"
    etcdctl(etcd.endpoint, "snapshot", "save", str(snapshot))
    dest = postgres_server.new_dsn()
    out = _migrate(str(snapshot), dest, "--verify")
    assert out.returncode == 0 and "HashKV equal" in out.stdout, out.stderr
    server = k8s_sql_factory("--endpoint", dest)
    assert _recorded(server.endpoint) == want


def test_interrupted_copy_is_never_served(k8s_sql_factory, tmp_path: Path) -> None:
    source_dir = tmp_path / "source"
    source = k8s_sql_factory(data_dir=source_dir)
    with grpc.insecure_channel(source.endpoint) as ch:
        for i in range(20):
            rpc_pb2_grpc.KVStub(ch).Put(pb.PutRequest(key=b"/i/%d" % i, value=b"v"))
    want = _recorded(source.endpoint)
    source.stop()
    dest = tmp_path / "dest" / "state.db"
    assert _migrate(f"sqlite://{source_dir / 'state.db'}", f"sqlite://{dest}").returncode == 0
    # as if the copy had been killed halfway: the marker is back and the revision unset
    with sqlite3.connect(dest) as db:
        db.execute("INSERT INTO meta (name, value) VALUES ('migrating', 1)")
        db.execute("UPDATE meta SET value = 1 WHERE name = 'revision'")
        db.execute("DELETE FROM kv WHERE key > ?", (b"/i/5",))
    refused = k8s_sql_factory(data_dir=dest.parent, start=False)
    out = subprocess.run(refused.argv, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "holds an unfinished `k8s-sql migrate`" in out.stderr, out.stderr
    # a rerun clears the partial rows and completes
    out = _migrate(f"sqlite://{source_dir / 'state.db'}", f"sqlite://{dest}", "--verify")
    assert out.returncode == 0 and "interrupted migration: clearing it" in out.stderr, out.stderr
    server = k8s_sql_factory(data_dir=dest.parent)
    assert _recorded(server.endpoint) == want


@pytest.mark.parametrize("bad", ["nonexistent-file", "not-a-dsn-dest", "bad-dsn"])
def test_bad_arguments_are_one_line(bad: str, tmp_path: Path) -> None:
    args = {
        "nonexistent-file": [str(tmp_path / "nope.db"), f"sqlite://{tmp_path}/d.db"],
        "not-a-dsn-dest": [str(tmp_path / "nope.db"), str(tmp_path / "d.db")],
        "bad-dsn": [f"sqlite://{tmp_path}/s.db", "ftp://x/y"],
    }[bad]
    out = _migrate(*args)
    assert out.returncode == 1, out
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("Error: "), out.stderr


def test_from_a_live_etcd_endpoint(etcd, k8s_sql_factory, tmp_path: Path) -> None:
    """A live endpoint gives its state at one revision, without history: the same keys,
    revisions and versions, leases with their remaining TTL, the next write at the next
    revision, and reads from before it answered as compacted (a 410 for Kubernetes)."""
    with grpc.insecure_channel(etcd.endpoint) as ch:
        lease = _write_history(ch, random.Random(3))
        revision, state = _state(ch)
    dest = tmp_path / "live" / "state.db"
    out = _migrate(f"http://{etcd.endpoint}", f"sqlite://{dest}", "--verify")
    assert out.returncode == 0 and f"copied revision {revision} (compacted at {revision})" in out.stdout, out.stderr
    server = k8s_sql_factory(data_dir=dest.parent)
    with grpc.insecure_channel(server.endpoint) as ch:
        assert _state(ch) == (revision, state)
        with pytest.raises(grpc.RpcError) as e:
            rpc_pb2_grpc.KVStub(ch).Range(pb.RangeRequest(key=b"/k/1", revision=revision - 1))
        assert e.value.details() == "etcdserver: mvcc: required revision has been compacted"
        ttl = rpc_pb2_grpc.LeaseStub(ch).LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lease, keys=True))
        assert ttl.grantedTTL == 600 and 0 < ttl.TTL <= 600 and list(ttl.keys) == [b"/leased"]
        assert rpc_pb2_grpc.KVStub(ch).Put(pb.PutRequest(key=b"/n", value=b"v")).header.revision == revision + 1
    unreachable = _migrate("http://127.0.0.1:1", f"sqlite://{tmp_path / 'u' / 'state.db'}")
    assert unreachable.returncode == 1 and len(unreachable.stderr.strip().splitlines()) == 1, unreachable.stderr
    assert "SOURCE http://127.0.0.1:1: UNAVAILABLE" in unreachable.stderr


def _kine_writes(ch: grpc.Channel) -> None:
    """What kube-apiserver sends kine (kine accepts nothing else): creates, updates and
    deletes as compare-and-swap txns, a leased create, and reads back."""
    kv = rpc_pb2_grpc.KVStub(ch)

    def create(key: bytes, value: bytes, lease: int = 0) -> int:
        txn = pb.TxnRequest(compare=[pb.Compare(key=key, target=pb.Compare.MOD, mod_revision=0)])
        txn.success.add().request_put.CopyFrom(pb.PutRequest(key=key, value=value, lease=lease))
        resp = kv.Txn(txn)
        assert resp.succeeded
        return resp.header.revision

    def update(key: bytes, rev: int, value: bytes) -> int:
        txn = pb.TxnRequest(compare=[pb.Compare(key=key, target=pb.Compare.MOD, mod_revision=rev)])
        txn.success.add().request_put.CopyFrom(pb.PutRequest(key=key, value=value))
        txn.failure.add().request_range.CopyFrom(pb.RangeRequest(key=key))
        resp = kv.Txn(txn)
        assert resp.succeeded
        return resp.header.revision

    def delete(key: bytes, rev: int) -> None:
        txn = pb.TxnRequest(compare=[pb.Compare(key=key, target=pb.Compare.MOD, mod_revision=rev)])
        txn.success.add().request_delete_range.CopyFrom(pb.DeleteRangeRequest(key=key))
        txn.failure.add().request_range.CopyFrom(pb.RangeRequest(key=key))
        assert kv.Txn(txn).succeeded

    revs = {}
    for i in range(30):
        revs[i] = create(b"/registry/configmaps/default/cm%d" % i, b"v0")
    for n in range(1, 4):
        for i in range(0, 30, 2):
            revs[i] = update(b"/registry/configmaps/default/cm%d" % i, revs[i], b"v%d" % n)
    for i in range(0, 30, 5):
        delete(b"/registry/configmaps/default/cm%d" % i, revs[i])
    create(b"/registry/configmaps/default/cm0", b"again")
    lease = rpc_pb2_grpc.LeaseStub(ch).LeaseGrant(pb.LeaseGrantRequest(TTL=3600)).ID
    create(b"/registry/leases/kube-node-lease/n1", b"l", lease)


@pytest.mark.parametrize("db", ["sqlite", "postgres", "mariadb"])
def test_from_kine(db: str, kine_factory, k8s_sql_factory, tmp_path: Path) -> None:
    """kine's table read directly: the same keys, create and mod revisions, values and
    leases; the same changes replayed by a watch from an old revision; the next write
    at kine's next revision."""
    kine, kine_dsn = kine_factory(db)
    try:
        with grpc.insecure_channel(kine.endpoint) as ch:
            _kine_writes(ch)
            revision, state = _state(ch)
            events = _events(ch, 2, revision)
    finally:
        kine.stop()

    dest = tmp_path / "from-kine" / "state.db"
    out = _migrate(f"kine+{kine_dsn}", f"sqlite://{dest}", "--verify")
    assert out.returncode == 0 and f"copied revision {revision}" in out.stdout, out.stderr
    server = k8s_sql_factory(data_dir=dest.parent)

    def without_version(rows: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
        # kine lists its own bookkeeping row as a key, compact_rev_key at revision 1: not data
        return [(k, c, m, v, lease) for k, c, m, _version, v, lease in rows if (k, m) != (b"compact_rev_key", 1)]  # type: ignore[misc]

    def events_without_version(evs: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
        def kv(x: object) -> object:
            return None if x is None else without_version([x])[0]  # type: ignore[list-item]

        def deleted(t: object, k: object) -> object:
            # kine's DELETE events carry the key's create revision; etcd's (and ours) 0
            return k if t != 1 or k is None else (k[0], 0, *k[2:])  # type: ignore[index]

        return [(t, deleted(t, kv(k)), kv(p)) for t, k, p in evs]  # type: ignore[misc]

    with grpc.insecure_channel(server.endpoint) as ch:
        got_revision, got_state = _state(ch)
        assert got_revision == revision
        assert without_version(got_state) == without_version(state)  # kine keeps no versions
        assert events_without_version(_events(ch, 2, revision)) == events_without_version(events)
        assert rpc_pb2_grpc.KVStub(ch).Put(pb.PutRequest(key=b"/n", value=b"v")).header.revision == revision + 1


def test_unknown_kine_table_is_one_line(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.db"
    with sqlite3.connect(bogus) as db:
        db.execute("CREATE TABLE kine (id INTEGER PRIMARY KEY, something TEXT)")
    out = _migrate(f"kine+sqlite://{bogus}", f"sqlite://{tmp_path / 'd' / 'state.db'}")
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "no kine table this reader understands" in out.stderr
    assert not (tmp_path / "d").exists()


def test_back_to_etcd(k8s_sql_factory, postgres_server, peers_bin: Path, tmp_path: Path) -> None:
    """k8s-sql (on PostgreSQL) → an etcd snapshot file → etcdutl snapshot status and
    restore (etcd 3.6) → a real etcd serving every revision since the compaction, the
    watch history and the leases as k8s-sql did, and taking the next revision."""

    from testing.servers import restored_etcd

    dsn = postgres_server.new_dsn()
    source = k8s_sql_factory("--endpoint", dsn)
    with grpc.insecure_channel(source.endpoint) as ch:
        lease = _write_history(ch, random.Random(5))
        rpc_pb2_grpc.KVStub(ch).Compact(pb.CompactionRequest(revision=_state(ch)[0] - 80, physical=True))
        rpc_pb2_grpc.KVStub(ch).Put(pb.PutRequest(key=b"/last", value=b"v"))
    want = _recorded(source.endpoint)
    snapshot = tmp_path / "to-etcd.snapshot"
    out = _migrate(dsn, str(snapshot), "--verify")
    assert out.returncode == 0 and "HashKV equal" in out.stdout, out.stderr
    source.stop()

    etcd, status = restored_etcd(peers_bin, snapshot, tmp_path)
    assert status["revision"] == want[0]
    try:
        assert _recorded(etcd.endpoint) == want
        with grpc.insecure_channel(etcd.endpoint) as ch:
            ttl = rpc_pb2_grpc.LeaseStub(ch).LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lease, keys=True))
            assert ttl.grantedTTL == 600 and list(ttl.keys) == [b"/leased"]
            assert rpc_pb2_grpc.KVStub(ch).Put(pb.PutRequest(key=b"/n", value=b"v")).header.revision == want[0] + 1
    finally:
        etcd.stop()


def test_older_sqlite_snapshots_still_read(k8s_sql_factory, tmp_path: Path) -> None:
    """Snapshots k8s-sql streamed before it wrote etcd's format (an SQLite file and its
    SHA-256) are still restored and migrated."""
    import asyncio

    from k8s_sql.backend import snapshot

    source_dir = tmp_path / "source"
    source = k8s_sql_factory(data_dir=source_dir)
    with grpc.insecure_channel(source.endpoint) as ch:
        for i in range(10):
            rpc_pb2_grpc.KVStub(ch).Put(pb.PutRequest(key=b"/old/%d" % i, value=b"v%d" % i))
    want = _recorded(source.endpoint)
    source.stop()
    copy = tmp_path / "copy.db"
    with sqlite3.connect(source_dir / "state.db") as db:
        db.execute("VACUUM INTO ?", (str(copy),))
    old = tmp_path / "old-format.snapshot"

    async def write_old() -> None:
        with open(old, "wb") as f:
            async for _, blob in snapshot.frames(str(copy)):  # the file, then its SHA-256
                f.write(blob)

    asyncio.run(write_old())
    restored = tmp_path / "restored"
    out = subprocess.run(
        [sys.executable, "-m", "k8s_sql", "restore", str(old), "--data-dir", str(restored)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and f"revision {want[0]}" in out.stdout, out.stderr
    migrated = tmp_path / "migrated" / "state.db"
    assert _migrate(str(old), f"sqlite://{migrated}", "--verify").returncode == 0
    for data_dir in (restored, migrated.parent):
        server = k8s_sql_factory(data_dir=data_dir)
        assert _recorded(server.endpoint) == want
        server.stop()


def test_to_a_live_etcd_endpoint(k8s_sql_factory, etcd_factory, tmp_path: Path) -> None:
    """Into a running etcd, current state only: the same keys, values and leases;
    every key at a revision above the source's, whose history is compacted away (a
    Kubernetes client's old resourceVersion gets 410 Gone, never a newer object's
    state under an older number); a non-empty etcd refused until --replace."""
    source_dir = tmp_path / "source"
    source = k8s_sql_factory(data_dir=source_dir)
    with grpc.insecure_channel(source.endpoint) as ch:
        lease = _write_history(ch, random.Random(13))
        revision, state = _state(ch)
    source.stop()
    etcd = etcd_factory()
    src = f"sqlite://{source_dir / 'state.db'}"
    out = _migrate(src, f"http://{etcd.endpoint}", "--verify")
    assert out.returncode == 0 and "--verify: keys, values and leases equal" in out.stdout, out.stderr
    assert f"(compacted at {revision})" in out.stdout, out.stdout
    with grpc.insecure_channel(etcd.endpoint) as ch:
        got_revision, got = _state(ch)
        assert [(k, v, le) for k, _, _, _, v, le in got] == [(k, v, le) for k, _, _, _, v, le in state]
        assert all(c > revision and m > revision and n == 1 for _, c, m, n, _, _ in got)  # type: ignore[operator]
        assert got_revision > revision
        with pytest.raises(grpc.RpcError) as e:
            rpc_pb2_grpc.KVStub(ch).Range(pb.RangeRequest(key=b"/k/1", revision=revision - 1))
        assert e.value.details() == "etcdserver: mvcc: required revision has been compacted"
        ttl = rpc_pb2_grpc.LeaseStub(ch).LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lease, keys=True))
        assert 0 < ttl.TTL <= 600 and list(ttl.keys) == [b"/leased"]

    again = _migrate(src, f"http://{etcd.endpoint}")
    assert again.returncode == 1 and len(again.stderr.strip().splitlines()) == 1, again.stderr
    assert "is not empty" in again.stderr and "--replace" in again.stderr
    with grpc.insecure_channel(etcd.endpoint) as ch:
        rpc_pb2_grpc.KVStub(ch).Put(pb.PutRequest(key=b"/stray", value=b"x"))
    out = _migrate(src, f"http://{etcd.endpoint}", "--replace", "--verify")
    assert out.returncode == 0 and "keys, values and leases equal" in out.stdout, out.stderr
    with grpc.insecure_channel(etcd.endpoint) as ch:
        assert rpc_pb2_grpc.KVStub(ch).Range(pb.RangeRequest(key=b"/stray")).count == 0
    # a copy cut short leaves its marker key: a rerun clears what it wrote and starts again
    with grpc.insecure_channel(etcd.endpoint) as ch:
        rpc_pb2_grpc.KVStub(ch).Put(pb.PutRequest(key=b"\0k8s-sql-migrate/copy-in-progress", value=b"copying"))
        rpc_pb2_grpc.KVStub(ch).DeleteRange(pb.DeleteRangeRequest(key=b"/k/", range_end=b"/k0"))
    out = _migrate(src, f"http://{etcd.endpoint}", "--verify")
    assert out.returncode == 0 and "interrupted migration: clearing it" in out.stderr, out.stderr
    assert "keys, values and leases equal" in out.stdout
    unreachable = _migrate(src, "http://127.0.0.1:1")
    assert unreachable.returncode == 1 and "DEST http://127.0.0.1:1: UNAVAILABLE" in unreachable.stderr
