"""The SQL engine's plans (backend/plans.py), driven without a server.

Plans are sans-IO: some tests feed them rows by hand (what a plan asks and how it
reads the answers), others run them with the SQLite driver on an in-memory
database built from the real schema (that the SQL is right).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import pytest

from k8s_sql.backend import migrations, plans, sql
from k8s_sql.backend.base import CompactedError, FutureRevisionError, KeyRange, LogRow, MemberRow, Row
from k8s_sql.backend.sqlite import SCHEMA, SQLiteBackend

D = sql.SQLITE


def feed(plan: plans.Plan[Any], answer: Callable[[plans.Statement], Any]) -> tuple[Any, list[plans.Statement]]:
    """Run a plan, answering each statement with ``answer(statement)``."""
    asked: list[plans.Statement] = []
    result: Any = None
    try:
        while True:
            st = plan.send(result)
            asked.append(st)
            result = answer(st)
    except StopIteration as done:
        return done.value, asked


@pytest.fixture
def db() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    for stmt in [*SCHEMA.split(";"), *migrations.all_statements("sqlite")]:
        if stmt.strip():
            conn.execute(stmt)
    conn.executemany("INSERT INTO meta VALUES (?, ?)", [("revision", 1), ("compact_revision", 0)])
    return conn


def write(db: sqlite3.Connection, rev: int, *changes: tuple[bytes, bytes | None]) -> None:
    """Commit one revision of puts (value) and deletes (None), as a write batch would."""
    for sub, (key, value) in enumerate(changes):
        prev_row = db.execute(f"SELECT {sql.KV_COLUMNS} FROM kv WHERE key = ?", (key,)).fetchone()
        prev = Row(*prev_row) if prev_row else None
        if value is None:
            assert prev is not None
            plans.run_sync(db, plans.write_kv(D, [], [key]))
            change = LogRow(rev, sub, 1, Row(key, 0, rev, 0, 0, b""), prev)
        else:
            row = Row(key, prev.create_rev if prev else rev, rev, prev.version + 1 if prev else 1, 0, value)
            plans.run_sync(db, plans.write_kv(D, [row], []))
            change = LogRow(rev, sub, 0, row, prev)
        plans.run_sync(db, plans.insert_log(D, [sql.log_params(change)]))
    plans.run_sync(db, plans.set_meta("revision", rev))


def test_range_checks_revisions_before_reading() -> None:
    meta = [("revision", 10), ("compact_revision", 4)]
    with pytest.raises(FutureRevisionError):
        feed(plans.range_(D, KeyRange(b"a", None), 11, 0, False, False), lambda st: meta)
    with pytest.raises(CompactedError):
        feed(plans.range_(D, KeyRange(b"a", None), 3, 0, False, False), lambda st: meta)
    result, asked = feed(plans.range_(D, KeyRange(b"b", b"a"), 0, 0, False, False), lambda st: meta)
    assert result.count == 0 and len(asked) == 1  # an empty range asks nothing more


def test_a_limited_range_counts_only_when_the_limit_is_reached() -> None:
    row = (b"a", 2, 2, 1, 0, b"v")
    _, asked = feed(plans.head(D, KeyRange(b"a", b""), 5), lambda st: [row])
    assert len(asked) == 1  # fewer rows than the limit: they are the count
    result, asked = feed(plans.head(D, KeyRange(b"a", b""), 1), lambda st: [row] if "COUNT" not in st.sql else [(7,)])
    assert result == ([Row(*row)], 7) and len(asked) == 2


def test_current_and_historical_ranges(db: sqlite3.Connection) -> None:
    write(db, 2, (b"a", b"1"), (b"b", b"1"))
    write(db, 3, (b"a", b"2"))
    write(db, 4, (b"b", None))
    everything = KeyRange(b"\0", b"")
    now = plans.run_sync(db, plans.range_(D, everything, 0, 0, False, False))
    assert [(r.key, r.value) for r in now.rows] == [(b"a", b"2")] and now.revision == 4
    then = plans.run_sync(db, plans.range_(D, everything, 2, 0, False, False))
    assert [(r.key, r.value, r.mod_rev) for r in then.rows] == [(b"a", b"1", 2), (b"b", b"1", 2)]
    keys = plans.run_sync(db, plans.range_(D, everything, 3, 1, False, True))
    assert [(r.key, r.value) for r in keys.rows] == [(b"a", b"")] and keys.count == 2


def test_a_point_read_is_one_statement(db: sqlite3.Connection) -> None:
    """One key now: revision, compaction point and the row from one SELECT, the same
    answer as the general range plan for every shape of request."""
    write(db, 2, (b"a", b"1"), (b"b", b"1"))
    write(db, 3, (b"a", b"2"))
    write(db, 4, (b"b", None))
    for key in (b"a", b"b", b"zz"):
        for keys_only, count_only in ((False, False), (True, False), (False, True)):
            result, asked = feed(
                plans.point(D, key, keys_only, count_only), lambda st: db.execute(st.sql, st.params).fetchall()
            )
            assert len(asked) == 1
            general = plans.run_sync(db, plans.range_(D, KeyRange(key, None), 0, 0, count_only, keys_only))
            assert result == general, (key, keys_only, count_only)
    assert plans.run_sync(db, plans.point(D, b"a", False, False)).rows[0].value == b"2"


def test_changes_come_in_whole_revisions(db: sqlite3.Connection) -> None:
    write(db, 2, (b"a", b"1"), (b"b", b"1"), (b"c", b"1"))
    write(db, 3, (b"a", b"2"))
    rows, covered = plans.run_sync(db, plans.changes(D, 2, 3, None, 2))
    assert [(r.rev, r.row.key) for r in rows] == [(2, b"a"), (2, b"b"), (2, b"c")] and covered == 2
    rows, covered = plans.run_sync(db, plans.changes(D, 2, 3, [KeyRange(b"a", None)], 10))
    assert [(r.rev, r.row.key) for r in rows] == [(2, b"a"), (3, b"a")] and covered == 3
    assert plans.run_sync(db, plans.changes(D, 2, 3, [KeyRange(b"b", b"a")], 10)) == ([], 3)


def test_compare_and_set_on_meta(db: sqlite3.Connection) -> None:
    assert plans.run_sync(db, plans.meta_compare_and_set(D, {"leader": 0}, {"leader": 5, "leader_until": 9}))
    assert plans.run_sync(db, plans.meta_get(["leader", "leader_until"])) == {"leader": 5, "leader_until": 9}
    assert not plans.run_sync(db, plans.meta_compare_and_set(D, {"leader": 0}, {"leader": 6}))
    assert plans.run_sync(db, plans.meta_get(["leader"])) == {"leader": 5}


def test_compaction_steps_and_hash(db: sqlite3.Connection) -> None:
    for rev in range(2, 12):
        write(db, rev, (b"k", str(rev).encode()))
    before = plans.run_sync(db, plans.hash_kv(D, 0))
    assert plans.run_sync(db, plans.compact_step(8, 3)) == 3  # revisions 2, 3, 4
    assert plans.run_sync(db, plans.compact_step(8, 100)) == 3  # 5, 6, 7
    assert plans.run_sync(db, plans.compact_step(8, 100)) == 0
    plans.run_sync(db, plans.set_meta("compact_revision", 8))
    with pytest.raises(CompactedError):
        plans.run_sync(db, plans.hash_kv(D, 7))
    h, compact, at = plans.run_sync(db, plans.hash_kv(D, 0))
    assert (compact, at) == (8, 11) and h != before[0]


def test_members_and_heartbeats(db: sqlite3.Connection) -> None:
    plans.run_sync(db, plans.heartbeat(MemberRow(1, "a", "http://a", 100.0)))
    plans.run_sync(db, plans.heartbeat(MemberRow(1, "a", "http://a", 200.0)))
    plans.run_sync(db, plans.heartbeat(MemberRow(2, "b", "http://b", 50.0)))
    assert plans.run_sync(db, plans.members(100.0)) == [MemberRow(1, "a", "http://a", 200.0)]
    plans.run_sync(db, plans.remove_member(1))
    assert plans.run_sync(db, plans.members(0.0)) == [MemberRow(2, "b", "http://b", 50.0)]


def reference_hash(db: sqlite3.Connection, at: int) -> int:
    """HashKV computed the simple way: every change and the whole state in one query each."""
    from k8s_sql.backend.hashing import StateHash

    h = StateHash()
    compact = plans.run_sync(db, plans.current())[1]
    for r in db.execute(
        f"SELECT {sql.LOG_COLUMNS} FROM log WHERE rev >= ? AND rev <= ? ORDER BY rev, sub", (compact, at)
    ):
        h.add_change(sql.log_row(r))
    for row in plans.run_sync(db, plans.historical(D, KeyRange(b"\0", b""), at, 0))[0]:
        h.add_row(row)
    return h.value


def test_paged_reads_see_every_row_once(db: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """HashKV and the snapshot's table pages, with pages of 3 rows: page boundaries fall
    inside revisions, between a key's changes, and on keys deleted later."""
    monkeypatch.setattr(plans, "PAGE_ROWS", 3)
    rev = 1
    for i in range(12):
        rev += 1
        write(db, rev, *((b"k%02d" % j, b"%d" % i) for j in range(i % 4, 12, 3)))
        if i % 5 == 4:
            rev += 1
            write(db, rev, (b"k%02d" % (i % 4), None))
    for at in (2, 5, rev - 1, rev):
        assert plans.run_sync(db, plans.hash_kv(D, at))[0] == reference_hash(db, at), at
    for table, _ in sql.TABLES:
        seen: list[Any] = []
        after = None
        while True:
            page = plans.run_sync(db, plans.table_page(D, table, after))
            seen += page
            if len(page) < 3:
                break
            after = page[-1][: len(plans.TABLE_KEYS[table])]
        assert seen == db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall(), table


