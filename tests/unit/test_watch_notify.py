"""A commit wakes only the watch streams that may want it; the other watchers are
moved past it without a wake, so they stay synced for progress notifications."""

from __future__ import annotations

from k8s_sql.backend.base import PUT, KeyRange, LogRow, Row
from k8s_sql.pb import rpc_pb2 as pb
from k8s_sql.watch.hub import Hub
from k8s_sql.watch.stream import WatchStream, _touches


def test_touches() -> None:
    keys = sorted([b"/a/1", b"/c/9"])
    assert _touches(KeyRange(b"/a/", b"/a0"), keys)
    assert not _touches(KeyRange(b"/b/", b"/b0"), keys)
    assert _touches(KeyRange(b"/c/9", None), keys)
    assert not _touches(KeyRange(b"/c/8", None), keys)
    assert _touches(KeyRange(b"/b", b""), keys)  # to the end of the keyspace
    assert not _touches(KeyRange(b"/d", b""), keys)


def _change(rev: int, key: bytes) -> LogRow:
    return LogRow(rev, 0, PUT, Row(key, rev, rev, 1, 0, b"v"), None)


def test_only_interested_streams_wake() -> None:
    hub = Hub(backend=None)  # type: ignore[arg-type]  # the ring alone is used here
    hub.start(10)
    a, b = (WatchStream(hub, pb.ResponseHeader(), 1 << 20) for _ in range(2))
    a.create(pb.WatchCreateRequest(key=b"/a/", range_end=b"/a0"))
    b.create(pb.WatchCreateRequest(key=b"/b/", range_end=b"/b0"))
    for s in (a, b):
        s.control.clear()
        s._wake.clear()
        hub.streams.add(s)

    hub.publish(11, [_change(11, b"/a/x")])
    assert a._wake.is_set() and not b._wake.is_set()
    assert a.watchers[0].next_rev == 11  # still to be delivered by a's own task
    assert b.watchers[0].next_rev == 12  # nothing for it: moved past, not woken
    assert b._synced(b.watchers[0])

    hub.publish(12, [_change(12, b"/b/y")])
    assert b._wake.is_set() and b.watchers[0].next_rev == 12
