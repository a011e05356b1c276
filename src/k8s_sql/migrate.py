"""``k8s-sql migrate SOURCE DEST``: a store copied whole, revisions intact.

The source is read from one consistent copy: an etcd snapshot file (converted by
:mod:`k8s_sql.formats.etcd_snapshot`), a k8s-sql snapshot file, a k8s-sql database
(its Snapshot, as ``etcdctl snapshot save`` takes it), or a live etcd v3 endpoint --
etcd, kine or k8s-sql -- read at one pinned revision (current state only: the API
gives no history). That copy, an SQLite file, is
then written into the destination database a few thousand rows per transaction:
every ``kv``, ``log`` and ``lease`` row as it is, then the revision and compaction
point. So every key keeps its create and mod revisions and version, the history
stays readable and watchable, and the destination's next write gets a revision
above every one the source handed out.

**To etcd.** When DEST is a file path, the copy is written as an etcd snapshot
(:func:`k8s_sql.formats.etcd_snapshot.export`): ``etcdutl snapshot restore`` turns it
into an etcd data directory with the same revisions, history and leases.

**Never half a copy.** The destination must be empty (a database k8s-sql has never
written to), unless ``--replace`` is given: its keys, history and leases are then
cleared first (stop its frontends: a running one keeps serving what it cached). A
``migrating`` row in ``meta`` marks it from the first row written until the revision
is set; a frontend refuses to start on a database that carries it
(server.py), and a rerun of ``migrate`` clears the partial rows and starts again.

``--verify`` compares HashKV -- a hash of the whole history and the state at the
revision, the same on every backend for the same data -- of the copy and of the
destination.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from k8s_sql.backend import migrations, open_backend, plans, snapshot, sql
from k8s_sql.backend.base import Backend, KeyRange
from k8s_sql.backend.engine import SQLBackend
from k8s_sql.backend.plans import Execute, Load, Plan
from k8s_sql.backend.sql import Dialect
from k8s_sql.backend.sqlite import SQLiteBackend
from k8s_sql.dsn import redact
from k8s_sql.formats import bbolt, etcd_snapshot, kine
from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc

MARKER = "migrating"  # a meta row: the database holds a copy in progress
ROWS_PER_TRANSACTION = 5000
COPIED_TABLES = ("kv", "log", "lease")


class MigrationError(Exception):
    """Why a migration cannot go on: one line for the operator."""


class Progress:
    """What a migration reports as it goes: notes, and rows copied of each table. The
    default says nothing; the command shows a bar on a terminal, lines otherwise."""

    def note(self, line: str) -> None:
        pass

    def table(self, name: str, total: int) -> None:
        pass

    def advance(self, rows: int) -> None:
        pass

    def done(self) -> None:
        pass


@dataclass
class Summary:
    revision: int
    compact_revision: int
    rows: dict[str, int]
    seconds: float
    verified: bool = False
    check: str = "HashKV equal"  # what --verify compared


def _is_dsn(name: str) -> bool:
    return "://" in name and not _is_endpoint(name)


def _is_endpoint(name: str) -> bool:
    return name.startswith(("http://", "https://"))


@dataclass
class TLS:
    """etcdctl's --cacert, --cert, --key for an https endpoint."""

    cacert: str = ""
    cert: str = ""
    key: str = ""


ENDPOINT_PAGE = 1000  # keys per Range from a live endpoint


def _channel(url: str, tls: TLS) -> grpc.aio.Channel:
    """A channel to a live endpoint: https with etcdctl's TLS files, or plain http."""
    target = url.split("://", 1)[1].rstrip("/")
    options = [("grpc.max_receive_message_length", 2**31 - 1)]
    if not url.startswith("https://"):
        return grpc.aio.insecure_channel(target, options=options)

    def read(p: str) -> bytes | None:
        if not p:
            return None
        try:
            with open(p, "rb") as f:
                return f.read()
        except OSError as e:
            raise MigrationError(f"cannot read {p}: {e.strerror or e}") from None

    creds = grpc.ssl_channel_credentials(read(tls.cacert), read(tls.key), read(tls.cert))
    return grpc.aio.secure_channel(target, creds, options=options)


