"""The hub's watcher groups (watch/index.py): the synced index returns exactly the
watchers whose range holds a key, against a brute-force reference over random keys and
ranges (bytes \\x00 and \\xff included; single keys, prefixes, bounded, open-ended and
empty ranges); lagging watchers are grouped by revision, and one read of the log serves
a group across streams, each watcher getting its events once and in order."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections.abc import AsyncIterator, Sequence

import pytest

from k8s_sql.backend.base import DELETE, PUT, BackendUnavailable, CompactedError, KeyRange, LogRow, Row
from k8s_sql.pb import rpc_pb2 as pb
from k8s_sql.watch import stream as stream_module
from k8s_sql.watch.hub import Hub
from k8s_sql.watch.index import MAX_WATCHERS_PER_SYNC, LagGroups, WatchIndex, _Intervals, union
from k8s_sql.watch.stream import Watcher, WatchStream, split
from testing.keys import prefix_end

ALPHABET = b"\x00\x01ab\xfe\xff"


def rand_key(rng: random.Random) -> bytes:
    return bytes(rng.choice(ALPHABET) for _ in range(rng.randint(1, 4)))


def rand_range(rng: random.Random) -> KeyRange:
    kind = rng.randrange(6)
    key = rand_key(rng)
    if kind == 0:
        return KeyRange.from_etcd(key, b"")  # single key
    if kind == 1:
        return KeyRange.from_etcd(key, prefix_end(key))  # prefix (open-ended for \xff...)
    if kind == 2:
        return KeyRange.from_etcd(key, b"\0")  # [key, end of keyspace)
    if kind == 3:
        return KeyRange(key, key)  # empty
    return KeyRange(key, rand_key(rng))  # bounded, empty when end <= key


class W:
    """A stand-in watcher: hashable by identity, as the real one."""

    def __init__(self, n: int, kr: KeyRange) -> None:
        self.n = n
        self.kr = kr

    def __repr__(self) -> str:
        return f"W({self.n}, {self.kr})"


def brute(live: dict[W, KeyRange], keys: Sequence[bytes]) -> set[W]:
    return {w for w, kr in live.items() if not kr.is_empty and any(kr.contains(k) for k in keys)}


def check_intervals(iv: _Intervals) -> None:
    """_Intervals' invariants (see its docstring)."""
    items = list(iv)
    assert items == sorted(items) and len(items) == len(set(items)) == len(iv)
    for b, blk in enumerate(iv._blocks):
        assert 0 < len(blk) <= 2 * iv.LOAD
        assert iv._starts[b] == [s for s, _ in blk]
        assert iv._pmax[b] == list(itertools.accumulate((e for _, e in blk), max))
        assert iv._first[b] == blk[0] and iv._first_start[b] == blk[0][0] and iv._bmax[b] == iv._pmax[b][-1]
        assert iv._bpmax[b] == max(iv._bmax[: b + 1])


@pytest.mark.parametrize("load", [2, 5, 128])
def test_match_is_exactly_the_brute_force_answer(load: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_Intervals, "LOAD", load)
    rng = random.Random(11 + load)
    index: WatchIndex[W] = WatchIndex()
    live: dict[W, KeyRange] = {}
    n = 0
    for step in range(40):
        for _ in range(rng.randint(1, 25)):  # add, some on ranges already watched
            kr = rng.choice(list(live.values())) if live and rng.random() < 0.3 else rand_range(rng)
            n += 1
            w = W(n, kr)
            index.add(w, kr)
            live[w] = kr
        for w in rng.sample(list(live), k=min(len(live), rng.randint(0, 15))):  # remove
            assert index.discard(w)
            del live[w]
            assert not index.discard(w)
        assert len(index) == len(live) and all(w in index for w in live)
        check_intervals(index._intervals)
        for _ in range(25):
            size = rng.choice([1, 1, 2, 3, 8, 100])  # 100 keys: more than entries, asked the other way round
            keys = sorted({rand_key(rng) for _ in range(size)})
            got = index.match(keys)
            assert len(got) == len(set(got)), "a watcher returned twice"
            assert set(got) == brute(live, keys), (step, keys)
        assert index.match([]) == []
    for w in list(live):  # all gone: nothing matches, the empty ranges were dropped along the way
        index.discard(w)
    assert index.match([bytes([b]) for b in range(256)]) == []
    assert len(index._bounded) <= 64


