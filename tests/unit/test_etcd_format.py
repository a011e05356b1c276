"""etcd's snapshot format written and read back with no etcd: a B+tree of several levels,
values over a page (overflow pages), any byte in keys, negative lease ids (the fuzzer's
find: int64 ids as etcd stores them), history from a compaction point, several changes
in one revision. Real etcd tools read these files in tests/test_migrate.py."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from k8s_sql.backend import migrations, sql
from k8s_sql.backend.base import DELETE, PUT, LogRow, Row
from k8s_sql.backend.snapshot import SnapshotError, _create
from k8s_sql.formats import bbolt, etcd_snapshot


def _store(path: Path, rng: random.Random) -> None:
    """A k8s-sql store with history, as k8s-sql's own writes record it."""
    out = _create(str(path))
    state: dict[bytes, Row] = {}
    rev = 1
    logs = []
    for _ in range(1500):
        rev += 1
        for sub in range(rng.choice((1, 1, 1, 3))):  # some revisions change several keys
            key = b"/k/" + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6)))
            if sub and key in {ch.row.key for ch in logs if ch.rev == rev}:
                continue
            prev = state.get(key)
            if prev is not None and rng.random() < 0.2:
                logs.append(LogRow(rev, sub, DELETE, Row(key, 0, rev, 0, 0, b""), prev))
                del state[key]
                continue
            size = 70_000 if rng.random() < 0.01 else rng.randrange(0, 300)
            row = Row(
                key, prev.create_rev if prev else rev, rev, prev.version + 1 if prev else 1, 0, rng.randbytes(size)
            )
            logs.append(LogRow(rev, sub, PUT, row, prev))
            state[key] = row
    compact = 700
    out.executemany(
        f"INSERT INTO log ({sql.LOG_COLUMNS}) VALUES ({sql.marks(13)})",
        [sql.log_params(ch) for ch in logs if ch.rev >= compact],
    )
    out.executemany(f"INSERT INTO kv ({sql.KV_COLUMNS}) VALUES ({sql.marks(6)})", [tuple(r) for r in state.values()])
    out.executemany(
        "INSERT INTO lease (id, ttl, expires_at) VALUES (?, ?, ?)", [(-5, 60, 2e9), (7, 3600, 2e9), (2**62, 10, 2e9)]
    )
    for name, value in (
        ("revision", rev),
        ("compact_revision", compact),
        ("schema_version", migrations.SCHEMA_VERSION),
    ):
        out.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))
    out.commit()
    out.close()


def test_round_trip(tmp_path: Path) -> None:
    source, exported, back = tmp_path / "source.db", tmp_path / "etcd.db", tmp_path / "back.db"
    _store(source, random.Random(1))
    revision, compact = etcd_snapshot.export(str(source), str(exported), now=1e9)
    assert bbolt.is_bolt(str(exported))
    with bbolt.Bolt(str(exported)) as db:
        assert {b"key", b"lease", b"meta", b"members", b"cluster"} <= set(db.buckets())
        revs = [k for k, _ in db.items(b"key")]
        assert revs == sorted(revs) and len(set(revs)) == len(revs)
    converted = etcd_snapshot.convert(str(exported), str(back), now=1e9)
    assert (converted.revision, converted.compact_revision) == (revision, compact)
    a, b = sqlite3.connect(source), sqlite3.connect(back)
    assert (
        a.execute("SELECT * FROM kv ORDER BY key").fetchall() == b.execute("SELECT * FROM kv ORDER BY key").fetchall()
    )
    # every change after the compaction point, with the state before it
    q = "SELECT * FROM log WHERE rev > ? ORDER BY rev, sub"
    assert a.execute(q, (compact,)).fetchall() == b.execute(q, (compact,)).fetchall()
    assert b.execute("SELECT id, ttl FROM lease ORDER BY id").fetchall() == [(-5, 60), (7, 3600), (2**62, 10)]


def test_truncated_or_flipped(tmp_path: Path) -> None:
    source, exported = tmp_path / "source.db", tmp_path / "etcd.db"
    _store(source, random.Random(2))
    etcd_snapshot.export(str(source), str(exported))
    data = exported.read_bytes()
    middle = len(data) // 2
    flipped = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
    for name, damaged in (("cut", data[: middle + 7]), ("flip", flipped)):
        bad = tmp_path / name
        bad.write_bytes(damaged)
        with pytest.raises(SnapshotError):
            etcd_snapshot.convert(str(bad), str(tmp_path / f"{name}.out"))
