"""The linearizability and watch-guarantee checker.

What it proves
==============

etcd orders every change by revision, and every response carries the revision of the
state it saw or made (its header). A watch of every key from the start, with prev_kv,
lists each revision's changes, including those no client asked for (lease expiry).
The checker replays that watch (the *reference*, one or more streams; they must agree)
into an MVCC model, one state per revision (``model``), and then:

1. **Writes.** An acknowledged Put/Delete/Txn with header revision h that changed
   something made revision h: its effect computed on the state at h-1 must be exactly
   h's events, its response (txn branch, prev_kv, deleted counts, ranges inside the
   txn) what the model answers. One that changed nothing is a read at h. Every value a
   client writes is unique, so a value found at another revision (``wrong-revision``),
   at two revisions (``duplicate-write``) or nowhere (``lost-write``) is named as such.
2. **Every revision is explained** exactly once: by the acknowledged write that
   reported it, by an acknowledged LeaseRevoke, or else by one request whose outcome is
   unknown (it timed out or failed with UNAVAILABLE during a fault) or by a lease's
   expiry. Which unknown request or lease explains which revision is decided by a
   maximum bipartite matching (Kuhn's augmenting paths), so it is exact: a revision
   stays ``unexplained-revision`` only if no assignment explains them all. An unknown
   request may take effect once or never; one that failed definitely must not.
3. **Reads** (Range, and txns that changed nothing) saw exactly the state at their
   revision (for a historical read, at the revision asked for).
4. **Real time.** If A returned before B was invoked then rev(A) <= rev(B), and
   rev(A) < rev(B) if B made a revision (``realtime-order``; for a read
   ``stale-read``). Serializable reads are bounded from below by nothing (etcd allows
   them to be stale) but still witness that their revision existed. An unknown request
   placed at revision r must have r greater than every revision returned before it was
   invoked.
5. **Definite failures** are justified somewhere in their window of possible
   linearization points: ``compacted`` needs a compaction past the revision invoked
   before the failure returned, ``future revision`` a revision above every one
   returned before it was invoked, ``lease not found`` a point where the lease may
   have been gone (not before its last attach or keepalive that is known to precede).
6. **Leases.** A lease is revoked once; nothing attaches to it afterwards; a keepalive
   after its revocation fails; a lease that expired (no client revoked it) was not
   gone before ``max(grant invoked, acknowledged keepalive invoked) + TTL`` (witnessed
   by any response whose revision includes its deletion, or by a failure that saw it
   gone); and after the run, no key is attached to a lease that no longer exists.
7. **Watches**, every stream against the model: events in revision order, never
   repeated (``watch-duplicate``); a revision's events all in one response
   (``watch-split``, the atomic guarantee); no revision in the watch's range skipped
   (``watch-gap``, reliable); a progress notification only once every event up to its
   revision was sent, and no such event after it (``progress-ahead``, bookmarkable);
   prev_kv equal to the model's previous value (``prev-kv``); a watch from revision s
   starts exactly there, so a watch resumed after a fault from the revision after the
   last one delivered continues without loss or repetition (resumable); a compacted
   start is cancelled with a real compaction revision.

Why no Wing-Gong search is needed
=================================

WGL searches for a linearization order when the history does not pin one down. Here
every acknowledged operation's header pins its linearization point to one revision;
writes take distinct revisions, and between two revisions the state is constant, so
reads at the same revision may be ordered among themselves in any order consistent
with real time (an interval order is acyclic). With the write order given by the
reference watch, a history passes checks 1-4 exactly when the order "by revision,
writes before the reads of their revision" is a linearization, which is also the only
candidate: no other total order of writes reproduces the observed revisions. The
choices left are (a) which unknown requests took effect, where — decided exactly by
the matching in 2 (an unknown request can only be placed where its effect equals a
revision's events, and a revision can only be one request's), and (b) where definite
failures and keepalives sit, which have no revision — their legality depends only on
lease and compaction liveness, which is monotone (a lease, once gone, stays gone; a
compaction point only grows), so a window check (5 and 6) is exact for them.

What it does not prove: that the reference watch is complete beyond the final
revision the run waited for; the timing of a lease expiry that deleted no key (only
that nothing contradicted it); that LeaseTimeToLive/Leases answers are right (the
workload only uses them to wait for the end); and it assumes the request kinds the
workload sends (no nested txns, no watch filters, no fragmenting).
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from .history import (
    COMPACTED,
    FUTURE,
    KV,
    LEASE_NOT_FOUND,
    Compact,
    Delete,
    DeleteResp,
    Event,
    History,
    KeepAliveResp,
    LeaseGrantResp,
    LeaseKeepAlive,
    LeaseRevoke,
    Op,
    Put,
    PutResp,
    Range,
    Txn,
    TxnResp,
    WatchCreate,
    WatchResp,
    WatchStream,
)
from .model import Effect, State, apply, apply_events, event_key, in_range, range_read, revocation


@dataclass(frozen=True)
class Violation:
    kind: str
    message: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"


@dataclass
class Report:
    violations: list[Violation] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.violations

    def kinds(self) -> set[str]:
        return {v.kind for v in self.violations}

    def summary(self, limit: int = 25) -> str:
        counts = Counter(v.kind for v in self.violations)
        lines = [f"{len(self.violations)} violation(s): " + ", ".join(f"{k} x{n}" for k, n in counts.most_common())]
        lines += [f"  {v}" for v in self.violations[:limit]]
        if len(self.violations) > limit:
            lines.append(f"  ... and {len(self.violations) - limit} more")
        return "\n".join(lines)


def check(history: History, *, lease_slack: float = 0.25) -> Report:
    """Check one run's history; ``lease_slack`` seconds of clock tolerance for expiry."""
    return _Checker(history, lease_slack).run()


