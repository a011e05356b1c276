"""KeyRange: etcd's key/range_end conventions, resolved once (backend/base.py)."""

from __future__ import annotations

import itertools

import pytest

from k8s_sql.backend.base import KeyRange
from testing.keys import prefix_end

# Keys that break naive byte handling: NUL inside, at the start and at the end, 0xFF,
# bytes that are not UTF-8.
KEYS = [
    b"",
    b"\x00",
    b"\x00\x00",
    b"\x01",
    b"a",
    b"a\x00",
    b"a\x00\x00",
    b"a\x01",
    b"a\xff",
    b"ab",
    b"b",
    b"b\xff",
    b"\xc3\x28",
    b"\xfe",
    b"\xff",
    b"\xff\x00",
    b"\xff\xff",
]


def test_an_empty_range_end_is_the_single_key() -> None:
    kr = KeyRange.from_etcd(b"a", b"")
    assert kr == KeyRange(b"a", None)
    assert [k for k in KEYS if kr.contains(k)] == [b"a"]
    assert not kr.is_empty


def test_a_nul_range_end_is_every_key_from_key_on() -> None:
    kr = KeyRange.from_etcd(b"a\x00", b"\0")
    assert kr == KeyRange(b"a\x00", b"")
    assert [k for k in KEYS if kr.contains(k)] == [k for k in KEYS if k >= b"a\x00"]
    assert kr.contains(b"\xff\xff\xff")
    assert not kr.is_empty


def test_nul_to_nul_is_every_key() -> None:
    kr = KeyRange.from_etcd(b"\0", b"\0")
    assert all(kr.contains(k) for k in KEYS if k)
    assert not kr.contains(b"")  # not a key etcd accepts anyway


def test_only_a_single_nul_means_unbounded() -> None:
    """A range_end of two NULs is an ordinary bound: [\\0, \\0\\0) holds only \\0."""
    kr = KeyRange.from_etcd(b"\x00", b"\x00\x00")
    assert kr == KeyRange(b"\x00", b"\x00\x00")
    assert [k for k in KEYS if kr.contains(k)] == [b"\x00"]


def test_a_bounded_range_is_half_open() -> None:
    kr = KeyRange.from_etcd(b"a", b"b")
    assert [k for k in KEYS if kr.contains(k)] == [b"a", b"a\x00", b"a\x00\x00", b"a\x01", b"a\xff", b"ab"]
    assert not kr.contains(b"b")


def test_a_key_and_its_successor_hold_exactly_the_key() -> None:
    for key in (b"a", b"\x00", b"\xff", b"\xff\xff"):
        kr = KeyRange.from_etcd(key, key + b"\x00")
        assert [k for k in KEYS if kr.contains(k)] == [k for k in KEYS if k == key]
        assert not kr.is_empty


@pytest.mark.parametrize("prefix", [b"a", b"a\x00", b"\x00", b"b", b"\xff", b"\xff\xff", b"\xc3"])
def test_a_prefix_range_holds_exactly_the_keys_with_the_prefix(prefix: bytes) -> None:
    """Including prefixes of 0xFF bytes, whose range_end is "\\0" (no upper bound)."""
    kr = KeyRange.from_etcd(prefix, prefix_end(prefix))
    assert [k for k in KEYS if kr.contains(k)] == [k for k in KEYS if k.startswith(prefix)]


@pytest.mark.parametrize(
    ("key", "end"),
    [(b"b", b"a"), (b"a", b"a"), (b"\xff", b"\x01"), (b"a\x00", b"a"), (b"\xff\xff", b"\xff")],
)
def test_an_inverted_or_equal_range_is_empty(key: bytes, end: bytes) -> None:
    kr = KeyRange.from_etcd(key, end)
    assert kr.is_empty
    assert not any(kr.contains(k) for k in KEYS)


def test_empty_exactly_when_the_start_key_is_outside() -> None:
    """Over every pair of keys (and the two special range_ends): a range is empty
    exactly when it does not hold its own start key, and it holds what etcd's
    interval [key, range_end) holds."""
    for key, end in itertools.product(KEYS[1:], [b"", b"\0", *KEYS[1:]]):
        kr = KeyRange.from_etcd(key, end)
        assert kr.is_empty == (not kr.contains(key)), (key, end)
        for k in KEYS:
            if end == b"":
                want = k == key
            elif end == b"\0":
                want = k >= key
            else:
                want = key <= k < end
            assert kr.contains(k) == want, (key, end, k)


def test_key_ranges_are_values() -> None:
    assert KeyRange.from_etcd(b"a", b"b") == KeyRange(b"a", b"b")
    assert len({KeyRange.from_etcd(b"a", b""), KeyRange(b"a", None)}) == 1
    with pytest.raises(AttributeError):
        KeyRange(b"a", None).key = b"b"  # type: ignore[misc]
