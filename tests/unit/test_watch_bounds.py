"""The watch hub and streams hold bounded memory: the ring and the per-change caches by
count and by bytes, a stream's control responses by count (etcd's ctrlStreamBufLen)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from k8s_sql.backend.base import PUT, LogRow, Row
from k8s_sql.pb import rpc_pb2 as pb
from k8s_sql.watch import stream as stream_module
from k8s_sql.watch.hub import Hub, _Cache, change_bytes
from k8s_sql.watch.stream import CONTROL_BUFFER, WatchStream


def _change(rev: int, size: int, sub: int = 0) -> LogRow:
    return LogRow(rev, sub, PUT, Row(b"/k/%d" % rev, rev, rev, 1, 0, b"v" * size), None)


def test_ring_is_bounded_by_bytes() -> None:
    hub = Hub(log=None, ring_bytes=1 << 20)  # type: ignore[arg-type]  # the ring alone
    hub.start(0)
    for rev in range(1, 1001):
        hub.publish(rev, [_change(rev, 10_000)])
        assert hub._ring_bytes <= hub.ring_bytes + change_bytes(_change(rev, 10_000))
        assert hub._ring_bytes == sum(size for _, _, size in hub.ring)
    assert hub.revision == 1000 and hub.ring[-1][0] == 1000
    assert hub.ring_start == hub.ring[0][0] and hub.ring_start > 900  # about 100 changes of 10 kB fit
    assert [rev for rev, _, _ in hub.from_ring(hub.ring_start)] == list(range(hub.ring_start, 1001))


def test_a_revision_larger_than_the_ring_is_kept_whole() -> None:
    hub = Hub(log=None, ring_bytes=100_000)  # type: ignore[arg-type]
    hub.start(0)
    hub.publish(1, [_change(1, 10)])
    hub.publish(2, [_change(2, 60_000, sub) for sub in range(3)])
    assert hub.ring_start == 2 and len(hub.ring[0][1]) == 3


def test_ring_is_bounded_by_count() -> None:
    hub = Hub(log=None, ring_events=100)  # type: ignore[arg-type]
    hub.start(0)
    for rev in range(1, 1001):
        hub.publish(rev, [_change(rev, 1)])
        assert hub._ring_size <= 100
    assert hub.ring[-1][0] == 1000


def test_cache_is_bounded_by_bytes_and_entries() -> None:
    cache: _Cache[bytes] = _Cache(max_entries=1000, max_bytes=10_000)
    for i in range(100):
        cache.put((i, 0, False), b"x" * 1000, 1000)
        assert cache.bytes <= 10_000
    assert len(cache) == 10 and cache.get((99, 0, False)) is not None and cache.get((0, 0, False)) is None
    small: _Cache[bytes] = _Cache(max_entries=5, max_bytes=1 << 30)
    for i in range(100):
        small.put((i, 0, False), b"", 1)
    assert len(small) == 5


async def test_a_stream_stops_reading_requests_while_its_answers_wait() -> None:
    """A client that sends creates without reading: the stream queues CONTROL_BUFFER
    answers, then stops taking requests (HTTP/2 flow control holds the client back)."""
    hub = Hub(log=None)  # type: ignore[arg-type]
    hub.start(10)
    stream = WatchStream(hub, pb.ResponseHeader(), 1 << 20)
    taken = 0

    async def requests() -> AsyncIterator[pb.WatchRequest]:
        nonlocal taken
        for i in range(100):
            taken += 1
            yield pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"/k/%d" % i))

    reader = asyncio.create_task(stream.read_requests(requests()))
    while not (len(stream.control) == CONTROL_BUFFER and taken == CONTROL_BUFFER + 1):
        await asyncio.sleep(0)
    for _ in range(10):  # it stays blocked: nothing more is taken while nothing is read
        await asyncio.sleep(0)
    assert taken == CONTROL_BUFFER + 1 and len(stream.control) == CONTROL_BUFFER
    answers: list[pb.WatchResponse] = []
    while len(answers) < 100:
        if stream.control:
            answers.append(stream._pop_control())
        else:
            await asyncio.sleep(0)
    await reader
    assert [a.watch_id for a in answers] == list(range(100)) and all(a.created for a in answers)


class _Log:
    """A backend whose log holds one change per revision, 1..3000."""

    async def changes(self, start: int, end: int, ranges: object, limit: int) -> tuple[list[LogRow], int]:
        last = min(end, start + limit - 1)
        return [_change(rev, 10) for rev in range(start, last + 1)], last


async def test_no_events_after_the_canceled_response(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancel read while a watcher's batch of responses is being sent ends that batch:
    after the canceled response the client sees no event of the watcher, as from etcd.
    (The fuzzer caught k8s-sql sending the rest of a catch-up batch read from the log:
    up to 2,000 changes, two responses.)"""
    monkeypatch.setattr(stream_module, "MAX_EVENTS_PER_RESPONSE", 10)  # several responses per log read
    hub = Hub(log=_Log())  # type: ignore[arg-type]
    hub.start(3000)  # the ring starts after 3000: a watch from 1 catches up from the log
    stream = WatchStream(hub, pb.ResponseHeader(), 1 << 20)
    stream.create(pb.WatchCreateRequest(key=b"/k/", range_end=b"/k0", start_revision=1))
    wid = next(iter(stream.watchers))
    stream.wake()
    out = stream.responses()
    seen: list[pb.WatchResponse] = []
    while not any(r.canceled for r in seen):
        raw = await asyncio.wait_for(out.__anext__(), 5)
        resp = raw if isinstance(raw, pb.WatchResponse) else pb.WatchResponse.FromString(raw)
        seen.append(resp)
        if resp.events and wid in stream.watchers:
            stream.cancel(wid)  # the client's cancel arrives after the first response with events
    assert len([r for r in seen if r.events]) == 1
    stream._closed = True
    stream.wake()
    rest = [r async for r in out]
    assert not any((r if isinstance(r, pb.WatchResponse) else pb.WatchResponse.FromString(r)).events for r in rest)
