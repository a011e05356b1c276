"""A randomized concurrent workload against real servers, recorded as a ``History``.

Clients are threads with their own gRPC channels to every endpoint, sending one request
at a time with a deadline, over a small key space so that txns conflict often. Every
value written is unique (``c<client>.<op>``), which lets the checker tell requests
apart. Leases are granted with 2-3 s TTLs; some are kept alive, some revoked, the rest
left to expire. A compactor compacts behind the reference watches. Reference watches
(one per endpoint, of every key, with prev_kv) resume after a fault from the revision
after the last one they had; test watches come and go with random ranges, starts and
progress requests.

Timing is taken around each call with ``time.monotonic()`` in this one process: a
request's interval [inv, ret] contains its effect, which is all the checker assumes.
"""

from __future__ import annotations

import itertools
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc

from .history import (
    COMPACTED,
    FUTURE,
    KV,
    LEASE_NOT_FOUND,
    Compact,
    Compare,
    Delete,
    DeleteResp,
    Empty,
    Event,
    History,
    KeepAliveResp,
    LeaseGrant,
    LeaseGrantResp,
    LeaseKeepAlive,
    LeaseRevoke,
    Op,
    OpResp,
    Put,
    PutResp,
    Range,
    RangeResp,
    Request,
    Response,
    Txn,
    TxnOp,
    TxnResp,
    WatchCreate,
    WatchResp,
    WatchStream,
)

KEYS = [b"k/%d" % i for i in range(8)]
LEASED_KEYS = [b"l/%d" % i for i in range(4)]
DEADLINE = 1.5  # seconds per request: a stopped server turns into an unknown outcome this fast
CHANNEL_OPTIONS = [
    # a restarted server is found again within half a second, not after gRPC's default backoff
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.enable_retries", 0),
    ("grpc.use_local_subchannel_pool", 1),
]
# Unknown outcomes with these codes are what a fault looks like; anything else is noted.
FAULT_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"}


def channel(endpoint: str) -> grpc.Channel:
    return grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS)


# --- conversions ---------------------------------------------------------------------------


def kv_of(m: Any) -> KV:
    return KV(m.key, m.value, m.create_revision, m.mod_revision, m.version, m.lease)


_TARGET = {"value": pb.Compare.VALUE, "version": pb.Compare.VERSION, "create": pb.Compare.CREATE,
           "mod": pb.Compare.MOD, "lease": pb.Compare.LEASE}  # fmt: skip
_RESULT = {"=": pb.Compare.EQUAL, "!=": pb.Compare.NOT_EQUAL, "<": pb.Compare.LESS, ">": pb.Compare.GREATER}
_FIELD = {"value": "value", "version": "version", "create": "create_revision", "mod": "mod_revision", "lease": "lease"}


def request_op(op: TxnOp) -> pb.RequestOp:
    if isinstance(op, Put):
        return pb.RequestOp(request_put=pb.PutRequest(key=op.key, value=op.value, lease=op.lease, prev_kv=op.prev_kv))
    if isinstance(op, Delete):
        return pb.RequestOp(
            request_delete_range=pb.DeleteRangeRequest(key=op.key, range_end=op.end, prev_kv=op.prev_kv)
        )
    return pb.RequestOp(request_range=range_request(op))


def range_request(r: Range) -> pb.RangeRequest:
    return pb.RangeRequest(
        key=r.key,
        range_end=r.end,
        revision=r.revision,
        limit=r.limit,
        count_only=r.count_only,
        serializable=r.serializable,
    )


def txn_request(t: Txn) -> pb.TxnRequest:
    compares = [
        pb.Compare(key=c.key, target=_TARGET[c.target], result=_RESULT[c.result], **{_FIELD[c.target]: c.operand})
        for c in t.compares
    ]
    return pb.TxnRequest(
        compare=compares, success=[request_op(o) for o in t.success], failure=[request_op(o) for o in t.failure]
    )


def op_response(m: Any) -> OpResp:
    which = m.WhichOneof("response")
    r = getattr(m, which)
    if which == "response_put":
        return PutResp(kv_of(r.prev_kv) if r.HasField("prev_kv") else None)
    if which == "response_delete_range":
        return DeleteResp(r.deleted, tuple(kv_of(x) for x in r.prev_kvs))
    return RangeResp(tuple(kv_of(x) for x in r.kvs), r.count, r.more)


