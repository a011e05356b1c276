"""Sending fuzzed requests to a server with raw gRPC and checking what must hold.

Every call goes through ``grpc.aio`` generic calls with identity serializers, so any
bytes can be sent. Per answer the oracle judges the status code and message; per
run the server must keep these invariants (checked during the run and after it):

- the process is alive and answers Status within ``STATUS_DEADLINE``;
- the sentinel keys written before the run (which no fuzzed write may reach, see
  ``safety``) still have their values, create/mod revisions and versions;
- the revision never goes backwards: a response's header revision is at least the
  highest revision seen in any response received before the call started;
- every acknowledged write has its own revision, and replaying the history from the
  compaction floor with a watch gives a gap-free sequence of revisions that contains
  every acknowledged write and turns the state at the floor into the state now;
- watch events arrive in revision order per watcher, never twice, only for keys in
  the watcher's range and types its filters let through;
- the server's RSS at the end is within ``rss_bound`` of its RSS after the warm-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import Message

from k8s_sql.pb import rpc_pb2 as pb

from . import generate as g, mutate, oracle, safety, values as v
from .generate import METHODS, Hints, Method, Request

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * v.MiB),
    ("grpc.max_send_message_length", 64 * v.MiB),
]
CALL_DEADLINE = 20.0  # far beyond any honest answer on a loaded 2-core CI machine
SLOW_CALL_DEADLINE = 60.0  # Defragment, Snapshot, MiB-sized payloads
STATUS_DEADLINE = 5.0
N_SENTINELS = 8
PROGRESS_ALL = -1
PROBE_ID = 0x7E57_0000
PROBE = pb.WatchRequest(
    create_request=pb.WatchCreateRequest(key=v.SENTINEL_PREFIX + b"probe", watch_id=PROBE_ID)
).SerializeToString()
PROGRESS = pb.WatchRequest(progress_request=pb.WatchProgressRequest()).SerializeToString()
PROGRESS_RETRY = 0.1  # seconds between progress requests, which etcd drops while a watcher replays


def cancel_frame(watch_id: int) -> bytes:
    return pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=watch_id)).SerializeToString()


def rss_kib(pid: int) -> int:
    """VmRSS of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclass
class Answer:
    code: str
    details: str
    responses: list[bytes] = field(default_factory=list)


@dataclass
class Violation:
    method: str
    label: str
    code: str
    details: str
    reason: str
    frames: list[bytes]

    def line(self) -> str:
        shown = " ".join(
            (f[:96].hex() + (f"...({len(f)} bytes, sha1 {hashlib.sha1(f).hexdigest()[:12]})" if len(f) > 96 else ""))
            for f in self.frames
        )
        return f"{self.method} [{self.label}] -> {self.code} {self.details[:200]!r}: {self.reason}; frames: {shown}"


@dataclass
class Said:
    """One request and its answer, kept by sequential runs for the etcd comparison."""

    label: str  # "Method [origin]"
    code: str
    details: str
    client_end: str
    wellformed: bool
    frames: str  # the request's first bytes, hex

    @property
    def method(self) -> str:
        return self.label.split(" ", 1)[0]

    @property
    def origin(self) -> str:
        return self.label.split("[", 1)[1].split(":", 1)[0].rstrip("]")


@dataclass
class Results:
    """What a run found: the status-code table, the violations of the oracle and of
    the invariants, and counts."""

    table: Counter[tuple[str, str]] = field(default_factory=Counter)
    origins: Counter[tuple[str, str]] = field(default_factory=Counter)
    violations: list[Violation] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)  # invariants
    calls: int = 0
    frames: int = 0
    seconds: float = 0.0
    rss_warm_kib: int = 0
    rss_end_kib: int = 0
    rss_samples_mib: list[int] = field(default_factory=list)  # at each checkpoint, to show a trend
    budget_used: dict[str, int] = field(default_factory=dict)
    answers: list[Said] = field(default_factory=list)  # sequential runs: every answer, in order

    def add_violation(self, x: Violation) -> None:
        if len(self.violations) < 5000:  # a dead server fails every call: keep the report bounded
            self.violations.append(x)


