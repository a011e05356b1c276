"""etcd's sequential semantics for the requests the workload sends: an MVCC key space
at one revision, and what a request does to it.

The rules are etcd v3.6's (``server/etcdserver/txn``, ``server/storage/mvcc``):

- a write request that changes at least one key makes exactly one new revision; every
  change in it carries that revision; a txn or delete that changes nothing makes none;
- a put keeps the key's create revision and bumps its version (create = the new
  revision and version 1 for a new key) and sets its lease (0 detaches it);
- a delete event's kv holds only the key and the deleting revision;
- a txn evaluates all its compares against the state before it, then runs the chosen
  branch's operations in order, each seeing the earlier ones; a compare of VALUE on a
  missing key is false, other targets compare against zero;
- revoking a lease deletes every key attached to it, in key order, in one revision.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .history import (
    KV,
    Compare,
    Delete,
    DeleteResp,
    Event,
    OpResp,
    Put,
    PutResp,
    Range,
    RangeResp,
    Txn,
    TxnOp,
    TxnResp,
)

State = Mapping[bytes, KV]  # one revision's key space; never mutated once built


def in_range(key: bytes, start: bytes, end: bytes) -> bool:
    """etcd's [key, range_end): empty end is the single key, end ``\\0`` means every key >= start."""
    if not end:
        return key == start
    if end == b"\0":
        return key >= start
    return start <= key < end


def range_read(state: State, req: Range) -> RangeResp:
    keys = sorted(k for k in state if in_range(k, req.key, req.end))
    shown = keys[: req.limit] if req.limit else keys
    kvs = () if req.count_only else tuple(state[k] for k in shown)
    return RangeResp(kvs=kvs, count=len(keys), more=bool(req.limit) and len(keys) > req.limit)


def compare_holds(state: State, c: Compare) -> bool:
    kv = state.get(c.key)
    if kv is None:
        if c.target == "value":
            return False
        kv = KV(c.key, b"", 0, 0, 0, 0)
    ours: bytes | int = {
        "value": kv.value,
        "version": kv.version,
        "create": kv.create,
        "mod": kv.mod,
        "lease": kv.lease,
    }[c.target]
    theirs = c.operand
    assert type(ours) is type(theirs), f"compare operand type for {c.target}: {theirs!r}"
    cmp = (ours > theirs) - (ours < theirs)  # type: ignore[operator]
    return {"=": cmp == 0, "!=": cmp != 0, ">": cmp > 0, "<": cmp < 0}[c.result]


@dataclass(frozen=True)
class Effect:
    """What a request does at one revision: its events (empty: no new revision), the
    response it earns, and for a txn which branch ran."""

    events: tuple[Event, ...]
    resp: OpResp | TxnResp
    succeeded: bool = True


def _put(work: dict[bytes, KV], rev: int, req: Put, events: list[Event]) -> PutResp:
    prev = work.get(req.key)
    kv = KV(
        req.key,
        req.value,
        prev.create if prev else rev,
        rev,
        prev.version + 1 if prev else 1,
        req.lease,
    )
    work[req.key] = kv
    events.append(Event("put", kv, prev))
    return PutResp(prev if req.prev_kv else None)


def _delete(work: dict[bytes, KV], rev: int, req: Delete, events: list[Event]) -> DeleteResp:
    keys = sorted(k for k in work if in_range(k, req.key, req.end))
    prevs = tuple(work.pop(k) for k in keys)
    events.extend(Event("delete", KV(p.key, b"", 0, rev, 0, 0), p) for p in prevs)
    return DeleteResp(len(keys), prevs if req.prev_kv else ())


def _run(work: dict[bytes, KV], rev: int, op: TxnOp, events: list[Event]) -> OpResp:
    if isinstance(op, Put):
        return _put(work, rev, op, events)
    if isinstance(op, Delete):
        return _delete(work, rev, op, events)
    return range_read(work, op)


def apply(state: State, rev: int, req: Put | Delete | Range | Txn) -> Effect:
    """``req`` run on ``state`` (the key space at ``rev - 1``) as the request that makes
    revision ``rev``. An effect without events makes no revision: the request was then
    a read of ``state``."""
    work = dict(state)
    events: list[Event] = []
    if isinstance(req, Txn):
        ok = all(compare_holds(state, c) for c in req.compares)
        branch = req.success if ok else req.failure
        resps = tuple(_run(work, rev, op, events) for op in branch)
        return Effect(tuple(events), TxnResp(ok, resps), ok)
    resp = _run(work, rev, req, events)
    return Effect(tuple(events), resp)


def apply_events(state: State, rev: int, events: tuple[Event, ...]) -> tuple[dict[bytes, KV], list[str]]:
    """The next state from one revision's events, and what is inconsistent in them
    (versions, create/mod revisions and prev_kv must follow from ``state``)."""
    work = dict(state)
    problems: list[str] = []
    seen: set[bytes] = set()
    for e in events:
        key = e.kv.key
        if key in seen:
            problems.append(f"revision {rev} changes {key!r} twice")
        seen.add(key)
        prev = work.get(key)
        if e.kv.mod != rev:
            problems.append(f"revision {rev}: event for {key!r} has mod_revision {e.kv.mod}")
        if e.type == "put":
            want_create, want_version = (prev.create, prev.version + 1) if prev else (rev, 1)
            if (e.kv.create, e.kv.version) != (want_create, want_version):
                problems.append(
                    f"revision {rev}: put of {key!r} has create {e.kv.create} version {e.kv.version}, "
                    f"expected create {want_create} version {want_version} after {prev}"
                )
            work[key] = e.kv
        else:
            if prev is None:
                problems.append(f"revision {rev}: delete of {key!r}, which does not exist")
            work.pop(key, None)
    return work, problems


def revocation(state: State, lease: int, rev: int) -> tuple[Event, ...]:
    """The events of revoking ``lease`` at revision ``rev`` (empty: it had no keys)."""
    keys = sorted(k for k, kv in state.items() if kv.lease == lease)
    return tuple(Event("delete", KV(k, b"", 0, rev, 0, 0), state[k]) for k in keys)


def event_key(e: Event) -> tuple[str, KV]:
    """An event without its prev_kv (which a watch carries only when asked)."""
    return (e.type, e.kv)
