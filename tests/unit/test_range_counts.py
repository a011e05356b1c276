"""The count memo (watch/counts.py) against a model of the keyspace: every answer it
gives is the true number of live keys at the revision asked for, and it gives none
when the hub's ring does not hold every revision in between."""

from __future__ import annotations

import random

from k8s_sql.backend.base import DELETE, PUT, KeyRange, LogRow, Row
from k8s_sql.watch.counts import RangeCounts, count_change
from k8s_sql.watch.hub import Hub

RANGES = [
    KeyRange(b"/a/", b"/a0"),
    KeyRange(b"/a/1", b"/a/5"),
    KeyRange(b"/b/", b"/b0"),
    KeyRange(b"/", b""),
    KeyRange(b"/c", b"/c"),  # empty
]
KEYS = [b"/a/%d" % i for i in range(8)] + [b"/b/%d" % i for i in range(4)] + [b"/z"]


def _revision(rev: int, live: dict[bytes, int], rng: random.Random) -> list[LogRow]:
    """One revision's changes against ``live`` (key -> create revision), applied to it;
    sometimes a key changed twice, as a txn's DeleteRange and Put of one key do."""
    before = dict(live)
    changes: list[LogRow] = []
    for key in rng.sample(KEYS, rng.choice([1, 1, 1, 2, 4])):
        ops = [rng.choice([PUT, DELETE])] if key in live else [PUT]
        if rng.random() < 0.2:  # changed again: deleted and re-created, or created and deleted
            ops.append(PUT if ops[0] == DELETE else DELETE)
        for kind in ops:
            prev = None if key not in before else Row(key, before[key], rev - 1, 1, 0, b"")
            if kind == PUT:
                live.setdefault(key, rev)
                row = Row(key, live[key], rev, 1, 0, b"v")
            else:
                del live[key]
                row = Row(key, 0, rev, 0, 0, b"")
            changes.append(LogRow(rev, len(changes), kind, row, prev))
    return changes


def _true_count(kr: KeyRange, live: dict[bytes, int]) -> int:
    return sum(1 for k in live if kr.contains(k))


def test_counts_follow_the_ring_against_a_model() -> None:
    rng = random.Random(7)
    hub = Hub(log=None, ring_events=400)  # type: ignore[arg-type]  # the ring alone is used
    hub.start(1)
    counts = RangeCounts(hub)
    live: dict[bytes, int] = {}
    history: dict[int, dict[bytes, int]] = {1: {}}
    answered = refused = 0
    for rev in range(2, 1500):
        changes = _revision(rev, live, rng)
        if not changes:
            continue
        hub.publish(rev, changes)
        history[rev] = dict(live)
        kr = rng.choice(RANGES)
        if rng.random() < 0.05:  # a database count, at some revision read
            at = rng.choice(list(history)[-50:])
            counts.remember(kr, at, _true_count(kr, history[at]))
        at = rng.choice([rev, rev, rev, *list(history)[-30:]])
        n = counts.count(kr, at)
        if n is None:
            refused += 1
        else:
            answered += 1
            assert n == _true_count(kr, history[at]), (kr, at)
    assert answered > 500 and refused > 5  # both ways taken


def test_no_answer_across_a_gap_or_past_the_ring() -> None:
    hub = Hub(log=None)  # type: ignore[arg-type]
    hub.start(10)
    counts = RangeCounts(hub)
    kr = KeyRange(b"/a/", b"/a0")
    counts.remember(kr, 10, 3)
    hub.publish(11, [LogRow(11, 0, PUT, Row(b"/a/x", 11, 11, 1, 0, b"v"), None)])
    assert counts.count(kr, 11) == 4
    assert counts.count(kr, 12) is None  # not published here yet (another frontend's)
    hub.advance(15)  # revisions 12..15 known without their changes
    assert counts.count(kr, 15) is None
    assert counts.knows(kr)
    counts.remember(kr, 15, 9)  # counted again in the database
    assert counts.count(kr, 15) == 9
    counts.remember(kr, 12, 1)  # an older count does not replace a newer one
    assert counts.count(kr, 15) == 9


def test_a_key_changed_twice_in_a_revision_counts_once() -> None:
    kr = KeyRange(b"/a/", b"/a0")
    old = Row(b"/a/k", 3, 5, 2, 0, b"old")
    # A txn's DeleteRange over everything then Put of the same key: it still exists.
    both = [
        LogRow(9, 0, DELETE, Row(b"/a/k", 0, 9, 0, 0, b""), old),
        LogRow(9, 1, PUT, Row(b"/a/k", 9, 9, 1, 0, b"new"), old),
    ]
    assert count_change(kr, both) == 0
    assert count_change(kr, both[:1]) == -1
    created = [LogRow(9, 0, PUT, Row(b"/a/n", 9, 9, 1, 0, b""), None)]
    assert count_change(kr, created) == 1
    assert count_change(KeyRange(b"/b/", b"/b0"), created) == 0


def test_bounded() -> None:
    hub = Hub(log=None)  # type: ignore[arg-type]
    hub.start(1)
    counts = RangeCounts(hub, max_ranges=10)
    for i in range(50):
        counts.remember(KeyRange(b"/p%d/" % i, b"/p%d0" % i), 1, i)
    counts.remember(KeyRange(b"/x" * 600, b"/y"), 1, 1)  # bounds too long: not kept
    assert len(counts) == 10
    assert counts.count(KeyRange(b"/p49/", b"/p490"), 1) == 49
    assert counts.count(KeyRange(b"/p0/", b"/p00"), 1) is None
