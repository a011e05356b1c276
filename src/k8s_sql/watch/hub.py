"""One ordered feed of committed changes per frontend, shared by every watch stream.

The store hands each commit's changes to :meth:`Hub.publish`; the hub keeps recent
revisions in memory (the ring) and wakes the streams. A watcher that is behind the
ring -- a replay from an older revision, or a client too slow to keep up -- reads
the change log from the database instead, so nothing is ever dropped and memory
stays bounded.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar

from k8s_sql.backend.base import DELETE, Backend, LogRow
from k8s_sql.pb import kv_pb2, rpc_pb2
from k8s_sql.store.ranges import to_kv


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


class Subscriber(Protocol):
    def wake(self) -> None: ...

    def notify(self, first: int, revision: int, keys: list[bytes]) -> None:
        """Changes of revisions ``first..revision`` were published; ``keys`` are their
        keys, sorted."""


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


class Hub:
    """Invariants: ``ring`` holds every change of revisions ``ring_start..revision`` in
    order (a revision's changes together), at most ``ring_events`` changes and
    ``ring_bytes`` bytes (by :func:`change_bytes`) once trimmed, but always the latest
    revision whole; the caches hold at most their entries and bytes."""

    def __init__(
        self,
        backend: Backend,
        *,
        ring_events: int = RING_EVENTS,
        ring_bytes: int = RING_BYTES,
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        self.backend = backend
        self.ring_events = ring_events
        self.ring_bytes = ring_bytes
        self.revision = 0  # every change with rev <= revision has been published
        self.ring_start = 1  # the ring holds revisions ring_start..revision, in order
        # (rev, changes, their change_bytes total)
        self.ring: list[tuple[int, list[LogRow], int]] = []
        self._ring_size = 0
        self._ring_bytes = 0
        self.streams: set[Subscriber] = set()
        self.compact_revision: Callable[[], int] = lambda: 0
        self._events: _Cache[kv_pb2.Event] = _Cache(2 * ring_events, cache_bytes)
        self._encoded: _Cache[bytes] = _Cache(2 * ring_events, cache_bytes)

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
        """Take the changes of one commit (revisions in order, ending at ``revision``)."""
        if changes and changes[0].rev <= self.revision:
            changes = [ch for ch in changes if ch.rev > self.revision]  # already published
        if not changes:
            return
        first = changes[0].rev
        if first != self.revision + 1:
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
        self.revision = revision
        self._trim()
        keys = sorted({ch.row.key for ch in changes})
        for s in self.streams:
            s.notify(first, revision, keys)

    def advance(self, revision: int) -> None:
        """Note revisions known to exist without their changes (read later from the log)."""
        if revision > self.revision:
            self.ring.clear()
            self._ring_size = self._ring_bytes = 0
            self.ring_start = revision + 1
            self.revision = revision
            for s in self.streams:
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
        >= ring_start), in order. Iterate before the next publish: it may trim the ring."""
        return itertools.islice(self.ring, start_rev - self.ring_start, None)


async def wait_any(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
