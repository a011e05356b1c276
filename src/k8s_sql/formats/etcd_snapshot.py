"""An etcd snapshot (``etcdctl snapshot save``) turned into a k8s-sql store, revisions intact.

An etcd snapshot is etcd's bbolt database (read by :mod:`k8s_sql.backend.bbolt`),
followed by the SHA-256 of those bytes when it came from the Snapshot RPC. Its
buckets, as etcd's mvcc and lease packages write them:

- ``key``: every retained revision of every key, keyed by the revision -- 8 bytes
  big-endian main revision, ``_``, 8 bytes sub revision, and ``t`` for a deletion
  (a tombstone) -- with an ``mvccpb.KeyValue`` as the value (only the key, for a
  tombstone). Below the compaction point etcd keeps each key's latest revision, so
  the history is complete from the compaction revision on;
- ``meta``: ``scheduledCompactRev`` and ``finishedCompactRev`` (revision bytes);
- ``lease``: ``leasepb.Lease {ID, TTL, RemainingTTL}`` by 8-byte lease id.

The conversion replays ``key`` in revision order, keeping each key's state, so that
every change after the compaction point becomes a ``log`` row carrying the state
before it (as k8s-sql's own writes record it) and the final states become ``kv``.
The store's revision is the snapshot's (the newest revision in ``key``, or the
compaction revision if that is higher, as etcd restores it), so the next write gets
a revision above every one the source handed out, and resourceVersions never go
backwards. Leases keep their TTL and get their remaining TTL (or, as etcd grants
on restore, the full TTL) from the moment of the conversion.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from k8s_sql.backend import migrations, sql
from k8s_sql.backend.base import DELETE, PUT, LogRow, Row
from k8s_sql.backend.snapshot import DIGEST, SnapshotError, _create
from k8s_sql.formats import bbolt
from k8s_sql.formats.bbolt import Bolt, BoltError
from k8s_sql.pb import kv_pb2
from k8s_sql.store.ranges import to_kv

REVISION_BYTES = 17  # main (8) + "_" + sub (8)
BATCH = 5000  # rows per INSERT batch


@dataclass
class Converted:
    revision: int
    compact_revision: int
    keys: int
    changes: int
    leases: int


def _revision(raw: bytes) -> tuple[int, int, bool]:
    """``(main, sub, tombstone)`` of a ``key`` bucket key."""
    if len(raw) not in (REVISION_BYTES, REVISION_BYTES + 1) or raw[8:9] != b"_":
        raise SnapshotError(f"not an etcd revision key: {raw.hex()}")
    return int.from_bytes(raw[:8], "big"), int.from_bytes(raw[9:17], "big"), raw[17:] == b"t"


def _varints(data: bytes) -> dict[int, int]:
    """The varint fields of a small protobuf message (leasepb.Lease): number -> value."""
    fields: dict[int, int] = {}
    i = 0
    while i < len(data):
        tag, i = _varint(data, i)
        if tag & 7 != 0:
            raise SnapshotError("unexpected field in a lease record")
        value, i = _varint(data, i)
        fields[tag >> 3] = value - (1 << 64) if value >= 1 << 63 else value
    return fields


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data):
            raise SnapshotError("truncated lease record")
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def check_digest(path: str) -> None:
    """A snapshot from the Snapshot RPC ends with the SHA-256 of the database before it
    (etcdutl checks it the same way: ``size % 512 == 32``); a bare database has none."""
    size = os.path.getsize(path)
    if size % 512 not in (0, DIGEST):  # pages are whole: a bare database is a multiple of 512
        raise SnapshotError(f"{path} is truncated (not whole pages, nor whole pages and a SHA-256)")
    if size % 512 != DIGEST:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        left = size - DIGEST
        while left:
            chunk = f.read(min(left, 1 << 20))
            digest.update(chunk)
            left -= len(chunk)
        if f.read(DIGEST) != digest.digest():
            raise SnapshotError(f"{path} is corrupt: SHA-256 mismatch")


def changes(db: Bolt, compact: int) -> Iterator[tuple[LogRow | None, Row | None, bytes]]:
    """Replay the ``key`` bucket: for each revision, ``(the change if it is at or after
    the compaction point else None, the key's state after it, the key)``. A change at
    the compaction revision whose previous state etcd compacted away has none (etcd
    serves its event without prev_kv)."""
    state: dict[bytes, Row | None] = {}
    for raw, value in db.items(b"key"):
        main, sub, tombstone = _revision(raw)
        kv = kv_pb2.KeyValue.FromString(value)
        prev = state.get(kv.key)
        row = None if tombstone else Row(kv.key, kv.create_revision, kv.mod_revision, kv.version, kv.lease, kv.value)
        state[kv.key] = row
        change = None
        if main >= compact:  # etcd serves the compaction revision's own events
            logged = row if row is not None else Row(kv.key, 0, main, 0, 0, b"")
            change = LogRow(main, sub, DELETE if tombstone else PUT, logged, prev)
        yield change, row, kv.key


def convert(src: str, dest: str, now: float | None = None) -> Converted:
    """Write a k8s-sql SQLite store at ``dest`` (which must not exist) from the etcd
    snapshot ``src``. Raises :class:`SnapshotError` with one line."""
    now = time.time() if now is None else now
    check_digest(src)
    try:
        with Bolt(src) as db:
            meta = dict(db.items(b"meta"))
            compact = 0
            for name in (b"finishedCompactRev", b"scheduledCompactRev"):
                if name in meta:
                    compact = max(compact, _revision(meta[name])[0])
            out = _create(dest)
            try:
                counts = _write(out, db, compact, now)
                out.commit()
            finally:
                out.close()
    except BoltError as e:
        raise SnapshotError(str(e)) from None
    except sqlite3.Error as e:
        raise SnapshotError(f"cannot write {dest}: {e}") from None
    return counts


def _write(out: sqlite3.Connection, db: Bolt, compact: int, now: float) -> Converted:
    insert_log = f"INSERT INTO log ({sql.LOG_COLUMNS}) VALUES ({sql.marks(13)})"
    insert_kv = f"INSERT OR REPLACE INTO kv ({sql.KV_COLUMNS}) VALUES ({sql.marks(6)})"
    final: dict[bytes, Row | None] = {}
    batch: list[tuple[object, ...]] = []
    revision = n_changes = 0
    for change, row, key in changes(db, compact):
        final[key] = row
        if change is not None:
            revision = max(revision, change.rev)
            batch.append(sql.log_params(change))
            n_changes += 1
            if len(batch) >= BATCH:
                out.executemany(insert_log, batch)
                batch.clear()
        elif row is not None:
            revision = max(revision, row.mod_rev)
    out.executemany(insert_log, batch)
    rows = [tuple(r) for r in final.values() if r is not None]
    for i in range(0, len(rows), BATCH):
        out.executemany(insert_kv, rows[i : i + BATCH])
    leases = 0
    for raw_id, value in db.items(b"lease"):
        fields = _varints(value)
        lease_id = fields.get(1, int.from_bytes(raw_id, "big", signed=True))
        ttl = fields.get(2, 0)
        remaining = fields.get(3, 0) or ttl
        out.execute("INSERT INTO lease (id, ttl, expires_at) VALUES (?, ?, ?)", (lease_id, ttl, now + remaining))
        leases += 1
    revision = max(revision, compact, 1)
    for meta_name, meta_value in (
        ("revision", revision),
        ("compact_revision", compact),
        ("schema_version", migrations.SCHEMA_VERSION),
    ):
        out.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (meta_name, meta_value))
    return Converted(revision, compact, len(rows), n_changes, leases)


def restore(src: str, data_dir: str) -> tuple[str, Converted]:
    """``k8s-sql restore`` of an etcd snapshot: ``data_dir/state.db``, all or nothing."""
    target = os.path.join(data_dir, "state.db")
    if os.path.exists(target):
        raise SnapshotError(f"{target} exists; restore into a new --data-dir")
    created = not os.path.exists(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    partial = target + ".part"
    done = False
    try:
        if os.path.exists(partial):
            os.unlink(partial)
        converted = convert(src, partial)
        os.replace(partial, target)
        done = True
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
        if not done and created:  # leave nothing behind: the destination as it was
            os.rmdir(data_dir)
    return target, converted


# -- k8s-sql -> etcd -------------------------------------------------------------------------

STORAGE_VERSION = b"3.6.0"


def _rev_bytes(main: int, sub: int, tombstone: bool = False) -> bytes:
    return main.to_bytes(8, "big") + b"_" + sub.to_bytes(8, "big") + (b"t" if tombstone else b"")


def _lease_record(lease_id: int, ttl: int, remaining: int) -> bytes:
    """leasepb.Lease {ID = 1, TTL = 2, RemainingTTL = 3}: three int64 varints."""
    out = bytearray()
    for number, value in ((1, lease_id), (2, ttl), (3, remaining)):
        if value:
            out += _put_varint(number << 3)
            out += _put_varint(value & 0xFFFFFFFFFFFFFFFF)
    return bytes(out)


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key_bucket(store: sqlite3.Connection, compact: int) -> Iterator[tuple[bytes, bytes]]:
    """etcd's ``key`` bucket from a k8s-sql store: each key's state at the compaction
    point (as etcd keeps it), then every change after it, in revision order."""
    # The state at the compaction point, less what the log holds at that revision itself
    # (those entries are written from the log, with their sub revisions).
    state_rows = store.execute(
        "SELECT * FROM ("
        f" SELECT {sql.KV_COLUMNS} FROM kv WHERE mod_rev <= ?"
        " UNION ALL"
        " SELECT key, prev_create_rev, prev_mod_rev, prev_version, prev_lease, prev_value FROM ("
        "  SELECT key, prev_create_rev, prev_mod_rev, prev_version, prev_lease, prev_value,"
        "         ROW_NUMBER() OVER (PARTITION BY key ORDER BY rev) AS n FROM log WHERE rev > ?)"
        " WHERE n = 1 AND prev_mod_rev IS NOT NULL) AS state"
        " WHERE NOT EXISTS (SELECT 1 FROM log WHERE log.rev = state.mod_rev AND log.rev = ? AND log.key = state.key)"
        " ORDER BY mod_rev, key",  # sorted by SQLite (on disk if need be), streamed
        (compact, compact, compact),
    )
    sub, last = 0, None
    for key, create, mod, version, lease, value in state_rows:
        # the sub revision is not kept below the compaction point: number them
        sub = sub + 1 if mod == last else 0
        last = mod
        yield (
            _rev_bytes(mod, sub),
            to_kv(Row(bytes(key), create, mod, version, lease, bytes(value))).SerializeToString(),
        )
    for r in store.execute(f"SELECT {sql.LOG_COLUMNS} FROM log WHERE rev >= ? ORDER BY rev, sub", (compact,)):
        change = sql.log_row(r)
        if change.kind == DELETE:
            yield _rev_bytes(change.rev, change.sub, True), kv_pb2.KeyValue(key=change.row.key).SerializeToString()
        else:  # a put's row carries the change's revision as its mod revision
            yield _rev_bytes(change.rev, change.sub), to_kv(change.row).SerializeToString()


def export(store_path: str, dest: str, now: float | None = None, trailer: bool = True) -> tuple[int, int]:
    """Write an etcd snapshot (bbolt, then -- with ``trailer`` -- its SHA-256, as
    ``etcdctl snapshot save`` writes it) of the k8s-sql SQLite store at ``store_path``:
    ``(revision, compaction revision)``. ``etcdutl snapshot restore`` makes an etcd data
    directory of it; the Snapshot RPC streams it (adding the digest as it goes)."""
    now = time.time() if now is None else now
    store = sqlite3.connect(f"file:{os.path.abspath(store_path)}?mode=ro", uri=True)
    try:
        meta = dict(store.execute("SELECT name, value FROM meta").fetchall())
        revision, compact = int(meta["revision"]), int(meta["compact_revision"])
        leases = [
            # the id as etcd's int64 key: a negative id in two's complement
            (
                (lease_id & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big"),
                _lease_record(lease_id, ttl, max(0, round(expires_at - now))),
            )
            for lease_id, ttl, expires_at in store.execute("SELECT id, ttl, expires_at FROM lease ORDER BY id")
        ]
        meta_bucket = [(b"storageVersion", STORAGE_VERSION)]
        if compact:
            meta_bucket += [
                (b"finishedCompactRev", _rev_bytes(compact, 0)),
                (b"scheduledCompactRev", _rev_bytes(compact, 0)),
            ]
        buckets: dict[bytes, Iterable[tuple[bytes, bytes]]] = {
            b"alarm": [],
            b"auth": [(b"authRevision", (1).to_bytes(8, "big"))],
            b"authRoles": [],
            b"authUsers": [],
            b"cluster": [(b"clusterVersion", STORAGE_VERSION)],
            b"key": _key_bucket(store, compact),
            b"lease": sorted(leases),
            b"members": [],
            b"members_removed": [],
            b"meta": sorted(meta_bucket),
        }
        partial = dest + ".part"
        bbolt.write(partial, buckets)
    finally:
        store.close()
    if trailer:
        digest = hashlib.sha256()
        with open(partial, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        with open(partial, "ab") as f:
            f.write(digest.digest())
    os.replace(partial, dest)
    return revision, compact


async def export_elsewhere(store_path: str, dest: str) -> None:
    """:func:`export` (without the trailer) on a thread. The conversion is Python work
    sharing the GIL with the event loop; measured with bench/micro/loop_stall.py (20,000
    keys of 1 KiB), the loop's worst stall while a snapshot is converted and streamed is
    3-6 ms, against 3 ms for streaming a file alone (a spawned process did no better)."""
    import asyncio

    await asyncio.to_thread(export, store_path, dest, None, False)