def test_edges_of_the_keyspace() -> None:
    index: WatchIndex[W] = WatchIndex()
    ranges = {
        "zero": KeyRange(b"\x00", None),
        "all": KeyRange(b"\x00", b""),  # etcdctl watch --prefix ""
        "ff-prefix": KeyRange.from_etcd(b"\xff", prefix_end(b"\xff")),  # open-ended
        "upto-ff": KeyRange(b"a", b"\xff"),
        "empty": KeyRange(b"b", b"a"),
        "empty-key": KeyRange(b"", None),
        "from-empty": KeyRange(b"", b"\x00\x01"),
    }
    ws = {name: W(i, kr) for i, (name, kr) in enumerate(ranges.items())}
    for w in ws.values():
        index.add(w, w.kr)

    def names(*keys: bytes) -> set[str]:
        got = index.match(sorted(keys))
        return {name for name, w in ws.items() if w in got}

    assert names(b"\x00") == {"zero", "all", "from-empty"}
    assert names(b"\x00\x00") == {"all", "from-empty"}
    assert names(b"\xff") == {"all", "ff-prefix"}
    assert names(b"\xfe\xff\xff") == {"all", "upto-ff"}
    assert names(b"\xff\xff\x00") == {"all", "ff-prefix"}
    assert names(b"a") == {"all", "upto-ff"}
    assert names(b"") == {"empty-key", "from-empty"}  # (no stored key is empty)


def test_a_watcher_added_twice_moves() -> None:
    index: WatchIndex[W] = WatchIndex()
    w = W(1, KeyRange(b"a", b"c"))
    index.add(w, w.kr)
    index.add(w, KeyRange(b"x", None))
    assert index.match([b"b"]) == [] and index.match([b"x"]) == [w] and len(index) == 1


def test_empty_ranges_are_dropped_once_they_outnumber_the_rest() -> None:
    index: WatchIndex[W] = WatchIndex()
    ws = [W(i, KeyRange(b"/p/%04d/" % i, b"/p/%04d0" % i)) for i in range(1000)]
    for w in ws:
        index.add(w, w.kr)
    for w in ws[:400]:  # leaving and coming back (as while a stream sends) keeps the interval
        index.discard(w)
    assert len(index._intervals) == 1000 and index._empty == 400
    for w in ws[:400]:
        index.add(w, w.kr)
    assert index._empty == 0
    for w in ws[:900]:
        index.discard(w)
    assert len(index._intervals) < 1000 and len(index._bounded) == len(index._intervals)
    assert set(index.match([b"/p/0950/x", b"/p/0100/x"])) == {ws[950]}
    check_intervals(index._intervals)


def test_union_selects_the_same_keys() -> None:
    rng = random.Random(5)
    for _ in range(300):
        ranges = [rand_range(rng) for _ in range(rng.randint(0, 12))]
        merged = union(ranges)
        for kr in merged:
            assert not kr.is_empty
        for a, b in itertools.pairwise(merged):
            # sorted, disjoint and not adjacent: each range ends before the next begins
            assert a.end != b"" and (a.end or a.key + b"\0") < b.key, (a, b)
        for _ in range(50):
            k = rand_key(rng)
            assert any(kr.contains(k) for kr in merged) == any(kr.contains(k) for kr in ranges if not kr.is_empty), (
                ranges,
                merged,
                k,
            )
    assert union([KeyRange(b"/p/", b"/p0")] * 512 + [KeyRange(b"/p/x", None)]) == [KeyRange(b"/p/", b"/p0")]
    assert union([KeyRange(b"a", None), KeyRange(b"a\x00", None)]) == [KeyRange(b"a", b"a\x00\x00")]
    assert union([KeyRange(b"b", b""), KeyRange(b"a", b"c")]) == [KeyRange(b"a", b"")]


