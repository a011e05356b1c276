"""store/ranges.py: etcd's executeRange on top of the rows a backend returns --
revision filters, sort, limit and ``more``, ``keys_only``, ``count_only``."""

from __future__ import annotations

import pytest

from k8s_sql.backend.base import Row
from k8s_sql.pb import kv_pb2, rpc_pb2 as pb
from k8s_sql.store import ranges

RR = pb.RangeRequest

# In key order, as a backend returns them: Row(key, create_rev, mod_rev, version, lease, value).
ROWS = [
    Row(b"a", 2, 9, 3, 0, b"m"),
    Row(b"a\x00", 3, 3, 1, 7, b"z"),
    Row(b"b", 4, 8, 2, 0, b"a"),
    Row(b"b\xff", 5, 5, 1, 0, b"m"),
    Row(b"\xff", 6, 7, 2, 0, b"\x00"),
]


def keys(resp: pb.RangeResponse) -> list[bytes]:
    return [kv.key for kv in resp.kvs]


def build(rows: list[Row] = ROWS, count: int | None = None, revision: int = 10, **request: object) -> pb.RangeResponse:
    r = RR(key=b"\0", range_end=b"\0", **request)  # type: ignore[arg-type]
    return ranges.build_response(r, rows, len(rows) if count is None else count, revision)


# -- fetch_limit ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "fetch"),
    [(0, 0), (1, 2), (5, 6), (-1, 0), (-(2**63), 0), (2**62 - 1, 2**62), (2**62, 0), (2**63 - 1, 0)],
)
def test_fetch_limit_reads_one_more_than_the_limit(limit: int, fetch: int) -> None:
    """One more row tells ``more``; a negative limit, or one no store can reach
    (>= 2^62, where limit + 1 would overflow SQL's 64-bit LIMIT), reads everything."""
    assert ranges.fetch_limit(RR(key=b"a", range_end=b"b", limit=limit)) == fetch


@pytest.mark.parametrize(
    "request_fields",
    [
        {"sort_order": RR.ASCEND},
        {"sort_order": RR.DESCEND},
        {"sort_order": RR.ASCEND, "sort_target": RR.KEY},
        {"min_mod_revision": 2},
        {"max_mod_revision": 2},
        {"min_create_revision": 2},
        {"max_create_revision": 2},
    ],
)
def test_fetch_limit_reads_everything_to_sort_or_filter(request_fields: dict[str, int]) -> None:
    assert ranges.fetch_limit(RR(key=b"a", range_end=b"b", limit=3, **request_fields)) == 0  # type: ignore[arg-type]


def test_a_sort_target_without_an_order_reads_only_limit_plus_one_as_etcd_does() -> None:
    """etcd's executeRange reads everything only for an explicit sort order: a target
    other than KEY with order NONE sorts the first limit + 1 keys ascending. (Checked
    against etcd 3.6.16: versions a=3 b=2 c=1 d=1, VERSION/NONE limit 1 answers b,
    VERSION/ASCEND limit 1 answers c.)"""
    r = RR(key=b"a", range_end=b"z", limit=1, sort_target=RR.VERSION)
    assert ranges.fetch_limit(r) == 2
    rows = [Row(b"a", 2, 4, 3, 0, b""), Row(b"b", 5, 6, 2, 0, b"")]  # what the backend returns
    resp = ranges.build_response(r, rows, 4, 10)
    assert keys(resp) == [b"b"]
    assert resp.more and resp.count == 4


def test_sorts_by_value() -> None:
    assert ranges.sorts_by_value(RR(key=b"a", sort_target=RR.VALUE))
    assert ranges.sorts_by_value(RR(key=b"a", sort_target=RR.VALUE, sort_order=RR.DESCEND, keys_only=True))
    assert not ranges.sorts_by_value(RR(key=b"a", sort_target=RR.MOD))


# -- to_kv ------------------------------------------------------------------------------


def test_to_kv_maps_every_column() -> None:
    kv = ranges.to_kv(Row(b"k\x00\xff", 3, 5, 2, -7, b"\x00v\xff"))
    assert kv == kv_pb2.KeyValue(
        key=b"k\x00\xff", create_revision=3, mod_revision=5, version=2, lease=-7, value=b"\x00v\xff"
    )


# -- build_response -------------------------------------------------------------------


def test_rows_keep_key_order_and_the_header_revision() -> None:
    resp = build()
    assert keys(resp) == [r.key for r in ROWS]
    assert resp.header.revision == 10
    assert resp.count == 5 and not resp.more
    assert resp.kvs[1] == ranges.to_kv(ROWS[1])


@pytest.mark.parametrize(("limit", "n", "more"), [(1, 1, True), (4, 4, True), (5, 5, False), (6, 5, False)])
def test_limit_and_more(limit: int, n: int, more: bool) -> None:
    resp = build(limit=limit)
    assert keys(resp) == [r.key for r in ROWS[:n]]
    assert resp.more is more
    assert resp.count == 5  # the whole range, whatever the limit