WRITE_KINDS = (Put, Delete, Txn)


def written_values(req: object) -> list[bytes]:
    if isinstance(req, Put):
        return [req.value]
    if isinstance(req, Txn):
        return [op.value for op in (*req.success, *req.failure) if isinstance(op, Put)]
    return []


def leases_used(req: object) -> set[int]:
    if isinstance(req, Put):
        return {req.lease} - {0}
    if isinstance(req, Txn):
        return {op.lease for op in (*req.success, *req.failure) if isinstance(op, Put)} - {0}
    if isinstance(req, LeaseRevoke | LeaseKeepAlive):
        return {req.lease}
    return set()


class _Witnesses:
    """Ops whose revision existed by the time they returned: real-time lower bounds."""

    def __init__(self, ops: Iterable[Op]) -> None:
        witness = sorted(((op.ret, op.revision, op) for op in ops if op.ret is not None), key=lambda x: x[0])
        self._ret = [w[0] for w in witness]
        self._max: list[tuple[int, Op | None]] = []
        best: tuple[int, Op | None] = (0, None)
        for _, rev, op in witness:
            if rev > best[0]:
                best = (rev, op)
            self._max.append(best)
        by_rev = sorted(witness, key=lambda x: x[1])
        self._revs = [w[1] for w in by_rev]
        self._first: list[tuple[float, Op | None]] = [(float("inf"), None)] * (len(by_rev) + 1)
        for i in range(len(by_rev) - 1, -1, -1):
            ret, _, op = by_rev[i]
            self._first[i] = min(self._first[i + 1], (ret, op), key=lambda x: x[0])

    def max_returned_before(self, t: float) -> tuple[int, Op | None]:
        """The highest revision returned strictly before ``t`` (0 if none), and by whom."""
        i = bisect.bisect_left(self._ret, t)
        return self._max[i - 1] if i else (0, None)

    def first_return_at_or_after(self, rev: int) -> tuple[float, Op | None]:
        """The earliest time an op returned a revision >= ``rev``: by then ``rev`` existed."""
        return self._first[bisect.bisect_left(self._revs, rev)]


class _Successors:
    """Ops placed at a revision, as real-time upper bounds for ops that returned before
    they were invoked: (inv, bound), bound being the last linearization point allowed
    before the op (rev - 1 for an op that made revision rev, rev for a read)."""

    def __init__(self, bounded: list[tuple[float, int, Op]]) -> None:
        bounded = sorted(bounded, key=lambda x: x[0])
        self._inv = [b[0] for b in bounded]
        self._min: list[tuple[float, Op | None]] = [(float("inf"), None)] * (len(bounded) + 1)
        for i in range(len(bounded) - 1, -1, -1):
            _, bound, op = bounded[i]
            self._min[i] = min(self._min[i + 1], (bound, op), key=lambda x: x[0])

    def min_invoked_after(self, t: float) -> tuple[float, Op | None]:
        """The lowest bound among ops invoked strictly after ``t`` (inf if none)."""
        return self._min[bisect.bisect_right(self._inv, t)]