def test_lag_groups() -> None:
    groups: LagGroups[W] = LagGroups()
    ws = [W(i, KeyRange(b"k", None)) for i in range(10)]
    for i, w in enumerate(ws):
        groups.add(w, 5 if i < 7 else 9)
    assert groups.revisions() == {5: 7, 9: 3} and len(groups) == 10
    groups.add(ws[0], 9)  # moves
    assert groups.revisions() == {5: 6, 9: 4} and groups.revision(ws[0]) == 9
    odd = groups.take(5, 2, lambda w: w.n % 2 == 1)
    assert odd == [ws[1], ws[3]]  # eligible ones, oldest first, at most n
    assert groups.revisions() == {5: 4, 9: 4} and ws[1] not in groups and ws[2] in groups
    assert groups.take(5, 100, lambda w: True) == [ws[2], ws[4], ws[5], ws[6]]
    assert groups.revisions() == {9: 4} and groups.take(5, 1, lambda w: True) == []
    assert groups.discard(ws[7]) and not groups.discard(ws[7])
    many: LagGroups[W] = LagGroups()
    for i in range(100):
        many.add(W(i, KeyRange(b"k", None)), 1)
    assert len(many.take(1, 5, lambda w: w.n >= 50)) == 0  # looks at 4 * n of them, no more
    assert len(many.take(1, 20, lambda w: w.n >= 50)) == 20


# -- one read of the log per group ----------------------------------------------------------------


def change(rev: int, key: bytes, kind: int = PUT) -> LogRow:
    return LogRow(rev, 0, kind, Row(key, rev, rev, 1, 0, b"v%d" % rev), None)


class FakeLog:
    """A change log of ``revisions`` revisions, one change each on keys /k/0../k/N-1,
    every fifth a delete, answering ``changes`` as the backends do (whole revisions,
    about ``limit`` rows), counting reads."""

    def __init__(self, revisions: int, keys: int) -> None:
        self.rows = [
            change(rev, b"/k/%d" % (rev * 7 % keys), DELETE if rev % 5 == 0 else PUT) for rev in range(1, revisions + 1)
        ]
        self.reads: list[tuple[int, int]] = []  # (start, number of ranges)
        self.compacted = 0
        self.unavailable = 0  # reads that fail first
        self.gate: asyncio.Event | None = None

    async def changes(
        self, start: int, end: int, ranges: Sequence[KeyRange] | None, limit: int
    ) -> tuple[list[LogRow], int]:
        self.reads.append((start, len(ranges or ())))
        if self.gate is not None:
            await self.gate.wait()
        if start < self.compacted:
            raise CompactedError(self.compacted)
        if self.unavailable:
            self.unavailable -= 1
            raise BackendUnavailable
        out = [
            ch
            for ch in self.rows
            if start <= ch.rev <= end and (ranges is None or any(kr.contains(ch.row.key) for kr in ranges))
        ]
        if len(out) > limit:
            return out[:limit], out[limit - 1].rev
        return out, end


def expected(log: FakeLog, w: Watcher) -> list[int]:
    return [ch.rev for ch in log.rows if ch.rev >= w.start_rev and w.wants(ch)]


async def consume(s: WatchStream, got: dict[tuple[int, int], list[int]]) -> None:
    async for raw in s.responses():
        resp = raw if isinstance(raw, pb.WatchResponse) else pb.WatchResponse.FromString(raw)
        if resp.events:
            got.setdefault((id(s), resp.watch_id), []).extend(ev.kv.mod_revision for ev in resp.events)