def test_a_snapshot_without_its_meta_rows_is_taken_again() -> None:
    """MariaDB's OPTIMIZE TABLE can leave a snapshot that shows no meta rows: not a
    KeyError (UNKNOWN), but SnapshotLost, which the engine retries."""
    import asyncio

    from k8s_sql.backend.base import SnapshotLost

    with pytest.raises(SnapshotLost):
        feed(plans.range_(D, KeyRange(b"a", None), 0, 0, False, False), lambda st: [])
    with pytest.raises(SnapshotLost):
        feed(plans.begin_write(D), lambda st: [[] for _ in st.steps])  # one answer per pipelined step
    with pytest.raises(SnapshotLost):  # the aggregate's one row, of NULLs
        feed(plans.point(D, b"a", False, False), lambda st: [(None, None, None, None, None, None, None, None)])

    attempts: list[int] = []

    async def flaky() -> tuple[int, int]:
        attempts.append(1)
        answers = [] if len(attempts) < 3 else [("revision", 5), ("compact_revision", 0)]
        return feed(plans.current(), lambda st: answers)[0]

    backend = SQLiteBackend.__new__(SQLiteBackend)  # the engine's retrying alone
    assert asyncio.run(backend.retrying(flaky)) == (5, 0)
    assert len(attempts) == 3


