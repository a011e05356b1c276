"""Differential test: thousands of random operations against k8s-sql and a real etcd.

Every seed starts both servers fresh, sends the same random sequence of requests to
both (KV, txns, compactions, leases, invalid requests) and compares every answer field
by field (see ``compare.py`` for the little that is normalised). Watches run during the
sequence, and afterwards watches replay the history from several revisions; their
events are compared one by one.

The k8s_sql fixture runs every seed on each backend (SQLite, PostgreSQL, MariaDB).
Reproduce a failure with the seed and backend it prints::

    K8S_SQL_BACKENDS=<backend> K8S_SQL_DIFF_SEEDS=<seed> python -m pytest tests/differential -x -q -s

``K8S_SQL_DIFF_OPS`` sets the number of operations per seed, ``K8S_SQL_DIFF_STATS=1``
prints how etcd answered them (a coverage table).
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from google.protobuf import text_format
from google.protobuf.message import Message

from k8s_sql.pb import rpc_pb2 as pb

from .compare import RpcError, diff, map_ids, normalize, to_tree
from .harness import Pair, Side, WatchLog, WatchSession, pump_until
from .ops import Generator, Op, prefix_end

SEEDS = [int(s) for s in os.environ.get("K8S_SQL_DIFF_SEEDS", "1,2,3,4").split(",") if s.strip()]
OPS_PER_SEED = int(os.environ.get("K8S_SQL_DIFF_OPS", "1200"))
STATS = os.environ.get("K8S_SQL_DIFF_STATS", "") not in ("", "0")
ETCD_VERSION = "3.6.16"
MAX_MISMATCHES = 20
WATCH_TIMEOUT = 30.0

NOPUT = pb.WatchCreateRequest.NOPUT
NODELETE = pb.WatchCreateRequest.NODELETE


@dataclass
class Totals:
    """What every seed compared, for the terminal summary (see tests/conftest.py). Each test
    records its numbers as a ``differential`` user property of its report, which
    reaches the summary also from pytest-xdist workers."""

    ops: int = 0
    events: int = 0
    mismatches: int = 0
    seconds: float = 0.0
    runs: list[str] = field(default_factory=list)  # "seed@backend"

    def add(self, backend: str, seed: int, ops: int, events: int, mismatches: int, seconds: float) -> None:
        self.ops += ops
        self.events += events
        self.mismatches += mismatches
        self.seconds += seconds
        self.runs.append(f"{seed}@{backend}")

    def line(self) -> str:
        return (
            f"differential: compared {self.ops} operations and {self.events} watch events "
            f"against etcd {ETCD_VERSION}: {self.mismatches} mismatches "
            f"({len(self.runs)} runs: {' '.join(self.runs)}; {self.seconds:.0f}s)"
        )


def describe(msg: Message, limit: int = 3000) -> str:
    text = text_format.MessageToString(msg, as_one_line=True)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


# The watches that run during the whole sequence, on one stream per server. Before
# every compaction the run waits until they have caught up (see ``catch_up``).
LIVE_WATCHES: list[dict[str, Any]] = [
    {"key": b"\0", "range_end": b"\0", "prev_kv": True},
    {"key": b"a", "range_end": b"b", "filters": [NODELETE]},
    {"key": b"\0", "range_end": b"\0", "filters": [NOPUT]},
    {"key": b"a", "start_revision": 1},
    {"key": b"/registry/", "range_end": prefix_end(b"/registry/"), "progress_notify": True},
]


class Run:
    """One seed: the operation sequence, then the watch comparisons."""

    def __init__(self, seed: int, etcd_endpoint: str, k8s_endpoint: str) -> None:
        self.seed = seed
        self.pair = Pair.connect(etcd_endpoint, k8s_endpoint)
        self.gen = Generator(seed)
        self.rng = random.Random(seed * 7919 + 1)
        self.mismatches: list[str] = []
        self.ops = 0
        self.events = 0
        self.live: dict[str, tuple[WatchSession, WatchLog]] = {}
        self.outcomes: Counter[str] = Counter()
        self.sessions: list[WatchSession] = []

    def close(self) -> None:
        for s in self.sessions:
            s.close()
        self.pair.close()

    def mismatch(self, where: str, lines: list[str]) -> None:
        self.mismatches.append(f"seed {self.seed}, {where}:\n    " + "\n    ".join(lines[:15]))

    def sides(self) -> list[Side]:
        return [self.pair.etcd, self.pair.k8s]

    def session(self, side: Side) -> WatchSession:
        s = WatchSession(side)
        self.sessions.append(s)
        return s

    # -- the operation sequence ------------------------------------------------------

    def execute(self, n: int) -> None:
        self.start_live_watches()
        for i in range(n):
            op = self.gen.next()
            if op.kind == "Compact":
                self.catch_up()
            re, rk = self.pair.call(op.kind, op.request)
            self.ops += 1
            self.compare(f"op #{i}", op, re, rk)
            self.gen.observe(op, re)
            if len(self.mismatches) >= MAX_MISMATCHES:
                return
        self.finish_live_watches()
        self.replays()
        self.control_stream()
        self.future_stream()

    def compare(self, where: str, op: Op, re: Any, rk: Any) -> None:
        self.outcomes[outcome(op, re)] += 1
        ne = normalize(op.kind, op.request, re, self.pair.etcd_values)
        nk = normalize(op.kind, op.request, rk, self.pair.etcd_values)
        d = diff(ne, nk)
        if d:
            self.mismatch(f"{where} {op.kind} [{op.note}] {describe(op.request)}", d)

    # -- live watches ------------------------------------------------------------------

    def start_live_watches(self) -> None:
        for side in self.sides():
            s, log = self.session(side), WatchLog()
            for spec in LIVE_WATCHES:
                s.create(**spec)
            if not pump_until(s, log, lambda lg: len(lg.created) == len(LIVE_WATCHES), WATCH_TIMEOUT):
                self.mismatch("live watches", [f"{side.name} did not confirm them: {log.errors}"])
            self.live[side.name] = (s, log)

    def catch_up(self) -> None:
        """Before a compaction, wait until every live watch has been sent every event up
        to the current revision (a stream-wide progress answer says so). Otherwise the
        compaction races the watches: etcd cancels a watch that fell behind (its shared
        send buffer was full) once compaction passes it, and reads a prev_kv when it
        sends the event, which fails if the history was compacted meanwhile."""
        target = self.gen.rev
        for name, (s, log) in self.live.items():
            s.progress()
            if not pump_until(s, log, lambda lg: lg.progress_rev >= target, WATCH_TIMEOUT):
                self.mismatch("live watches", [f"{name}: no progress up to revision {target}: {log.errors}"])

    def finish_live_watches(self) -> None:
        target = self.gen.rev
        logs: dict[str, WatchLog] = {}
        for name, (s, log) in self.live.items():
            s.progress()
            if not pump_until(s, log, lambda lg: lg.progress_rev >= target, WATCH_TIMEOUT):
                self.mismatch("live watches", [f"{name}: no progress up to revision {target}: {log.errors}"])
            logs[name] = log
        self.compare_watch_logs("live watches", logs["etcd"], logs["k8s-sql"], range(len(LIVE_WATCHES)))

    # -- watch comparisons --------------------------------------------------------------

    def event_trees(self, log: WatchLog, wid: int, k8s: bool) -> list[dict[str, Any]]:
        out = []
        for ev in log.events.get(wid, []):
            if k8s:
                map_ids(ev, self.pair.k2e)
            out.append(to_tree(ev))
        return out

    def compare_watch_logs(self, where: str, e: WatchLog, k: WatchLog, ids: Any) -> None:
        d = diff([to_tree(r) for r in e.created], [to_tree(r) for r in k.created], ".created")
        d += diff(
            {str(w): to_tree(r) for w, r in e.canceled.items()},
            {str(w): to_tree(r) for w, r in k.canceled.items()},
            ".canceled",
        )
        for wid in ids:
            ee, ke = self.event_trees(e, wid, False), self.event_trees(k, wid, True)
            self.events += len(ee)
            d += diff(ee, ke, f".watch[{wid}].events")
        if d:
            self.mismatch(where, d)

    def replays(self) -> None:
        """Watches replaying history from several revisions, each on its own stream."""
        rev, compact = self.gen.rev, self.gen.compact
        rng = self.rng
        ranges: list[tuple[bytes, bytes]] = [
            (b"\0", b"\0"),
            (b"a", b"b"),
            (b"a\x00", b""),
            (b"a", b"b\xff"),
            (b"b", b"\0"),
            (b"/registry/", prefix_end(b"/registry/")),
            (b"", b""),  # etcd: an empty key means "\0"
            (b"\xff", b"\0"),
        ]
        starts = [1, 2, max(compact, 1), compact + 1, rev, rev + 1, rng.randint(max(compact, 1), rev)]
        if compact > 1:
            starts.append(compact - 1)
        specs: list[dict[str, Any]] = [
            {"key": b"\0", "range_end": b"\0", "start_revision": max(compact, 1), "prev_kv": True},
            {"key": b"\0", "range_end": b"\0", "start_revision": max(compact - 1, 1), "prev_kv": True},
            {"key": b"\0", "range_end": b"\0", "start_revision": 1},
            {"key": b"a", "range_end": b"b", "start_revision": compact + 1, "prev_kv": True, "filters": [NODELETE]},
            {"key": b"\0", "range_end": b"\0", "start_revision": rev, "prev_kv": True, "filters": [NOPUT]},
        ]
        for _ in range(11):
            key, end = rng.choice(ranges)
            spec: dict[str, Any] = {"key": key, "range_end": end, "start_revision": rng.choice(starts)}
            spec["prev_kv"] = rng.random() < 0.6
            filters = rng.choice([[], [], [NOPUT], [NODELETE], [NOPUT, NODELETE]])
            if filters:
                spec["filters"] = filters
            specs.append(spec)
        streams = []
        for spec in specs:
            pair = {}
            for side in self.sides():
                s = self.session(side)
                s.create(**spec)
                s.progress()
                pair[side.name] = (s, WatchLog())
            streams.append((spec, pair))

        for spec, pair in streams:
            future = spec["start_revision"] > rev  # etcd reports no progress below a watch's start

            def done(lg: WatchLog, future: bool = future) -> bool:
                return bool(lg.canceled) or (bool(lg.created) and (future or lg.progress_rev >= rev))

            for name, (s, log) in pair.items():
                if not pump_until(s, log, done, WATCH_TIMEOUT):
                    self.mismatch(f"replay {spec}", [f"{name}: never reached revision {rev}: {log.errors}"])
                s.close()
            self.compare_watch_logs(f"replay {spec}", pair["etcd"][1], pair["k8s-sql"][1], [0])

    def control_stream(self) -> None:
        """Watch creation edge cases on one stream: explicit and duplicate IDs, an empty
        range, a negative start revision, cancels (of a watch and of an unknown ID), and
        a progress request answered once the last watch has replayed its events."""
        rev = self.gen.rev
        logs: dict[str, WatchLog] = {}
        for side in self.sides():
            s, log = self.session(side), WatchLog()
            s.create(key=b"a", watch_id=7)
            s.create(key=b"a", watch_id=7)
            s.create(key=b"b", range_end=b"a")
            s.create(key=b"a", start_revision=-3)
            s.create(key=b"a")
            s.send(pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=7)))
            s.send(pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=99)))
            s.create(key=b"a", range_end=b"\0", start_revision=rev, prev_kv=True)
            s.progress()
            if not pump_until(s, log, lambda lg: len(lg.created) == 6 and lg.progress_rev >= rev, WATCH_TIMEOUT):
                self.mismatch(
                    "control stream",
                    [f"{side.name}: {len(log.created)} creates confirmed, progress {log.progress_rev} < {rev}"],
                )
            logs[side.name] = log
        self.compare_watch_logs("control stream", logs["etcd"], logs["k8s-sql"], [0, 1, 7])
        d = diff(dedup(logs["etcd"].order), dedup(logs["k8s-sql"].order), ".order")
        if d:
            self.mismatch("control stream", d)

    def future_stream(self) -> None:
        """A watch starting after the current revision: etcd reports no progress until
        the store reaches its start revision. Runs last: it writes one key."""
        rev = self.gen.rev
        sessions = {side.name: (self.session(side), WatchLog()) for side in self.sides()}
        for name, (s, log) in sessions.items():
            s.create(key=b"\0", range_end=b"\0", start_revision=rev + 1)
            s.progress()
            s.create(key=b"a")
            if not pump_until(s, log, lambda lg: len(lg.created) == 2, WATCH_TIMEOUT, poke=None):
                self.mismatch("future watch", [f"{name}: creates not confirmed"])
        re, rk = self.pair.call("Put", pb.PutRequest(key=b"a", value=b"future"))
        self.compare("future watch put", Op("Put", pb.PutRequest(key=b"a", value=b"future"), "put"), re, rk)
        self.gen.rev += 1
        for name, (s, log) in sessions.items():

            def both(lg: WatchLog) -> bool:
                return lg.last_event_rev.get(0, 0) > rev and lg.last_event_rev.get(1, 0) > rev

            if not pump_until(s, log, both, WATCH_TIMEOUT, poke=None):
                self.mismatch("future watch", [f"{name}: events at revision {rev + 1} missing"])
            s.progress()
            if not pump_until(s, log, lambda lg: lg.progress_rev > rev, WATCH_TIMEOUT, poke=None):
                self.mismatch("future watch", [f"{name}: no progress at revision {rev + 1}"])
        e, k = sessions["etcd"][1], sessions["k8s-sql"][1]
        self.compare_watch_logs("future watch", e, k, [0, 1])
        d = diff(dedup(e.order), dedup(k.order), ".order")
        if d:
            self.mismatch("future watch", d)


def dedup(order: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The order of control responses with repeated progress answers folded: k8s-sql
    answers a progress request made while a watch catches up once it has caught up,
    where etcd 3.6 drops it and the client asks again (an extra, correct answer)."""
    out: list[tuple[str, int]] = []
    for x in order:
        if not (out and x[0] == "progress" and out[-1] == x):
            out.append(x)
    return out


