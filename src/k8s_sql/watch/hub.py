"""One ordered feed of committed changes per frontend, shared by every watch stream.

The store hands each commit's changes to :meth:`Hub.publish`; the hub keeps recent
revisions in memory (the ring) and wakes the streams of the watchers the commit
touches. A watcher that is behind the ring -- a replay from an older revision, or a
client too slow to keep up -- reads the change log from the database instead, so
nothing is ever dropped and memory stays bounded.

The hub keeps etcd's two watcher groups (server/storage/mvcc/watchable_store.go):
``synced``, the watchers with nothing to send but what the ring holds, indexed by key
and range so a commit finds its watchers without looking at the others (etcd's
``notify`` over ``watcherGroup.watcherSetByKey``); and ``unsynced``, the watchers
that must read the log, grouped by the revision they need next so that one read
serves a group (etcd's ``syncWatchers``; see :meth:`WatchStream._read_log`).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from time import monotonic
from typing import Generic, Protocol, TypeVar

from k8s_sql.backend.base import DELETE, KeyRange, LogRow
from k8s_sql.pb import kv_pb2, rpc_pb2
from k8s_sql.store.ranges import to_kv
from k8s_sql.store.revisions import Revisions
from k8s_sql.watch.index import LagGroups, WatchIndex


def to_event(ch: LogRow, with_prev: bool) -> kv_pb2.Event:
    if ch.kind == DELETE:
        ev = kv_pb2.Event(type=kv_pb2.Event.DELETE, kv=kv_pb2.KeyValue(key=ch.row.key, mod_revision=ch.rev))
    else:
        ev = kv_pb2.Event(type=kv_pb2.Event.PUT, kv=to_kv(ch.row))
    # etcd sends no prev_kv with a create event (create_revision == mod_revision), even
    # when the key existed before the revision (deleted and re-created by one txn).
    if with_prev and ch.prev is not None and not (ch.kind != DELETE and ch.row.create_rev == ch.rev):
        ev.prev_kv.CopyFrom(to_kv(ch.prev))
    return ev


class ChangeLog(Protocol):
    """Where a watcher behind the ring reads (the backend's, or the store's, ``changes``)."""

    async def changes(
        self, start_rev: int, end_rev: int, ranges: Sequence[KeyRange] | None, limit: int
    ) -> tuple[list[LogRow], int]: ...


class Subscriber(Protocol):
    """A watch stream, as the hub sees it."""

    def wake(self) -> None: ...

    def behind(self, w: Watching, first: int) -> None:
        """``w``, synced, may want changes from revision ``first`` on (a commit touched
        its range, or revisions were published that only the log holds)."""

    def detach(self) -> None:
        """The stream has ended: its watchers leave the hub's groups."""

    def cancel_all(self, reason: str) -> None:
        """Cancel every watcher of the stream, telling its client ``reason``."""


class Watching(Protocol):
    """A watcher, as the hub sees it."""

    next_rev: int  # the first revision not yet sent (synced and idle: at most that)

    @property
    def kr(self) -> KeyRange: ...

    @property
    def stream(self) -> Subscriber: ...


# Bounds on what the hub keeps, by count and by bytes. Before the byte bounds, 40,000
# Puts of 1 KiB with two watchers took a server from 46 to 375 MB and it stayed there:
# the ring (20,000 changes) and two per-change caches (up to 40,000 entries each) hold
# a value each, and a value can be 1.5 MiB (a ring of 20,000 such changes would be
# 30 GB). The byte bounds cap the ring at 32 MiB, about 20,000 changes of 1 KiB or
# 6,000 Kubernetes objects of 5 KiB: a watcher that far behind reads the log table
# instead, in whole revisions, so a smaller ring costs database reads, never events.
# The encoded-event cache only has to outlive the moment the watchers of one commit send
# it (a thousand watchers of one prefix send each event within a few milliseconds), so
# 16 MiB is ample; the Event-message cache serves only fragmenting watchers.
RING_EVENTS = 20_000
RING_BYTES = 32 << 20
CACHE_BYTES = 16 << 20
# What a change costs beyond its keys and values (measured with tracemalloc: LogRow and
# Row tuples, ints, bytes headers; about 420 bytes for a put with its previous state).
CHANGE_OVERHEAD = 512


