"""A paginated LIST's next page takes its count from the page before (SQLBackend.range):
the same answers as counting, without counting the rest of the range again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from k8s_sql.backend import engine, open_backend, plans
from k8s_sql.backend.base import CompactedError, KeyRange, RangeResult, Row
from k8s_sql.backend.sqlite import SQLiteBackend
from k8s_sql.pb import rpc_pb2 as pb
from k8s_sql.store.store import Store


async def test_pages_take_their_count_from_the_page_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = open_backend(f"sqlite://{tmp_path}/state.db")
    await backend.open()
    store = Store(backend)
    await store.start()
    known: list[Any] = []
    real = plans.range_

    def spy(*args: Any) -> Any:
        known.append(args[-1])
        return real(*args)

    monkeypatch.setattr(plans, "range_", spy)
    try:
        for i in range(25):
            await store.put(pb.PutRequest(key=b"/p/%02d" % i, value=b"v"))
        await store.put(pb.PutRequest(key=b"/q", value=b"outside"))
        kr = KeyRange(b"/p/", b"/p0")
        first = await backend.range(kr, 0, 10, False, False)
        rev = first.revision
        assert (len(first.rows), first.count, known[-1]) == (10, 25, None)
        for i in range(5):  # writes after the first page: the next pages read history
            await store.put(pb.PutRequest(key=b"/p/%02d" % i, value=b"changed"))
        await store.put(pb.PutRequest(key=b"/p/99", value=b"new"))
        second = await backend.range(KeyRange(first.rows[-1].key + b"\x00", kr.end), rev, 10, False, False)
        assert (len(second.rows), second.count, known[-1]) == (10, 15, 15)
        third = await backend.range(KeyRange(second.rows[-1].key + b"\x00", kr.end), rev, 10, False, True)
        assert (len(third.rows), third.count, known[-1]) == (5, 5, 5)
        assert [r.key for r in first.rows + second.rows + third.rows] == [b"/p/%02d" % i for i in range(25)]
        # through the store, which reads one row more than the limit to tell "more"
        page = await store.range(pb.RangeRequest(key=b"/p/", range_end=b"/p0", limit=10, revision=rev))
        assert (len(page.kvs), page.count, page.more) == (10, 25, True)
        page = await store.range(
            pb.RangeRequest(key=page.kvs[-1].key + b"\x00", range_end=b"/p0", limit=10, revision=rev)
        )
        assert (len(page.kvs), page.count, page.more, known[-1]) == (10, 15, True, 15)
        # what counting answers, for the same requests (another frontend has no memo)
        engine_counts = backend._page_counts.copy()
        backend._page_counts.clear()
        again = await backend.range(KeyRange(first.rows[-1].key + b"\x00", kr.end), rev, 10, False, False)
        assert (again.count, known[-1]) == (15, None)
        assert engine_counts  # the memo held the pages' counts
        # a compacted revision is refused whatever the memo holds
        await store.compact(pb.CompactionRequest(revision=rev + 3))
        with pytest.raises(CompactedError):
            await backend.range(KeyRange(first.rows[-1].key + b"\x00", kr.end), rev, 10, False, False)
    finally:
        await store.stop()
        await backend.close()


def test_the_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "PAGE_COUNTS", 3)
    backend = SQLiteBackend.__new__(SQLiteBackend)  # the memo alone
    for i in range(5):
        row = Row(b"k%d" % i, 1, 1, 1, 0, b"")
        backend._remember_next_page(KeyRange(b"k", b"l"), 7, RangeResult([row], 9, 7, 0))
    assert list(backend._page_counts) == [(b"k%d\x00" % i, b"l", 7) for i in (2, 3, 4)]
    two = [Row(b"m1", 1, 1, 1, 0, b""), Row(b"m2", 1, 1, 1, 0, b"")]  # a page read with one row more
    backend._remember_next_page(KeyRange(b"m", b"n"), 7, RangeResult(two, 9, 7, 0))
    assert backend._page_counts[(b"m1\x00", b"n", 7)] == 8 and backend._page_counts[(b"m2\x00", b"n", 7)] == 7
    backend._page_counts.clear()
    long_key = Row(b"x" * 2000, 1, 1, 1, 0, b"")
    backend._remember_next_page(KeyRange(b"x", b"y"), 7, RangeResult([long_key], 9, 7, 0))
    assert not backend._page_counts