@pytest.mark.parametrize("limit", [2**62, 2**63 - 1, 0, -1])
def test_a_huge_or_no_limit_returns_every_row(limit: int) -> None:
    resp = build(limit=limit)
    assert len(resp.kvs) == 5 and not resp.more


def test_count_comes_from_the_backend() -> None:
    """``more`` is told from the rows read (limit + 1), the count from the backend's count."""
    resp = build(ROWS[:3], count=40, limit=2)
    assert keys(resp) == [b"a", b"a\x00"]
    assert resp.more and resp.count == 40


def test_count_only_answers_the_count_without_rows() -> None:
    """The store reads no rows for ``count_only`` (etcd: no kvs, ``more`` false)."""
    resp = build([], count=5, count_only=True, limit=2)
    assert not resp.kvs and resp.count == 5 and not resp.more


def test_keys_only_drops_values_and_keeps_the_rest() -> None:
    resp = build(keys_only=True)
    assert keys(resp) == [r.key for r in ROWS]
    assert all(kv.value == b"" for kv in resp.kvs)
    assert resp.kvs[1] == kv_pb2.KeyValue(key=b"a\x00", create_revision=3, mod_revision=3, version=1, lease=7)


SORTED = {
    # (target, order) -> keys; ties in key order (etcd's order among ties is unspecified)
    (RR.KEY, RR.NONE): [b"a", b"a\x00", b"b", b"b\xff", b"\xff"],
    (RR.KEY, RR.ASCEND): [b"a", b"a\x00", b"b", b"b\xff", b"\xff"],
    (RR.KEY, RR.DESCEND): [b"\xff", b"b\xff", b"b", b"a\x00", b"a"],
    (RR.VERSION, RR.NONE): [b"a\x00", b"b\xff", b"b", b"\xff", b"a"],  # no order: ascending
    (RR.VERSION, RR.ASCEND): [b"a\x00", b"b\xff", b"b", b"\xff", b"a"],
    (RR.VERSION, RR.DESCEND): [b"a", b"b", b"\xff", b"a\x00", b"b\xff"],
    (RR.CREATE, RR.ASCEND): [b"a", b"a\x00", b"b", b"b\xff", b"\xff"],
    (RR.CREATE, RR.DESCEND): [b"\xff", b"b\xff", b"b", b"a\x00", b"a"],
    (RR.MOD, RR.NONE): [b"a\x00", b"b\xff", b"\xff", b"b", b"a"],
    (RR.MOD, RR.DESCEND): [b"a", b"b", b"\xff", b"b\xff", b"a\x00"],
    (RR.VALUE, RR.ASCEND): [b"\xff", b"b", b"a", b"b\xff", b"a\x00"],
    (RR.VALUE, RR.DESCEND): [b"a\x00", b"a", b"b\xff", b"b", b"\xff"],
}


@pytest.mark.parametrize(("target", "order"), list(SORTED), ids=lambda v: str(v))
def test_sort(target: int, order: int) -> None:
    resp = build(sort_target=target, sort_order=order)
    assert keys(resp) == SORTED[(target, order)]


def test_key_ascending_is_not_resorted() -> None:
    """KEY/ASCEND is the backend's own order: the rows are taken as they come."""
    rows = list(reversed(ROWS))
    assert keys(build(rows, sort_target=RR.KEY, sort_order=RR.ASCEND)) == [r.key for r in rows]


def test_limit_applies_after_the_sort() -> None:
    resp = build(sort_target=RR.MOD, sort_order=RR.DESCEND, limit=2)
    assert keys(resp) == [b"a", b"b"]
    assert resp.more and resp.count == 5


def test_keys_only_sorted_by_value_sorts_by_the_values_it_drops() -> None:
    resp = build(keys_only=True, sort_target=RR.VALUE, sort_order=RR.DESCEND, limit=3)
    assert keys(resp) == [b"a\x00", b"a", b"b\xff"]
    assert all(kv.value == b"" for kv in resp.kvs)
    assert resp.more


@pytest.mark.parametrize(
    ("fields", "want"),
    [
        ({"min_mod_revision": 8}, [b"a", b"b"]),
        ({"max_mod_revision": 5}, [b"a\x00", b"b\xff"]),
        ({"min_create_revision": 4}, [b"b", b"b\xff", b"\xff"]),
        ({"max_create_revision": 3}, [b"a", b"a\x00"]),
        ({"min_mod_revision": 5, "max_mod_revision": 8, "min_create_revision": 4}, [b"b", b"b\xff", b"\xff"]),
        ({"min_mod_revision": 100}, []),
    ],
)
def test_revision_filters(fields: dict[str, int], want: list[bytes]) -> None:
    resp = build(**fields)  # type: ignore[arg-type]
    assert keys(resp) == want
    assert resp.count == 5  # etcd counts the range before its filters


def test_filters_apply_before_the_limit() -> None:
    """``more`` is told after filtering: two rows pass, limit 2 leaves none behind."""
    resp = build(min_mod_revision=8, limit=2)
    assert keys(resp) == [b"a", b"b"] and not resp.more
    resp = build(min_create_revision=3, limit=2)
    assert keys(resp) == [b"a\x00", b"b"] and resp.more
