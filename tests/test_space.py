"""Space as etcd handles it: ``--quota-backend-bytes`` and a full disk both answer
``etcdserver: mvcc: database space exceeded`` (RESOURCE_EXHAUSTED) and raise the
NOSPACE alarm, which etcdctl lists; reads, deletes and compaction keep working;
``etcdctl alarm disarm`` recovers once there is room, and no acknowledged write is
lost. Before (issue 10), a full disk was answered UNAVAILABLE "database
unavailable", which clients retry forever."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from conftest import ServerProcess, free_port, missing

from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc

NOSPACE = "etcdserver: mvcc: database space exceeded"
VALUE = 64 * 1024


def _fill(kv: rpc_pb2_grpc.KVStub, prefix: bytes, most: int) -> dict[bytes, int]:
    """Put 64 KiB values until the server answers NOSPACE; the acknowledged ones."""
    acked: dict[bytes, int] = {}
    for i in range(most):
        key = prefix + b"%05d" % i
        try:
            acked[key] = kv.Put(pb.PutRequest(key=key, value=os.urandom(VALUE)), timeout=30).header.revision
        except grpc.RpcError as e:
            assert (e.code(), e.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, NOSPACE), e
            return acked
    raise AssertionError(f"{most} puts of {VALUE} bytes and still no NOSPACE")


def _assert_refused(call: Callable[[], object]) -> None:
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert (e.value.code(), e.value.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, NOSPACE)


def _alarms(etcdctl: Callable[..., subprocess.CompletedProcess[str]], server: ServerProcess) -> list[str]:
    return [x.strip() for x in etcdctl(server.url, "alarm", "list").stdout.splitlines() if x.strip()]


def _check_recovery(
    server: ServerProcess,
    etcdctl: Callable[..., subprocess.CompletedProcess[str]],
    acked: dict[bytes, int],
    make_room: Callable[[kv_stub_t, int], None],
    disk_full: bool = False,
) -> None:
    """While NOSPACE is raised: it is listed, writes that add data are refused, reads,
    deletes and compaction are served; then room is made, the alarm disarmed, and
    writes go on with every acknowledged one intact. On a disk that is really full a
    delete needs room too (the WAL), so there room is made first: a quota below the
    disk's size is what keeps deletes possible, as with etcd."""
    with grpc.insecure_channel(server.endpoint) as ch:
        kv = rpc_pb2_grpc.KVStub(ch)
        lease = rpc_pb2_grpc.LeaseStub(ch)
        alarms = _alarms(etcdctl, server)
        assert len(alarms) == 1 and alarms[0].startswith("memberID:") and alarms[0].endswith("alarm:NOSPACE")
        _assert_refused(lambda: kv.Put(pb.PutRequest(key=b"small", value=b"x"), timeout=10))
        _assert_refused(lambda: lease.LeaseGrant(pb.LeaseGrantRequest(TTL=60), timeout=10))
        txn = pb.TxnRequest()
        txn.success.add().request_put.CopyFrom(pb.PutRequest(key=b"small", value=b"x"))
        _assert_refused(lambda: kv.Txn(txn, timeout=10))
        status = rpc_pb2_grpc.MaintenanceStub(ch).Status(pb.StatusRequest(), timeout=10)
        assert [e.split()[-1] for e in status.errors] == ["alarm:NOSPACE"]

        got = kv.Range(pb.RangeRequest(key=b"fill/", range_end=b"fill0", keys_only=True), timeout=10)
        assert {x.key: x.mod_revision for x in got.kvs} == acked
        # Deletes and compaction still work: etcd refuses only what adds data.
        # (all but two: InnoDB allocates its files by the megabyte, so half of a 2 MiB
        # quota's worth of keys can still fill it after a defragmentation)
        victims = sorted(acked)[:-2]
        if disk_full:
            make_room(kv, 0)
        for key in victims:
            kv.DeleteRange(pb.DeleteRangeRequest(key=key), timeout=30)
        rev = kv.Range(pb.RangeRequest(key=b"fill/"), timeout=10).header.revision
        kv.Compact(pb.CompactionRequest(revision=rev, physical=True), timeout=60)
        if not disk_full:
            make_room(kv, rev)

        etcdctl(server.url, "alarm", "disarm")
        assert _alarms(etcdctl, server) == []
        after = kv.Put(pb.PutRequest(key=b"after", value=b"ok"), timeout=30).header.revision
        assert after > rev
        lease.LeaseGrant(pb.LeaseGrantRequest(TTL=60), timeout=10)
        got = kv.Range(pb.RangeRequest(key=b"fill/", range_end=b"fill0", keys_only=True), timeout=10)
        assert {x.key: x.mod_revision for x in got.kvs} == {k: r for k, r in acked.items() if k not in victims}


