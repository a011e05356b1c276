"""One ordered feed of committed changes per frontend, shared by every watch stream.

The store hands each commit's changes to :meth:`Hub.publish`; the hub keeps recent
revisions in memory (the ring) and wakes the streams. A watcher that is behind the
ring -- a replay from an older revision, or a client too slow to keep up -- reads
the change log from the database instead, so nothing is ever dropped and memory
stays bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

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


class Hub:
    def __init__(self, backend: Backend, *, ring_events: int = 20_000) -> None:
        self.backend = backend
        self.ring_events = ring_events
        self.revision = 0  # every change with rev <= revision has been published
        self.ring_start = 1  # the ring holds revisions ring_start..revision, in order
        self.ring: list[tuple[int, list[LogRow]]] = []
        self._ring_size = 0
        self.streams: set[Subscriber] = set()
        self.compact_revision: Callable[[], int] = lambda: 0
        self._events: dict[tuple[int, int, bool], kv_pb2.Event] = {}
        self._encoded: dict[tuple[int, int, bool], bytes] = {}

    def event(self, ch: LogRow, with_prev: bool) -> kv_pb2.Event:
        """The Event message of a change, built once however many watchers send it
        (with a thousand watchers on one prefix, building it per watcher costs more
        than sending it)."""
        key = (ch.rev, ch.sub, with_prev)
        ev = self._events.get(key)
        if ev is None:
            ev = self._events[key] = to_event(ch, with_prev)
            self._bound(self._events)
        return ev

    def encoded_event(self, ch: LogRow, with_prev: bool) -> bytes:
        """The change as the encoded ``events`` field of a WatchResponse, encoded once for
        every watcher that sends it: protobuf's encoding of a message is the
        concatenation of its fields' encodings, so a response can be assembled from
        these bytes without building and encoding a message per watcher."""
        key = (ch.rev, ch.sub, with_prev)
        data = self._encoded.get(key)
        if data is None:
            data = rpc_pb2.WatchResponse(events=[self.event(ch, with_prev)]).SerializeToString()
            self._encoded[key] = data
            self._bound(self._encoded)
        return data

    def _bound(self, cache: dict[tuple[int, int, bool], Any]) -> None:
        """Keep a per-change cache to about twice the ring: drop its oldest half."""
        if len(cache) > 2 * self.ring_events:
            for old in list(cache)[: self.ring_events]:
                del cache[old]

    def start(self, revision: int) -> None:
        self.revision = revision
        self.ring_start = revision + 1
        self.ring.clear()
        self._ring_size = 0

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
            self._ring_size = 0
            self.ring_start = first
        current: list[LogRow] = []
        rev = first
        for ch in changes:
            if ch.rev != rev:
                self.ring.append((rev, current))
                current, rev = [], ch.rev
            current.append(ch)
        self.ring.append((rev, current))
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
            self._ring_size = 0
            self.ring_start = revision + 1
            self.revision = revision
            for s in self.streams:
                s.wake()

    def _trim(self) -> None:
        if self._ring_size <= self.ring_events:
            return
        drop = 0
        while self._ring_size > self.ring_events * 3 // 4 and drop < len(self.ring) - 1:
            self._ring_size -= len(self.ring[drop][1])
            drop += 1
        del self.ring[:drop]
        self.ring_start += drop

    def from_ring(self, start_rev: int) -> list[tuple[int, list[LogRow]]]:
        """Ring entries with rev >= start_rev (start_rev must be >= ring_start)."""
        return self.ring[start_rev - self.ring_start :]


async def wait_any(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