def create(s: WatchStream, rng: random.Random, start: int) -> None:
    key = b"/k/%d" % rng.randrange(60)
    kind = rng.randrange(4)
    if kind == 0:
        c = pb.WatchCreateRequest(key=key, start_revision=start)
    elif kind == 1:
        c = pb.WatchCreateRequest(key=b"/k/%d" % rng.randrange(6), range_end=b"/k/%d" % rng.randrange(6, 10))
        c.start_revision = start
    elif kind == 2:
        c = pb.WatchCreateRequest(key=key, start_revision=start, filters=[pb.WatchCreateRequest.NOPUT])
    else:
        c = pb.WatchCreateRequest(key=b"/k/", range_end=b"/k0", start_revision=start, prev_kv=True)
    s.create(c)


async def test_lagging_watchers_are_caught_up_a_group_per_read() -> None:
    """1,200 watchers on three parked streams, all from revision 1 with 300 revisions in
    the log only: every watcher gets exactly its events, once and in order, in a
    handful of reads (one per watcher before the groups: 1,200 times the reads),
    none of more than MAX_WATCHERS_PER_SYNC watchers."""
    log = FakeLog(300, 60)
    hub = Hub(log=log)  # type: ignore[arg-type]
    hub.start(300)  # the ring starts after 300: everything is in the log only
    streams = [WatchStream(hub, pb.ResponseHeader(), 1 << 20) for _ in range(3)]
    got: dict[tuple[int, int], list[int]] = {}
    tasks = [asyncio.create_task(consume(s, got)) for s in streams]
    for s in streams:
        hub.attach(s)
    await asyncio.sleep(0)  # every stream parked
    rng = random.Random(3)
    for i in range(1200):
        create(streams[i % 3], rng, 1)
    assert hub.unsynced.revisions() == {1: 1200}
    taken: list[int] = []
    take = hub.unsynced.take

    def counting_take(*args: object, **kw: object) -> list[object]:
        out = take(*args, **kw)  # type: ignore[arg-type]
        taken.append(len(out) + 1)
        return out  # type: ignore[return-value]

    hub.unsynced.take = counting_take  # type: ignore[method-assign]
    for s in streams:
        s.wake()
    for _ in range(2000):
        if len(hub.synced) == 1200:
            break
        await asyncio.sleep(0)
    assert len(hub.synced) == 1200 and len(hub.unsynced) == 0
    for s in streams:
        for wid, w in s.watchers.items():
            assert got.get((id(s), wid), []) == expected(log, w), (wid, w.kr)
    assert max(taken) <= MAX_WATCHERS_PER_SYNC
    reads_from_1 = [r for r in log.reads if r[0] == 1]
    assert len(reads_from_1) <= 2 * math.ceil(1200 / MAX_WATCHERS_PER_SYNC) + 3, reads_from_1
    assert len(log.reads) < 40, len(log.reads)  # 1,200 watchers, 300 revisions, reads of 100 rows first
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def parked_stream(hub: Hub) -> WatchStream:
    s = WatchStream(hub, pb.ResponseHeader(), 1 << 20)
    s._parked = True  # as if its response generator waited to be woken
    hub.attach(s)
    return s


async def test_a_share_goes_only_to_a_stream_holding_nothing() -> None:
    log = FakeLog(50, 4)
    hub = Hub(log=log)  # type: ignore[arg-type]
    hub.start(50)
    me, idle, busy = parked_stream(hub), parked_stream(hub), parked_stream(hub)
    me._parked = False  # the initiator runs
    for s in (me, idle, busy):
        s.create(pb.WatchCreateRequest(key=b"/k/", range_end=b"/k0", start_revision=1))
        s.create(pb.WatchCreateRequest(key=b"/nothing", start_revision=1))
        s._wake.clear()
    log.gate = asyncio.Event()
    w = me._pick()
    assert w is me.watchers[0]
    read = asyncio.create_task(me._read_log(w))
    await asyncio.sleep(0)
    assert len(hub.unsynced) == 0  # all five others claimed, none ready meanwhile
    busy._parked = False  # woke up and took a batch while the read was out
    log.gate.set()
    changes, covered = await read
    assert [ch.rev for ch in changes] == list(range(1, 51)) and covered == 50
    assert idle.watchers[0].share is not None and list(idle._shared) == [idle.watchers[0]] and idle._wake.is_set()
    assert me.watchers[1] in hub.synced and idle.watchers[1] in hub.synced  # nothing for them: caught up
    assert busy.watchers[0].share is None and list(busy._ready) == [busy.watchers[0]]  # reads later itself
    assert hub.unsynced.revision(busy.watchers[0]) == 1 and busy._wake.is_set()
    assert not idle.accepting  # holds a share now
    assert len(log.reads) == 1 and log.reads[0] == (1, 2)  # one read: /k/ prefix and /nothing