async def endpoint_copy(url: str, path: str, tls: TLS, now: float) -> int:
    """The current state of a live etcd v3 endpoint (etcd, kine or k8s-sql) at one pinned
    revision, written as a k8s-sql store at ``path``; the revision. History is not
    readable over the API: the copy's compaction point is that revision, so a watch or
    read from before it is answered as after a compaction (Kubernetes: 410 Gone)."""
    channel = _channel(url, tls)
    out = snapshot._create(path)
    try:
        async with channel:
            kv = rpc_pb2_grpc.KVStub(channel)
            try:
                first = await kv.Range(pb.RangeRequest(key=b"\0", range_end=b"\0", limit=1), timeout=30)
                revision = first.header.revision
                start = b"\0"
                insert = f"INSERT INTO kv ({sql.KV_COLUMNS}) VALUES ({sql.marks(6)})"
                while True:
                    req = pb.RangeRequest(key=start, range_end=b"\0", revision=revision, limit=ENDPOINT_PAGE)
                    page = await kv.Range(req, timeout=120)
                    out.executemany(
                        insert,
                        [(x.key, x.create_revision, x.mod_revision, x.version, x.lease, x.value) for x in page.kvs],
                    )
                    if not page.more or not page.kvs:
                        break
                    start = page.kvs[-1].key + b"\0"
                leases = rpc_pb2_grpc.LeaseStub(channel)
                try:
                    listed = (await leases.LeaseLeases(pb.LeaseLeasesRequest(), timeout=30)).leases
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise
                    listed = []  # an endpoint that keeps no leases (kine's are not listed)
                for lease in listed:
                    ttl = await leases.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lease.ID), timeout=30)
                    if ttl.TTL > 0:  # -1: expired meanwhile
                        out.execute(
                            "INSERT INTO lease (id, ttl, expires_at) VALUES (?, ?, ?)",
                            (lease.ID, ttl.grantedTTL, now + ttl.TTL),
                        )
            except grpc.aio.AioRpcError as e:
                raise MigrationError(f"SOURCE {url}: {e.code().name}: {e.details()}") from None
        for name, value in (
            ("revision", revision),
            ("compact_revision", revision),
            ("schema_version", migrations.SCHEMA_VERSION),
        ):
            out.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))
        out.commit()
    finally:
        out.close()
    return revision