class _Checker:
    def __init__(self, history: History, lease_slack: float) -> None:
        self.h = history
        self.slack = lease_slack
        self.report = Report()
        self.states: dict[int, State] = {}
        self.events: dict[int, tuple[Event, ...]] = {}
        self.end = history.initial_revision
        self.gap = False  # the model stops early: the reference watch misses a revision
        self.claimed: dict[int, str] = {}
        self.writes: dict[int, int] = {}  # op id -> the revision it made
        self.lease_gone: dict[int, tuple[int, bool]] = {}  # lease -> (revision or point, made a revision)
        self.lease_matched: set[int] = set()  # revoked by expiry (or an unknown revoke), per the matching

    def fail(self, kind: str, message: str) -> None:
        self.report.violations.append(Violation(kind, message))

    # --- driver ---------------------------------------------------------------------------

    def run(self) -> Report:
        ops = self.h.ops
        self.owner: dict[bytes, Op] = {}
        for op in ops:
            for v in written_values(op.req):
                if v in self.owner:
                    raise ValueError(f"the workload wrote value {v!r} twice ({self.owner[v].id}, {op.id})")
                self.owner[v] = op
        self.by_id = {op.id: op for op in ops}
        self.grants: dict[int, Op] = {}
        self.keepalives: dict[int, list[Op]] = defaultdict(list)
        self.revokes: dict[int, list[Op]] = defaultdict(list)
        for op in ops:
            if op.status == "ok" and isinstance(op.resp, LeaseGrantResp):
                self.grants[op.resp.id] = op
            elif isinstance(op.req, LeaseKeepAlive):
                self.keepalives[op.req.lease].append(op)
            elif isinstance(op.req, LeaseRevoke):
                self.revokes[op.req.lease].append(op)
        self._build_model()
        self.witnesses = _Witnesses(op for op in ops if op.status == "ok" and op.revision)
        self._attach_index()
        self._check_acknowledged_writes()
        self._check_revokes()
        self._explain_unclaimed()
        bounded = [
            (op.inv, op.revision - (op.id in self.writes), op)
            for op in ops
            if op.status == "ok" and op.revision and not _serializable(op)
        ]
        bounded += [
            (self.by_id[i].inv, r - 1, self.by_id[i])
            for i, r in self.writes.items()
            if self.by_id[i].status == "unknown"
        ]
        self.successors = _Successors(bounded)
        self._alive_cache: dict[int, int] = {}
        self._check_reads()
        self._check_realtime()
        self._check_definite_failures()
        self._check_leases()
        self._check_watches()
        st = self.report.stats
        st["ops"] = len(ops)
        st.update(f"ops_{s}" for s in (op.status for op in ops))
        st["revisions"] = self.end - self.h.initial_revision
        st["lease_expiries"] = len(self.lease_matched)
        st["watch_streams"] = len(self.h.streams)
        st["watch_events"] = sum(len(r.events) for s in self.h.streams for r in s.responses)
        return self.report

    # --- the model from the reference watch ------------------------------------------------

    def _build_model(self) -> None:
        found: dict[int, tuple[Event, ...]] = {}
        for s in self.h.streams:
            if not s.reference:
                continue
            for r, evs in _first_response_events(s).items():
                found.setdefault(r, evs)
        last = max(found, default=self.h.initial_revision)
        if self.h.final_revision and last < self.h.final_revision:
            self.fail(
                "watch-gap",
                f"the reference watch ends at revision {last}, short of the final revision {self.h.final_revision}",
            )
        self.states[self.h.initial_revision] = {}
        state: State = {}
        for r in range(self.h.initial_revision + 1, last + 1):
            if r not in found:
                self.fail("watch-gap", f"revision {r} is missing from every reference watch; checking stops at {r - 1}")
                self.gap = True
                break
            nxt, problems = apply_events(state, r, found[r])
            for p in problems:
                self.fail("watch-inconsistent", p)
            self.events[r] = found[r]
            self.states[r] = state = nxt
            self.end = r
        if self.h.final_revision and self.end > self.h.final_revision:
            self.fail("unexplained-revision", f"revisions after the final revision {self.h.final_revision} exist")
        self.value_revs: dict[bytes, list[int]] = defaultdict(list)
        for r, evs in self.events.items():
            for e in evs:
                if e.type == "put":
                    self.value_revs[e.kv.value].append(r)
        for v, revs in self.value_revs.items():
            if len(revs) > 1:
                who = self.owner.get(v)
                self.fail(
                    "duplicate-write",
                    f"value {v!r} ({who.describe() if who else 'written by nobody'}) was written at revisions {revs}",
                )

    def _attach_index(self) -> None:
        """For each lease: the revisions at which a key was attached to it."""
        self.attach_revs: dict[int, list[int]] = defaultdict(list)
        for r, evs in self.events.items():
            for e in evs:
                if e.type == "put" and e.kv.lease:
                    self.attach_revs[e.kv.lease].append(r)

    def _verifiable(self, rev: int) -> bool:
        return rev <= self.end

    # --- 1. acknowledged writes ------------------------------------------------------------

    def _claim(self, rev: int, who: str) -> bool:
        if rev in self.claimed:
            self.fail("duplicate-revision", f"revision {rev} is claimed by {self.claimed[rev]} and by {who}")
            return False
        self.claimed[rev] = who
        return True

    def _events_match(self, got: Iterable[Event], want: Iterable[Event]) -> bool:
        return [event_key(e) for e in got] == [event_key(e) for e in want]

    def _check_acknowledged_writes(self) -> None:
        for op in self.h.ops:
            if op.status != "ok" or not isinstance(op.req, WRITE_KINDS):
                continue
            h = op.revision
            if not self._verifiable(h):
                if self.gap:
                    self.report.stats["unverified"] += 1
                else:
                    self.fail("lost-write", f"{op.describe()}: revision {h} never appears (watch ends at {self.end})")
                continue
            at = sorted({r for v in written_values(op.req) for r in self.value_revs.get(v, ())})
            if at and h not in at:
                self.fail("wrong-revision", f"{op.describe()}: acknowledged at revision {h}, took effect at {at}")
                continue
            if at or _answers_change(op):
                # It made revision h: its value is there, or its answer says it deleted something.
                if h <= self.h.initial_revision:
                    self.fail("wrong-revision", f"{op.describe()}: a change cannot have revision {h}")
                    continue
                write = apply(self.states[h - 1], h, op.req)
                matches = self._events_match(self.events[h], write.events)
                if self._compare_response(op, write, h - 1) and not matches:
                    self.fail(
                        "lost-write" if not at and any(e.type == "put" for e in write.events) else "wrong-effect",
                        f"{op.describe()}: revision {h} holds {_show(self.events[h])}, "
                        f"the request makes {_show(write.events)} on revision {h - 1}'s state",
                    )
                if self._claim(h, op.describe()):
                    self.writes[op.id] = h
                continue
            read = apply(self.states[h], h + 1, op.req)
            if not read.events:  # it changed nothing: a read at h
                self._compare_response(op, read, h)
                continue
            if isinstance(op.req, Txn) and isinstance(op.resp, TxnResp) and read.succeeded != op.resp.succeeded:
                self.fail(
                    "txn-outcome",
                    f"{op.describe()}: answered succeeded={op.resp.succeeded} without a change, but its compares "
                    f"are {read.succeeded} on revision {h}'s state",
                )
            else:
                self.fail(
                    "lost-write",
                    f"{op.describe()}: acknowledged at revision {h}, but its change {_show(read.events)} is not "
                    f"in the store (revision {h} holds {_show(self.events.get(h, ()))})",
                )

    def _compare_response(self, op: Op, want: Effect, at: int) -> bool:
        """The op's response against the model's; False (and a violation) if they differ."""
        if isinstance(op.req, Txn):
            assert isinstance(op.resp, TxnResp)
            if op.resp.succeeded != want.succeeded:
                self.fail(
                    "txn-outcome",
                    f"{op.describe()}: answered succeeded={op.resp.succeeded}, but its compares are "
                    f"{want.succeeded} on revision {at}'s state",
                )
                return False
        if op.resp != want.resp:
            self.fail("wrong-response", f"{op.describe()}: answered {op.resp}, the model answers {want.resp}")
            return False
        return True

    def _check_revokes(self) -> None:
        for op in self.h.ops:
            if op.status != "ok" or not isinstance(op.req, LeaseRevoke):
                continue
            lease, h = op.req.lease, op.revision
            if not self._verifiable(h):
                continue
            if lease in self.lease_gone:
                self.fail("lease-revoke", f"{op.describe()}: lease {lease:x} was already revoked")
                continue
            if h > self.h.initial_revision and h not in self.claimed:
                # (if a write claimed h, it deleted the keys and this revoke found none)
                dels = revocation(self.states[h - 1], lease, h)
                if dels and self._events_match(self.events[h], dels):
                    self._claim(h, op.describe())
                    self.lease_gone[lease] = (h, True)
                    continue
            left = sorted(k for k, kv in self.states[h].items() if kv.lease == lease)
            if left:
                self.fail("lease-revoke", f"{op.describe()}: keys {left} are still attached at revision {h}")
            self.lease_gone[lease] = (h, False)

    # --- 2. every revision explained ----------------------------------------------------------

    def _explain_unclaimed(self) -> None:
        unclaimed = [r for r in range(self.h.initial_revision + 1, self.end + 1) if r not in self.claimed]
        if not unclaimed:
            return
        unknown = [op for op in self.h.ops if op.status == "unknown" and isinstance(op.req, WRITE_KINDS)]
        lease_ids = {op.resp.id for op in self.h.ops if isinstance(op.resp, LeaseGrantResp)}
        lease_ids |= set(self.attach_revs)
        leases = sorted(lease_ids - set(self.lease_gone))
        cands: dict[int, list[tuple[str, int]]] = {}
        for r in unclaimed:
            evs, before = self.events[r], self.states[r - 1]
            values = [e.kv.value for e in evs if e.type == "put"]
            pool = [self.owner[v] for v in values[:1] if v in self.owner and self.owner[v].status == "unknown"]
            if not values:
                pool = [op for op in unknown if not any(v in self.value_revs for v in written_values(op.req))]
            c: list[tuple[str, int]] = []
            for op in pool:
                if r <= self.witnesses.max_returned_before(op.inv)[0]:
                    continue
                eff = apply(before, r, op.req)  # type: ignore[arg-type]
                if eff.events and self._events_match(evs, eff.events):
                    c.append(("op", op.id))
            if not values and all(e.type == "delete" for e in evs):
                c += [
                    ("lease", lease)
                    for lease in leases
                    if self._events_match(evs, revocation(before, lease, r)) and not self._cannot_end(lease, r)
                ]
            cands[r] = c
        match: dict[tuple[str, int], int] = {}

        def augment(r: int, seen: set[tuple[str, int]]) -> bool:
            for node in cands[r]:
                if node in seen:
                    continue
                seen.add(node)
                if node not in match or augment(match[node], seen):
                    match[node] = r
                    return True
            return False

        for r in unclaimed:
            if not augment(r, set()):
                evs = self.events[r]
                owners = [self.owner[e.kv.value] for e in evs if e.type == "put" and e.kv.value in self.owner]
                failed = [o for o in owners if o.status == "error"]
                if failed:
                    self.fail("failed-write-applied", f"revision {r} applies {failed[0].describe()}")
                elif any(len(self.value_revs[e.kv.value]) > 1 for e in evs if e.type == "put"):
                    pass  # reported as duplicate-write
                elif why := [
                    self._cannot_end(lease, r)
                    for lease in leases
                    if self._events_match(evs, revocation(self.states[r - 1], lease, r))
                ]:
                    kind, message = why[0]  # type: ignore[misc]
                    self.fail(kind, f"revision {r} revokes {message}")
                else:
                    self.fail("unexplained-revision", f"no request or lease explains revision {r}: {_show(evs)}")
        for (kind, ident), r in match.items():
            self.claimed[r] = kind
            if kind == "op":
                self.writes[ident] = r
                self.report.stats["unknown_applied"] += 1
            else:
                self.lease_gone[ident] = (r, True)
                self.lease_matched.add(ident)

    def _cannot_end(self, lease: int, r: int) -> tuple[str, str] | None:
        """Why ``lease`` cannot have been revoked by revision ``r`` (None: it can): a key
        attached to it later, a keepalive known to come later that found it alive, or
        (if no client revoked it) revision ``r`` existing before its TTL could run out."""
        later = [a for a in self.attach_revs.get(lease, []) if a > r]
        if later:
            return "lease-attach-after-revoke", f"lease {lease:x}, but a key is attached to it at revision {later[0]}"
        for ka in self.keepalives.get(lease, []):
            if _alive(ka) and self.witnesses.max_returned_before(ka.inv)[0] >= r:
                return "keepalive-after-revoke", f"lease {lease:x}, but {ka.describe()} found it alive afterwards"
        if not self.revokes.get(lease):
            t, by = self.witnesses.first_return_at_or_after(r)
            deadline = self._deadline(lease, t)
            if by is not None and deadline is not None and t < deadline - self.slack:
                return "early-expiry", (
                    f"lease {lease:x} (no client revoked it), but {by.describe()} returned it at {t:.3f}, "
                    f"{deadline - t:.3f}s before the lease could expire ({self.grants[lease].describe()})"
                )
        return None

    def _deadline(self, lease: int, t: float) -> float | None:
        """The earliest time ``lease`` can expire as seen from time ``t``: its TTL after
        its grant or the last acknowledged keepalive invoked before ``t``."""
        grant = self.grants.get(lease)
        if grant is None:
            return None
        assert isinstance(grant.resp, LeaseGrantResp)
        refreshed = [ka.inv for ka in self.keepalives.get(lease, []) if _alive(ka) and ka.inv < t]
        return max([grant.inv, *refreshed]) + grant.resp.ttl

    # --- 3. reads ------------------------------------------------------------------------------

    def _check_reads(self) -> None:
        for op in self.h.ops:
            if op.status != "ok" or not isinstance(op.req, Range):
                continue
            at = op.req.revision or op.revision
            if op.req.revision and op.req.revision > op.revision:
                self.fail("wrong-read", f"{op.describe()}: read revision {at} above its header {op.revision}")
                continue
            if not self._verifiable(max(at, op.revision)):
                if self.gap:
                    self.report.stats["unverified"] += 1
                else:
                    self.fail("wrong-read", f"{op.describe()}: revision {op.revision} does not exist")
                continue
            want = range_read(self.states[at], op.req)
            if op.resp == want:
                continue
            older = next((r for r in range(at - 1, self.h.initial_revision - 1, -1) if self._reads(op, r)), None)
            if older is not None:
                self.fail("stale-read", f"{op.describe()}: saw revision {older}'s state, not revision {at}'s")
            else:
                self.fail("wrong-read", f"{op.describe()}: answered {op.resp}, revision {at} holds {want}")

    def _reads(self, op: Op, r: int) -> bool:
        assert isinstance(op.req, Range)
        return op.resp == range_read(self.states[r], op.req)

    # --- 4. real time --------------------------------------------------------------------------

    def _check_realtime(self) -> None:
        """Acknowledged ops against everything that returned before they were invoked
        (unknown requests were bounded so when the matching placed them)."""
        for op in self.h.ops:
            if op.status != "ok" or not op.revision or _serializable(op):
                continue
            rev, write = op.revision, op.id in self.writes
            floor, by = self.witnesses.max_returned_before(op.inv)
            if rev > floor or (rev == floor and not write):
                continue
            assert by is not None
            kind, did = ("realtime-order", "made") if write else ("stale-read", "saw")
            self.fail(
                kind,
                f"{op.describe()} {did} revision {rev}, but {by.describe()} had returned revision {floor} "
                f"before it was invoked",
            )

    def _window(self, op: Op) -> tuple[int, float]:
        """The linearization points allowed for an op without a revision: [lo, hi]."""
        lo = self.witnesses.max_returned_before(op.inv)[0]
        hi = self.successors.min_invoked_after(op.ret)[0] if op.ret is not None else float("inf")
        return lo, hi

    # --- 5. definite failures ------------------------------------------------------------------

    def _alive_until(self, lease: int) -> int:
        """A linearization point at which the lease is known to exist (0: none known):
        its grant, a key attached to it, or an acknowledged keepalive's earliest point
        (a lease alive at a point was alive at every earlier point since its grant)."""
        if not self._alive_cache:
            known: dict[int, int] = defaultdict(int)
            for ls, revs in self.attach_revs.items():
                known[ls] = max(revs)
            for op in self.h.ops:
                if op.status == "ok" and isinstance(op.resp, LeaseGrantResp):
                    known[op.resp.id] = max(known[op.resp.id], op.revision)
                if isinstance(op.req, LeaseKeepAlive) and _alive(op):
                    known[op.req.lease] = max(known[op.req.lease], self._window(op)[0])
            self._alive_cache = dict(known) or {0: 0}
        return self._alive_cache.get(lease, 0)

    def _check_definite_failures(self) -> None:
        compacts = [op for op in self.h.ops if isinstance(op.req, Compact)]
        for op in self.h.ops:
            if op.status == "ok" and isinstance(op.req, Range) and op.req.revision:
                early = [c for c in compacts if c.status == "ok" and c.ret is not None and c.ret < op.inv]
                past = [c for c in early if c.req.revision > op.req.revision]  # type: ignore[union-attr]
                if past:
                    self.fail(
                        "read-compacted",
                        f"{op.describe()}: read revision {op.req.revision} after {past[0].describe()} returned",
                    )
            if op.status != "error":
                continue
            if op.ret is None:
                continue
            assert op.ret is not None
            lo, hi = self._window(op)
            if op.error == COMPACTED:
                asked = op.req.revision if isinstance(op.req, Range | Compact) else 0
                need = asked + 1 if isinstance(op.req, Range) else asked
                if not any(c.req.revision >= need and c.inv < op.ret for c in compacts):  # type: ignore[union-attr]
                    self.fail("bad-compacted", f"{op.describe()}: no compaction past {asked} was requested before")
            elif op.error == FUTURE:
                asked = op.req.revision if isinstance(op.req, Range | Compact) else 0
                if asked <= lo:
                    self.fail("bad-future", f"{op.describe()}: revision {lo} had been returned before it was invoked")
            elif op.error == LEASE_NOT_FOUND:
                self._lease_missing(op, leases_used(op.req), hi)

    def _lease_missing(self, op: Op, leases: set[int], hi: float) -> None:
        """``op`` saw one of ``leases`` gone: possible only if some is gone at a point <= hi."""
        final = self.h.final_leases
        possible = []
        for lease in leases:
            if final is not None and lease in final:
                continue
            gone = self.lease_gone.get(lease)
            dead_from = gone[0] if gone and gone[1] else self._alive_until(lease)
            if hi >= dead_from:
                possible.append(lease)
        if not possible:
            shown = ", ".join(f"{x:x}" for x in sorted(leases))
            self.fail("bad-lease-not-found", f"{op.describe()}: lease {shown} was known to exist after it")

    # --- 6. leases -----------------------------------------------------------------------------

    def _check_leases(self) -> None:
        # nothing attaches to a lease after a client revoked it (for expiry: see _cannot_end)
        for lease, (point, made) in self.lease_gone.items():
            late = [r for r in self.attach_revs.get(lease, []) if r > point]
            if late and lease not in self.lease_matched:
                self.fail(
                    "lease-attach-after-revoke",
                    f"lease {lease:x} was revoked at {'revision' if made else 'point'} {point}, "
                    f"but a key was attached to it at revision {late[0]}",
                )
        for lease, kas in self.keepalives.items():
            gone = self.lease_gone.get(lease)
            for ka in kas:
                if _alive(ka):
                    lo = self._window(ka)[0]
                    done = [r for r in self.revokes[lease] if r.status == "ok" and r.ret is not None and r.ret < ka.inv]
                    if done or (gone and gone[1] and lo >= gone[0]) or (gone and lo > gone[0]):
                        self.fail("keepalive-after-revoke", f"{ka.describe()} kept lease {lease:x} alive after it went")
                elif ka.status == "ok" or (ka.status == "error" and ka.error == LEASE_NOT_FOUND):
                    self._lease_missing(ka, {lease}, self._window(ka)[1])
        # a lease no client revoked is not found gone before its TTL ran out
        for lease in self.grants:
            if self.revokes.get(lease):
                continue
            for op in self.h.ops:
                # (a txn naming several leases may have found another one gone)
                if op.ret is None or leases_used(op.req) != {lease}:
                    continue
                if (op.status == "error" and op.error == LEASE_NOT_FOUND) or (
                    isinstance(op.req, LeaseKeepAlive) and op.status == "ok" and not _alive(op)
                ):
                    deadline = self._deadline(lease, op.ret)
                    if deadline is not None and op.ret < deadline - self.slack:
                        self.fail(
                            "early-expiry",
                            f"{op.describe()} found lease {lease:x} gone {deadline - op.ret:.3f}s before it could "
                            f"expire ({self.grants[lease].describe()})",
                        )
                        break
        # after the run no key is attached to a lease that no longer exists
        if self.h.final_leases is not None and not self.gap:
            for k, kv in self.states[self.end].items():
                if kv.lease and kv.lease not in self.h.final_leases:
                    self.fail("lease-keys-remain", f"{k!r} is attached to lease {kv.lease:x}, which is gone")

    # --- 7. watches ----------------------------------------------------------------------------

    def _check_watches(self) -> None:
        compacts = [op for op in self.h.ops if isinstance(op.req, Compact)]
        chains: dict[str, list[WatchStream]] = defaultdict(list)
        for s in self.h.streams:
            _WatchCheck(self, s, compacts).run()
            if s.chain:
                chains[s.chain].append(s)
        for chain, streams in chains.items():
            for a, b in itertools.pairwise(streams):
                if not a.creates or not b.creates:
                    continue
                reached = _position(a)
                if reached and b.creates[0].start_revision != reached + 1:
                    self.fail(
                        "watch-resume",
                        f"chain {chain}: stream {b.id} resumed at {b.creates[0].start_revision}, "
                        f"but stream {a.id} had reached revision {reached}",
                    )