async def test_a_group_read_ends_cleanly() -> None:
    """A compacted start cancels the whole group, each with the database's
    compact_revision (another frontend compacted: this one knew only 3); a member
    canceled while the read was out gets nothing; when the reading stream ends, the
    others go back to ready."""
    log = FakeLog(50, 4)
    hub = Hub(log=log)  # type: ignore[arg-type]
    hub.revisions.compacted = 3
    hub.start(50)
    me, other = parked_stream(hub), parked_stream(hub)
    for s in (me, other):
        for i in range(3):
            s.create(pb.WatchCreateRequest(key=b"/k/%d" % i, start_revision=5))
        s.control.clear()
    log.compacted = 10
    w = me._pick()
    assert w is me.watchers[0]
    other.cancel(2)
    other.control.clear()
    with pytest.raises(CompactedError):
        await me._read_log(w)
    assert len(hub.unsynced) == 0 and len(me._shared) == 2 and len(other._shared) == 2

    async def sent(s: WatchStream) -> list[tuple[int, bool, int]]:
        out = []
        while (m := s._pick()) is not None:
            async for r in s._pump(m):
                assert isinstance(r, pb.WatchResponse)
                out.append((r.watch_id, r.canceled, r.compact_revision))
        return out

    assert await sent(me) == [(1, True, 10), (2, True, 10)]
    assert await sent(other) == [(0, True, 10), (1, True, 10)]
    assert not other.watchers and list(me.watchers) == [0] and len(hub.unsynced) == 0

    for s in (me, other):
        s.control.clear()
        for i in range(3):
            s.create(pb.WatchCreateRequest(key=b"/k/%d" % i, start_revision=20))
    log.gate = asyncio.Event()
    w = me._pick()
    assert w is not None and w.next_rev == 20
    read = asyncio.create_task(me._read_log(w))
    await asyncio.sleep(0)
    assert len(hub.unsynced) == 0
    first, *rest = other.watchers.values()
    other.cancel(first.id)
    read.cancel()  # the reading stream's call ends
    with pytest.raises(asyncio.CancelledError):
        await read
    assert hub.unsynced.revisions() == {20: 4}  # me's two others and other's two left: ready again
    assert list(other._ready) == rest


async def test_an_unavailable_database_is_waited_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """The read fails: the group goes back to ready, the reader waits and tries again."""
    monkeypatch.setattr(stream_module, "DB_RETRY_SECONDS", 0)
    log = FakeLog(50, 4)
    log.unavailable = 1
    hub = Hub(log=log)  # type: ignore[arg-type]
    hub.start(50)
    me, other = parked_stream(hub), parked_stream(hub)
    for s in (me, other):
        s.create(pb.WatchCreateRequest(key=b"/k/1", start_revision=1))
    w = me._pick()
    assert w is not None
    assert [r async for r in me._pump(w)] == []
    assert list(me._ready) == [w] and list(other._ready) == [other.watchers[0]] and len(hub.unsynced) == 2
    w = me._pick()
    assert w is not None
    sent = [pb.WatchResponse.FromString(r) for r in [r async for r in me._pump(w)] if isinstance(r, bytes)]
    assert [ev.kv.mod_revision for r in sent for ev in r.events] == [ch.rev for ch in log.rows if w.wants(ch)]
    assert w.synced and other.watchers[0].share is not None and len(log.reads) == 2


