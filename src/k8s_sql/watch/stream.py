"""One client Watch stream: many watchers, server-assigned ids, ordered delivery.

Responses are produced on demand by the gRPC response generator, so a slow client
slows only its own stream: its watchers fall behind the hub's ring and then catch
up from the database log, never losing or duplicating an event.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from k8s_sql import errors
from k8s_sql.backend.base import DELETE, BackendUnavailable, CompactedError, KeyRange, LogRow
from k8s_sql.pb import rpc_pb2 as pb
from k8s_sql.watch.hub import Hub, change_bytes

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
# catch up from the log, as etcd moves a slow watcher to its unsynced group.
BATCH_BYTES = 4 << 20
DB_READ_LIMIT = 2000  # rows of one log read, at most; fewer when the rows are large
DB_FIRST_READ = 100  # rows of a watcher's first log read, before their size is known
DB_RETRY_SECONDS = 0.5
# Control responses (created, canceled, progress) a stream queues before it stops
# reading the client's requests until the client reads (etcd's ctrlStreamBufLen).
CONTROL_BUFFER = 16


@dataclass(eq=False)
class Watcher:
    id: int
    kr: KeyRange
    next_rev: int  # the first revision not yet delivered
    start_rev: int  # the start revision the client asked for; 0 = from now
    prev_kv: bool
    no_put: bool
    no_delete: bool
    fragment: bool
    progress_notify: bool
    sent_since_tick: bool = False
    encoded_id: bytes = b""  # the watch_id field, encoded (see Hub.encoded_event)
    db_limit: int = DB_FIRST_READ  # rows of the next log read, adapted to BATCH_BYTES

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


def _touches(kr: KeyRange, sorted_keys: list[bytes]) -> bool:
    """Whether one of the (sorted) keys is in the range."""
    i = bisect.bisect_left(sorted_keys, kr.key)
    if i == len(sorted_keys):
        return False
    if kr.end is None:
        return sorted_keys[i] == kr.key
    return kr.end == b"" or sorted_keys[i] < kr.end


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

    def _header_field(self, revision: int) -> bytes:
        """The header field of a response at ``revision``, encoded (see Hub.encoded_event)."""
        if self._encoded_header[0] != revision:
            self.header.revision = revision
            self._encoded_header = (revision, pb.WatchResponse(header=self.header).SerializeToString())
        return self._encoded_header[1]

    def wake(self) -> None:
        self._wake.set()

    def notify(self, first: int, revision: int, keys: list[bytes]) -> None:
        """A commit was published. Wake the stream only if a watcher may want one of its
        changes; move the others past it here, without waking. With a thousand watchers
        over a hundred prefixes, waking every stream and looking at every watcher on
        every commit cost more than delivering the events."""
        wake = bool(self.control) or self._progress_requested or self._closed
        for w in self.watchers.values():
            if w.next_rev > revision:
                continue  # up to date, or starting later
            if w.next_rev < first or _touches(w.kr, keys):
                wake = True  # behind, or (maybe) wants one of these changes
            else:
                w.next_rev = revision + 1
        if wake:
            self.wake()

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
        if c.start_revision < 0:
            error = errors.Compacted.message  # etcd's v3rpc refuses a negative start as compacted
        elif kr.is_empty:
            error = "mvcc: watcher range is empty"
        elif wid != 0 and wid in self.watchers:
            error = "mvcc: duplicate watch ID provided on the WatchStream"
        if error:
            # etcd answers a create it refuses with its InvalidWatchID (-1), whatever id
            # the client asked for.
            self.control.append(
                self._response(current, watch_id=PROGRESS_ALL, created=True, canceled=True, cancel_reason=error)
            )
            return
        if wid == 0:
            while self._next_id in self.watchers:
                self._next_id += 1
            wid = self._next_id
            self._next_id += 1
        start = c.start_revision if c.start_revision > 0 else current + 1
        self.watchers[wid] = Watcher(
            id=wid,
            kr=kr,
            next_rev=start,
            start_rev=max(c.start_revision, 0),
            prev_kv=c.prev_kv,
            no_put=NOPUT in c.filters,
            no_delete=NODELETE in c.filters,
            fragment=c.fragment,
            progress_notify=c.progress_notify,
        )
        self.control.append(self._response(current, watch_id=wid, created=True))

    def cancel(self, wid: int) -> None:
        if self.watchers.pop(wid, None) is not None:
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
        """Every event up to the current revision sent. Like etcd's progressIfSync, a
        watcher whose requested start revision is still in the future does not count as
        synced: no progress below a watch's start revision is ever reported."""
        return w.next_rev > self.hub.revision and self.hub.revision >= w.start_rev

    # -- responses ------------------------------------------------------------------

    async def responses(self) -> AsyncIterator[pb.WatchResponse | bytes]:
        """The stream's responses, in order. Responses carrying events come already
        encoded (bytes), the others as messages."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                while self.control:
                    yield self._pop_control()
                progressed = False
                for w in list(self.watchers.values()):
                    if w.next_rev > self.hub.revision or self.watchers.get(w.id) is not w:
                        continue  # nothing new for it (the common case: no generator)
                    async for resp in self._pump(w):
                        progressed = True
                        yield resp
                        while self.control:
                            yield self._pop_control()
                if not progressed and not self.control:
                    break
            if self._progress_requested and all(self._synced(w) for w in self.watchers.values()):
                self._progress_requested = False
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
        """Responses carrying this watcher's events from ``w.next_rev`` up to the hub's
        current revision, a batch at a time; each revision's events stay together."""
        hub = self.hub
        while w.next_rev <= hub.revision and self.watchers.get(w.id) is w:
            if w.next_rev < hub.compact_revision():
                # etcd cancels a watcher whose next revision was compacted away, whether
                # or not the events are still at hand (here: in the ring).
                self.watchers.pop(w.id, None)
                resp = self._response(0, watch_id=w.id, canceled=True)
                resp.compact_revision = hub.compact_revision()
                yield resp
                return
            if w.next_rev < hub.ring_start:
                end = hub.ring_start - 1
                try:
                    rows, covered = await hub.backend.changes(w.next_rev, end, [w.kr], w.db_limit)
                except CompactedError:
                    self.watchers.pop(w.id, None)
                    resp = self._response(0, watch_id=w.id, canceled=True)
                    resp.compact_revision = hub.compact_revision()
                    yield resp
                    return
                except BackendUnavailable:
                    # The database is away: the watcher waits (its stream stays open)
                    # and catches up from the log once the database is back.
                    await asyncio.sleep(DB_RETRY_SECONDS)
                    continue
                if rows:
                    # the next read: as many rows as fit BATCH_BYTES at this read's size
                    size = sum(change_bytes(ch) for ch in rows)
                    w.db_limit = max(1, min(DB_READ_LIMIT, len(rows) * BATCH_BYTES // size))
                changes = [ch for ch in rows if w.wants(ch)]
                del rows
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

    def _event_responses(self, w: Watcher, covered: int, changes: list[LogRow]) -> Iterator[pb.WatchResponse | bytes]:
        """Responses carrying ``changes`` (up to revision ``covered``) to ``w``, at most
        about MAX_EVENTS_PER_RESPONSE events each; a revision's events stay together.
        Each is built when asked for, so only the one being sent is held."""
        hub = self.hub
        # etcd reads prev_kv at the event's revision - 1 when it sends the event: at or
        # below the compaction point that read fails and prev_kv is left out.
        compacted = hub.compact_revision()
        w.sent_since_tick = True
        i = 0
        while i < len(changes):
            j = min(i + MAX_EVENTS_PER_RESPONSE, len(changes))
            while j < len(changes) and changes[j].rev == changes[j - 1].rev:
                j += 1
            batch = changes[i:j]
            i = j
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
