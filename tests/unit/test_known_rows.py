"""backend/known.py: the rows a frontend's own commits left, bounded, and trusted only
as of the revision they are for."""

from __future__ import annotations

from k8s_sql.backend.base import Row
from k8s_sql.backend.known import MAX_ROW_BYTES, MAX_SKIP, ROW_OVERHEAD, KnownRows

META = (5, 2, 0, 0)  # revision, compaction point, no alarms


def _row(key: bytes, rev: int, value: bytes = b"v") -> Row:
    return Row(key, rev, rev, 1, 0, value)


def test_a_batch_starts_from_the_rows_as_of_the_newest_revision_only() -> None:
    known = KnownRows()
    assert known.start([b"a"], -1) is None  # nothing known yet
    known.committed(-1, META, {b"a": _row(b"a", 5), b"gone": None})
    start, absent = known.start([b"a", b"gone", b"new"], 5) or (None, None)
    assert start is not None and absent == [b"new"]  # never seen: assumed absent, checked by the write
    assert (start.revision, start.compact_revision, start.meta) == (5, 2, META)
    assert start.rows == {b"a": _row(b"a", 5)}  # b"gone" known absent
    assert known.start([b"a"], 6) is None  # the frontend saw a newer revision: stale
    known.committed(5, (6, 2, 0, 0), {b"new": _row(b"new", 6)})  # continues from 5
    start, absent = known.start([b"a", b"new"], 6) or (None, None)
    assert start is not None and absent == [] and set(start.rows) == {b"a", b"new"}


def test_a_batch_that_began_elsewhere_replaces_everything() -> None:
    known = KnownRows()
    known.committed(-1, META, {b"a": _row(b"a", 5)})
    known.committed(9, (10, 2, 0, 0), {b"b": _row(b"b", 10)})  # another frontend wrote 6-9
    start, absent = known.start([b"a", b"b"], 10) or (None, None)
    assert start is not None and absent == [b"a"] and set(start.rows) == {b"b"}


def test_alarms_and_forgetting_stop_it() -> None:
    known = KnownRows()
    known.committed(-1, (5, 2, 7, 0), {b"a": _row(b"a", 5)})  # NOSPACE raised by member 7
    assert known.start([b"a"], 5) is None
    known.committed(5, META, {})
    assert known.start([b"a"], 5) is not None
    known.forget()
    assert known.start([b"a"], 5) is None and len(known) == 0 and known.size == 0


def test_refusals_in_a_row_back_off_and_a_commit_ends_it() -> None:
    """Another frontend writing in between refuses batches begun from known rows; the
    next ones read instead, twice as many after each refusal in a row, up to MAX_SKIP."""
    known = KnownRows()
    rev = 5

    def attempts(batches: int) -> int:
        nonlocal rev
        tried = 0
        for _ in range(batches):
            known.committed(rev, (rev, 2, 0, 0), {})  # as each batch leaves it (forgotten after a refusal)
            if known.start([b"a"], rev) is not None:
                tried += 1
                known.refused()  # the other frontend had moved the revision
            rev += 1
        return tried

    known.committed(-1, META, {})
    assert attempts(1 + 1 + 1 + 2 + 1 + 4) == 3  # tried, skipped 1, tried, skipped 2, tried, skipped 4
    assert attempts(10_000) <= 10_000 // MAX_SKIP + 2  # then one batch in MAX_SKIP + 1
    for _ in range(MAX_SKIP):  # the writer is alone again: once the skip runs out ...
        known.committed(rev, (rev, 2, 0, 0), {})
        if known.start([b"a"], rev) is not None:
            break
        rev += 1
    else:
        raise AssertionError("never tried again")
    known.accepted()  # ... a batch begun from known rows commits, and every batch tries
    for _ in range(10):
        known.committed(rev, (rev + 1, 2, 0, 0), {})
        rev += 1
        assert known.start([b"a"], rev) is not None


def test_memory_is_bounded_and_big_rows_are_read_not_assumed() -> None:
    known = KnownRows(max_bytes=100_000)
    value = b"x" * 1000
    for i in range(1000):
        known.committed(known.revision, (i + 1, 0, 0, 0), {b"k%04d" % i: _row(b"k%04d" % i, i + 1, value)})
        assert known.size <= 100_000
    per_row = 5 + ROW_OVERHEAD + len(value)
    assert len(known) == 100_000 // per_row  # the least recently used went first
    start, absent = known.start([b"k0999", b"k0000"], 1000) or (None, None)
    assert start is not None and list(start.rows) == [b"k0999"] and absent == [b"k0000"]

    known.committed(1000, (1001, 0, 0, 0), {b"big": _row(b"big", 1001, b"x" * (MAX_ROW_BYTES + 1))})
    assert known.size <= 100_000
    assert known.start([b"big"], 1001) is None  # exists, not kept: the batch reads it
    assert known.start([b"k0999"], 1001) is not None


def test_the_bound_holds_for_what_python_really_allocates() -> None:
    """max_bytes counts ROW_OVERHEAD per entry: measured, tiny rows (where the overhead
    is all there is) must not take more memory than the bound says."""
    import tracemalloc

    known = KnownRows(max_bytes=2_000_000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(50_000):  # far past the bound: evicting all along
            key = b"/registry/k/%08d" % i
            known.committed(known.revision, (i + 1, 0, 0, 0), {key: Row(key, 10**9 + i, 10**9 + i, 5, 0, b"%d" % i)})
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert known.size <= 2_000_000
    assert used <= 2_000_000 * 1.05, used  # measured: 1.64 MB