def test_split_is_each_watchers_own_changes() -> None:
    rng = random.Random(8)
    hub = Hub(log=None)  # type: ignore[arg-type]
    hub.start(0)
    s = WatchStream(hub, pb.ResponseHeader(), 1 << 20)
    for _ in range(40):
        create(s, rng, 1)
        if rng.random() < 0.2:
            s.create(pb.WatchCreateRequest(key=b"/k/1", filters=[pb.WatchCreateRequest.NODELETE]))
    rows = FakeLog(400, 60).rows
    ws = list(s.watchers.values())
    for group in (ws[:3], ws):  # by each watcher, and through an index of them
        parts = split(rows, group)
        for w in group:
            assert parts.get(w, []) == [ch for ch in rows if w.wants(ch)]


async def test_progress_waits_for_a_later_start() -> None:
    """A RequestProgress with a watcher starting later is answered once the revision
    reaches its start, although no commit touches it (the stream is woken for it)."""
    hub = Hub(log=None)  # type: ignore[arg-type]
    hub.start(10)
    s = WatchStream(hub, pb.ResponseHeader(), 1 << 20)
    hub.attach(s)
    s.create(pb.WatchCreateRequest(key=b"/a", start_revision=13))
    got: list[pb.WatchResponse] = []

    async def requests() -> AsyncIterator[pb.WatchRequest]:
        yield pb.WatchRequest(progress_request=pb.WatchProgressRequest())

    async def read() -> None:
        async for r in s.responses():
            assert isinstance(r, pb.WatchResponse)
            got.append(r)

    task = asyncio.create_task(read())
    await s.read_requests(requests())
    for rev in (11, 12, 13):
        await asyncio.sleep(0)
        assert not any(r.watch_id == -1 for r in got)
        hub.publish(rev, [change(rev, b"/other")])
    for _ in range(5):
        await asyncio.sleep(0)
    assert [(r.watch_id, r.header.revision) for r in got if not r.created] == [(-1, 13)]
    assert s not in hub.progress_waiters
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


class Log:
    """The database's change log, as the hub's backend: everything ever committed."""

    def __init__(self) -> None:
        self.rows: list[LogRow] = []
        self.reads = 0

    async def changes(
        self, start: int, end: int, ranges: Sequence[KeyRange] | None, limit: int
    ) -> tuple[list[LogRow], int]:
        self.reads += 1
        await asyncio.sleep(0)
        out = [
            ch
            for ch in self.rows
            if start <= ch.rev <= end and (ranges is None or any(kr.contains(ch.row.key) for kr in ranges))
        ]
        if len(out) > limit:
            last = out[limit].rev  # whole revisions only
            out = [ch for ch in out if ch.rev < last] or [ch for ch in out if ch.rev == out[0].rev]
            return out, out[-1].rev
        return out, end


