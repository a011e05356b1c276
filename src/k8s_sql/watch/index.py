"""Watchers grouped as etcd groups them (server/storage/mvcc/watcher_group.go,
watchable_store.go): the synced ones indexed by what they watch, the lagging ones by
the revision they need next.

- :class:`WatchIndex` (etcd's ``watcherGroup``: a key map plus an interval tree): a
  commit asks it for the watchers of its keys and touches only those, however many
  other watchers there are.
- :class:`LagGroups` (etcd's ``unsynced`` group): lagging watchers that need the same
  revision next are caught up by one read of the change log (the union of their
  ranges), at most :data:`MAX_WATCHERS_PER_SYNC` at a time (etcd's
  ``maxWatchersPerSync``).

Keys are arbitrary bytes (``\\x00`` and ``\\xff`` included) compared bytewise, as in
the database.
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Generic, TypeVar

from k8s_sql.backend.base import KeyRange

T = TypeVar("T")  # a watcher: hashable, by identity

# etcd's maxWatchersPerSync: lagging watchers caught up by one read of the log.
MAX_WATCHERS_PER_SYNC = 512

Interval = tuple[bytes, bytes]  # [start, end), start < end, both non-empty bounds


def touches(start: bytes, end: bytes | None, sorted_keys: Sequence[bytes]) -> bool:
    """Whether one of the (sorted) keys is in ``[start, end)`` (``end`` None: the key
    ``start``; ``b""``: no upper bound)."""
    i = bisect.bisect_left(sorted_keys, start)
    if i == len(sorted_keys):
        return False
    if end is None:
        return sorted_keys[i] == start
    return end == b"" or sorted_keys[i] < end


class _Intervals:
    """Distinct bounded intervals, sorted by ``(start, end)`` in blocks (as
    sortedcontainers' SortedList keeps its items), each block with the running maximum
    of its ends and the blocks with the running maximum of theirs.

    Invariants: the blocks are non-empty, sorted within and between each other, and
    hold at most ``2 * LOAD`` intervals; ``_starts[b]`` are the starts of block b,
    ``_pmax[b][i]`` the largest end among its first i+1 intervals, ``_bmax[b]`` its
    largest end, ``_bpmax[b]`` the largest end of blocks 0..b, ``_first[b]`` its first
    interval.

    A key k is in the intervals that start at or before it and end after it. Those
    starting at or before it are a prefix of the order (two bisections, in C), and the
    running maxima say whether any of them ends after k: a key no interval contains
    costs those two bisections and two comparisons, however many intervals there are
    (the whole point: 10,000 idle watchers must cost a commit nothing). The intervals
    that do contain it are found walking back through the prefix only while a running
    maximum says one is left. An interval tree answers in O(log n) steps too, but each
    step is Python (a treap measured 4-8 us per key among 5,000 unrelated prefixes,
    these bisections 1 us).
    """

    LOAD = 128

    def __init__(self) -> None:
        self._blocks: list[list[Interval]] = []
        self._starts: list[list[bytes]] = []
        self._pmax: list[list[bytes]] = []
        self._first: list[Interval] = []
        self._first_start: list[bytes] = []
        self._bmax: list[bytes] = []
        self._bpmax: list[bytes] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Interval]:
        return itertools.chain.from_iterable(self._blocks)

    def _refresh(self, b: int) -> None:
        blk = self._blocks[b]
        self._starts[b] = [s for s, _ in blk]
        self._pmax[b] = list(itertools.accumulate((e for _, e in blk), max))
        self._first[b] = blk[0]
        self._first_start[b] = blk[0][0]
        self._bmax[b] = self._pmax[b][-1]

    def _refresh_blocks(self) -> None:
        self._bpmax = list(itertools.accumulate(self._bmax, max))

    def rebuild(self, intervals: Iterable[Interval]) -> None:
        """Start over from ``intervals`` (distinct)."""
        items = sorted(intervals)
        self._blocks = [items[i : i + self.LOAD] for i in range(0, len(items), self.LOAD)]
        n = len(self._blocks)
        self._starts, self._pmax = [[] for _ in range(n)], [[] for _ in range(n)]
        self._first, self._first_start, self._bmax = [(b"", b"")] * n, [b""] * n, [b""] * n
        for b in range(n):
            self._refresh(b)
        self._refresh_blocks()
        self._len = len(items)

    def add(self, iv: Interval) -> None:
        """Insert ``iv`` (not already present). The running maxima change only from the
        insertion point up to the first that is already at least its end (they never
        decrease), usually none: about 2 us among 10,000 intervals."""
        if not self._blocks:
            self.rebuild([iv])
            return
        b = max(0, bisect.bisect_right(self._first, iv) - 1)
        blk = self._blocks[b]
        i = bisect.bisect_left(blk, iv)
        blk.insert(i, iv)
        self._starts[b].insert(i, iv[0])
        end = iv[1]
        pmax = self._pmax[b]
        pmax.insert(i, end if i == 0 or pmax[i - 1] < end else pmax[i - 1])
        j = i + 1
        while j < len(pmax) and pmax[j] < end:
            pmax[j] = end
            j += 1
        if i == 0:
            self._first[b], self._first_start[b] = iv, iv[0]
        self._len += 1
        if len(blk) > 2 * self.LOAD:
            half = len(blk) // 2
            self._blocks[b : b + 1] = [blk[:half], blk[half:]]
            for meta in (self._starts, self._pmax):
                meta.insert(b + 1, [])
            self._first.insert(b + 1, iv)
            self._first_start.insert(b + 1, b"")
            self._bmax.insert(b + 1, b"")
            self._refresh(b)
            self._refresh(b + 1)
            self._refresh_blocks()
        elif self._bmax[b] < end:
            self._bmax[b] = end
            bpmax = self._bpmax
            j = b
            while j < len(bpmax) and bpmax[j] < end:
                bpmax[j] = end
                j += 1

    def stab(self, key: bytes) -> list[Interval]:
        """The intervals containing ``key``."""
        b = bisect.bisect_right(self._first_start, key) - 1
        if b < 0:
            return []
        out: list[Interval] = []
        j = bisect.bisect_right(self._starts[b], key)  # block b's intervals starting at or before key
        if j and self._pmax[b][j - 1] > key:
            self._scan(b, j, key, out)
        b -= 1
        while b >= 0 and self._bpmax[b] > key:  # some interval of blocks 0..b ends after key
            if self._bmax[b] > key:
                self._scan(b, len(self._blocks[b]), key, out)
            b -= 1
        return out

    def _scan(self, b: int, hi: int, key: bytes, out: list[Interval]) -> None:
        """The intervals of block b below index hi (all starting at or before key) that
        end after key: walk back while the running maximum says one is left."""
        blk, pmax = self._blocks[b], self._pmax[b]
        for i in range(hi - 1, -1, -1):
            if pmax[i] <= key:
                return
            if blk[i][1] > key:
                out.append(blk[i])


class WatchIndex(Generic[T]):
    """Watchers by what they watch (etcd's ``watcherGroup``): single keys in a dict,
    open-ended ranges ``[start, end of keyspace)`` by their sorted starts, bounded
    ranges in :class:`_Intervals`. Watchers on the same range share one entry
    (Kubernetes puts many watchers on one prefix).

    Invariants: every watcher added and not discarded is in exactly one entry, the
    one of its range; :meth:`match` returns exactly the watchers whose range contains
    one of the keys (an empty range contains none). A bounded range whose last
    watcher leaves stays in the intervals, empty, until empty ranges outnumber the
    others: a watcher alone on its range leaves the index and comes back on every
    commit that it matches (while its stream sends the events), so this keeps that
    O(1).
    """

    def __init__(self) -> None:
        self._range: dict[T, KeyRange] = {}
        self._keys: dict[bytes, dict[T, None]] = {}
        self._open: dict[bytes, dict[T, None]] = {}
        self._open_starts: list[bytes] = []  # sorted keys of _open
        self._bounded: dict[Interval, dict[T, None]] = {}  # every interval in _intervals
        self._intervals = _Intervals()
        self._empty = 0  # intervals with no watcher left

    def __len__(self) -> int:
        return len(self._range)

    def __contains__(self, w: object) -> bool:
        return w in self._range

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._range))

    def add(self, w: T, kr: KeyRange) -> None:
        self.discard(w)
        self._range[w] = kr
        if kr.end is None:
            self._keys.setdefault(kr.key, {})[w] = None
        elif kr.end == b"":
            group = self._open.get(kr.key)
            if group is None:
                group = self._open[kr.key] = {}
                bisect.insort(self._open_starts, kr.key)
            group[w] = None
        elif not kr.is_empty:  # an empty range matches nothing: kept in _range only
            iv = (kr.key, kr.end)
            group = self._bounded.get(iv)
            if group is None:
                group = self._bounded[iv] = {}
                self._intervals.add(iv)
            elif not group:
                self._empty -= 1
            group[w] = None

    def discard(self, w: T) -> bool:
        kr = self._range.pop(w, None)
        if kr is None:
            return False
        if kr.end is None:
            group = self._keys[kr.key]
            del group[w]
            if not group:
                del self._keys[kr.key]
        elif kr.end == b"":
            group = self._open[kr.key]
            del group[w]
            if not group:
                del self._open[kr.key]
                del self._open_starts[bisect.bisect_left(self._open_starts, kr.key)]
        elif not kr.is_empty:
            group = self._bounded[(kr.key, kr.end)]
            del group[w]
            if not group:
                self._empty += 1
                if self._empty > 64 and self._empty * 2 > len(self._bounded):
                    self._drop_empty()
        return True

    def _drop_empty(self) -> None:
        self._bounded = {iv: group for iv, group in self._bounded.items() if group}
        self._intervals.rebuild(self._bounded)
        self._empty = 0

    def match(self, keys: Sequence[bytes]) -> list[T]:
        """The watchers whose range contains one of ``keys`` (sorted, distinct), each
        once. A commit of more keys than there are entries asks the other way round
        (each entry against the sorted keys, as every watcher was asked before the
        index), so a delete of 10,000 keys does not look each of them up."""
        if not keys or not self._range:
            return []
        if len(keys) == 1:
            return self._match_one(keys[0])
        out: dict[T, None] = {}
        if len(keys) <= len(self._keys):
            for k in keys:
                group = self._keys.get(k)
                if group:
                    out.update(group)
        else:
            wanted = set(keys)
            for k, group in self._keys.items():
                if k in wanted:
                    out.update(group)
        # every open range starting at or before the largest key contains it
        for start in self._open_starts[: bisect.bisect_right(self._open_starts, keys[-1])]:
            out.update(self._open[start])
        if self._bounded:
            if len(keys) * 4 <= len(self._bounded):
                if len(keys) == 1:
                    for iv in self._intervals.stab(keys[0]):
                        out.update(self._bounded[iv])
                else:
                    seen: set[Interval] = set()
                    for k in keys:
                        seen.update(self._intervals.stab(k))
                    for iv in seen:
                        out.update(self._bounded[iv])
            else:
                for (start, end), group in self._bounded.items():
                    if group and touches(start, end, keys):
                        out.update(group)
        return list(out)

    def _match_one(self, key: bytes) -> list[T]:
        """:meth:`match` of one key (most commits): each watcher is in one entry, and
        each entry comes up once."""
        out: list[T] = []
        group = self._keys.get(key)
        if group:
            out += group
        starts = self._open_starts
        if starts and starts[0] <= key:
            for start in starts[: bisect.bisect_right(starts, key)]:
                out += self._open[start]
        if self._bounded:
            for iv in self._intervals.stab(key):
                out += self._bounded[iv]
        return out


class LagGroups(Generic[T]):
    """Lagging watchers by the revision they need next (etcd's ``unsynced`` group,
    grouped by ``minRev``), oldest first within a revision.

    Invariant: each watcher is in at most one group, the one of the revision it was
    added with."""

    def __init__(self) -> None:
        self._groups: dict[int, OrderedDict[T, None]] = {}
        self._rev: dict[T, int] = {}

    def __len__(self) -> int:
        return len(self._rev)

    def __contains__(self, w: object) -> bool:
        return w in self._rev

    def revision(self, w: T) -> int | None:
        return self._rev.get(w)

    def revisions(self) -> dict[int, int]:
        """How many watchers need each revision next."""
        return {rev: len(group) for rev, group in self._groups.items()}

    def add(self, w: T, rev: int) -> None:
        if self._rev.get(w) == rev:
            return
        self.discard(w)
        self._rev[w] = rev
        self._groups.setdefault(rev, OrderedDict())[w] = None

    def discard(self, w: T) -> bool:
        rev = self._rev.pop(w, None)
        if rev is None:
            return False
        group = self._groups[rev]
        del group[w]
        if not group:
            del self._groups[rev]
        return True

    def take(self, rev: int, n: int, eligible: Callable[[T], bool]) -> list[T]:
        """Remove and return up to ``n`` watchers needing ``rev`` for which ``eligible``
        holds, oldest first, looking at no more than ``4 * n`` of them (those passed
        over stay)."""
        group = self._groups.get(rev)
        if not group or n <= 0:
            return []
        taken = [w for w in itertools.islice(group, 4 * n) if eligible(w)][:n]
        for w in taken:
            del group[w]
            del self._rev[w]
        if not group:
            del self._groups[rev]
        return taken


def union(ranges: Iterable[KeyRange]) -> list[KeyRange]:
    """The smallest list of ranges selecting the same keys: overlapping and adjacent
    ranges merged, single keys inside a range dropped, empty ranges left out (one
    read of the log for 512 watchers on one prefix is one condition, not 512)."""
    spans: list[tuple[bytes, bytes | None]] = []  # [start, end), None: no upper bound
    for kr in ranges:
        if kr.end is None:
            spans.append((kr.key, kr.key + b"\0"))  # the single key: [key, key + \0)
        elif kr.end == b"":
            spans.append((kr.key, None))
        elif not kr.is_empty:
            spans.append((kr.key, kr.end))
    spans.sort(key=lambda s: s[0])
    merged: list[tuple[bytes, bytes | None]] = []
    for start, end in spans:
        if merged:
            last_start, last_end = merged[-1]
            if last_end is None or start <= last_end:
                if last_end is not None and (end is None or end > last_end):
                    merged[-1] = (last_start, end)
                continue
        merged.append((start, end))
    out: list[KeyRange] = []
    for start, end in merged:
        if end is None:
            out.append(KeyRange(start, b""))
        elif end == start + b"\0":
            out.append(KeyRange(start, None))
        else:
            out.append(KeyRange(start, end))
    return out
