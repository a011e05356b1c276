"""Counts of key ranges carried forward through the hub's ring instead of counted again.

A count-only Range (etcd's ``WithCountOnly``: kube-apiserver's object-count metric
asks one per resource every minute, k8s-sql's own key gauge every 30 s) costs the
database a walk over every key of the range: 100,000 keys took PostgreSQL 79 ms
(bench W2, against etcd's 12), most of it visiting table pages autovacuum has not
marked all-visible yet. The keys that exist at revision X are those at revision R
plus the keys created in ``(R, X]`` less those deleted, and the hub's ring holds every
change of its revisions in order. So a count, once read from the database at R, is
moved to any revision the ring covers by looking only at the changes in between.

Invariant: an entry ``(start, end) -> (R, n)`` means exactly ``n`` keys of the range
were live at revision R (it came from a database read in one snapshot at R, or from
such an entry moved through the ring). An answer is given only when the ring holds
every revision between R and the revision asked for; otherwise the caller counts in
the database and remembers that.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from k8s_sql.backend.base import PUT, KeyRange, LogRow
from k8s_sql.watch.hub import Hub

# Ranges remembered, the least recently used forgotten first, and none whose bounds
# are longer than COUNTED_KEY_BYTES: at most about 1 MiB of keys. A Kubernetes
# cluster counts one prefix per resource type (a few hundred).
COUNTED_RANGES = 1024
COUNTED_KEY_BYTES = 1024


def count_change(kr: KeyRange, changes: Sequence[LogRow]) -> int:
    """How a revision's ``changes`` moved the number of live keys in ``kr``.

    A change's ``prev`` is its key's state before the *revision* (store/txn.py: a txn
    can change a key twice), so a key counts once: present before if it had a
    ``prev``, present after if its last change is a put."""
    if len(changes) == 1:
        ch = changes[0]
        if not kr.contains(ch.row.key):
            return 0
        return (ch.kind == PUT) - (ch.prev is not None)
    keys: dict[bytes, tuple[bool, bool]] = {}
    for ch in changes:
        if kr.contains(ch.row.key):
            keys[ch.row.key] = (ch.prev is not None, ch.kind == PUT)
    return sum(after - before for before, after in keys.values())


class RangeCounts:
    """The count memo a :class:`~k8s_sql.store.store.Store` consults (its ``counts``)."""

    def __init__(self, hub: Hub, max_ranges: int = COUNTED_RANGES) -> None:
        self.hub = hub
        self.max_ranges = max_ranges
        self._counts: OrderedDict[tuple[bytes, bytes | None], tuple[int, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._counts)

    def knows(self, kr: KeyRange) -> bool:
        """Whether a count of ``kr`` is remembered (worth asking the revision for)."""
        return (kr.key, kr.end) in self._counts

    def count(self, kr: KeyRange, revision: int) -> int | None:
        """The number of live keys in ``kr`` at ``revision``, or None when the ring does
        not hold every revision between the remembered count's and ``revision``."""
        entry = self._counts.get((kr.key, kr.end))
        if entry is None:
            return None
        known_rev, n = entry
        lo, hi = min(known_rev, revision), max(known_rev, revision)
        hub = self.hub
        if hi > hub.revision or lo + 1 < hub.ring_start:
            return None
        if hi > lo:
            moved = 0
            for rev, changes, _ in hub.from_ring(lo + 1):
                if rev > hi:
                    break
                moved += count_change(kr, changes)
            n = n + moved if revision > known_rev else n - moved
        if revision >= known_rev:
            self._counts[(kr.key, kr.end)] = (revision, n)
        self._counts.move_to_end((kr.key, kr.end))
        return n

    def remember(self, kr: KeyRange, revision: int, n: int) -> None:
        """``n`` keys of ``kr`` were live at ``revision`` (a database count in one snapshot)."""
        if kr.end is None or len(kr.key) + len(kr.end) > COUNTED_KEY_BYTES:
            return
        old = self._counts.get((kr.key, kr.end))
        if old is not None and old[0] > revision:
            return  # (a read at an older revision: the newer count reaches further)
        self._counts[(kr.key, kr.end)] = (revision, n)
        self._counts.move_to_end((kr.key, kr.end))
        while len(self._counts) > self.max_ranges:
            self._counts.popitem(last=False)


__all__ = ["RangeCounts", "count_change"]
