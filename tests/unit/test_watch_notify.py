"""A commit wakes only the watch streams that may want it; the other watchers stay in
the hub's synced group untouched, so they stay synced for progress notifications."""

from __future__ import annotations

from k8s_sql.backend.base import PUT, LogRow, Row
from k8s_sql.pb import rpc_pb2 as pb
from k8s_sql.watch.hub import Hub
from k8s_sql.watch.index import touches
from k8s_sql.watch.stream import WatchStream


def test_touches() -> None:
    keys = sorted([b"/a/1", b"/c/9"])
    assert touches(b"/a/", b"/a0", keys)
    assert not touches(b"/b/", b"/b0", keys)
    assert touches(b"/c/9", None, keys)
    assert not touches(b"/c/8", None, keys)
    assert touches(b"/b", b"", keys)  # to the end of the keyspace
    assert not touches(b"/d", b"", keys)


def _change(rev: int, key: bytes) -> LogRow:
    return LogRow(rev, 0, PUT, Row(key, rev, rev, 1, 0, b"v"), None)


def test_only_interested_streams_wake() -> None:
    hub = Hub(log=None)  # type: ignore[arg-type]  # the ring alone is used here
    hub.start(10)
    a, b = (WatchStream(hub, pb.ResponseHeader(), 1 << 20) for _ in range(2))
    a.create(pb.WatchCreateRequest(key=b"/a/", range_end=b"/a0"))
    b.create(pb.WatchCreateRequest(key=b"/b/", range_end=b"/b0"))
    for s in (a, b):
        s.control.clear()
        s._wake.clear()
        hub.attach(s)

    hub.publish(11, [_change(11, b"/a/x")])
    assert a._wake.is_set() and not b._wake.is_set()
    wa, wb = a.watchers[0], b.watchers[0]
    assert wa.next_rev == 11 and list(a._ready) == [wa]  # a's own task sends it, from the ring
    assert wa in hub.synced and wa.queued and not a._synced(wa) and len(hub.unsynced) == 0
    assert wb in hub.synced and b._synced(wb)  # nothing for it: not woken, not touched

    hub.publish(12, [_change(12, b"/b/y")])
    assert b._wake.is_set() and b.watchers[0].next_rev == 12  # nothing before 12 touched it


def test_a_gap_moves_every_synced_watcher_to_one_group() -> None:
    """Revisions published without their changes (another frontend wrote them): every
    synced watcher must read them from the log, all from the same revision."""
    hub = Hub(log=None)  # type: ignore[arg-type]
    hub.start(10)
    s = WatchStream(hub, pb.ResponseHeader(), 1 << 20)
    hub.attach(s)
    for i in range(5):
        s.create(pb.WatchCreateRequest(key=b"/k/%d" % i))
    later = WatchStream(hub, pb.ResponseHeader(), 1 << 20)
    later.create(pb.WatchCreateRequest(key=b"/k/0", start_revision=100))
    hub.publish(11, [_change(11, b"/other")])
    hub.publish(15, [_change(15, b"/other")])  # 12..14 are in the log only
    assert hub.unsynced.revisions() == {12: 5}
    assert all(w not in hub.synced for w in s.watchers.values())
    assert later.watchers[0] in hub.synced  # starts at 100: nothing to read
    hub.advance(20)
    assert hub.unsynced.revisions() == {12: 5}


def test_a_commit_above_a_gap_waits_for_the_follower() -> None:
    """With a follower, this frontend's commit above revisions another frontend wrote is
    parked, not published with a gap: once the follower publishes those revisions, both
    go out from the ring and no synced watcher has to read the log."""
    hub = Hub(log=None)  # type: ignore[arg-type]  # nothing may be read from the log here
    hub.start(10)
    woken: list[int] = []
    hub.on_gap = lambda: woken.append(hub.revision)
    s = WatchStream(hub, pb.ResponseHeader(), 1 << 20)
    hub.attach(s)
    for i in range(5):
        s.create(pb.WatchCreateRequest(key=b"/k/%d" % i))
    hub.publish(15, [_change(15, b"/k/1")])  # own; 11..14 are the other frontend's
    assert woken == [10] and hub.revision == 10 and hub.gap_end() == 14
    hub.publish(16, [_change(16, b"/k/2")])  # own again, behind the first in the queue
    assert hub.revision == 10 and len(hub.parked) == 2
    hub.publish(14, [_change(11, b"/other"), _change(14, b"/k/0")])  # the follower: 11..14
    assert hub.revision == 16 and not hub.parked and hub.gap_end() is None
    assert len(hub.unsynced) == 0 and all(w in hub.synced for w in s.watchers.values())
    assert [rev for rev, _, _ in hub.from_ring(11)] == [11, 14, 15, 16]


def test_a_parked_commit_goes_out_when_the_follower_cannot_fill_the_gap() -> None:
    hub = Hub(log=None)  # type: ignore[arg-type]
    hub.start(10)
    hub.on_gap = lambda: None
    s = WatchStream(hub, pb.ResponseHeader(), 1 << 20)
    hub.attach(s)
    s.create(pb.WatchCreateRequest(key=b"/k"))
    hub.publish(15, [_change(15, b"/k")])
    hub.flush_parked()  # not yet PARK_SECONDS old
    assert hub.revision == 10
    hub.flush_parked(0)  # e.g. the database is away: published with its gap, as without a follower
    assert hub.revision == 15 and not hub.parked
    assert hub.unsynced.revisions() == {11: 1}


def test_parked_commits_wait_no_longer_than_park_seconds(monkeypatch) -> None:
    """A follower stalled in a read flushes nothing; the next commit does."""
    from k8s_sql.watch import hub as hub_mod

    now = [100.0]
    monkeypatch.setattr(hub_mod, "monotonic", lambda: now[0])
    hub = Hub(log=None)  # type: ignore[arg-type]
    hub.start(10)
    hub.on_gap = lambda: None
    hub.publish(15, [_change(15, b"/k")])
    assert hub.revision == 10 and len(hub.parked) == 1
    now[0] += hub_mod.PARK_SECONDS
    hub.publish(16, [_change(16, b"/k")])
    assert hub.revision == 16 and not hub.parked


def test_a_stream_that_ends_leaves_the_hub() -> None:
    hub = Hub(log=None)  # type: ignore[arg-type]
    hub.start(10)
    s = WatchStream(hub, pb.ResponseHeader(), 1 << 20)
    hub.attach(s)
    s.create(pb.WatchCreateRequest(key=b"/a"))
    s.create(pb.WatchCreateRequest(key=b"/b", start_revision=5))
    assert len(hub.synced) == 1 and len(hub.unsynced) == 1
    hub.detach(s)
    assert len(hub.synced) == 0 and len(hub.unsynced) == 0
    s.create(pb.WatchCreateRequest(key=b"/c"))  # a request read after the end is not indexed
    assert len(hub.synced) == 0