def event_of(e: Any) -> Event:
    return Event(
        "put" if e.type == e.PUT else "delete", kv_of(e.kv), kv_of(e.prev_kv) if e.HasField("prev_kv") else None
    )


def watch_resp(t: float, m: Any) -> WatchResp:
    return WatchResp(
        t,
        m.watch_id,
        m.header.revision,
        tuple(event_of(e) for e in m.events),
        m.created,
        m.canceled,
        m.compact_revision,
        m.cancel_reason,
    )


def classify(e: grpc.RpcError) -> tuple[str, str]:
    """An error's meaning: ("error", kind) when etcd's message says the request had no
    effect, else ("unknown", "CODE: details")."""
    details = e.details() or ""
    if "required revision has been compacted" in details:
        return "error", COMPACTED
    if "required revision is a future revision" in details:
        return "error", FUTURE
    if "requested lease not found" in details:
        return "error", LEASE_NOT_FOUND
    return "unknown", f"{e.code().name}: {details}"


# --- the recorder --------------------------------------------------------------------------


@dataclass
class Recorder:
    history: History = field(default_factory=History)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ids: Iterator[int] = field(default_factory=itertools.count)
    highest: int = 1  # the highest revision any response carried (for choosing historical reads)

    def next_id(self) -> int:
        with self.lock:
            return next(self.ids)

    def call(self, client: str, endpoint: str, req: Request, send: Callable[[], Any], op_id: int | None = None) -> Op:
        """Send one request and record it (``send`` makes the gRPC call)."""
        op = Op(id=self.next_id() if op_id is None else op_id, client=client, req=req, inv=0.0, endpoint=endpoint)
        op.inv = time.monotonic()
        try:
            m = send()
            op.ret = time.monotonic()
        except grpc.RpcError as e:
            t = time.monotonic()
            op.status, op.error = classify(e)
            if op.status == "error":
                op.ret = t
        else:
            op.status, op.resp, op.revision = "ok", response(req, m), m.header.revision
            with self.lock:
                self.highest = max(self.highest, op.revision)
        with self.lock:
            self.history.ops.append(op)
        return op

    def stream(self, s: WatchStream) -> None:
        with self.lock:
            self.history.streams.append(s)


def response(req: Request, m: Any) -> Response:
    if isinstance(req, Put):
        return PutResp(kv_of(m.prev_kv) if m.HasField("prev_kv") else None)
    if isinstance(req, Delete):
        return DeleteResp(m.deleted, tuple(kv_of(x) for x in m.prev_kvs))
    if isinstance(req, Range):
        return RangeResp(tuple(kv_of(x) for x in m.kvs), m.count, m.more)
    if isinstance(req, Txn):
        return TxnResp(m.succeeded, tuple(op_response(r) for r in m.responses))
    if isinstance(req, LeaseGrant):
        return LeaseGrantResp(m.ID, m.TTL)
    if isinstance(req, LeaseKeepAlive):
        return KeepAliveResp(m.TTL)
    return Empty()


class Stubs:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.channel = channel(endpoint)
        self.kv = rpc_pb2_grpc.KVStub(self.channel)
        self.lease = rpc_pb2_grpc.LeaseStub(self.channel)
        self.watch = rpc_pb2_grpc.WatchStub(self.channel)

    def send(self, req: Request) -> Callable[[], Any]:
        kv, lease = self.kv, self.lease
        if isinstance(req, Put):
            msg = pb.PutRequest(key=req.key, value=req.value, lease=req.lease, prev_kv=req.prev_kv)
            return lambda: kv.Put(msg, timeout=DEADLINE)
        if isinstance(req, Delete):
            dmsg = pb.DeleteRangeRequest(key=req.key, range_end=req.end, prev_kv=req.prev_kv)
            return lambda: kv.DeleteRange(dmsg, timeout=DEADLINE)
        if isinstance(req, Range):
            rmsg = range_request(req)
            return lambda: kv.Range(rmsg, timeout=DEADLINE)
        if isinstance(req, Txn):
            tmsg = txn_request(req)
            return lambda: kv.Txn(tmsg, timeout=DEADLINE)
        if isinstance(req, LeaseGrant):
            return lambda: lease.LeaseGrant(pb.LeaseGrantRequest(TTL=req.ttl, ID=req.id), timeout=DEADLINE)
        if isinstance(req, LeaseRevoke):
            return lambda: lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=req.lease), timeout=DEADLINE)
        if isinstance(req, LeaseKeepAlive):
            return lambda: _keepalive_once(lease, req.lease)
        assert isinstance(req, Compact)
        return lambda: kv.Compact(pb.CompactionRequest(revision=req.revision), timeout=DEADLINE)

    def close(self) -> None:
        self.channel.close()