class _WatchCheck:
    """One stream: each watch on it against the model."""

    def __init__(self, c: _Checker, stream: WatchStream, compacts: list[Op]) -> None:
        self.c, self.s, self.compacts = c, stream, compacts

    def run(self) -> None:
        ids: dict[int, WatchCreate] = {}
        pending = list(self.s.creates)
        per: dict[int, _WatchState] = {}
        for resp in self.s.responses:
            if resp.created:
                if not pending:
                    self.c.fail("watch-protocol", f"stream {self.s.id}: created response without a create request")
                    continue
                create = pending.pop(0)
                ids[resp.watch_id] = create
                per[resp.watch_id] = _WatchState(self, resp.watch_id, create, resp)
                if resp.canceled:
                    per[resp.watch_id].on_cancel(resp)
                continue
            if resp.watch_id == -1 and resp.is_progress:
                for w in per.values():
                    w.on_progress(resp)
                continue
            w = per.get(resp.watch_id)
            if w is None:
                self.c.fail("watch-protocol", f"stream {self.s.id}: response for unknown watch {resp.watch_id}")
                continue
            if resp.canceled:
                w.on_cancel(resp)
            elif resp.is_progress:
                w.on_progress(resp)
            else:
                w.on_events(resp)


class _WatchState:
    def __init__(self, check: _WatchCheck, wid: int, create: WatchCreate, created: WatchResp) -> None:
        self.check, self.c = check, check.c
        self.name = f"stream {check.s.id} watch {wid} [{create.key!r}, {create.end!r}) from {create.start_revision}"
        self.create = create
        self.start = create.start_revision or created.header_revision + 1
        self.expected = [
            r for r in range(max(self.start, self.c.h.initial_revision + 1), self.c.end + 1) if self._want(r)
        ]
        self.i = 0  # expected[:i] are delivered (or reported missing)
        self.last = self.start - 1  # the last revision delivered
        self.progress = 0  # the highest progress revision received
        self.delivered: dict[int, tuple[Event, ...]] = {}
        self.done = False

    def _want(self, r: int) -> tuple[Event, ...]:
        return tuple(e for e in self.c.events.get(r, ()) if in_range(e.kv.key, self.create.key, self.create.end))

    def _skip_to(self, r: int, why: str) -> None:
        """Everything expected below ``r`` should have been delivered by now."""
        missing = []
        while self.i < len(self.expected) and self.expected[self.i] < r:
            missing.append(self.expected[self.i])
            self.i += 1
        if missing:
            kind = "progress-ahead" if why.startswith("progress") else "watch-gap"
            self.c.fail(kind, f"{self.name}: revisions {missing[:10]} were never delivered before {why}")

    def on_cancel(self, resp: WatchResp) -> None:
        self.done = True
        if resp.compact_revision:
            if self.start >= resp.compact_revision:
                self.c.fail(
                    "watch-compacted",
                    f"{self.name}: cancelled as compacted at {resp.compact_revision}, but it starts at {self.start}",
                )
            elif not any(op.req.revision == resp.compact_revision and op.inv < resp.t for op in self.check.compacts):  # type: ignore[union-attr]
                self.c.fail("watch-compacted", f"{self.name}: no compaction to {resp.compact_revision} was requested")

    def on_progress(self, resp: WatchResp) -> None:
        if self.done:
            return
        p = resp.header_revision
        if p > self.c.end and not self.c.gap and self.c.h.final_revision:
            self.c.fail("progress-ahead", f"{self.name}: progress at {p}, above the last revision {self.c.end}")
        self._skip_to(p + 1, f"progress notification at revision {p}")
        self.progress = max(self.progress, p)

    def on_events(self, resp: WatchResp) -> None:
        if self.done:
            self.c.fail("watch-protocol", f"{self.name}: events after cancellation")
            return
        groups: list[tuple[int, list[Event]]] = []
        for e in resp.events:
            if groups and groups[-1][0] == e.kv.mod:
                groups[-1][1].append(e)
            else:
                groups.append((e.kv.mod, [e]))
        if resp.header_revision < max(r for r, _ in groups):
            self.c.fail("watch-header", f"{self.name}: header {resp.header_revision} below its events' revisions")
        seen: set[int] = set()
        for r, evs in groups:
            if r in seen:
                self.c.fail("watch-order", f"{self.name}: revision {r} appears twice in one response")
                continue
            seen.add(r)
            got = tuple(evs)
            if len({event_key(e) for e in got}) < len(got):
                self.c.fail("watch-duplicate", f"{self.name}: an event of revision {r} is repeated in one response")
            if r <= self.last:
                before = self.delivered.get(r, ())
                if before and {event_key(e) for e in got} <= {event_key(e) for e in before}:
                    self.c.fail("watch-duplicate", f"{self.name}: revision {r}'s events delivered again")
                elif r == self.last:
                    self.c.fail("watch-split", f"{self.name}: revision {r}'s events are split across responses")
                else:
                    self.c.fail("watch-order", f"{self.name}: revision {r} delivered after revision {self.last}")
                continue
            if r <= self.progress:
                self.c.fail(
                    "progress-ahead",
                    f"{self.name}: event of revision {r} delivered after a progress notification at {self.progress}",
                )
            if r < self.start:
                self.c.fail("watch-order", f"{self.name}: revision {r} is before the watch's start {self.start}")
            want = self._want(r)
            self.last = r
            self.delivered[r] = got
            if not want:
                if r <= self.c.end or not self.c.gap:
                    self.c.fail("watch-phantom", f"{self.name}: revision {r} has no change in this range")
                continue
            self._skip_to(r, f"revision {r}")
            if self.i < len(self.expected) and self.expected[self.i] == r:
                self.i += 1
            self._compare(r, got, want, resp.t)

    def _compacted(self, rev: int, t: float) -> bool:
        """Whether a compaction past ``rev`` had been requested by time ``t``."""
        return any(op.req.revision > rev and op.inv < t for op in self.check.compacts)  # type: ignore[union-attr]

    def _compare(self, r: int, got: tuple[Event, ...], want: tuple[Event, ...], at: float) -> None:
        if [event_key(e) for e in got] == [event_key(e) for e in want]:
            for g, w in zip(got, want, strict=True):
                expect = w.prev if self.create.prev_kv else None
                if g.prev is None and expect is not None and self._compacted(r - 1, at):
                    continue  # etcd reads prev_kv at r - 1 when sending; once compacted it sends none
                if g.prev != expect:
                    self.c.fail(
                        "prev-kv",
                        f"{self.name}: revision {r} {g.type} {g.kv.key!r} has prev_kv {g.prev}, expected {expect}",
                    )
            return
        got_keys, want_keys = [event_key(e) for e in got], [event_key(e) for e in want]
        if len(got_keys) < len(want_keys) and set(got_keys) <= set(want_keys):
            self.c.fail(
                "watch-split",
                f"{self.name}: revision {r} delivered {len(got)} of its {len(want)} events in one response",
            )
        else:
            self.c.fail(
                "watch-event-mismatch", f"{self.name}: revision {r} delivered {_show(got)}, model {_show(want)}"
            )