def outcome(op: Op, result: Any) -> str:
    """A coarse class of etcd's answer, for the coverage table (K8S_SQL_DIFF_STATS=1)."""
    if isinstance(result, RpcError):
        return f"{op.kind} error: {result.details[:60]}"
    if isinstance(result, pb.TxnResponse):
        return f"Txn {'succeeded' if result.succeeded else 'failed'}"
    if isinstance(result, pb.RangeResponse):
        rev = getattr(op.request, "revision", 0)
        return f"Range {'historical' if rev > 0 else 'current'} {'empty' if not result.count else 'found'}"
    if isinstance(result, pb.DeleteRangeResponse):
        return f"DeleteRange deleted {'some' if result.deleted else 'none'}"
    return f"{op.kind} ok"


def run_seed(seed: int, etcd_endpoint: str, k8s_endpoint: str, n_ops: int) -> Run:
    run = Run(seed, etcd_endpoint, k8s_endpoint)
    try:
        run.execute(n_ops)
    finally:
        run.close()
    return run


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_differential(
    seed: int,
    etcd: Any,
    k8s_sql: Any,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    record_property: Any,
) -> None:
    backend = request.node.callspec.params.get("backend_args", "sqlite")
    start = time.monotonic()
    run = run_seed(seed, etcd.endpoint, k8s_sql.endpoint, OPS_PER_SEED)
    elapsed = time.monotonic() - start
    record_property("differential", (backend, seed, run.ops, run.events, len(run.mismatches), elapsed))
    with capsys.disabled():
        print(
            f"\ndifferential seed {seed} on {backend}: compared {run.ops} operations and {run.events} watch "
            f"events against etcd {ETCD_VERSION}: {len(run.mismatches)} mismatches ({elapsed:.1f}s)"
        )
        if STATS:
            for what, n in sorted(run.outcomes.items()):
                print(f"  {n:6d}  {what}")
    assert not run.mismatches, (
        f"seed {seed} on {backend}: {len(run.mismatches)} mismatches with etcd (reproduce: "
        f"K8S_SQL_BACKENDS={backend} K8S_SQL_DIFF_SEEDS={seed} python -m pytest tests/differential -x -q -s)\n"
        + "\n".join(run.mismatches)
    )
