"""One client Watch stream: many watchers, server-assigned ids, ordered delivery.

Responses are produced on demand by the gRPC response generator, so a slow client
slows only its own stream: its watchers fall behind the hub's ring and then catch
up from the database log, never losing or duplicating an event.

A watcher is in one of these states (the hub's groups are etcd's, see hub.py):

- synced (``w.synced``, in ``hub.synced``), idle: nothing to send;
- synced, queued (``w.queued``): a commit touched it; in the stream's ``_ready``
  queue, its changes in the ring. The hot path: a commit moves no index entry;
- lagging, ready: in ``_ready`` and in ``hub.unsynced`` (by ``next_rev``), as a
  watcher that starts below the current revision, or whose changes left the ring;
- lagging, claimed: a read of the log (this stream's or another's) is reading for it;
- lagging, shared: holds the changes such a read found for it (``share``), in ``_shared``;
- active: its stream is sending it one batch (from the ring, the log or its share).

After each batch a watcher that has caught up is synced and idle, the others go to
the end of the ready queue: the watchers of a stream take turns a batch at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from time import monotonic
from typing import cast

from k8s_sql import errors
from k8s_sql.backend.base import DELETE, BackendUnavailable, CompactedError, KeyRange, LogRow
from k8s_sql.metrics import WATCH_DELIVERY_SECONDS
from k8s_sql.pb import rpc_pb2 as pb
from k8s_sql.watch.hub import Hub, Watching, change_bytes
from k8s_sql.watch.index import MAX_WATCHERS_PER_SYNC, WatchIndex, union

log = logging.getLogger(__name__)

NOPUT = pb.WatchCreateRequest.NOPUT
NODELETE = pb.WatchCreateRequest.NODELETE
PROGRESS_ALL = -1  # etcd's InvalidWatchID: the id of a stream-wide progress reply
MAX_EVENTS_PER_RESPONSE = 1000
# What one stream holds at a time beyond gRPC's own buffers: the changes of one batch
# (ring scan or log read), at most about this many bytes unless a single revision is
# larger (a revision's events always go together). The responses are built from it one
# at a time, as gRPC asks for them: a client that stops reading leaves its stream's
# generator suspended with one batch, and its watchers fall behind the ring and later
# catch up from the log, as etcd moves a slow watcher to its unsynced group. A read of
# the log serves several watchers (a group, see WatchStream._read_log) but is sized to
# the same budget, and a stream takes a share of another's read only while it holds
# nothing: a stream still holds one batch at a time.
BATCH_BYTES = 4 << 20
DB_READ_LIMIT = 2000  # rows of one log read, at most; fewer when the rows are large
DB_FIRST_READ = 100  # rows of a watcher's first log read, before their size is known
DB_RETRY_SECONDS = 0.5
# The share of a watcher whose group's read found the start compacted: its stream sends
# etcd's cancel with compact_revision when it comes to it.
COMPACTED: tuple[list[LogRow], int] = ([], -1)
# Control responses (created, canceled, progress) a stream queues before it stops
# reading the client's requests until the client reads (etcd's ctrlStreamBufLen).
CONTROL_BUFFER = 16


@dataclass(eq=False)
class Watcher:
    id: int
    kr: KeyRange
    stream: WatchStream = field(repr=False)
    next_rev: int  # the first revision not yet delivered (synced and idle: at most that, see Hub)
    start_rev: int  # the start revision the client asked for; 0 = from now
    prev_kv: bool
    no_put: bool
    no_delete: bool
    fragment: bool
    progress_notify: bool
    sent_since_tick: bool = False
    encoded_id: bytes = b""  # the watch_id field, encoded (see Hub.encoded_event)
    db_limit: int = DB_FIRST_READ  # rows of the next log read, adapted to BATCH_BYTES
    share: tuple[list[LogRow], int] | None = None  # (changes, up to revision) read for it by a group
    synced: bool = False  # in hub.synced
    queued: bool = False  # synced, with changes in the ring to send (in its stream's _ready)

    def __post_init__(self) -> None:
        self.encoded_id = pb.WatchResponse(watch_id=self.id).SerializeToString()

    def wants(self, ch: LogRow) -> bool:
        if ch.kind == DELETE:
            if self.no_delete:
                return False
        elif self.no_put:
            return False
        return self.kr.contains(ch.row.key)

    def wanted(self, changes: list[LogRow]) -> list[LogRow]:
        """The changes this watcher sends (the ring scan's inner loop, kept tight)."""
        if self.no_put or self.no_delete:
            return [ch for ch in changes if self.wants(ch)]
        lo, hi = self.kr.key, self.kr.end
        if hi is None:
            return [ch for ch in changes if ch.row.key == lo]
        if hi == b"":
            return [ch for ch in changes if ch.row.key >= lo]
        return [ch for ch in changes if lo <= ch.row.key < hi]


def split(rows: list[LogRow], watchers: Sequence[Watcher]) -> dict[Watcher, list[LogRow]]:
    """The changes each watcher sends of one read of the log (etcd's newWatcherBatch),
    in order; watchers with none are left out. Past a few watchers the rows are matched
    through a :class:`WatchIndex` of them rather than each watcher against each row
    (512 watchers x 2,000 rows would be a million checks)."""
    if len(watchers) <= 8:
        out = {w: w.wanted(rows) for w in watchers}
        return {w: chs for w, chs in out.items() if chs}
    index: WatchIndex[Watcher] = WatchIndex()
    for w in watchers:
        index.add(w, w.kr)
    parts: dict[Watcher, list[LogRow]] = {}
    by_key: dict[bytes, list[Watcher]] = {}
    for ch in rows:
        ws = by_key.get(ch.row.key)
        if ws is None:
            ws = by_key[ch.row.key] = index.match([ch.row.key])
        for w in ws:
            if w.wants(ch):
                parts.setdefault(w, []).append(ch)
    return parts


@dataclass(eq=False)
class WatchStream:
    hub: Hub
    header: pb.ResponseHeader  # cluster/member/term; revision is set per response
    max_request_bytes: int
    watchers: dict[int, Watcher] = field(default_factory=dict)
    control: deque[pb.WatchResponse] = field(default_factory=deque)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _next_id: int = 0
    _progress_requested: bool = False
    _closed: bool = False
    error: Exception | None = None
    _encoded_header: tuple[int, bytes] = (-1, b"")
    _control_room: asyncio.Event = field(default_factory=asyncio.Event)
    _ready: OrderedDict[Watcher, None] = field(default_factory=OrderedDict)
    _shared: OrderedDict[Watcher, None] = field(default_factory=OrderedDict)
    # Ids of watchers canceled by compaction: etcd keeps such an id taken (its
    # watchStream still holds the cancel func) until the client cancels it, so creating
    # a watcher with it is a duplicate and the next automatic id skips it.
    _compacted_ids: set[int] = field(default_factory=set)
    _parked: bool = False  # the response generator waits to be woken, holding nothing
    _detached: bool = False  # the call has ended: no watcher of it is in the hub

    def _header_field(self, revision: int) -> bytes:
        """The header field of a response at ``revision``, encoded (see Hub.encoded_event)."""
        if self._encoded_header[0] != revision:
            self.header.revision = revision
            self._encoded_header = (revision, pb.WatchResponse(header=self.header).SerializeToString())
        return self._encoded_header[1]

    def wake(self) -> None:
        self._wake.set()

    # -- watcher states (see the module docstring) ------------------------------------

    def behind(self, w: Watching, first: int) -> None:
        """A commit touched ``w`` (synced, one of ours), or revisions from ``first`` are
        only in the log: queue it to be sent from the ring, or make it lag."""
        assert isinstance(w, Watcher)
        if w.queued:
            return  # already to be sent up to the latest revision
        if w.next_rev < first:
            w.next_rev = first  # nothing before touched it
        if w.next_rev < self.hub.ring_start:
            self._lag(w)
        else:
            w.queued = True
            self._ready[w] = None
        self.wake()

    def detach(self) -> None:
        self._detached = True
        for w in self.watchers.values():
            self._forget(w)
        # The call is over: nothing reads the watchers again, and each refers back to
        # the stream (a cycle only a full garbage collection would free).
        self.watchers.clear()
        self.hub.progress_waiters.discard(self)

    def cancel_all(self, reason: str) -> None:
        for w in list(self.watchers.values()):
            del self.watchers[w.id]
            self._forget(w)
            self.control.append(self._response(self.hub.revision, watch_id=w.id, canceled=True, cancel_reason=reason))
        self.wake()

    @property
    def accepting(self) -> bool:
        """Whether another stream's read may hand this one a share now: only while it
        waits to be woken holding nothing (no batch being sent, no share), so that it
        never holds more than one batch."""
        return self._parked and not self._shared and not self._detached and not self._closed

    def _forget(self, w: Watcher) -> None:
        self.hub.synced.discard(w)
        self.hub.unsynced.discard(w)
        self._ready.pop(w, None)
        self._shared.pop(w, None)
        w.share = None
        w.synced = w.queued = False

    def _lag(self, w: Watcher) -> None:
        """Out of the synced group (if in it), ready to read the log from ``w.next_rev``."""
        if w.synced:
            self.hub.synced.discard(w)
            w.synced = w.queued = False
        self._ready[w] = None
        self.hub.unsynced.add(w, w.next_rev)

    def _settle(self, w: Watcher) -> None:
        """After a batch (or a read for it): synced and idle if it has caught up, else
        ready for the next."""
        if self._detached or self.watchers.get(w.id) is not w:
            return  # canceled meanwhile
        if w.next_rev > self.hub.revision:
            if w.synced:
                w.queued = False
            else:
                self.hub.synced.add(w, w.kr)
                w.synced = True
        elif w.synced:
            self._ready[w] = None  # more in the ring
        else:
            self._ready[w] = None
            self.hub.unsynced.add(w, w.next_rev)

    def _pick(self) -> Watcher | None:
        """The next watcher to send a batch of: shares first (they hold memory), then
        the ready queue in order."""
        if self._shared:
            return self._shared.popitem(last=False)[0]
        if self._ready:
            w = self._ready.popitem(last=False)[0]
            if not w.synced:
                self.hub.unsynced.discard(w)
            return w
        return None

    def _left_behind(self, w: Watcher) -> None:
        """``w``, synced and being sent, finds its changes gone from the ring (its client
        read too slowly): it lags, and so does every queued watcher of this stream the
        ring has left behind, so that they read the log as groups (etcd moves a watcher
        whose channel is full out of the synced group)."""
        ring_start = self.hub.ring_start
        self.hub.synced.discard(w)
        w.synced = w.queued = False
        for m in [m for m in self._ready if m.synced and m.next_rev < ring_start]:
            self.hub.synced.discard(m)
            m.synced = m.queued = False
            self.hub.unsynced.add(m, m.next_rev)

    def _compacted(self, w: Watcher) -> pb.WatchResponse:
        """etcd's cancel of a watcher whose next revision was compacted away (its id stays
        taken, see _compacted_ids)."""
        if self.watchers.get(w.id) is w:
            del self.watchers[w.id]
            self._compacted_ids.add(w.id)
        self._forget(w)
        resp = self._response(0, watch_id=w.id, canceled=True)
        resp.compact_revision = self.hub.compact_revision
        return resp

    def _response(self, revision: int, **kw: object) -> pb.WatchResponse:
        resp = pb.WatchResponse(**kw)  # type: ignore[arg-type]
        resp.header.CopyFrom(self.header)
        resp.header.revision = revision
        return resp

    # -- requests -----------------------------------------------------------------

    async def read_requests(self, requests: AsyncIterator[pb.WatchRequest]) -> None:
        """Apply the client's requests; a failure to read them (an undecodable message)
        is kept in ``error`` and ends the stream. A client that stops sending (closes
        its side) still gets its watches' events, as from etcd: the stream ends when
        the client cancels it."""
        try:
            async for req in requests:
                while len(self.control) >= CONTROL_BUFFER and not self._closed:
                    # The client sends but does not read: stop reading its requests, so
                    # HTTP/2 flow control holds it back, rather than queue its answers.
                    self._control_room.clear()
                    await self._control_room.wait()
                kind = req.WhichOneof("request_union")
                if kind == "create_request":
                    self.create(req.create_request)
                elif kind == "cancel_request":
                    self.cancel(req.cancel_request.watch_id)
                elif kind == "progress_request":
                    self._progress_requested = True
                    self.hub.progress_waiters.add(self)
                self.wake()
        except Exception as e:
            self.error = e
            self._closed = True
            self.wake()

    def create(self, c: pb.WatchCreateRequest) -> None:
        key = c.key or b"\0"
        kr = KeyRange.from_etcd(key, c.range_end)
        current = self.hub.revision
        wid = c.watch_id
        error = ""
        if self.hub.refusing:
            error = self.hub.refusing
        elif c.start_revision < 0:
            error = errors.Compacted.message  # etcd's v3rpc refuses a negative start as compacted
        elif kr.is_empty:
            error = "mvcc: watcher range is empty"
        elif wid != 0 and (wid in self.watchers or wid in self._compacted_ids):
            error = "mvcc: duplicate watch ID provided on the WatchStream"
        if error:
            # etcd answers a create it refuses with its InvalidWatchID (-1), whatever id
            # the client asked for.
            self.control.append(
                self._response(current, watch_id=PROGRESS_ALL, created=True, canceled=True, cancel_reason=error)
            )
            return
        if wid == 0:
            while self._next_id in self.watchers or self._next_id in self._compacted_ids:
                self._next_id += 1
            wid = self._next_id
            self._next_id += 1
        start = c.start_revision if c.start_revision > 0 else current + 1
        w = self.watchers[wid] = Watcher(
            id=wid,
            kr=kr,
            stream=self,
            next_rev=start,
            start_rev=max(c.start_revision, 0),
            prev_kv=c.prev_kv,
            no_put=NOPUT in c.filters,
            no_delete=NODELETE in c.filters,
            fragment=c.fragment,
            progress_notify=c.progress_notify,
        )
        self.control.append(self._response(current, watch_id=wid, created=True))
        if not self._detached:
            # etcd's watchableStore.watch: synced unless it starts at or below the current revision
            if start <= current:
                self._lag(w)
            else:
                self.hub.synced.add(w, kr)
                w.synced = True

    def cancel(self, wid: int) -> None:
        w = self.watchers.pop(wid, None)
        if w is not None:
            self._forget(w)
            self.control.append(self._response(self.hub.revision, watch_id=wid, canceled=True))
        elif wid in self._compacted_ids:  # etcd's Cancel of a compacted watcher succeeds
            self._compacted_ids.discard(wid)
            self.control.append(self._response(self.hub.revision, watch_id=wid, canceled=True))

    def tick_progress(self) -> None:
        """The periodic progress notification for idle, synced watchers that asked for it."""
        for w in self.watchers.values():
            if w.progress_notify:
                if not w.sent_since_tick and self._synced(w):
                    self.control.append(self._response(self.hub.revision, watch_id=w.id))
                w.sent_since_tick = False
        self.wake()

    def _synced(self, w: Watcher) -> bool:
        """Every event up to the current revision sent (in the hub's synced group). Like
        etcd's progressIfSync, a watcher whose requested start revision is still in the
        future does not count as synced: no progress below a watch's start revision is
        ever reported."""
        return w.synced and not w.queued and self.hub.revision >= w.start_rev

    # -- responses ------------------------------------------------------------------

    async def responses(self) -> AsyncIterator[pb.WatchResponse | bytes]:
        """The stream's responses, in order. Responses carrying events come already
        encoded (bytes), the others as messages. Only a stream the hub woke looks at
        its watchers, and then only at those with something to send."""
        while True:
            self._parked = True
            try:
                await self._wake.wait()
            finally:
                self._parked = False
            self._wake.clear()
            while True:
                while self.control:
                    yield self._pop_control()
                w = self._pick()
                if w is None:
                    break
                async for resp in self._pump(w):
                    yield resp
                    while self.control:
                        yield self._pop_control()
            if self._progress_requested and all(self._synced(w) for w in self.watchers.values()):
                self._progress_requested = False
                self.hub.progress_waiters.discard(self)
                if self.watchers:
                    yield self._response(self.hub.revision, watch_id=PROGRESS_ALL)
            if self._closed and not self.control:
                return

    def _pop_control(self) -> pb.WatchResponse:
        resp = self.control.popleft()
        if len(self.control) < CONTROL_BUFFER:
            self._control_room.set()
        return resp

    async def _pump(self, w: Watcher) -> AsyncIterator[pb.WatchResponse | bytes]:
        """Responses carrying one batch of this watcher's events from ``w.next_rev`` on
        (its share, or read from the ring or the log); each revision's events stay
        together. Then it is synced or ready again (see :meth:`_settle`)."""
        hub = self.hub
        share, w.share = w.share, None
        if share is COMPACTED:
            if self.watchers.get(w.id) is w:
                yield self._compacted(w)
            return
        if share is not None:
            changes, covered = share
        elif w.next_rev > hub.revision:
            self._settle(w)
            return
        elif w.next_rev < hub.compact_revision:
            # etcd cancels a watcher whose next revision was compacted away, whether
            # or not the events are still at hand (here: in the ring).
            yield self._compacted(w)
            return
        elif w.next_rev < hub.ring_start:
            if w.synced:
                self._left_behind(w)
            try:
                changes, covered = await self._read_log(w)
            except CompactedError:
                if self.watchers.get(w.id) is w:
                    yield self._compacted(w)
                return
            except BackendUnavailable:
                # The database is away: the watcher waits (its stream stays open)
                # and catches up from the log once the database is back.
                await asyncio.sleep(DB_RETRY_SECONDS)
                self._settle(w)
                return
        else:
            changes = []
            covered = w.next_rev - 1
            size = 0
            for rev, chs, _ in hub.from_ring(w.next_rev):
                if len(changes) >= MAX_EVENTS_PER_RESPONSE or size >= BATCH_BYTES:
                    break
                wanted = w.wanted(chs)
                if wanted:
                    changes += wanted
                    size += sum(change_bytes(ch) for ch in wanted)
                covered = rev
        if self.watchers.get(w.id) is not w:
            return  # canceled meanwhile
        w.next_rev = covered + 1
        if changes:
            for r in self._event_responses(w, covered, changes):
                # A cancel read while this batch was being sent has been answered
                # (the canceled response goes out between two of these): nothing
                # more for this watcher, as from etcd (found by the fuzzer).
                if self.watchers.get(w.id) is not w:
                    return
                yield r
            del changes
        self._settle(w)

    async def _read_log(self, w: Watcher) -> tuple[list[LogRow], int]:
        """``w``'s next changes from the log, read once for a group: the lagging
        watchers that need the same revision next, up to MAX_WATCHERS_PER_SYNC, this
        stream's and those of streams that hold nothing now (etcd's syncWatchers reads
        once for its unsynced group, then newWatcherBatch splits the events). The
        others get their part as a share and are woken; a watcher whose part is empty
        just moves on. Without groups each watcher read alone: 2,000 watchers on 20
        streams catching up over 20,000 changes on SQLite made 3,000 reads (9.7 s CPU),
        now 73 (1.2 s); 10,000 on 100 streams 15,000, now 912 -- a stream busy sending
        takes no share, so under load a group is mostly one stream's watchers.

        The read is the union of the group's ranges, sized like a lone watcher's (by
        ``w.db_limit``, adapted to BATCH_BYTES), so a stream's share is at most one
        batch. Raises CompactedError (the other members are canceled too) and
        BackendUnavailable (they go back to ready)."""
        hub = self.hub
        rev = w.next_rev
        members = cast(
            list[Watcher],
            hub.unsynced.take(
                rev, MAX_WATCHERS_PER_SYNC - 1, lambda m: m.stream is self or cast(WatchStream, m.stream).accepting
            ),
        )
        for m in members:
            m.stream._ready.pop(m, None)  # claimed
        handed = False
        try:
            ranges = union([w.kr, *(m.kr for m in members)])
            try:
                rows, covered = await hub.log.changes(rev, hub.ring_start - 1, ranges, w.db_limit)
            except CompactedError as e:
                # Another frontend's compaction may not have reached this one's
                # follower yet: the cancels carry the database's compaction point
                # (CI: a watch starting at 1297 was cancelled "at 728", the point
                # known before, when the log had been compacted at 1327).
                hub.revisions.observe(0, e.compact_revision)
                handed = True
                for m in members:
                    st = m.stream
                    if not st._detached and st.watchers.get(m.id) is m:
                        m.share = COMPACTED  # holds nothing: any stream takes it
                        st._shared[m] = None
                        st.wake()
                raise
            handed = True
            if rows:
                # the next read: as many rows as fit BATCH_BYTES at this read's size
                size = sum(change_bytes(ch) for ch in rows)
                w.db_limit = max(1, min(DB_READ_LIMIT, len(rows) * BATCH_BYTES // size))
            parts = split(rows, [w, *members]) if members else {w: w.wanted(rows)}
            del rows
            taking: dict[WatchStream, bool] = {}
            for m in members:
                st = m.stream
                if st._detached or st.watchers.get(m.id) is not m:
                    continue  # canceled meanwhile
                m.db_limit = w.db_limit
                mine = parts.get(m)
                if not mine:
                    m.next_rev = covered + 1
                    st._settle(m)
                elif taking.setdefault(st, st is self or st.accepting):
                    m.share = (mine, covered)
                    st._shared[m] = None
                else:
                    st._settle(m)  # its stream is busy now: it reads again later
                st.wake()
            return parts.get(w, []), covered
        finally:
            if not handed:  # unavailable, or this stream is ending: the others read later
                for m in members:
                    m.stream._settle(m)
                    m.stream.wake()

    def _event_responses(self, w: Watcher, covered: int, changes: list[LogRow]) -> Iterator[pb.WatchResponse | bytes]:
        """Responses carrying ``changes`` (up to revision ``covered``) to ``w``, at most
        about MAX_EVENTS_PER_RESPONSE events each; a revision's events stay together.
        Each is built when asked for, so only the one being sent is held."""
        hub = self.hub
        # etcd reads prev_kv at the event's revision - 1 when it sends the event: at or
        # below the compaction point that read fails and prev_kv is left out.
        compacted = hub.compact_revision
        w.sent_since_tick = True
        published = hub.published
        i = 0
        while i < len(changes):
            j = min(i + MAX_EVENTS_PER_RESPONSE, len(changes))
            while j < len(changes) and changes[j].rev == changes[j - 1].rev:
                j += 1
            batch = changes[i:j]
            i = j
            at = published(batch[0].rev)
            if at is not None:  # (older revisions, read from the log, are not timed)
                WATCH_DELIVERY_SECONDS.observe(monotonic() - at)
            if w.fragment:
                resp = self._response(covered, watch_id=w.id)
                resp.events.extend(hub.event(ch, w.prev_kv and ch.rev > compacted) for ch in batch)
                yield from self._fragments(resp)
            else:
                # header, watch_id, events: the fields in order, as a message would encode
                events = [hub.encoded_event(ch, w.prev_kv and ch.rev > compacted) for ch in batch]
                yield b"".join([self._header_field(covered), w.encoded_id, *events])

    def _fragments(self, resp: pb.WatchResponse) -> list[pb.WatchResponse]:
        """etcd's sendFragments: split a response over max-request-bytes into parts."""
        limit = self.max_request_bytes
        if resp.ByteSize() < limit or len(resp.events) < 2:
            return [resp]
        parts: list[pb.WatchResponse] = []
        events = list(resp.events)
        idx = 0
        while idx < len(events):
            cur = pb.WatchResponse()
            cur.CopyFrom(resp)
            del cur.events[:]
            cur.fragment = True
            while idx < len(events):
                cur.events.append(events[idx])
                if len(cur.events) > 1 and cur.ByteSize() >= limit:
                    del cur.events[-1]
                    break
                idx += 1
            if idx == len(events):
                cur.fragment = False
            parts.append(cur)
        return parts