def _decodes(m: Method, frames: list[bytes]) -> bool:
    return all(safety.decode(m, f) is not None for f in frames)


class Fuzzer:
    """One fuzz run against one server. ``sequential`` sends one request at a time
    from one RNG (the etcd comparison needs both servers to see the same requests in
    the same order); otherwise ``concurrency`` workers share the request budget."""

    def __init__(
        self,
        endpoint: str,
        *,
        seed: int,
        requests: int,
        concurrency: int = 8,
        pid: int | None = None,
        sequential: bool = False,
        checkpoints: int = 5,
    ) -> None:
        self.endpoint = endpoint
        self.seed = seed
        self.total = requests
        self.concurrency = 1 if sequential else concurrency
        self.pid = pid
        self.sequential = sequential
        self.checkpoints = checkpoints
        self.hints = Hints(sequential=sequential)
        self.budget = v.Budget(requests)
        self.results = Results()
        self.max_rev = 0
        self.sent = 0  # requests started (a stream's frames count one each)
        self.sentinels: dict[bytes, tuple[bytes, int, int, int]] = {}
        self.acked: dict[int, str] = {}  # revision of an acknowledged write -> the RPC that made it
        self.put_keys: dict[int, bytes] = {}  # revision -> sha1 of the key a Put wrote
        self._callables: dict[str, Any] = {}
        self._next_checkpoint = 0
        self._checking: asyncio.Task[None] | None = None
        self.channel: grpc.aio.Channel | None = None

    # -- plumbing ---------------------------------------------------------------------------

    def _callable(self, m: Method) -> Any:
        c = self._callables.get(m.path)
        if c is None:
            assert self.channel is not None
            make = {
                "unary": self.channel.unary_unary,
                "server-stream": self.channel.unary_stream,
                "bidi": self.channel.stream_stream,
            }[m.kind]
            c = make(m.path, request_serializer=None, response_deserializer=None)
            self._callables[m.path] = c
        return c

    async def _unary(self, name: str, msg: Message, timeout: float = CALL_DEADLINE) -> Any:
        """A typed call used by the checks (not fuzz): raises on any error."""
        m = METHODS[name]
        raw = await self._callable(m)(msg.SerializeToString(), timeout=timeout)
        return m.response.FromString(raw)

    # -- setup ------------------------------------------------------------------------------

    async def open(self) -> None:
        self.channel = grpc.aio.insecure_channel(self.endpoint, options=CHANNEL_OPTIONS)
        status = await self._unary("Status", pb.StatusRequest(), STATUS_DEADLINE)
        self.hints.member_id = status.header.member_id
        # sentinels: one written once, the rest twice (so each has history, the second
        # value holding every byte), and the first updated again after the floor below
        for i in range(N_SENTINELS):
            key = v.SENTINEL_PREFIX + b"%02d" % i
            await self._unary("Put", pb.PutRequest(key=key, value=b"first"))
            if i:
                await self._unary("Put", pb.PutRequest(key=key, value=bytes(range(256)) + b"%d" % i))
        floor_resp = await self._unary("Range", pb.RangeRequest(key=v.SENTINEL_PREFIX))
        self.hints.floor = floor_resp.header.revision
        await self._unary("Put", pb.PutRequest(key=v.SENTINEL_PREFIX + b"00", value=b"after the floor"))
        got = await self._unary("Range", pb.RangeRequest(key=v.SENTINEL_PREFIX, range_end=v.SENTINEL_END))
        assert len(got.kvs) == N_SENTINELS, got
        self.sentinels = {kv.key: (kv.value, kv.create_revision, kv.mod_revision, kv.version) for kv in got.kvs}
        self.max_rev = self.hints.revision = got.header.revision

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    # -- requests ---------------------------------------------------------------------------

    def make_request(self, rng: random.Random) -> Request:
        """A request: well-formed (55%), a mutation of a well-formed one (35%), or
        garbage (10%); writes that could reach the sentinels are drawn again."""
        names = list(METHODS)
        weights = [g.weight(n) for n in names]
        for _ in range(20):
            name = rng.choices(names, weights)[0]
            if name in ("Defragment", "Snapshot") and not self.budget.take(name.lower()):
                continue
            m = METHODS[name]
            req = g.well_formed(m, rng, self.hints, self.budget)
            r = rng.random()
            if r < 0.35:
                i = rng.randrange(len(req.frames))
                if len(req.frames[i]) <= 64 * 1024:
                    data, how = mutate.mutate(req.frames[i], rng)
                    req.frames[i] = data
                    req.label = f"mut:{how}"
                    req.wellformed = False
            elif r < 0.45:
                data, how = mutate.garbage(rng)
                if m.kind == "bidi" and rng.random() < 0.5:
                    req.frames.insert(rng.randrange(len(req.frames) + 1), data)
                else:
                    req.frames = [data]
                req.label = f"garbage:{how}"
                req.wellformed = False
            if not all(safety.frame_safe(m, f, self.hints) for f in req.frames):
                continue
            if (
                self.sequential
                and not req.wellformed
                and name in safety.STATEFUL
                and not all(safety.same_to_every_decoder(m, f) for f in req.frames)
            ):
                continue
            cut, how = rng.random() < 0.03, rng.choice(["deadline", "cancel"])
            # a write cut short may or may not apply: two servers compared could then differ
            if cut and m.kind == "unary" and not (self.sequential and name in safety.STATEFUL):
                req.client_end = how
            return req
        return Request(METHODS["Status"], [b""], "fallback")

    async def send(self, req: Request) -> Answer:
        m = req.method
        big = sum(len(f) for f in req.frames) > v.MiB or m.name in ("Defragment", "Snapshot")
        timeout = SLOW_CALL_DEADLINE if big else CALL_DEADLINE
        if req.client_end == "deadline":
            timeout = 0.001
        try:
            if m.kind == "unary":
                call = self._callable(m)(req.frames[0], timeout=timeout)
                if req.client_end == "cancel":
                    await asyncio.sleep(0)
                    call.cancel()
                try:
                    return Answer("OK", "", [await call])
                except asyncio.CancelledError:
                    if req.client_end != "cancel":
                        raise
                    return Answer("CANCELLED", "cancelled by the client")
            if m.kind == "server-stream":
                out = [r async for r in self._callable(m)(req.frames[0], timeout=timeout)]
                return Answer("OK", "", out)
            if m.name == "Watch":
                return await self._watch(req, timeout)
            return await self._keepalive(req, timeout)
        except grpc.aio.AioRpcError as e:
            return Answer(e.code().name, e.details() or "")

    async def _keepalive(self, req: Request, timeout: float) -> Answer:
        call = self._callable(req.method)(timeout=timeout)
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            for f in req.frames:
                await call.write(f)
            await call.done_writing()
        out = [r async for r in call]
        return Answer("OK", "", out)

    async def _watch(self, req: Request, timeout: float) -> Answer:
        """Send the frames, then a probe watcher's create (so the stream has a watcher:
        etcd answers a progress request on a stream without watchers with nothing).
        Creates are answered in order, so the probe's answer comes after every other.
        Then the watchers that would hold back etcd's progress reply are cancelled:
        those starting in the future, and those the server cancelled itself (etcd
        keeps a compacted watcher until the client cancels it). Then ask for progress
        until the reply comes (``until_progress``); it ends the exchange and the
        client cancels. A watch that never gets there is a hang."""
        call = self._callable(req.method)(timeout=timeout)
        decoded = [safety.decode(req.method, f) for f in req.frames]
        creates = [
            m.create_request for m in decoded if m is not None and m.WhichOneof("request_union") == "create_request"
        ]
        # when the server decodes frames Python cannot, answers cannot be matched to creates
        matchable = all(m is not None for m in decoded)
        with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.AioRpcError):
            for f in req.frames:
                await call.write(f)
            await call.write(PROBE)
        live: dict[int, int] = {}  # watch id -> start revision (-1: unknown)
        answered = 0
        cancelling: set[int] = set()
        probed = False

        async def cancel(watch_id: int) -> None:
            cancelling.add(watch_id)
            with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.AioRpcError):
                await call.write(cancel_frame(watch_id))

        async def on_response(resp: pb.WatchResponse) -> bool:
            nonlocal answered, probed
            if resp.created and resp.watch_id == PROBE_ID and not resp.canceled:
                probed = True
                for watch_id, start in list(live.items()):
                    if start < 0 or start > resp.header.revision:
                        await cancel(watch_id)
            elif resp.created:
                start = creates[answered].start_revision if matchable and answered < len(creates) else -1
                answered += 1
                if not resp.canceled:
                    live[resp.watch_id] = start
            elif resp.canceled:
                live.pop(resp.watch_id, None)
                if resp.watch_id in cancelling:
                    cancelling.discard(resp.watch_id)
                else:  # cancelled by the server: release it as etcd's client does
                    with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.AioRpcError):
                        await call.write(cancel_frame(resp.watch_id))
            return probed and not cancelling

        return await until_progress(call, on_response)

    # -- judging ----------------------------------------------------------------------------

    def judge(self, req: Request, ans: Answer, rev_floor: int) -> None:
        m = req.method
        res = self.results
        res.table[(m.label, ans.code)] += 1
        res.origins[(req.label.split(":")[0], ans.code)] += 1
        if self.sequential:
            shown = " ".join(f[:48].hex() + ("..." if len(f) > 48 else "") for f in req.frames)
            said = Said(f"{m.name} [{req.label}]", ans.code, ans.details, req.client_end, req.wellformed, shown)
            res.answers.append(said)
        decodes = _decodes(m, req.frames)
        why = oracle.violation(req, ans.code, ans.details, decodes)
        if why is None and ans.code == "OK":
            why = self._check_ok(req, ans, rev_floor)
        if why is not None:
            res.add_violation(Violation(m.label, req.label, ans.code, ans.details, why, req.frames))

    def _check_ok(self, req: Request, ans: Answer, rev_floor: int) -> str | None:
        m = req.method
        try:
            resps = [m.response.FromString(r) for r in ans.responses]
        except Exception as e:
            if "MaxDepth" in str(e):
                return None  # a txn nested ~50 deep answers as deep: past this client's decoder
            return f"undecodable response: {e}"
        if m.name == "Watch":
            return self._check_watch(req, resps)
        if m.name == "LeaseKeepAlive":
            sent = [safety.decode(m, f) for f in req.frames]
            if None in sent:
                return None
            if resps and len(resps) != len(sent):
                return f"{len(resps)} keepalive answers to {len(sent)} requests"
            if [r.ID for r in resps] != [s.ID for s in sent[: len(resps)] if s is not None]:
                return "keepalive answers for other leases than asked"
            return None
        for r in resps:
            header = r.range_response.header if m.name == "RangeStream" else getattr(r, "header", None)
            if header is None or header.revision == 0:
                continue
            if header.revision < rev_floor:
                return f"revision went backwards: {header.revision} < {rev_floor}"
            self.max_rev = max(self.max_rev, header.revision)
            self.hints.revision = max(self.hints.revision, header.revision)
        if m.kind != "unary" or not resps:
            return None
        (r,) = resps
        msg = safety.decode(m, req.frames[0])
        rev = r.header.revision
        wrote = False
        if m.name == "Put":
            wrote = True
            if msg is not None:
                self.put_keys[rev] = hashlib.sha1(msg.key).digest()
        elif m.name == "DeleteRange":
            wrote = r.deleted > 0
        elif m.name == "Txn":
            wrote = _txn_wrote(r)
        elif m.name == "LeaseGrant" and r.ID:
            self.hints.add_lease(r.ID)
        if wrote:
            if rev in self.acked:
                return f"two acknowledged writes got revision {rev}"
            self.acked[rev] = m.name
        return None

    def _check_watch(self, req: Request, resps: list[pb.WatchResponse]) -> str | None:
        """Events per watcher: in revision order, never twice, in range, after the
        start, of the types the filters let through, none after a cancellation.
        Skipped when a frame does not decode here (a peer with another decoder, etcd,
        may have read it as something else)."""
        if not _decodes(req.method, req.frames):
            return None
        creates = [
            msg.create_request
            for f in req.frames
            if (msg := safety.decode(req.method, f)) is not None and msg.WhichOneof("request_union") == "create_request"
        ]
        creates.append(pb.WatchRequest.FromString(PROBE).create_request)
        cancelled: set[int] = set()
        watchers: dict[int, pb.WatchCreateRequest] = {}
        last: dict[int, int] = {}
        seen: set[tuple[int, int, bytes, int]] = set()
        created = 0
        for r in resps:
            if r.created:
                if created < len(creates) and not r.canceled:
                    watchers[r.watch_id] = creates[created]
                    # an id canceled earlier may be taken again by a new watcher
                    cancelled.discard(r.watch_id)
                    last.pop(r.watch_id, None)
                    seen = {x for x in seen if x[0] != r.watch_id}
                created += 1
                continue
            if r.canceled:
                cancelled.add(r.watch_id)
            for ev in r.events:
                c = watchers.get(r.watch_id)
                if r.watch_id in cancelled:
                    return f"events for watch id {r.watch_id} after its cancellation"
                if c is None:
                    return f"events for watch id {r.watch_id}, which was not created on this stream"
                rev = ev.kv.mod_revision
                if rev < last.get(r.watch_id, 0):
                    return f"watch {r.watch_id}: revision {rev} after {last[r.watch_id]}"
                last[r.watch_id] = rev
                ident = (r.watch_id, rev, ev.kv.key, ev.type)
                if ident in seen:
                    return f"watch {r.watch_id}: event at {rev} delivered twice"
                seen.add(ident)
                if not _in_watch_range(ev.kv.key, c.key, c.range_end):
                    return f"watch {r.watch_id}: event for a key outside its range"
                if c.start_revision > 0 and rev < c.start_revision:
                    return f"watch {r.watch_id}: event at {rev} before its start revision {c.start_revision}"
                if (ev.type == 0 and 0 in c.filters) or (ev.type == 1 and 1 in c.filters):
                    return f"watch {r.watch_id}: event of a filtered-out type"
        if created > len(creates):
            return f"{created} created replies to {len(creates)} create requests"
        return None

    # -- running ----------------------------------------------------------------------------

    async def _worker(self, wid: int) -> None:
        rng = random.Random(f"{self.seed}:{wid}")
        while self.sent < self.total:
            req = self.make_request(rng)
            self.sent += max(1, len(req.frames))
            floor = self.max_rev
            ans = await self.send(req)
            self.results.calls += 1
            self.results.frames += len(req.frames)
            self.judge(req, ans, floor)
            if req.method.name == "Alarm":
                await self.disarm()
            elif req.method.name == "Downgrade" and self.sequential:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await self._unary("Downgrade", pb.DowngradeRequest(action=pb.DowngradeRequest.CANCEL))
            if self.sent >= self._next_checkpoint and (self._checking is None or self._checking.done()):
                self._next_checkpoint = self.sent + max(1, self.total // self.checkpoints)
                self._checking = asyncio.create_task(self.check_alive_and_sentinels())
                if self.pid:
                    self.results.rss_samples_mib.append(rss_kib(self.pid) // 1024)
            if self.pid and not self.results.rss_warm_kib and self.sent >= self.total // 10:
                self.results.rss_warm_kib = rss_kib(self.pid)

    async def run(self) -> Results:
        await self.open()
        self._next_checkpoint = max(1, self.total // self.checkpoints)
        start = time.monotonic()
        await asyncio.gather(*(self._worker(i) for i in range(self.concurrency)))
        self.results.seconds = time.monotonic() - start
        if self._checking is not None:
            await self._checking
        await self.disarm()
        await self.check_alive_and_sentinels()
        await self.check_history()
        if self.pid:
            self.results.rss_end_kib = rss_kib(self.pid)
        self.results.budget_used = dict(self.budget.used)
        return self.results

    # -- invariants -------------------------------------------------------------------------

    async def disarm(self) -> None:
        """Deactivate every alarm (an ACTIVATE the fuzzer sent raises one on etcd)."""
        listed = await self._unary("Alarm", pb.AlarmRequest(action=pb.AlarmRequest.GET))
        for a in listed.alarms:
            await self._unary(
                "Alarm", pb.AlarmRequest(action=pb.AlarmRequest.DEACTIVATE, memberID=a.memberID, alarm=a.alarm)
            )

    async def check_alive_and_sentinels(self) -> None:
        broken = self.results.broken
        try:
            await self._unary("Status", pb.StatusRequest(), STATUS_DEADLINE)
        except grpc.aio.AioRpcError as e:
            broken.append(f"Status did not answer within {STATUS_DEADLINE}s: {e.code().name} {e.details()}")
            return
        got = await self._unary("Range", pb.RangeRequest(key=v.SENTINEL_PREFIX, range_end=v.SENTINEL_END))
        now = {kv.key: (kv.value, kv.create_revision, kv.mod_revision, kv.version) for kv in got.kvs}
        if now != self.sentinels:
            changed = sorted(k for k in self.sentinels.keys() | now.keys() if self.sentinels.get(k) != now.get(k))
            broken.append(f"sentinels changed: {[(k, self.sentinels.get(k), now.get(k)) for k in changed]!r:.500}")

    async def check_history(self) -> None:
        """Replay everything after the floor with a watch: the revisions are gap-free,
        hold every acknowledged write, and turn the state at the floor into the state
        at the last revision."""
        broken = self.results.broken
        floor = self.hints.floor
        everything = dict(key=b"\0", range_end=b"\0")
        at_floor = await self._unary("Range", pb.RangeRequest(revision=floor, **everything), SLOW_CALL_DEADLINE)
        last = at_floor.header.revision
        now = await self._unary("Range", pb.RangeRequest(revision=last, **everything), SLOW_CALL_DEADLINE)
        state = {kv.key: kv for kv in at_floor.kvs}
        events_by_rev: dict[int, list[Any]] = defaultdict(list)
        call = self._callable(METHODS["Watch"])(timeout=SLOW_CALL_DEADLINE)
        await call.write(
            pb.WatchRequest(
                create_request=pb.WatchCreateRequest(start_revision=floor + 1, **everything)
            ).SerializeToString()
        )

        async def created(resp: pb.WatchResponse) -> bool:
            return resp.created

        ans = await until_progress(call, created)
        if ans.code != "OK":
            broken.append(f"the history watch failed: {ans.code} {ans.details}")
            return
        for raw in ans.responses:
            resp = pb.WatchResponse.FromString(raw)
            if resp.canceled:
                broken.append(f"the history watch was cancelled: {resp.cancel_reason}")
                return
            for ev in resp.events:
                if ev.kv.mod_revision <= last:
                    events_by_rev[ev.kv.mod_revision].append(ev)
        revs = sorted(events_by_rev)
        if revs != list(range(floor + 1, last + 1)):
            missing = sorted(set(range(floor + 1, last + 1)) - set(revs))
            broken.append(f"history after {floor} is not gap-free up to {last}: missing {missing[:20]}")
        lost = sorted(r for r in self.acked if floor < r <= last and r not in events_by_rev)
        if lost:
            broken.append(f"acknowledged writes missing from the history: revisions {lost[:20]}")
        wrong_key = sorted(
            rev
            for rev, key_hash in self.put_keys.items()
            if floor < rev <= last
            and rev in events_by_rev
            and key_hash not in {hashlib.sha1(e.kv.key).digest() for e in events_by_rev[rev]}
        )
        if wrong_key:
            broken.append(f"history events at acknowledged Puts' revisions lack the Put's key: {wrong_key[:20]}")
        for rev in revs:
            for ev in events_by_rev[rev]:
                if ev.type == 0:
                    state[ev.kv.key] = ev.kv
                else:
                    state.pop(ev.kv.key, None)
        want = {k: kv.SerializeToString() for k, kv in state.items()}
        got = {kv.key: kv.SerializeToString() for kv in now.kvs}
        if want != got:
            diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
            broken.append(f"replaying the history does not give the state at {last}: keys {diff[:10]!r:.400}")


async def until_progress(call: Any, ready: Callable[[pb.WatchResponse], Awaitable[bool]]) -> Answer:
    """Read a Watch stream until a stream-wide progress reply arrives after ``ready``
    first said yes, then cancel the call; or until the server ends the stream.
    ``ready`` sees every response (it may answer one with requests of its own).

    etcd 3.6 drops (does not defer) a progress request that arrives while any watcher
    of the stream is still replaying history or starts in the future
    (``watchableStore.progressIfSync``), and nothing in the protocol says when the
    replay is done; so once ready, the request is repeated every ``PROGRESS_RETRY``
    seconds until answered. The call's deadline bounds the wait: a watch that never
    catches up is reported as a hang.
    """
    queue: asyncio.Queue[bytes | grpc.aio.AioRpcError | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for raw in call:
                await queue.put(raw)
            await queue.put(None)
        except grpc.aio.AioRpcError as e:
            await queue.put(e)

    pumping = asyncio.create_task(pump())
    out: list[bytes] = []
    asked = False
    try:
        while True:
            if asked:
                try:
                    item = await asyncio.wait_for(queue.get(), PROGRESS_RETRY)
                except TimeoutError:
                    with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.AioRpcError):
                        await call.write(PROGRESS)
                    continue
            else:
                item = await queue.get()
            if item is None:
                code = await call.code()
                return Answer(code.name, await call.details() or "", out)
            if isinstance(item, grpc.aio.AioRpcError):
                return Answer(item.code().name, item.details() or "", out)
            out.append(item)
            resp = pb.WatchResponse.FromString(item)
            if asked and resp.watch_id == PROGRESS_ALL and not resp.events and not resp.created and not resp.canceled:
                return Answer("OK", "", out)
            if await ready(resp) and not asked:
                asked = True
                with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.AioRpcError):
                    await call.write(PROGRESS)
    finally:
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await pumping


def _txn_wrote(r: pb.TxnResponse) -> bool:
    for op in r.responses:
        kind = op.WhichOneof("response")
        if kind == "response_put":
            return True
        if kind == "response_delete_range" and op.response_delete_range.deleted > 0:
            return True
        if kind == "response_txn" and _txn_wrote(op.response_txn):
            return True
    return False


def _in_watch_range(key: bytes, start: bytes, end: bytes) -> bool:
    """etcd's watch range: an empty key means "\\0"; no end is one key, "\\0" every
    key from the start on."""
    start = start or b"\0"
    if not end:
        return key == start
    if end == b"\0":
        return key >= start
    return start <= key < end
