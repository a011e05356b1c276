"""The differential suite's recorded operations replayed through the store, in process.

Each trace under ``tests/differential/recorded/`` (written by
``python3 -m tests.differential.record``) holds a seed's generated requests and a
real etcd's answers. Here every request goes straight to a fresh
:class:`~k8s_sql.store.store.Store` (see ``conftest.py``: no gRPC, no subprocess,
no etcd), on each backend, and every answer is compared with etcd's after the same
normalisation as the differential test (``compare.normalize``: lease IDs the
servers chose are mapped, identity fields compared only for presence, sort ties and
lease lists as sets, remaining TTLs within a second). The store runs on a clock
that follows the recording's, so remaining lease TTLs compare.

``K8S_SQL_TRACES=DIR`` replays the traces in DIR instead (say, many seeds recorded
with ``--out DIR/seed-N.jsonl``, to hunt for differences without starting etcd).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from pathlib import Path

import pytest
from differential.compare import RpcError, diff, map_ids, normalize
from differential.record import RECORDED, read_trace
from differential.test_differential import describe
from google.protobuf.message import Message

from k8s_sql.pb import rpc_pb2 as pb

from .conftest import call, open_store

TRACES = sorted(Path(os.environ.get("K8S_SQL_TRACES", RECORDED)).glob("*.jsonl"))
MAX_MISMATCHES = 10
CALL_TIMEOUT = 30.0


async def replay(trace: Path, endpoint: str) -> tuple[int, list[str]]:
    """Replay ``trace`` on a fresh store at ``endpoint``: (operations, mismatches)."""
    _, ops = read_trace(trace)
    offset = 0.0
    base = time.time()
    e2k: dict[int, int] = {}  # etcd's lease IDs -> the store's
    k2e: dict[int, int] = {}
    mismatches: list[str] = []
    n = 0
    async with open_store(endpoint, clock=lambda: base + offset) as store:
        for line, op, etcd, values in ops:
            offset = line["t"]
            request = type(op.request)()
            request.CopyFrom(op.request)
            map_ids(request, e2k)
            ours = await asyncio.wait_for(call(store, op.kind, request), CALL_TIMEOUT)
            n += 1
            if isinstance(ours, Message):
                # As the differential harness does: etcd's server-chosen lease IDs <-> ours.
                asked = op.request
                if (
                    isinstance(asked, pb.LeaseGrantRequest)
                    and asked.ID == 0
                    and isinstance(ours, pb.LeaseGrantResponse)
                    and isinstance(etcd, pb.LeaseGrantResponse)
                ):
                    e2k[etcd.ID], k2e[ours.ID] = ours.ID, etcd.ID
                map_ids(ours, k2e)
            d = diff(normalize(op.kind, op.request, etcd, values), normalize(op.kind, op.request, ours, values))
            if d:
                mismatches.append(
                    f"{trace.name} op #{line['i']} {op.kind} [{op.note}] {describe(op.request, 600)}\n    "
                    + "\n    ".join(d[:12])
                )
                if len(mismatches) >= MAX_MISMATCHES:
                    break
    return n, mismatches


@pytest.mark.parametrize("trace", TRACES, ids=[p.stem for p in TRACES])
async def test_replay(trace: Path, endpoint: str) -> None:
    n, mismatches = await replay(trace, endpoint)
    assert not mismatches, f"{len(mismatches)} answers differ from etcd's:\n" + "\n".join(mismatches)
    assert n > 0


def outcome(kind: str, request: Message, answer: object) -> set[str]:
    """What an operation exercised, for the coverage check."""
    out = {kind}
    if isinstance(answer, RpcError):
        out.add(f"{kind} error")
        return out
    if isinstance(request, pb.RangeRequest):
        if request.revision > 0:
            out.add("Range historical")
        if request.limit > 0:
            out.add("Range limit")
        if request.sort_order or request.sort_target:
            out.add("Range sorted")
        if isinstance(answer, pb.RangeResponse) and answer.more:
            out.add("Range more")
    elif isinstance(request, pb.TxnRequest) and isinstance(answer, pb.TxnResponse):
        if request.compare:
            out.add(f"Txn compare {'succeeded' if answer.succeeded else 'failed'}")
        if any(op.WhichOneof("request") == "request_txn" for op in (*request.success, *request.failure)):
            out.add("Txn nested")
    elif isinstance(request, pb.DeleteRangeRequest) and isinstance(answer, pb.DeleteRangeResponse):
        if answer.deleted:
            out.add("DeleteRange deleted")
    elif isinstance(request, pb.PutRequest) and request.lease:
        out.add("Put lease")
    return out


def test_traces_cover_the_api() -> None:
    """The committed traces exercise what this tier is for (a re-recording with too
    few operations would silently test less)."""
    assert TRACES, "no traces to replay"
    seen: Counter[str] = Counter()
    for trace in TRACES:
        _, ops = read_trace(trace)
        for _, op, answer, _ in ops:
            seen.update(outcome(op.kind, op.request, answer))
    wanted = [
        "Put",
        "Put lease",
        "Put error",
        "DeleteRange deleted",
        "Range historical",
        "Range limit",
        "Range more",
        "Range sorted",
        "Range error",
        "Txn compare succeeded",
        "Txn compare failed",
        "Txn nested",
        "Txn error",
        "Compact",
        "Compact error",
        "LeaseGrant",
        "LeaseRevoke",
        "LeaseKeepAlive",
        "LeaseTimeToLive",
        "LeaseLeases",
    ]
    assert not [w for w in wanted if not seen[w]], dict(seen)