@pytest.mark.parametrize("follower", [False, True], ids=["no-follower", "follower"])
@pytest.mark.parametrize("seed", range(4))
async def test_every_event_once_in_order_under_churn(seed: int, follower: bool) -> None:
    """Random commits (some published, some only in the log, as another frontend's),
    watchers created from old, current and future revisions and canceled, readers that
    stall while the small ring moves on: each watcher gets exactly its events, once
    and in order, and nothing after its cancel; at the end every watcher is synced.
    With a follower, a commit above another frontend's revisions is parked until the
    (fake) follower publishes them, or until it gives up (flush_parked)."""
    rng = random.Random(seed)
    log = Log()
    hub = Hub(log=log, ring_events=12)  # type: ignore[arg-type]
    hub.start(0)
    gaps: list[int] = []
    if follower:
        hub.on_gap = lambda: gaps.append(1)

    def fill_gap() -> None:  # what Follower.poll_once does, up to the parked revisions
        end = hub.gap_end()
        if end is None or end <= hub.revision:
            return
        rows = [ch for ch in log.rows if hub.revision < ch.rev <= end]
        if rows:
            hub.publish(end, rows)
        else:
            hub.advance(end)

    streams = [WatchStream(hub, pb.ResponseHeader(), 1 << 20) for _ in range(4)]
    got: dict[tuple[int, int], list[int]] = {}
    canceled: set[tuple[int, int]] = set()
    stalled: set[int] = set()

    async def reader(i: int, s: WatchStream) -> None:
        async for raw in s.responses():
            resp = raw if isinstance(raw, pb.WatchResponse) else pb.WatchResponse.FromString(raw)
            key = (i, resp.watch_id)
            assert key not in canceled or not resp.events, "an event after the canceled response"
            if resp.canceled:
                canceled.add(key)
            got.setdefault(key, []).extend(ev.kv.mod_revision for ev in resp.events)
            while i in stalled:
                await asyncio.sleep(0)

    tasks = [asyncio.create_task(reader(i, s)) for i, s in enumerate(streams)]
    for s in streams:
        hub.attach(s)
    watchers: dict[tuple[int, int], Watcher] = {}
    starts: dict[tuple[int, int], int] = {}  # the first revision each watcher is owed
    gone: dict[tuple[int, int], Watcher] = {}
    rev = 0
    for _ in range(400):
        op = rng.random()
        if op < 0.45:  # a commit of one to three revisions
            first = rev + 1
            changes = []
            for _ in range(rng.randint(1, 3)):
                rev += 1
                for sub in range(rng.randint(1, 3)):
                    key = b"/k/%d" % rng.randrange(12)
                    kind = DELETE if rng.random() < 0.2 else PUT
                    changes.append(LogRow(rev, sub, kind, Row(key, rev, rev, 1, 0, b"v"), None))
            log.rows += changes
            if rng.random() < 0.1:
                continue  # another frontend's: in the log only, until a later publish
            hub.publish(rev, [ch for ch in changes if ch.rev >= first])
        elif op < 0.5 and rev > hub.revision:
            hub.advance(rev)
        elif op < 0.7:
            i = rng.randrange(len(streams))
            s = streams[i]
            when = rng.choice([0, 0, max(1, hub.revision - rng.randrange(40)), hub.revision + rng.randrange(1, 4)])
            create(s, rng, when)
            w = s.watchers[s.control[-1].watch_id]
            watchers[(i, w.id)] = w
            starts[(i, w.id)] = when or hub.revision + 1
            s.wake()
        elif op < 0.78 and watchers:
            key = rng.choice(list(watchers))
            streams[key[0]].cancel(key[1])
            streams[key[0]].wake()
            canceled.add(key)  # nothing after this moment (responses already out may still arrive)
            gone[key] = watchers.pop(key)
        elif op < 0.85:
            i = rng.randrange(len(streams))
            stalled.symmetric_difference_update({i})
        elif follower and op < 0.95:
            fill_gap()
        elif follower:
            hub.flush_parked(0)  # the follower could not read the gap
        for _ in range(rng.randrange(3)):
            await asyncio.sleep(0)
    fill_gap()
    assert not hub.parked
    if rev > hub.revision:
        hub.advance(rev)
    stalled.clear()
    for _ in range(5000):
        if len(hub.synced) == len(watchers) and not any(s._ready or s._shared for s in streams):
            break
        await asyncio.sleep(0)
    assert len(hub.synced) == len(watchers) and len(hub.unsynced) == 0
    for key, w in [*watchers.items(), *gone.items()]:
        want = [ch.rev for ch in log.rows if ch.rev >= starts[key] and w.wants(ch)]
        have = got.get(key, [])
        if key in watchers:
            assert have == want, (key, w.kr)
        else:  # canceled: what it got before, no more
            assert have == want[: len(have)], (key, w.kr)
    assert log.reads > 0
    assert bool(gaps) == follower
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