def _keepalive_once(lease: rpc_pb2_grpc.LeaseStub, lid: int) -> Any:
    """One keepalive on a stream of its own: the request, its one answer."""
    call = lease.LeaseKeepAlive(iter([pb.LeaseKeepAliveRequest(ID=lid)]), timeout=DEADLINE)
    try:
        for m in call:
            return m
        raise _NoAnswer()
    finally:
        call.cancel()


class _NoAnswer(grpc.RpcError):
    """The keepalive stream ended with status OK but no answer (the server went away)."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "keepalive stream ended without an answer"


# --- the workload --------------------------------------------------------------------------


@dataclass
class Workload:
    endpoints: list[str]
    seed: int
    clients: int = 6
    test_watchers: int = 2
    rec: Recorder = field(default_factory=Recorder)
    stop: threading.Event = field(default_factory=threading.Event)
    leases: list[int] = field(default_factory=list)  # granted, newest last (clients attach keys to recent ones)
    refs: list[ReferenceWatch] = field(default_factory=list)
    testers: list[TestWatch] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    lease_stop: threading.Event = field(default_factory=threading.Event)
    closing: threading.Event = field(default_factory=threading.Event)  # the run is over: threads end

    def start(self) -> None:
        self.refs = [ReferenceWatch(self, f"ref{i}", i) for i in range(len(self.endpoints))]
        self.testers = [
            TestWatch(self, f"tw{i}", random.Random(self.seed * 100 + 50 + i)) for i in range(self.test_watchers)
        ]
        runs: list[Callable[[], None]] = [r.run for r in self.refs] + [t.run for t in self.testers]
        runs += [lambda n=n: self._client(n) for n in range(self.clients)]  # type: ignore[misc]
        runs += [self._leases, self._compactor]
        for fn in runs:
            t = threading.Thread(target=fn, daemon=True)
            t.start()
            self.threads.append(t)

    # clients

    def _client(self, n: int) -> None:
        rng = random.Random(self.seed * 100 + n)
        stubs = [Stubs(ep) for ep in self.endpoints]
        at = n % len(stubs)
        try:
            while not self.stop.is_set():
                op_id = self.rec.next_id()
                req = self._request(rng, n, op_id)
                op = self.rec.call(f"c{n}", stubs[at].endpoint, req, stubs[at].send(req), op_id)
                if op.status == "unknown":
                    at = (at + 1) % len(stubs)  # try the next frontend, after a breath
                    self.stop.wait(0.05)
        finally:
            for s in stubs:
                s.close()

    def _request(self, rng: random.Random, n: int, op_id: int) -> Request:
        key = rng.choice(KEYS)
        value = b"c%d.%d" % (n, op_id)
        roll = rng.random()
        if roll < 0.25:
            if self.leases and rng.random() < 0.3:
                # leased keys of their own, so that some are still attached when their lease expires
                return Put(rng.choice(LEASED_KEYS), value, rng.choice(self.leases[-6:]), prev_kv=rng.random() < 0.3)
            lease = rng.choice(self.leases[-6:]) if self.leases and rng.random() < 0.1 else 0
            return Put(key, value, lease, prev_kv=rng.random() < 0.3)
        if roll < 0.33:
            if rng.random() < 0.7:
                return Delete(key, prev_kv=rng.random() < 0.5)
            a, b = sorted(rng.sample(range(len(KEYS) + 1), 2))
            return Delete(b"k/%d" % a, b"k/%d" % b, prev_kv=rng.random() < 0.5)
        if roll < 0.60:
            return self._txn(rng, value)
        highest = self.rec.highest
        revision = 0
        if rng.random() < 0.12:
            revision = rng.randint(max(1, highest - 200), highest)
        elif rng.random() < 0.02:
            revision = highest + 1000
        serializable = rng.random() < 0.1
        x = rng.random()
        if x < 0.45:
            return Range(key, revision=revision, serializable=serializable)
        if x < 0.55:
            return Range(b"l/", b"l0", revision=revision, serializable=serializable)
        return Range(b"k/", b"k0", revision=revision, limit=rng.choice([0, 0, 3]), serializable=serializable)

    def _txn(self, rng: random.Random, value: bytes) -> Txn:
        compares = []
        for key in rng.sample(KEYS, rng.randint(1, 2)):
            target = rng.choice(["value", "version", "create", "mod", "lease"])
            result = rng.choice(["=", "=", "!=", "<", ">"])
            highest = self.rec.highest
            operand: bytes | int
            if target == "value":
                operand = b"c%d" % rng.randint(0, self.clients)  # a prefix: < and > split the clients
            elif target == "version":
                operand = rng.randint(0, 3)
            elif target == "lease":
                operand = rng.choice([0, *self.leases[-3:]])
            else:
                operand = rng.choice([0, max(0, highest - rng.randint(0, 20))])
            compares.append(Compare(key, target, result, operand))  # type: ignore[arg-type]

        def branch(k: int, tag: bytes) -> tuple[TxnOp, ...]:
            ops: list[TxnOp] = []
            for j, key in enumerate(rng.sample(KEYS, k)):  # distinct keys: etcd refuses duplicates
                x = rng.random()
                if x < 0.55:
                    lease = rng.choice(self.leases[-6:]) if self.leases and rng.random() < 0.15 else 0
                    ops.append(Put(key, value + b".%s%d" % (tag, j), lease, prev_kv=rng.random() < 0.4))
                elif x < 0.8:
                    ops.append(Delete(key, prev_kv=rng.random() < 0.4))
                else:
                    ops.append(Range(b"k/", b"k0", limit=rng.choice([0, 2])))
            return tuple(ops)

        return Txn(tuple(compares), branch(rng.randint(1, 3), b"s"), branch(rng.randint(0, 2), b"f"))

    # leases: granted, then kept alive for a while, revoked, or left to expire

    def _leases(self) -> None:
        rng = random.Random(self.seed * 100 + 99)
        stubs = [Stubs(ep) for ep in self.endpoints]
        plans: dict[int, tuple[str, float]] = {}  # lease -> (fate, until)
        kept: dict[int, float] = {}  # lease -> when it was last kept alive
        next_grant = 0.0
        try:
            while not self.lease_stop.is_set():
                now = time.monotonic()
                s = rng.choice(stubs)
                if now >= next_grant:
                    next_grant = now + 0.4
                    req = LeaseGrant(rng.choice([2, 3]))
                    op = self.rec.call("lease", s.endpoint, req, s.send(req))
                    if op.status == "ok":
                        assert isinstance(op.resp, LeaseGrantResp)
                        fate = rng.choice(["expire", "expire", "keep", "revoke"])
                        plans[op.resp.id] = (fate, now + (rng.uniform(2, 5) if fate == "keep" else rng.uniform(0.5, 2)))
                        kept[op.resp.id] = now
                        self.leases.append(op.resp.id)
                for lid, (fate, until) in list(plans.items()):
                    if fate == "keep" and now < until and now - kept[lid] > 0.6:
                        kept[lid] = now
                        ka = LeaseKeepAlive(lid)
                        self.rec.call("lease", s.endpoint, ka, s.send(ka))
                    elif fate == "revoke" and now >= until:
                        rv = LeaseRevoke(lid)
                        self.rec.call("lease", s.endpoint, rv, s.send(rv))
                        del plans[lid]
                    elif now >= until + 10:
                        del plans[lid]
                self.lease_stop.wait(0.1)
        finally:
            for s in stubs:
                s.close()

    def _compactor(self) -> None:
        """Compacts a little behind the slowest reference watch, so a reference watch can
        always resume where it was (the check needs every revision)."""
        rng = random.Random(self.seed * 100 + 98)
        stubs = [Stubs(ep) for ep in self.endpoints]
        done = 1
        try:
            while not self.stop.wait(1.0):
                target = min(r.position for r in self.refs) - 20
                if target > done:
                    s = rng.choice(stubs)
                    op = self.rec.call("compactor", s.endpoint, Compact(target), s.send(Compact(target)))
                    if op.status != "unknown":
                        done = target
        finally:
            for s in stubs:
                s.close()

    # the end of a run

    def finish(self, timeout: float = 30.0) -> list[str]:
        """Stop the clients, let every lease run out, read the final revision and wait
        for the watches to reach it. Returns what did not finish in time."""
        problems: list[str] = []
        self.stop.set()
        self.lease_stop.set()
        stubs = Stubs(self.endpoints[0])
        try:
            deadline = time.monotonic() + timeout
            ours = set(self.leases)
            while True:
                # Leases expire by time: there is no event to wait for, so look until every
                # lease of ours is gone and no key is left attached to a gone lease (k8s-sql
                # stops listing a lease at its deadline, before its expirer deletes its keys).
                late = time.monotonic() > deadline
                try:
                    live = {x.ID for x in stubs.lease.LeaseLeases(pb.LeaseLeasesRequest(), timeout=5).leases}
                except grpc.RpcError:
                    live = ours
                if live & ours and not late:
                    time.sleep(0.2)
                    continue
                final = Range(b"\0", b"\0")
                op = self.rec.call("final", stubs.endpoint, final, stubs.send(final))
                if op.status != "ok":
                    if late:
                        problems.append(f"the final read failed: {op.error}")
                        return problems
                    continue
                assert isinstance(op.resp, RangeResp)
                orphans = {kv.lease for kv in op.resp.kvs if kv.lease} - live
                if orphans and not late:
                    time.sleep(0.2)
                    continue
                break
            if live & ours:
                problems.append(f"leases {sorted(live & ours)} had not expired after {timeout}s")
            if orphans:
                problems.append(f"keys are attached to leases {sorted(orphans)} that LeaseLeases no longer lists")
            self.rec.history.final_revision = op.revision
            self.rec.history.final_leases = frozenset(live)
            for r in self.refs:
                if not r.reach(op.revision, deadline - time.monotonic()):
                    problems.append(f"reference watch {r.name} stopped at {r.position}, short of {op.revision}")
            for t in self.testers:
                t.finish(op.revision, deadline - time.monotonic())
        finally:
            self.closing.set()
            stubs.close()
            for r in self.refs:
                r.close()
            for th in self.threads:
                th.join(10)
        return problems


class _Requests:
    """A Watch request stream fed from a queue; ``close`` ends it."""

    def __init__(self) -> None:
        self.q: queue.Queue[pb.WatchRequest] = queue.Queue()
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[pb.WatchRequest]:
        while not self.closed.is_set():
            try:
                yield self.q.get(timeout=0.2)
            except queue.Empty:
                continue

    def put(self, r: pb.WatchRequest) -> None:
        self.q.put(r)


def create_request(c: WatchCreate) -> pb.WatchRequest:
    return pb.WatchRequest(
        create_request=pb.WatchCreateRequest(
            key=c.key, range_end=c.end, start_revision=c.start_revision, prev_kv=c.prev_kv,
            progress_notify=c.progress_notify,
        )
    )  # fmt: skip


class ReferenceWatch:
    """A watch of every key with prev_kv from the start of the store, resumed on the
    next endpoint from the revision after its position whenever its stream breaks."""

    def __init__(self, w: Workload, name: str, home: int) -> None:
        self.w, self.name, self.home = w, name, home
        self.position = w.rec.history.initial_revision  # every revision up to here was delivered
        self.cond = threading.Condition()
        self.target: int | None = None
        self.closing = threading.Event()
        self.call: Any = None

    def run(self) -> None:
        for k in itertools.count():
            if self.closing.is_set():
                return
            ep = self.w.endpoints[(self.home + k) % len(self.w.endpoints)]
            stream = WatchStream(id=f"{self.name}.{k}", endpoint=ep, chain=self.name, reference=True)
            create = WatchCreate(b"\0", b"\0", self.position + 1, prev_kv=True, progress_notify=True)
            stream.creates.append(create)
            self.w.rec.stream(stream)
            reqs = _Requests()
            reqs.put(create_request(create))
            ch = channel(ep)
            try:
                self.call = rpc_pb2_grpc.WatchStub(ch).Watch(iter(reqs))
                for m in self.call:
                    resp = watch_resp(time.monotonic(), m)
                    stream.responses.append(resp)
                    if resp.canceled:
                        stream.end = f"cancelled: {resp.cancel_reason} (compact {resp.compact_revision})"
                        break
                    pos = max([e.kv.mod for e in resp.events], default=resp.header_revision if resp.is_progress else 0)
                    with self.cond:
                        if pos > self.position:
                            self.position = pos
                            self.cond.notify_all()
            except grpc.RpcError as e:
                stream.end = f"{e.code().name}: {e.details()}"
            finally:
                reqs.closed.set()
                ch.close()
            self.closing.wait(0.1)

    def reach(self, revision: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.position >= revision, max(0.0, timeout))

    def close(self) -> None:
        self.closing.set()
        if self.call is not None:
            self.call.cancel()


class TestWatch:
    """Streams of one or two watches with random ranges, start revisions (some compacted),
    prev_kv and progress requests, each living a second or three."""

    __test__ = False  # not a pytest class

    def __init__(self, w: Workload, name: str, rng: random.Random) -> None:
        self.w, self.name, self.rng = w, name, rng
        self.final: int | None = None
        self.final_seen = threading.Event()
        self.final_deadline = 0.0

    def run(self) -> None:
        rng = self.rng
        for k in itertools.count():
            if self.w.closing.is_set():
                return
            if self.w.stop.is_set() and self.final is None:
                self.w.closing.wait(0.05)
                continue
            ep = rng.choice(self.w.endpoints)
            stream = WatchStream(id=f"{self.name}.{k}", endpoint=ep)
            for _ in range(rng.choice([1, 1, 2])):
                stream.creates.append(self._create(rng))
            self.w.rec.stream(stream)
            reqs = _Requests()
            for c in stream.creates:
                reqs.put(create_request(c))
            ch = channel(ep)
            ends_at = time.monotonic() + rng.uniform(1, 3)
            final = self.final is not None
            call = rpc_pb2_grpc.WatchStub(ch).Watch(iter(reqs))
            poke = threading.Thread(target=self._poke, args=(reqs, call, ends_at, final), daemon=True)
            poke.start()
            try:
                for m in call:
                    resp = watch_resp(time.monotonic(), m)
                    stream.responses.append(resp)
                    if final and resp.watch_id == -1 and resp.is_progress and resp.header_revision >= self.final:  # type: ignore[operator]
                        self.final_seen.set()
                        call.cancel()
            except grpc.RpcError as e:
                stream.end = f"{e.code().name}: {e.details()}"
            finally:
                reqs.closed.set()
                poke.join()
                ch.close()
            if final:
                return
            if stream.end and not stream.end.startswith("CANCELLED"):
                self.w.closing.wait(0.1)  # the server is away: do not spin

    def _create(self, rng: random.Random) -> WatchCreate:
        kind = rng.random()
        key, end = (rng.choice(KEYS), b"") if kind < 0.4 else ((b"k/2", b"k/5") if kind < 0.7 else (b"\0", b"\0"))
        highest = self.w.rec.highest
        x = rng.random()
        if self.final is not None:
            # behind the end, but not behind compaction (which stays 20 behind the reference watches)
            start = max(2, self.final - 15)
        else:
            start = 0 if x < 0.5 else (max(2, highest - rng.randint(0, 40)) if x < 0.9 else 2)
        return WatchCreate(key, end, start, prev_kv=rng.random() < 0.6, progress_notify=rng.random() < 0.5)

    def _poke(self, reqs: _Requests, call: Any, ends_at: float, final: bool) -> None:
        """Progress requests now and then; the end of the stream when its time is up
        (for the final stream: when a progress at the final revision came, or never)."""
        while not reqs.closed.is_set():
            if final:
                if self.final_seen.is_set() or time.monotonic() > self.final_deadline:
                    call.cancel()
                    return
                reqs.put(pb.WatchRequest(progress_request=pb.WatchProgressRequest()))
                self.final_seen.wait(0.3)
                continue
            if time.monotonic() > ends_at or (self.w.stop.is_set() and self.final is not None):
                call.cancel()
                return
            if self.rng.random() < 0.3:
                reqs.put(pb.WatchRequest(progress_request=pb.WatchProgressRequest()))
            reqs.closed.wait(0.2)

    def finish(self, revision: int, timeout: float) -> None:
        """One last stream that must report progress at ``revision`` (so everything its
        watches were owed up to there is checked as delivered)."""
        self.final_deadline = time.monotonic() + max(1.0, timeout)
        self.final = revision
        self.final_seen.wait(max(1.0, timeout))


def summarize_errors(history: History) -> Counter[str]:
    """Errors by code (definite ones by kind), and unexpected ones with their details."""
    out: Counter[str] = Counter()
    for op in history.ops:
        if op.status != "ok":
            code = op.error.split(":")[0]
            out[code if code in FAULT_CODES or code.islower() else op.error[:200]] += 1
    return out