def test_a_write_begins_with_its_keys_and_leases_in_one_pipeline(db: sqlite3.Connection) -> None:
    """begin_write asks one Pipeline: the revision lock, the batch's keys (in chunks of
    64) and leases; absent ones are simply missing from the answer."""
    keys = [b"k%03d" % i for i in range(70)]
    db.executemany("INSERT INTO kv VALUES (?, ?, ?, ?, ?, ?)", [(k, 1, 1, 1, 0, b"v" + k) for k in keys[::2]])
    db.execute("INSERT INTO lease VALUES (7, 60, 123.5)")
    _, asked = feed(
        plans.begin_write(D, keys, [7, 8]),
        lambda st: [[("revision", 1), ("compact_revision", 0)]] + [[]] * (len(st.steps) - 1),
    )
    assert len(asked) == 1 and isinstance(asked[0], plans.Pipeline)
    assert len(asked[0].steps) == 1 + 2 + 1  # the lock, two chunks of keys, the leases
    start = plans.run_sync(db, plans.begin_write(D, keys, [7, 8]))
    assert (start.revision, start.compact_revision, start.nospace, start.corrupt) == (1, 0, False, False)
    assert sorted(start.rows) == keys[::2] and start.rows[keys[0]].value == b"v" + keys[0]
    assert list(start.leases) == [7] and start.leases[7].ttl == 60


@pytest.mark.parametrize("dialect", [sql.SQLITE, sql.MYSQL], ids=["sqlite", "mysql"])
def test_a_batch_ends_in_one_pipeline(dialect: sql.Dialect) -> None:
    """Without a one-statement finish, the deletes, upserts, log rows and revision go as
    one Pipeline, with the COMMIT where the dialect pipelines (MySQL)."""
    row = Row(b"a", 5, 5, 1, 0, b"v")
    log = [(5, 0, b"a", 0, 5, 1, 0, b"v", None, None, None, None, None)]
    _, asked = feed(
        plans.finish_batch(dialect, [row], [b"gone"], log, 5, commit=dialect.pipelines), lambda st: [None] * 5
    )
    assert len(asked) == 1 and isinstance(asked[0], plans.Pipeline)
    steps = asked[0].steps
    assert [type(s).__name__ for s in steps[:4]] == ["Execute", "ExecuteMany", "ExecuteMany", "Execute"]
    assert (steps[-1] is plans.COMMIT) == dialect.pipelines


def test_a_finished_batch_is_in_the_tables(db: sqlite3.Connection) -> None:
    db.execute("INSERT INTO kv VALUES (?, 1, 1, 1, 0, ?)", (b"gone", b"x"))
    row = Row(b"a", 5, 5, 1, 0, b"v")
    log = [(5, 0, b"a", 0, 5, 1, 0, b"v", None, None, None, None, None)]
    plans.run_sync(db, plans.finish_batch(D, [row], [b"gone"], log, 5))
    assert db.execute("SELECT key, value FROM kv").fetchall() == [(b"a", b"v")]
    assert db.execute("SELECT rev, key FROM log").fetchall() == [(5, b"a")]
    assert db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchall() == [(5,)]