def change_bytes(ch: LogRow) -> int:
    """About the memory a change holds: keys and values (new and previous) plus overhead."""
    n = CHANGE_OVERHEAD + len(ch.row.key) + len(ch.row.value)
    if ch.prev is not None:
        n += len(ch.prev.key) + len(ch.prev.value)
    return n


V = TypeVar("V")


class _Cache(Generic[V]):
    """A per-change cache bounded by entries and by bytes, dropping the oldest first."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple[int, int, bool], tuple[V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple[int, int, bool]) -> V | None:
        hit = self._items.get(key)
        return None if hit is None else hit[0]

    def put(self, key: tuple[int, int, bool], value: V, size: int) -> None:
        self._items[key] = (value, size)
        self.bytes += size
        while len(self._items) > self.max_entries or (self.bytes > self.max_bytes and len(self._items) > 1):
            _, (_, old) = self._items.popitem(last=False)
            self.bytes -= old


# The longest an own commit waits for the follower to publish other frontends'
# revisions below it (Hub.parked); the follower fills such a gap within one database
# read, a few milliseconds.
PARK_SECONDS = 0.5
PUBLISHED_TIMES = 8192  # publications whose time is kept (between this and twice this many)


class Hub:
    """Invariants: ``ring`` holds every change of revisions ``ring_start..revision`` in
    order (a revision's changes together), at most ``ring_events`` changes and
    ``ring_bytes`` bytes (by :func:`change_bytes`) once trimmed, but always the latest
    revision whole; the caches hold at most their entries and bytes.

    Watcher groups: ``synced`` holds the watchers whose changes since their
    ``next_rev`` are all in the ring (etcd's synced group), either idle -- sent every
    change they want up to ``revision``; their ``next_rev`` may lag, the commits since
    did not touch them -- or queued in their stream to be sent from the ring, as an
    etcd watcher stays synced while its events wait in its channel. The others lag
    (``unsynced``, grouped by ``next_rev``): they read the log. After each publish, a
    synced watcher is idle unless its stream was handed it, so a commit costs only the
    watchers it touches: with 10,000 idle watchers on other keys a publish took 1,546
    us before the index and takes 4.9 us now, 4.4 us with none
    (bench/micro/idle_watchers.py)."""

    def __init__(
        self,
        log: ChangeLog,
        revisions: Revisions | None = None,
        *,
        ring_events: int = RING_EVENTS,
        ring_bytes: int = RING_BYTES,
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        self.log = log  # where a watcher behind the ring reads (the store's change log)
        # The frontend's revisions (the store's): the compaction point decides whether a
        # watcher behind the ring can still be served.
        self.revisions = revisions if revisions is not None else Revisions()
        self.ring_events = ring_events
        self.ring_bytes = ring_bytes
        self.revision = 0  # every change with rev <= revision has been published
        self.ring_start = 1  # the ring holds revisions ring_start..revision, in order
        # (rev, changes, their change_bytes total)
        self.ring: list[tuple[int, list[LogRow], int]] = []
        self._ring_size = 0
        self._ring_bytes = 0
        self.streams: set[Subscriber] = set()
        self.synced: WatchIndex[Watching] = WatchIndex()
        self.unsynced: LagGroups[Watching] = LagGroups()
        # Streams waiting to answer a RequestProgress until all their watchers are synced
        # (a watcher starting later is synced only once the revision reaches its start):
        # woken on every publish, as no watcher of theirs may be touched.
        self.progress_waiters: set[Subscriber] = set()
        # When recent revisions were published here, for k8s_sql_watch_delivery_lag_seconds:
        # ``(last revision, monotonic time)`` per publish, oldest first, so a revision's
        # time is that of the first entry at or above it (one entry per commit batch: a
        # tuple per revision cost a write txn 1% of its CPU).
        self.published_at: list[tuple[int, float]] = []
        # While set, watches are refused with this reason (the CORRUPT alarm: see
        # store/corruption.py): cancel_all() ended the ones there were.
        self.refusing = ""
        self._events: _Cache[kv_pb2.Event] = _Cache(2 * ring_events, cache_bytes)
        self._encoded: _Cache[bytes] = _Cache(2 * ring_events, cache_bytes)
        # This frontend's own commits that arrived above revisions other frontends wrote
        # and the follower has not read yet: ``(first rev, revision, changes, monotonic
        # time)``, in order. Publishing one at once would leave a gap in the ring, and
        # every synced watcher would have to read the gap from the database -- with two
        # frontends writing, on almost every commit (8 kube-apiservers over 2 PostgreSQL
        # frontends at 160 writes/s: bench/run --tenants). So they wait, at most
        # PARK_SECONDS, for ``on_gap`` (the follower) to publish the gap first.
        self.parked: list[tuple[int, int, list[LogRow], float]] = []
        self.on_gap: Callable[[], None] | None = None

    @property
    def compact_revision(self) -> int:
        return self.revisions.compacted

    def attach(self, stream: Subscriber) -> None:
        """A Watch call began: its stream may now create watchers."""
        self.streams.add(stream)

    def refuse_watches(self, reason: str) -> None:
        """Cancel every watcher with ``reason`` and refuse new ones until
        ``refuse_watches("")``: their clients must stop trusting what they were sent."""
        self.refusing = reason
        if reason:
            for stream in list(self.streams):
                stream.cancel_all(reason)

    def detach(self, stream: Subscriber) -> None:
        """A Watch call ended: its watchers leave the hub's groups."""
        if stream in self.streams:
            self.streams.discard(stream)
            stream.detach()

    def event(self, ch: LogRow, with_prev: bool) -> kv_pb2.Event:
        """The Event message of a change, built once however many (fragmenting) watchers
        send it."""
        key = (ch.rev, ch.sub, with_prev)
        ev = self._events.get(key)
        if ev is None:
            ev = to_event(ch, with_prev)
            self._events.put(key, ev, change_bytes(ch))
        return ev

    def encoded_event(self, ch: LogRow, with_prev: bool) -> bytes:
        """The change as the encoded ``events`` field of a WatchResponse, encoded once for
        every watcher that sends it: protobuf's encoding of a message is the
        concatenation of its fields' encodings, so a response can be assembled from
        these bytes without building and encoding a message per watcher (with a
        thousand watchers on one prefix, building it per watcher costs more than
        sending it)."""
        key = (ch.rev, ch.sub, with_prev)
        data = self._encoded.get(key)
        if data is None:
            ev = self._events.get(key) or to_event(ch, with_prev)
            data = rpc_pb2.WatchResponse(events=[ev]).SerializeToString()
            self._encoded.put(key, data, len(data) + 64)
        return data

    def start(self, revision: int) -> None:
        self.revision = revision
        self.ring_start = revision + 1
        self.ring.clear()
        self._ring_size = self._ring_bytes = 0

    def publish(self, revision: int, changes: list[LogRow]) -> None:
        """Take the changes of one commit (revisions in order, ending at ``revision``):
        at once, or parked while revisions below them are unpublished and a follower
        (``on_gap``) is there to publish those."""
        if changes and self.on_gap is not None and changes[0].rev > self.revision + 1:
            self.parked.append((changes[0].rev, revision, changes, monotonic()))
            self.flush_parked()  # (a follower stalled in a read: the bound holds all the same)
            if self.parked:
                self.on_gap()
            return
        self._publish(revision, changes)
        if self.parked:
            self._drain_parked()

    def gap_end(self) -> int | None:
        """The last revision the follower needs before the parked commits can go out
        (None: nothing is parked; the revisions above are this frontend's own)."""
        return self.parked[0][0] - 1 if self.parked else None

    def _drain_parked(self) -> None:
        while self.parked and self.parked[0][0] <= self.revision + 1:
            _, revision, changes, _ = self.parked.pop(0)
            self._publish(revision, changes)

    def flush_parked(self, older_than: float = PARK_SECONDS) -> None:
        """Publish parked commits as they are (watchers read the gap below them from the
        log) once the oldest has waited ``older_than`` seconds: the follower could not
        fill the gap (the database is away, or the history was compacted)."""
        if self.parked and monotonic() - self.parked[0][3] >= older_than:
            parked, self.parked = self.parked, []
            for _, revision, changes, _ in parked:
                self._publish(revision, changes)

    def _publish(self, revision: int, changes: list[LogRow]) -> None:
        if changes and changes[0].rev <= self.revision:
            changes = [ch for ch in changes if ch.rev > self.revision]  # already published
        if not changes:
            return
        first = changes[0].rev
        old = self.revision
        if first != old + 1:
            # Revisions we did not see (another frontend wrote them): the ring restarts
            # here and watchers behind it read the gap from the database.
            self.ring.clear()
            self._ring_size = self._ring_bytes = 0
            self.ring_start = first
        current: list[LogRow] = []
        rev = first
        size = 0
        for ch in changes:
            if ch.rev != rev:
                self.ring.append((rev, current, size))
                current, rev, size = [], ch.rev, 0
            current.append(ch)
            n = change_bytes(ch)
            size += n
            self._ring_bytes += n
        self.ring.append((rev, current, size))
        self._ring_size += len(changes)
        times = self.published_at
        times.append((revision, monotonic()))
        if len(times) > 2 * PUBLISHED_TIMES:
            del times[:PUBLISHED_TIMES]
        self.revision = revision
        self._trim()
        if first != old + 1:
            self._fall_behind(first - 1, old + 1)
        # etcd's watchableStore.notify: only the synced watchers of these keys.
        keys = sorted({ch.row.key for ch in changes})
        for w in self.synced.match(keys):
            if w.next_rev <= revision:  # (one starting later waits)
                w.stream.behind(w, first)
        self._wake_waiters()

    def published(self, rev: int) -> float | None:
        """When ``rev`` was published here, if it is among the latest publications."""
        times = self.published_at
        i = bisect_left(times, (rev, 0.0))
        if i == len(times) or (i == 0 and len(times) >= PUBLISHED_TIMES):
            return None  # not published here yet, or older than what is kept
        return times[i][1]

    def advance(self, revision: int) -> None:
        """Note revisions known to exist without their changes (read later from the log)."""
        if revision > self.revision:
            old = self.revision
            self.ring.clear()
            self._ring_size = self._ring_bytes = 0
            self.ring_start = revision + 1
            self.revision = revision
            self._fall_behind(revision, old + 1)
            self._wake_waiters()
        if self.parked:
            self._drain_parked()

    def _fall_behind(self, last: int, first: int) -> None:
        """Revisions ``first..last`` are published without their changes (another
        frontend wrote them; the log has them): every synced watcher that may want one
        is told, and (idle ones) leave the synced group to read them, all from
        ``first``, one group. This looks at every synced watcher, as before the index
        every commit did; a single frontend never has such a gap."""
        for w in self.synced:
            if w.next_rev <= last:
                w.stream.behind(w, first)

    def _wake_waiters(self) -> None:
        if self.progress_waiters:
            for s in list(self.progress_waiters):
                s.wake()

    def _trim(self) -> None:
        """Past either bound, drop the oldest revisions down to three quarters of both (so
        trimming is not paid on every publish), never the latest revision."""
        if self._ring_size <= self.ring_events and self._ring_bytes <= self.ring_bytes:
            return
        drop = 0
        while drop < len(self.ring) - 1 and (
            self._ring_size > self.ring_events * 3 // 4 or self._ring_bytes > self.ring_bytes * 3 // 4
        ):
            _, chs, size = self.ring[drop]
            self._ring_size -= len(chs)
            self._ring_bytes -= size
            drop += 1
        del self.ring[:drop]
        self.ring_start += drop

    def from_ring(self, start_rev: int) -> Iterator[tuple[int, list[LogRow], int]]:
        """Ring entries ``(rev, changes, bytes)`` with rev >= start_rev (start_rev must be
        >= ring_start), in order. Iterate before the next publish: it may trim the ring.

        Indexed, not ``islice(ring, offset)``: islice steps over the offset one entry at
        a time, and a watcher that is sent each commit as it comes starts at the end of
        a ring that holds up to 20,000 revisions -- a commit to 1,000 watchers of one
        prefix cost up to 41 ms as the ring filled, 5.2 ms indexed
        (bench/micro/idle_watchers.py, pods row)."""
        ring = self.ring
        return map(ring.__getitem__, range(start_rev - self.ring_start, len(ring)))
