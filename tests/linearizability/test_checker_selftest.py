"""The checker's self-test (no servers): simulated histories that are linearizable and
keep every watch guarantee must pass, and each kind of breakage, introduced into one,
must be caught and named.

The simulations (``sim``) are valid by construction; each mutation below breaks one
property the way a faulty server would, and returns a fragment the violation's message
must contain, so the reason given points at the right operation or revision.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from linearizability.checker import check
from linearizability.history import (
    KV,
    LEASE_NOT_FOUND,
    Compact,
    Empty,
    Event,
    History,
    KeepAliveResp,
    LeaseGrantResp,
    LeaseKeepAlive,
    LeaseRevoke,
    Op,
    Put,
    Range,
    RangeResp,
    Txn,
    TxnResp,
    WatchResp,
    WatchStream,
)
from linearizability.model import State, apply_events, range_read
from linearizability.sim import simulate

SEEDS = range(40)


@pytest.mark.parametrize("seed", range(25))
def test_valid_histories_pass(seed: int) -> None:
    report = check(simulate(seed, n_ops=500))
    assert report.ok, report.summary()
    assert report.stats["revisions"] > 100


# --- helpers ---------------------------------------------------------------------------------


def _states(h: History) -> dict[int, State]:
    ref = next(s for s in h.streams if s.reference)
    states: dict[int, State] = {1: {}}
    for resp in ref.responses:
        for r in sorted({e.kv.mod for e in resp.events}):
            states[r], _ = apply_events(states[r - 1], r, tuple(e for e in resp.events if e.kv.mod == r))
    return states


def _stream(h: History, name: str) -> WatchStream:
    return next(s for s in h.streams if s.id == name)


def _acked(h: History, kind: type, pred: Callable[[Op], bool] = lambda op: True) -> list[Op]:
    return [op for op in h.ops if op.status == "ok" and isinstance(op.req, kind) and op.client != "final" and pred(op)]


def _put_revision(op: Op, h: History) -> bool:
    """An acknowledged put whose revision is its own (all puts are)."""
    return isinstance(op.req, Put)


def _append_revision(h: History, events: tuple[Event, ...]) -> int:
    """A new last revision in the reference watch (the store gained a change)."""
    r = h.final_revision + 1
    ref = next(s for s in h.streams if s.reference)
    ref.responses.append(WatchResp(ref.responses[-1].t + 0.001, 0, r, events))
    h.final_revision = r
    return r


# --- mutations: each returns the fragment the message must contain, or None if the
# --- history has no place for it (another seed is then tried) ---------------------------------


def stale_read(h: History) -> str | None:
    states = _states(h)
    writes = _acked(h, Put)
    for b in _acked(h, Range, lambda op: not op.req.revision and not op.req.serializable):
        before = [a for a in writes if a.ret < b.inv and a.revision > 2]
        if before:
            a = max(before, key=lambda a: a.revision)
            b.revision = a.revision - 1  # a consistent snapshot, but older than a write that returned first
            b.resp = range_read(states[b.revision], b.req)
            return f"op#{b.id}"
    return None


def lost_write(h: History) -> str | None:
    ops = _acked(h, Put, lambda op: not op.req.lease)
    if not ops:
        return None
    x = ops[len(ops) // 2]
    for s in h.streams:  # the store has another value at x's revision
        for i, resp in enumerate(s.responses):
            evs = tuple(
                dataclasses.replace(e, kv=dataclasses.replace(e.kv, value=b"other"))
                if e.type == "put" and e.kv.value == x.req.value
                else e
                for e in resp.events
            )
            s.responses[i] = dataclasses.replace(resp, events=evs)
    return f"op#{x.id}"


def duplicate_write(h: History) -> str | None:
    states = _states(h)
    ops = _acked(h, Put, lambda op: not op.req.lease)
    x = ops[-1]
    prev = states[h.final_revision].get(x.req.key)
    r = h.final_revision + 1
    kv = KV(x.req.key, x.req.value, prev.create if prev else r, r, prev.version + 1 if prev else 1)
    _append_revision(h, (Event("put", kv, prev),))
    return repr(x.req.value)


def wrong_txn_outcome(h: History) -> str | None:
    for op in _acked(h, Txn, lambda op: not op.resp.succeeded):
        if all(isinstance(r, RangeResp) for r in op.resp.responses):
            op.resp = TxnResp(True, op.resp.responses)
            return f"op#{op.id}"
    return None


def revision_backwards(h: History) -> str | None:
    puts = _acked(h, Put)
    a, b = puts[-5], puts[5]  # a made a later revision than b ...
    a.inv, a.ret = b.inv - 0.002, b.inv - 0.001  # ... but returned before b was invoked
    return f"op#{b.id}"


def watch_gap(h: History) -> str | None:
    s = _stream(h, "all")
    idx = [i for i, r in enumerate(s.responses) if r.events]
    i = idx[len(idx) // 2]
    lost = s.responses.pop(i)
    return f"revisions [{lost.events[0].kv.mod}"


def watch_duplicate(h: History) -> str | None:
    s = _stream(h, "all")
    idx = [i for i, r in enumerate(s.responses) if r.events]
    i = idx[len(idx) // 3]
    s.responses.insert(i + 1, dataclasses.replace(s.responses[i], t=s.responses[i].t + 1e-6))
    return f"revision {s.responses[i].events[-1].kv.mod}"


def watch_split(h: History) -> str | None:
    s = _stream(h, "all")
    for i, resp in enumerate(s.responses):
        for j in range(1, len(resp.events)):
            if resp.events[j].kv.mod == resp.events[j - 1].kv.mod:
                s.responses[i : i + 1] = [
                    dataclasses.replace(resp, events=resp.events[:j]),
                    dataclasses.replace(resp, events=resp.events[j:], t=resp.t + 1e-6),
                ]
                return f"revision {resp.events[j].kv.mod}"
    return None


def progress_ahead(h: History) -> str | None:
    s = _stream(h, "all")
    idx = [i for i, r in enumerate(s.responses) if r.events]
    i = idx[len(idx) // 2]
    r = s.responses[i].events[0].kv.mod
    s.responses.insert(i, WatchResp(s.responses[i].t - 1e-6, 0, r))  # "everything up to r was sent"
    return f"revision {r}"


def wrong_prev_kv(h: History) -> str | None:
    s = _stream(h, "all")
    for i, resp in enumerate(s.responses):
        for j, e in enumerate(resp.events):
            if e.prev is not None and e.type == "put":
                bad = dataclasses.replace(e, prev=dataclasses.replace(e.prev, value=b"not-the-previous-value"))
                s.responses[i] = dataclasses.replace(resp, events=(*resp.events[:j], bad, *resp.events[j + 1 :]))
                return f"revision {e.kv.mod}"
    return None


def phantom_revision(h: History) -> str | None:
    r = h.final_revision + 1
    _append_revision(h, (Event("put", KV(b"k/0", b"nobody-wrote-this", r, r, 1)),))
    return f"revision {r}"


def wrong_read(h: History) -> str | None:
    for op in _acked(h, Range, lambda op: bool(op.resp.kvs)):
        kvs = op.resp.kvs
        op.resp = dataclasses.replace(op.resp, kvs=(dataclasses.replace(kvs[0], value=b"garbage"), *kvs[1:]))
        return f"op#{op.id}"
    return None


def early_expiry(h: History) -> str | None:
    """A lease whose keys were deleted by its expiry, but granted with a longer TTL
    than it lived (as if the server counted from a wrong clock)."""
    revoked = {op.req.lease for op in h.ops if isinstance(op.req, LeaseRevoke)}
    states = _states(h)
    for grant in h.ops:
        lease = grant.resp.id if isinstance(grant.resp, LeaseGrantResp) else None
        if lease is None or lease in revoked:
            continue
        made = {op.revision for op in h.ops if op.status != "error" and not isinstance(op.req, Range)}
        ends = [  # revisions that only the lease's expiry can have made
            r
            for r in range(2, h.final_revision + 1)
            if r not in made
            and any(kv.lease == lease for kv in states[r - 1].values())
            and not any(kv.lease == lease for kv in states[r].values())
        ]
        if ends:
            grant.resp = LeaseGrantResp(lease, grant.resp.ttl + 5)
            return f"lease {lease:x}"
    return None


def keepalive_after_revoke(h: History) -> str | None:
    for rv in _acked(h, LeaseRevoke):
        ka = Op(id=10**6, client="x", req=LeaseKeepAlive(rv.req.lease), inv=rv.ret + 0.001, ret=rv.ret + 0.002)
        ka.status, ka.resp, ka.revision = "ok", KeepAliveResp(3), rv.revision
        h.ops.append(ka)
        return "op#1000000"
    return None


def failed_write_applied(h: History) -> str | None:
    ref = next(s for s in h.streams if s.reference)
    values = {e.kv.value for resp in ref.responses for e in resp.events if e.type == "put"}
    for op in h.ops:
        if op.status == "unknown" and isinstance(op.req, Put) and op.req.value in values:
            op.status, op.error, op.ret = "error", LEASE_NOT_FOUND, op.inv + 0.01
            return f"op#{op.id}"
    return None


def read_compacted_revision(h: History) -> str | None:
    for b in _acked(h, Range, lambda op: op.req.revision > 1):
        c = Op(id=10**6, client="x", req=Compact(b.req.revision + 1), inv=b.inv - 0.0002, ret=b.inv - 0.0001)
        c.status, c.resp, c.revision = "ok", Empty(), b.req.revision + 1
        h.ops.append(c)
        return f"op#{b.id}"
    return None


MUTATIONS: list[tuple] = [
    ("stale read", "stale-read", stale_read),
    ("lost acknowledged write", "lost-write", lost_write),
    ("duplicated write", "duplicate-write", duplicate_write),
    ("wrong txn outcome", "txn-outcome", wrong_txn_outcome),
    ("revision going backwards in real time", "realtime-order", revision_backwards),
    ("watch gap", "watch-gap", watch_gap),
    ("duplicate watch event", "watch-duplicate", watch_duplicate),
    ("revision split across responses", "watch-split", watch_split),
    ("progress notification ahead of an event", "progress-ahead", progress_ahead),
    ("wrong prev_kv", "prev-kv", wrong_prev_kv),
    ("revision nobody made", "unexplained-revision", phantom_revision),
    ("read of a wrong value", "wrong-read", wrong_read),
    # (without lost answers: a request whose outcome is unknown could otherwise have made the revision)
    ("lease expired before its TTL", "early-expiry", early_expiry, {"unknown_rate": 0.0}),
    ("keepalive of a revoked lease", "keepalive-after-revoke", keepalive_after_revoke),
    ("failed write applied", "failed-write-applied", failed_write_applied),
    ("read below the compaction point", "read-compacted", read_compacted_revision),
]


@pytest.mark.parametrize(
    ("kind", "mutate", "sim"), [(*m[1:], *m[3:], {})[:3] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS]
)
def test_broken_history_is_caught(kind: str, mutate: Callable[[History], str | None], sim: dict[str, float]) -> None:
    for seed in SEEDS:
        h = simulate(seed, n_ops=400, **sim)
        where = mutate(h)
        if where is not None:
            break
    else:
        pytest.fail(f"no simulated history had a place for this mutation in seeds {SEEDS}")
    report = check(h)
    assert kind in report.kinds(), f"expected {kind}, got:\n{report.summary()}"
    named = [v for v in report.violations if v.kind == kind]
    assert any(where in v.message for v in named), f"no {kind} message names {where!r}:\n{report.summary()}"