kv_stub_t = rpc_pb2_grpc.KVStub


def test_quota_raises_nospace_and_disarm_recovers(
    k8s_sql_factory: Callable[..., ServerProcess], backend_args: list[str], etcdctl, tmp_path: Path
) -> None:
    first = k8s_sql_factory(*backend_args)
    with grpc.insecure_channel(first.endpoint) as ch:
        base = rpc_pb2_grpc.MaintenanceStub(ch).Status(pb.StatusRequest()).dbSizeInUse
    first.stop()
    quota = base + 2 * 1024 * 1024
    server = k8s_sql_factory(*backend_args, "--quota-backend-bytes", str(quota), data_dir=first.data_dir)
    with grpc.insecure_channel(server.endpoint) as ch:
        acked = _fill(rpc_pb2_grpc.KVStub(ch), b"fill/", 400)
    # About 2 MiB of 64 KiB values: each is stored twice (the key's row and the log), so
    # 16 puts when the database's growth is measured in time, up to about 32 when the
    # quota counts only etcd's cost (key + value + 256) between measurements.
    assert 8 <= len(acked) <= 40, len(acked)

    def make_room(kv: kv_stub_t, rev: int) -> None:
        rpc_pb2_grpc.MaintenanceStub(grpc.insecure_channel(server.endpoint)).Defragment(
            pb.DefragmentRequest(), timeout=120
        )

    _check_recovery(server, etcdctl, acked, make_room)
    # The alarm is in the database: a restarted frontend still refuses until disarmed.
    assert "Traceback" not in server.log()


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 4 MiB tmpfs: a disk that really fills (root only, as CI runs). Outside pytest's
    private temporary directory, so that the PostgreSQL server's user can reach it."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        missing("a full disk is made with a tmpfs mount, which needs root")
    where = Path(tempfile.mkdtemp(prefix="k8s-sql-small-disk-"))
    where.chmod(0o755)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        missing(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        shutil.rmtree(where, ignore_errors=True)


def _grow(where: Path) -> None:
    subprocess.run(["mount", "-o", "remount,size=64m", str(where)], check=True)


def test_full_disk_raises_nospace_on_sqlite(
    k8s_sql_factory: Callable[..., ServerProcess], etcdctl, small_disk: Path
) -> None:
    server = k8s_sql_factory(data_dir=small_disk / "data")
    with grpc.insecure_channel(server.endpoint) as ch:
        acked = _fill(rpc_pb2_grpc.KVStub(ch), b"fill/", 400)
    assert len(acked) >= 10

    _check_recovery(server, etcdctl, acked, lambda kv, rev: _grow(small_disk), disk_full=True)
    assert "Traceback" not in server.log()


def test_full_disk_raises_nospace_on_postgres(
    k8s_sql_factory: Callable[..., ServerProcess], etcdctl, small_disk: Path, postgres_server
) -> None:
    """The store's database in a tablespace on the small disk: PostgreSQL answers
    disk_full (53100, "could not extend file") while its WAL still has room."""
    shutil.chown(small_disk, "postgres", "postgres")
    name = f"full_{free_port()}"
    dsn = postgres_server.new_dsn().rsplit("/", 1)[0] + "/" + name

    async def admin(*statements: str) -> None:
        conn = await asyncpg.connect(dsn.rsplit("/", 1)[0] + "/postgres")
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    def create() -> Awaitable[None]:
        return admin(f"CREATE TABLESPACE {name} LOCATION '{small_disk}'", f"CREATE DATABASE {name} TABLESPACE {name}")

    def drop() -> Awaitable[None]:
        return admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"DROP TABLESPACE IF EXISTS {name}")

    asyncio.run(create())
    try:
        server = k8s_sql_factory("--endpoint", dsn)
        with grpc.insecure_channel(server.endpoint) as ch:
            acked = _fill(rpc_pb2_grpc.KVStub(ch), b"fill/", 400)
        assert len(acked) >= 5

        _check_recovery(server, etcdctl, acked, lambda kv, rev: _grow(small_disk), disk_full=True)
        assert "Traceback" not in server.log()
        server.stop()
    finally:
        # The session's server is shared with later tests: nothing of it may stay on the
        # tmpfs that is unmounted next (a database left there broke later connections).
        asyncio.run(drop())