# --- helpers ---------------------------------------------------------------------------------


def _answers_change(op: Op) -> bool:
    """Whether an acknowledged write's answer says it changed something (and so made
    the revision in its header): a put, or a delete that deleted keys."""
    resps = op.resp.responses if isinstance(op.resp, TxnResp) else (op.resp,)
    return any(isinstance(r, PutResp) or (isinstance(r, DeleteResp) and r.deleted) for r in resps)


def _serializable(op: Op) -> bool:
    return isinstance(op.req, Range) and op.req.serializable


def _alive(op: Op) -> bool:
    return op.status == "ok" and isinstance(op.resp, KeepAliveResp) and op.resp.ttl > 0


def _first_response_events(s: WatchStream) -> dict[int, tuple[Event, ...]]:
    """Each revision's events as the first response of the stream that carries it has them."""
    out: dict[int, tuple[Event, ...]] = {}
    for resp in s.responses:
        here: dict[int, list[Event]] = defaultdict(list)
        for e in resp.events:
            here[e.kv.mod].append(e)
        for r, evs in here.items():
            out.setdefault(r, tuple(evs))
    return out


def _position(s: WatchStream) -> int:
    """The revision a stream has delivered everything up to (last event or progress)."""
    pos = 0
    for resp in s.responses:
        if resp.events:
            pos = max(pos, max(e.kv.mod for e in resp.events))
        elif resp.is_progress:
            pos = max(pos, resp.header_revision)
    return pos


def _show(events: Iterable[Event]) -> str:
    parts = []
    for e in events:
        if e.type == "put":
            parts.append(f"put {e.kv.key!r}={e.kv.value!r} v{e.kv.version} c{e.kv.create} l{e.kv.lease:x}")
        else:
            parts.append(f"del {e.kv.key!r}")
    return "[" + ", ".join(parts) + "]"


def _kv(kv: KV | None) -> str:
    return "-" if kv is None else f"{kv.key!r}={kv.value!r}@{kv.mod}"