@contextlib.asynccontextmanager
async def source_copy(source: str, tls: TLS | None = None) -> AsyncIterator[str]:
    """The source as a k8s-sql SQLite store file (a temporary copy)."""
    tmp = tempfile.mkdtemp(prefix="k8s-sql-migrate-")
    path = os.path.join(tmp, "source.db")
    try:
        if kine.is_kine(source):
            try:
                await kine.convert(source, path, time.time())
            except kine.KineError as e:
                raise MigrationError(f"SOURCE {redact(source)}: {e}") from None
        elif _is_endpoint(source):
            await endpoint_copy(source, path, tls or TLS(), time.time())
        elif _is_dsn(source):
            backend = _backend(source, "SOURCE")
            try:
                await backend.open()
                async with backend.snapshot() as copy:
                    shutil.copyfile(copy, path)
            finally:
                await backend.close()
        elif not os.path.isfile(source):
            raise MigrationError(f"SOURCE {source}: no such file (or a DSN: sqlite:///…, postgres://…, mysql://…)")
        elif bbolt.is_bolt(source):
            etcd_snapshot.convert(source, path)
        else:
            snapshot.restore(source, tmp)  # verifies the digest and the SQLite file
            os.replace(os.path.join(tmp, "state.db"), path)
        yield path
    except snapshot.SnapshotError as e:
        raise MigrationError(str(e)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _backend(dsn: str, which: str) -> Backend:
    try:
        return open_backend(dsn)
    except ValueError as e:
        raise MigrationError(f"{which}: {e}") from None


def load_rows(d: Dialect, table: str, rows: list[tuple[object, ...]]) -> Plan[None]:
    columns = {"kv": d.kv_columns, "log": d.log_columns, "lease": "id, ttl, expires_at"}[table]
    yield Load(table, tuple(c.strip() for c in columns.split(",")), rows)


def clear() -> Plan[None]:
    for table in COPIED_TABLES:
        yield Execute(f"DELETE FROM {table}")


def drop_marker() -> Plan[None]:
    yield Execute(f"DELETE FROM meta WHERE name = '{MARKER}'")


async def _empty(dest: SQLBackend) -> bool:
    revision, compact = await dest.current()
    if (revision, compact) != (1, 0):
        return False
    everything = KeyRange.from_etcd(b"\0", b"\0")
    if (await dest.range(everything, 0, 0, True, True)).count:
        return False
    return not await dest.leases()


async def migrate(
    source: str,
    dest: str,
    *,
    verify: bool = False,
    dry_run: bool = False,
    tls: TLS | None = None,
    progress: Progress | None = None,
    replace: bool = False,
) -> Summary:
    """Copy ``source`` into the database ``dest``; see the module docstring."""
    started = time.monotonic()
    progress = progress or Progress()
    if _is_endpoint(dest):
        return await _to_endpoint(
            source, dest, verify=verify, dry_run=dry_run, tls=tls or TLS(), replace=replace, progress=progress
        )
    if not _is_dsn(dest):
        return await _to_etcd_snapshot(source, dest, verify=verify, dry_run=dry_run, tls=tls, started=started)
    target = _backend(dest, "DEST")
    assert isinstance(target, SQLBackend)
    async with source_copy(source, tls) as path:
        src = SQLiteBackend(path)
        await src.open()
        try:
            revision, compact = await src.current()
            rows = {t: 0 for t in COPIED_TABLES}
            try:
                await target.open()
            except Exception as e:
                raise MigrationError(f"cannot open DEST {redact(dest)}: {' '.join(str(e).split())}") from None
            try:
                if await target.meta_get(MARKER):
                    progress.note(f"{redact(dest)} holds an interrupted migration: clearing it")
                    if not dry_run:
                        await target._write(clear)
                elif not await _empty(target):
                    if not replace:
                        raise MigrationError(
                            f"DEST {redact(dest)} is not empty: migrate into a new database, or --replace its contents"
                        )
                    progress.note(f"replacing what {redact(dest)} holds (--replace)")
                    if not dry_run:
                        await target.meta_set(MARKER, 1)  # from here on, no frontend starts on it
                        await target._write(clear)
                if not dry_run:
                    await target.meta_set(MARKER, 1)
                for table in COPIED_TABLES:
                    progress.table(table, await src._read(lambda t=table: _count(t)))  # type: ignore[misc]
                    await _copy_table(src, target, table, rows, dry_run, progress)
                progress.done()
                if not dry_run:
                    await target.meta_set("compact_revision", compact)
                    await target.meta_set("revision", revision)
                    await target._write(drop_marker)
                summary = Summary(revision, compact, rows, time.monotonic() - started)
                if verify and not dry_run:
                    want, got = await src.hash_kv(revision), await target.hash_kv(revision)
                    if want != got:
                        raise MigrationError(f"--verify: HashKV differs at revision {revision}: {want} != {got}")
                    summary.verified = True
                return summary
            finally:
                await target.close()
        finally:
            await src.close()


async def _to_etcd_snapshot(
    source: str, dest: str, *, verify: bool, dry_run: bool, tls: TLS | None, started: float
) -> Summary:
    """DEST is a file: write an etcd snapshot (the way back to etcd: ``etcdutl snapshot
    restore`` makes an etcd data directory of it). ``--verify`` reads the file back and
    compares its HashKV with the source's."""
    if os.path.exists(dest):
        raise MigrationError(f"DEST {dest} exists: write the etcd snapshot to a new file")
    async with source_copy(source, tls) as path:
        src = SQLiteBackend(path)
        await src.open()
        try:
            revision, compact = await src.current()
            rows = {t: int(await src._read(lambda t=t: _count(t))) for t in COPIED_TABLES}  # type: ignore[misc]
            summary = Summary(revision, compact, rows, 0.0)
            if dry_run:
                summary.seconds = time.monotonic() - started
                return summary
            try:
                etcd_snapshot.export(path, dest)
            except OSError as e:
                raise MigrationError(f"cannot write {dest}: {e.strerror or e}") from None
            if verify:
                back = os.path.join(os.path.dirname(path), "readback.db")
                etcd_snapshot.convert(dest, back)
                check = SQLiteBackend(back)
                await check.open()
                try:
                    want, got = await src.hash_kv(revision), await check.hash_kv(revision)
                finally:
                    await check.close()
                if want != got:
                    raise MigrationError(f"--verify: HashKV differs at revision {revision}: {want} != {got}")
                summary.verified = True
            summary.seconds = time.monotonic() - started
            return summary
        finally:
            await src.close()


def _count(table: str) -> Plan[int]:
    rows = yield plans.Fetch(f"SELECT COUNT(*) FROM {table}")
    return int(rows[0][0])


async def _copy_table(
    src: SQLBackend,
    dest: SQLBackend,
    table: str,
    rows: dict[str, int],
    dry_run: bool,
    progress: Progress,
) -> None:
    after = None
    pending: list[tuple[object, ...]] = []
    d = dest.dialect
    keys = len(plans.TABLE_KEYS[table])
    while True:
        page = await src._read(lambda after=after: plans.table_page(src.dialect, table, after))  # type: ignore[misc]
        if page:
            pending.extend(tuple(bytes(v) if isinstance(v, (bytearray, memoryview)) else v for v in r) for r in page)
            after = tuple(page[-1][:keys])
        if pending and (len(pending) >= ROWS_PER_TRANSACTION or not page):
            if not dry_run:
                batch = list(pending)
                await dest._write(lambda batch=batch: load_rows(d, table, batch))  # type: ignore[misc]
            rows[table] += len(pending)
            progress.advance(len(pending))
            pending.clear()
        if not page:
            return


# etcd's defaults for --max-txn-ops and --max-request-bytes (1.5 MiB) bound the Txns
# that copy keys into a live endpoint; a key with a value near the limit goes alone.
TXN_OPS = 128
TXN_BYTES = 1 << 20
# Held in a live destination while a copy is under way (its revision is raised by
# writing it again and again), deleted when the copy is complete: a rerun that finds it
# clears the partial copy and starts again, as the ``migrating`` meta row does.
MARKER_KEY = b"\0k8s-sql-migrate/copy-in-progress"
PADDING_IN_FLIGHT = 64  # concurrent Puts that raise a live destination's revision


async def _to_endpoint(
    source: str, dest: str, *, verify: bool, dry_run: bool, tls: TLS, replace: bool, progress: Progress
) -> Summary:
    """DEST is a live etcd v3 endpoint (etcd, or k8s-sql): the source's current state,
    written through the API. The API cannot set revisions, so keys get the
    destination's own; what keeps Kubernetes safe is that they are all *higher* than
    any the source handed out. Before copying, the destination's revision is raised to
    the source's (one Put per revision on MARKER_KEY, deleted when the copy is
    complete) and compacted there, so every resourceVersion a client holds from the source is either history
    that is gone (a watch from it gets 410 Gone and the client relists) or older than
    every key. Leases are granted with their IDs and the TTL they have left, and their
    keys attached. ``--verify`` reads the destination back and compares keys, values
    and leases (its revisions are its own)."""
    started = time.monotonic()
    async with source_copy(source, tls) as path:
        src = SQLiteBackend(path)
        await src.open()
        try:
            revision, _ = await src.current()
            keys = await src._read(_current_keys)
            leases = await src.leases()
        finally:
            await src.close()
    now = time.time()
    live = [(lease_id, max(1, int(expires_at - now + 0.999))) for lease_id, _, expires_at in leases if expires_at > now]
    granted = {lease_id for lease_id, _ in live}
    rows = {"kv": len(keys), "lease": len(live)}
    try:
        async with _channel(dest, tls) as channel:
            kv, lease_api = rpc_pb2_grpc.KVStub(channel), rpc_pb2_grpc.LeaseStub(channel)
            everything = pb.RangeRequest(key=b"\0", range_end=b"\0", count_only=True)
            held = await kv.Range(everything, timeout=30)
            held_leases = (await lease_api.LeaseLeases(pb.LeaseLeasesRequest(), timeout=30)).leases
            interrupted = (await kv.Range(pb.RangeRequest(key=MARKER_KEY, count_only=True), timeout=30)).count
            if interrupted:
                progress.note(f"{dest} holds an interrupted migration: clearing it")
            elif held.count or held_leases:
                if not replace:
                    raise MigrationError(
                        f"DEST {dest} is not empty ({held.count} keys, {len(held_leases)} leases): "
                        "migrate into a new cluster, or --replace its contents"
                    )
                progress.note(f"replacing what {dest} holds (--replace)")
            if dry_run:
                return Summary(max(revision, held.header.revision) + 1, revision, rows, time.monotonic() - started)
            if held.count:
                await kv.DeleteRange(pb.DeleteRangeRequest(key=b"\0", range_end=b"\0"), timeout=120)
            for old in held_leases:
                with contextlib.suppress(grpc.aio.AioRpcError):  # expired meanwhile
                    await lease_api.LeaseRevoke(pb.LeaseRevokeRequest(ID=old.ID), timeout=30)
            at = await _raise_revision(kv, revision, progress)
            for lease_id, ttl in live:
                await lease_api.LeaseGrant(pb.LeaseGrantRequest(ID=lease_id, TTL=ttl), timeout=30)
            progress.table("kv", len(keys))
            last = at
            for batch in _txn_batches(keys):
                txn = pb.TxnRequest()
                for key, value, lease_id in batch:
                    put = pb.PutRequest(key=key, value=value, lease=lease_id if lease_id in granted else 0)
                    txn.success.add().request_put.CopyFrom(put)
                last = (await kv.Txn(txn, timeout=120)).header.revision
                progress.advance(len(batch))
            progress.done()
            last = (await kv.DeleteRange(pb.DeleteRangeRequest(key=MARKER_KEY), timeout=30)).header.revision
            summary = Summary(last, at, rows, time.monotonic() - started)
            if verify:
                await _verify_endpoint(kv, lease_api, keys, granted, last)
                summary.verified, summary.check = True, "keys, values and leases equal"
            summary.seconds = time.monotonic() - started
            return summary
    except grpc.aio.AioRpcError as e:
        raise MigrationError(f"DEST {dest}: {e.code().name}: {e.details()}") from None


def _current_keys() -> Plan[list[tuple[bytes, bytes, int]]]:
    rows = yield plans.Fetch("SELECT key, value, lease FROM kv ORDER BY key")
    return [(bytes(k), bytes(v), int(lease)) for k, v, lease in rows]


def _txn_batches(keys: list[tuple[bytes, bytes, int]]) -> list[list[tuple[bytes, bytes, int]]]:
    """Keys in Txns of at most TXN_OPS puts and about TXN_BYTES."""
    out: list[list[tuple[bytes, bytes, int]]] = []
    batch: list[tuple[bytes, bytes, int]] = []
    size = 0
    for item in keys:
        n = len(item[0]) + len(item[1]) + 32
        if batch and (len(batch) == TXN_OPS or size + n > TXN_BYTES):
            out.append(batch)
            batch, size = [], 0
        batch.append(item)
        size += n
    if batch:
        out.append(batch)
    return out


async def _raise_revision(kv: rpc_pb2_grpc.KVStub, revision: int, progress: Progress) -> int:
    """Put the in-progress marker, and again until the destination's revision is at
    least ``revision``; compact there. The revision compacted at."""
    import asyncio

    current = (await kv.Put(pb.PutRequest(key=MARKER_KEY, value=b"copying"), timeout=30)).header.revision
    pads = revision - current
    if pads > 0:
        progress.table("revisions", pads)
        left = pads

        async def pad() -> int:
            nonlocal left
            at = 0
            while left > 0:
                left -= 1
                at = (await kv.Put(pb.PutRequest(key=MARKER_KEY, value=b"copying"), timeout=60)).header.revision
                progress.advance(1)
            return at

        current = max(await asyncio.gather(*(pad() for _ in range(min(PADDING_IN_FLIGHT, pads)))))
        progress.done()
    try:
        await kv.Compact(pb.CompactionRequest(revision=current, physical=True), timeout=600)
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.OUT_OF_RANGE:  # compacted there already
            raise
    return current


async def _verify_endpoint(
    kv: rpc_pb2_grpc.KVStub,
    lease_api: rpc_pb2_grpc.LeaseStub,
    keys: list[tuple[bytes, bytes, int]],
    granted: set[int],
    revision: int,
) -> None:
    got: list[tuple[bytes, bytes, int]] = []
    start = b"\0"
    while True:
        req = pb.RangeRequest(key=start, range_end=b"\0", revision=revision, limit=ENDPOINT_PAGE)
        page = await kv.Range(req, timeout=120)
        got.extend((x.key, x.value, x.lease) for x in page.kvs)
        if not page.more or not page.kvs:
            break
        start = page.kvs[-1].key + b"\0"
    want = [(k, v, lease if lease in granted else 0) for k, v, lease in keys]
    if got != want:
        differ = next((w[0] for w, g in zip(want, got, strict=False) if w != g), None)
        raise MigrationError(
            f"--verify: the destination holds {len(got)} keys, the source {len(want)}"
            + (f"; first difference at {differ!r}" if differ is not None else "")
        )
    held = {x.ID for x in (await lease_api.LeaseLeases(pb.LeaseLeasesRequest(), timeout=30)).leases}
    if not granted <= held:
        raise MigrationError(f"--verify: leases missing in the destination: {sorted(granted - held)[:5]}")
