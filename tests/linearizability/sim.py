"""Simulated histories for the checker's self-test: a sequential etcd (the ``model``)
serving concurrent clients, each request taking effect at one instant inside its
interval, with leases that expire by a clock, compaction, requests whose answer is
lost (applied or not), and watch streams that deliver every revision as etcd does.

Every history ``simulate`` returns is linearizable and keeps every watch guarantee by
construction, so the checker must accept it; the self-test then breaks one property
at a time and expects the checker to name it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .checker import leases_used
from .history import (
    COMPACTED,
    KV,
    LEASE_NOT_FOUND,
    Compact,
    Compare,
    Delete,
    Empty,
    Event,
    History,
    KeepAliveResp,
    LeaseGrant,
    LeaseGrantResp,
    LeaseKeepAlive,
    LeaseRevoke,
    Op,
    Put,
    Range,
    RangeResp,
    Request,
    Txn,
    TxnOp,
    WatchCreate,
    WatchResp,
    WatchStream,
)
from .model import State, apply, in_range, range_read, revocation

KEYS = [b"k/%d" % i for i in range(6)]


@dataclass
class _Lease:
    ttl: int
    deadline: float
    alive: bool = True


@dataclass
class _World:
    rng: random.Random
    t: float = 0.0
    rev: int = 1
    compacted: int = 0
    state: dict[bytes, KV] = field(default_factory=dict)
    states: dict[int, State] = field(default_factory=lambda: {1: {}})
    events: dict[int, tuple[Event, ...]] = field(default_factory=dict)
    times: dict[int, float] = field(default_factory=lambda: {1: 0.0})
    leases: dict[int, _Lease] = field(default_factory=dict)
    next_lease: int = 0x100

    def commit(self, events: tuple[Event, ...]) -> None:
        self.rev += 1
        for e in events:
            if e.type == "put":
                self.state[e.kv.key] = e.kv
            else:
                self.state.pop(e.kv.key, None)
        self.states[self.rev] = dict(self.state)
        self.events[self.rev] = events
        self.times[self.rev] = self.t

    def expire(self) -> None:
        for lid, lease in self.leases.items():
            if lease.alive and lease.deadline < self.t:
                lease.alive = False
                dels = revocation(self.state, lid, self.rev + 1)
                if dels:
                    self.commit(dels)


def simulate(seed: int, n_ops: int = 400, clients: int = 4, unknown_rate: float = 0.05) -> History:
    rng = random.Random(seed)
    w = _World(rng)
    hist = History()
    busy = [0.0] * clients
    for i in range(n_ops):
        w.t += rng.expovariate(1 / 0.01)
        w.expire()
        free = [c for c in range(clients) if busy[c] < w.t]
        if not free:
            continue
        c = rng.choice(free)
        inv = rng.uniform(max(busy[c], w.t - 0.02), w.t)
        req = _request(w, i)
        op = Op(id=i, client=f"c{c}", req=req, inv=inv)
        unknown = isinstance(req, Put | Delete | Txn) and rng.random() < unknown_rate
        if unknown and rng.random() < 0.5:
            busy[c] = w.t + 0.01  # lost before it reached the server: no effect
        else:
            _serve(w, op)
            busy[c] = op.ret = w.t + rng.uniform(0.0005, 0.02)
        if unknown:
            op.status, op.ret, op.resp, op.revision, op.error = "unknown", None, None, 0, "UNAVAILABLE: simulated"
            busy[c] = w.t + 0.02
        hist.ops.append(op)
    # let every lease run out, then read the end state
    w.t += max((lease.ttl for lease in w.leases.values()), default=0) + 1
    w.expire()
    final = Op(id=n_ops, client="final", req=Range(b"\0", b"\0"), inv=w.t)
    _serve(w, final)
    final.ret = w.t + 0.001
    hist.ops.append(final)
    hist.final_revision = w.rev
    hist.final_leases = frozenset(lid for lid, lease in w.leases.items() if lease.alive)
    hist.streams = _streams(w, rng)
    return hist


def _request(w: _World, i: int) -> Request:
    rng = w.rng
    live = [lid for lid, lease in w.leases.items() if lease.alive]
    any_lease = list(w.leases)
    roll = rng.random()
    key = rng.choice(KEYS)
    if roll < 0.22:
        lease = rng.choice(any_lease) if any_lease and rng.random() < 0.3 else 0
        return Put(key, b"s%d" % i, lease, prev_kv=rng.random() < 0.5)
    if roll < 0.30:
        if rng.random() < 0.5:
            return Delete(key, prev_kv=rng.random() < 0.5)
        a, b = sorted(rng.sample(range(len(KEYS) + 1), 2))
        return Delete(b"k/%d" % a, b"k/%d" % b, prev_kv=rng.random() < 0.5)
    if roll < 0.52:
        return _txn(w, i)
    if roll < 0.78:
        revision = 0
        if rng.random() < 0.3 and w.rev > 1:
            revision = rng.randint(max(1, w.rev - 30), w.rev)
        if rng.random() < 0.5:
            return Range(key, revision=revision)
        return Range(b"k/", b"k0", revision=revision, limit=rng.choice([0, 0, 2]), serializable=rng.random() < 0.1)
    if roll < 0.84:
        return LeaseGrant(rng.choice([2, 3]))
    if roll < 0.92 and any_lease:
        return LeaseKeepAlive(rng.choice(live) if live and rng.random() < 0.8 else rng.choice(any_lease))
    if roll < 0.96 and any_lease:
        return LeaseRevoke(rng.choice(live) if live else rng.choice(any_lease))
    return Compact(max(1, w.rev - rng.randint(0, 40)))


def _txn(w: _World, i: int) -> Txn:
    rng = w.rng
    compares = []
    for key in rng.sample(KEYS, rng.randint(1, 2)):
        kv = w.state.get(key)
        target = rng.choice(["value", "version", "create", "mod", "lease"])
        current: bytes | int = {
            "value": kv.value if kv else b"",
            "version": kv.version if kv else 0,
            "create": kv.create if kv else 0,
            "mod": kv.mod if kv else 0,
            "lease": kv.lease if kv else 0,
        }[target]
        if rng.random() < 0.4:
            current = current + b"x" if isinstance(current, bytes) else current + rng.choice([-1, 1])
        compares.append(Compare(key, target, rng.choice(["=", "=", "!=", "<", ">"]), current))  # type: ignore[arg-type]

    def branch(n: int, tag: str) -> tuple[TxnOp, ...]:
        ops: list[TxnOp] = []
        for j, key in enumerate(rng.sample(KEYS, n)):
            kind = rng.random()
            if kind < 0.55:
                ops.append(Put(key, b"s%d.%s%d" % (i, tag.encode(), j), prev_kv=rng.random() < 0.5))
            elif kind < 0.8:
                ops.append(Delete(key, prev_kv=rng.random() < 0.5))
            else:
                ops.append(Range(b"k/", b"k0"))
        return tuple(ops)

    return Txn(tuple(compares), branch(rng.randint(1, 3), "s"), branch(rng.randint(0, 2), "f"))


def _serve(w: _World, op: Op) -> None:
    """``op`` takes effect now: its response, header revision, or definite error."""
    req = op.req
    op.status = "ok"
    if isinstance(req, Put | Delete | Txn):
        if any(not w.leases[lid].alive for lid in leases_used(req)):
            op.status, op.error = "error", LEASE_NOT_FOUND
            return
        eff = apply(w.state, w.rev + 1, req)
        if eff.events:
            w.commit(eff.events)
        op.resp, op.revision = eff.resp, w.rev
    elif isinstance(req, Range):
        if req.revision and req.revision < w.compacted:
            op.status, op.error = "error", COMPACTED
            return
        op.resp, op.revision = range_read(w.states[req.revision or w.rev], req), w.rev
    elif isinstance(req, LeaseGrant):
        w.leases[w.next_lease] = _Lease(req.ttl, w.t + req.ttl)
        op.resp, op.revision = LeaseGrantResp(w.next_lease, req.ttl), w.rev
        w.next_lease += 1
    elif isinstance(req, LeaseKeepAlive):
        lease = w.leases[req.lease]
        if lease.alive:
            lease.deadline = w.t + lease.ttl
        op.resp, op.revision = KeepAliveResp(lease.ttl if lease.alive else 0), w.rev
    elif isinstance(req, LeaseRevoke):
        lease = w.leases[req.lease]
        if not lease.alive:
            op.status, op.error = "error", LEASE_NOT_FOUND
            return
        lease.alive = False
        dels = revocation(w.state, req.lease, w.rev + 1)
        if dels:
            w.commit(dels)
        op.resp, op.revision = Empty(), w.rev
    elif isinstance(req, Compact):
        if req.revision <= w.compacted:
            op.status, op.error = "error", COMPACTED
            return
        w.compacted = req.revision
        op.resp, op.revision = Empty(), w.rev


def _streams(w: _World, rng: random.Random) -> list[WatchStream]:
    """A reference watch of everything, one of everything with prev_kv that batches
    revisions and reports progress, and one of a range created mid-run."""
    mid = w.rev // 2
    specs = [
        ("ref", WatchCreate(b"\0", b"\0", 1, prev_kv=True), True, 1),
        ("all", WatchCreate(b"\0", b"\0", 1, prev_kv=True, progress_notify=True), False, 1),
        ("part", WatchCreate(b"k/1", b"k/4", 0), False, mid),
    ]
    out = []
    for name, create, ref, created_at in specs:
        s = WatchStream(id=name, endpoint="sim", creates=[create], reference=ref, chain=name)
        t = w.times[created_at]
        s.responses.append(WatchResp(t, 0, created_at, created=True))
        start = create.start_revision or created_at + 1
        pending: list[Event] = []
        for r in range(start, w.rev + 1):
            evs = tuple(
                e if create.prev_kv else Event(e.type, e.kv)
                for e in w.events.get(r, ())
                if in_range(e.kv.key, create.key, create.end)
            )
            pending.extend(evs)
            t = max(t, w.times[r]) + 0.0001
            if pending and (ref or rng.random() < 0.5 or r == w.rev):
                s.responses.append(WatchResp(t, 0, r, tuple(pending)))
                pending = []
            if not ref and not pending and rng.random() < 0.1:
                s.responses.append(WatchResp(t, rng.choice([0, -1]), r))
        if pending:
            s.responses.append(WatchResp(t, 0, w.rev, tuple(pending)))
        out.append(s)
    return out


def range_resp(state: State, key: bytes) -> RangeResp:
    return range_read(state, Range(key))
