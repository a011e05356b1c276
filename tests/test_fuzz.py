"""A protocol fuzzer over every RPC of the etcd v3 API (tests/fuzz).

Per backend, ``K8S_SQL_FUZZ_REQUESTS`` requests (default 20,000: 60,000 per CI run on
three backends, plus 2 x ``K8S_SQL_FUZZ_ETCD_REQUESTS`` = 6,000 in the etcd
comparison) from a seeded RNG: well-formed requests with extreme field values,
byte-level mutations of them, garbage. Measured on 2 cores: about 400 requests/s on
SQLite (synchronous=FULL) and 650-700/s on PostgreSQL and MariaDB, so the module
takes about 2.5 minutes; set ``K8S_SQL_FUZZ_REQUESTS=500000`` for a long local run. Every answer must be one etcd
gives (tests/fuzz/oracle.py) and the server must keep its invariants
(tests/fuzz/driver.py): alive, answering, sentinels intact, revisions monotonic and
gap-free, every acknowledged write in the history, bounded RSS.

The same generated inputs go to a real etcd and to k8s-sql one at a time
(``test_fuzz_answers_match_etcd``): etcd's answers validate the oracle, and where the
two differ outside the differences the README documents, that is a finding.

``K8S_SQL_FUZZ_SEED`` replays a run's inputs; every failure message names the seed.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from conftest import ServerProcess
from fuzz import oracle, report, safety, wire
from fuzz.driver import CHANNEL_OPTIONS, Fuzzer, Results, Said, Violation
from fuzz.generate import METHODS, nested_txn

from k8s_sql.pb import rpc_pb2 as pb

REQUESTS = int(os.environ.get("K8S_SQL_FUZZ_REQUESTS", "20000"))
ETCD_REQUESTS = int(os.environ.get("K8S_SQL_FUZZ_ETCD_REQUESTS", "3000"))
# A fixed seed by default, so that CI's runs are reproducible; K8S_SQL_FUZZ_SEED=random
# explores (every failure prints the seed that replays it).
_seed = os.environ.get("K8S_SQL_FUZZ_SEED", "20261130")
SEED = random.SystemRandom().randrange(1, 1 << 31) if _seed == "random" else int(_seed)
RSS_BOUND_MIB = 48  # growth allowed between the warm-up and the end of a run


def _fail_lines(name: str, res: Results) -> list[str]:
    out = [f"{name}: seed {SEED} (K8S_SQL_FUZZ_SEED={SEED} to replay)"]
    out += [f"invariant broken: {b}" for b in res.broken]
    out += report.grouped(res.violations)
    return out


def backend_of(request: pytest.FixtureRequest) -> str:
    callspec = getattr(request.node, "callspec", None)
    param = callspec.params.get("backend_args") if callspec else None
    return str(param or "sqlite")


@pytest.mark.timeout(900)
def test_fuzz_every_rpc(k8s_sql: ServerProcess, request: pytest.FixtureRequest, record_property) -> None:
    """One backend under eight concurrent fuzzing clients: every answer is one etcd
    gives, every invariant holds (during the run and after it), every RPC was
    called, the server logged no exception and its RSS stayed within the bound."""
    name = f"k8s-sql/{backend_of(request)}"
    assert k8s_sql.proc is not None
    fuzzer = Fuzzer(k8s_sql.endpoint, seed=SEED, requests=REQUESTS, concurrency=8, pid=k8s_sql.proc.pid)
    res = asyncio.run(_run(fuzzer))
    print("\n" + report.summary(name, SEED, res))
    report.record(record_property, name, res)

    # Known, not yet explained: under this fuzzer (concurrent OPTIMIZE TABLE among the
    # reads) MariaDB has answered a few reads with errors of its own ("Table definition
    # has changed" past the retries, a lost internal temporary table), which k8s-sql
    # answers UNAVAILABLE "database unavailable" -- retryable, as for any database
    # trouble. At most a handful on MariaDB is tolerated and printed; anything else fails.
    unavailable = [v for v in res.violations if (v.code, v.details) == ("UNAVAILABLE", DATABASE_UNAVAILABLE)]
    if name.endswith("mariadb") and len(unavailable) <= 5:
        for v in unavailable:
            print(f"\n  tolerated (MariaDB read error, answered UNAVAILABLE): {v.line()[:300]}")
        res.violations = [v for v in res.violations if v not in unavailable]
    problems = _fail_lines(name, res) if res.violations or res.broken else []
    assert k8s_sql.proc.poll() is None, f"the server died (seed {SEED}):\n{k8s_sql.log()}"
    assert "Traceback" not in k8s_sql.log(), f"the server logged an exception (seed {SEED}):\n{k8s_sql.log()[-5000:]}"
    assert not problems, "\n".join(problems)
    missing = [m for m in oracle.ALLOWED if not any(rpc.endswith("." + m) for rpc, _ in res.table)]
    assert not missing, f"RPCs never called: {missing}"
    growth = (res.rss_end_kib - res.rss_warm_kib) // 1024
    assert growth <= RSS_BOUND_MIB, f"RSS grew {growth} MiB after the warm-up (bound {RSS_BOUND_MIB} MiB)"


async def _run(fuzzer: Fuzzer) -> Results:
    try:
        return await fuzzer.run()
    finally:
        await fuzzer.close()


# -- the same inputs on a real etcd -----------------------------------------------------------

# What the README documents as different from etcd: no authentication (every Auth
# call but AuthStatus answers "authentication is not enabled"), no membership changes
# ("not capable"), no alarms, and etcd 3.7's RangeStream (etcd 3.6 answers
# UNIMPLEMENTED). Answers to these may differ; nothing else may.
DOCUMENTED = {
    "RangeStream",
    *(m for m in oracle.ALLOWED if m.startswith(("Auth", "User", "Role")) and m != "AuthStatus"),
    "MemberAdd",
    "MemberRemove",
    "MemberUpdate",
    "MemberPromote",
    "MoveLeader",
    "Downgrade",
    "Alarm",
}


DATABASE_UNAVAILABLE = "etcdserver: request timed out, database unavailable"
TOO_DEEP = ("INVALID_ARGUMENT", "etcdserver: too many operations in txn request")


def _nesting(label: str) -> int:
    m = re.search(r"nested-(\d+)", label)
    return int(m[1]) if m else 0


def _documented_txn_depth(label: str, got: tuple[str, str]) -> bool:
    """A deliberate difference (docs/architecture.md, What differs from etcd): etcd
    runs txns nested up to 127 levels (each level spends one of the 128 ops); k8s-sql's
    protobuf decoder stops at 100 nested messages, so from about 50 levels it answers
    etcd's "too many operations" instead."""
    return _nesting(label) >= 50 and got == TOO_DEEP


def _documented_compact_zero(e: Any, got: tuple[str, str]) -> bool:
    """A deliberate difference: a new store counts as compacted at revision 0 (etcd's
    starts at -1), so Compact(0) on a never-compacted store answers "compacted"."""
    if e.method != "Compact" or e.code != "OK" or got != COMPACTED:
        return False
    try:
        first = e.frames.split(" ")[0].split(".")[0]  # the request's first bytes, in hex
        return pb.CompactionRequest.FromString(bytes.fromhex(first)).revision <= 0
    except Exception:
        return False


def _decode_error(code: str, details: str) -> bool:
    return code == "INTERNAL" and details.startswith(
        (oracle.UNARY_DECODE_PREFIX, oracle.STREAM_DECODE_PREFIX, oracle.CLIENT_CORE_ERROR)
    )


@dataclass
class Comparison:
    """The etcd comparison's outcome, each difference grouped by RPC, origin and the
    two answers, with its count and an example request."""

    compared: int = 0
    undocumented: list[str] = field(default_factory=list)
    documented: list[str] = field(default_factory=list)
    decoder: list[str] = field(default_factory=list)  # on malformed bytes only
    after_divergence: list[str] = field(default_factory=list)  # once the two stores differ


def compare_answers(etcd: Results, ours: Results) -> Comparison:
    """Pair the two runs' answers request by request, up to where the requests
    diverge (a server answered differently enough for the generator to draw
    something else). Requests the client cut short are skipped (whether a 1 ms
    deadline beats the answer is a race).

    A difference is "documented" on an RPC the README lists as different. It is a
    "decoder" difference when the request was malformed bytes and one side refused
    to decode them: etcd decodes with gogoproto, k8s-sql with upb, and they differ at
    the edges (gogoproto refuses a known field with the wrong wire type, which upb
    keeps as an unknown field; upb refuses unknown groups nested 100 deep, which
    gogoproto skips). On a well-formed request any difference counts, until the
    first one where a write succeeded on one side only: from there the stores differ
    (a revision, a compaction point), and later differences are listed as
    "after_divergence" rather than failing the test, since they may only echo it."""
    out = Comparison()
    groups: dict[tuple[str, str], list[Said]] = {}
    diverged = False
    for e, o in zip(etcd.answers, ours.answers, strict=False):
        if e.label != o.label:
            break
        out.compared += 1
        if e.client_end or oracle.same_answer((e.code, e.details), (o.code, o.details)):
            continue
        if (
            e.method in DOCUMENTED
            or _documented_txn_depth(e.label, (o.code, o.details))
            or (e.method == "HashKV" and e.code == "OK" and (o.code, o.details) == COMPACTED)
            or _documented_compact_zero(e, (o.code, o.details))
        ):
            kind = "documented"
        elif not e.wellformed and (_decode_error(e.code, e.details) or _decode_error(o.code, o.details)):
            kind = "decoder"
        elif diverged:
            kind = "after_divergence"
        else:
            kind = "undocumented"
        if e.method in safety.STATEFUL and "OK" in (e.code, o.code):
            diverged = True
        key = f"{e.method} [{e.origin}]: etcd {e.code} {e.details[:90]!r} / k8s-sql {o.code} {o.details[:90]!r}"
        groups.setdefault((kind, key), []).append(e)
    for (kind, key), said in sorted(groups.items()):
        getattr(out, kind).append(f"{len(said)}x {key} (e.g. {said[0].label}: {said[0].frames})")
    return out


ETCD_QUIRKS = [
    # (what, predicate on a violation of the oracle by etcd)
    (
        "gogoproto refuses a known field sent with another wire type",
        lambda x: x.reason.startswith("INTERNAL (decode error) for bytes that do decode") and "wireType" in x.details,
    ),
    (
        "etcd answers some errors without a gRPC status (UNKNOWN)",
        lambda x: x.code == "UNKNOWN" and x.method in ("Cluster.MemberRemove", "Maintenance.Downgrade"),
    ),
    (
        "etcd stores invalid UTF-8 in string fields (accepted by gogoproto) and returns it",
        lambda x: x.reason.startswith("undecodable response") and "UTF-8" in x.reason,
    ),
    (
        "etcd answers UNKNOWN for a password longer than bcrypt's 72 bytes",
        lambda x: x.code == "UNKNOWN" and "bcrypt" in x.details,
    ),
    (
        "gRPC's client reports a watch stream etcd reset (malformed or oversized frames) as 'Internal error from Core'",
        lambda x: x.code == "INTERNAL" and x.details == "Internal error from Core" and x.method == "Watch.Watch",
    ),
    (
        # Seen once in CI (a Watch with fragment and a malformed frame, 20 s without the
        # progress reply); the same seed's request was answered on every other run, here
        # and in CI. The oracle's flake, not k8s-sql's: k8s-sql's own hangs still fail.
        "etcd's watch stream, on a loaded machine, may leave the probe's progress request unanswered",
        lambda x: x.code == "DEADLINE_EXCEEDED" and x.method == "Watch.Watch",
    ),
]


def etcd_quirk(x: Violation) -> str | None:
    return next((what for what, pred in ETCD_QUIRKS if pred(x)), None)


@pytest.mark.timeout(900)
def test_fuzz_answers_match_etcd(etcd: ServerProcess, k8s_sql_factory, record_property) -> None:
    """The same generated requests, one at a time, to etcd and to k8s-sql (SQLite):
    etcd's answers must satisfy the oracle but for its known quirks (else the oracle
    is wrong), and k8s-sql must answer as etcd does wherever the README documents no
    difference, decoder differences on malformed bytes aside (they are listed)."""
    ours = k8s_sql_factory("--watch-progress-notify-interval", "1s")
    results = {}
    for name, server in (("etcd", etcd), ("k8s-sql/sqlite", ours)):
        assert server.proc is not None
        fuzzer = Fuzzer(server.endpoint, seed=SEED, requests=ETCD_REQUESTS, sequential=True, pid=server.proc.pid)
        results[name] = res = asyncio.run(_run(fuzzer))
        print("\n" + report.summary(f"{name} (sequential)", SEED, res))
        report.record(record_property, f"{name} (sequential)", res)
    etcd_res, ours_res = results["etcd"], results["k8s-sql/sqlite"]
    cmp = compare_answers(etcd_res, ours_res)
    quirks = Counter(q for x in etcd_res.violations if (q := etcd_quirk(x)))
    print(
        f"\ncompared {cmp.compared} answers: {len(cmp.undocumented)} undocumented, {len(cmp.documented)} documented "
        f"and {len(cmp.decoder)} decoder differences, {len(cmp.after_divergence)} after the stores diverged; "
        f"etcd's own quirks: {dict(quirks)}"
    )
    for kind in ("documented", "decoder", "after_divergence", "undocumented"):
        for line in getattr(cmp, kind):
            print(f"  {kind}: {line}")
    problems = [
        f"etcd breaks the oracle: {line}"
        for line in report.grouped([x for x in etcd_res.violations if etcd_quirk(x) is None])
    ]
    problems += [f"etcd: invariant broken: {b}" for b in etcd_res.broken]
    if ours_res.violations or ours_res.broken:
        problems += _fail_lines("k8s-sql/sqlite", ours_res)
    problems += [f"k8s-sql answers differently from etcd: {line}" for line in cmp.undocumented]
    assert cmp.compared >= min(len(etcd_res.answers), len(ours_res.answers)) * 0.9, (
        f"the runs diverged after {cmp.compared} requests (seed {SEED})"
    )
    assert not problems, "\n".join([f"seed {SEED}", *problems])


# -- findings: minimal reproductions, each against a real etcd ------------------------------

M64, m64 = (1 << 63) - 1, -(1 << 63)
DEEP_LEAF = pb.TxnRequest(success=[pb.RequestOp(request_put=pb.PutRequest(key=b"fz/deep", value=b"x"))])

# (what, RPC, request bytes, response fields compared when both answer OK). In order,
# on fresh stores: the first Compact must be the first compaction either store sees.
EXTREMES: list[tuple[str, str, bytes, tuple[str, ...]]] = [
    # etcd records a compaction at revision 0 on a never-compacted store and answers OK;
    # k8s-sql answered OUT_OF_RANGE "required revision has been compacted"
    ("Compact(revision=0) on a fresh store", "Compact", pb.CompactionRequest(revision=0).SerializeToString(), ()),
    ("Compact(revision=0) again", "Compact", pb.CompactionRequest(revision=0).SerializeToString(), ()),
    # etcd keeps the hash it computed at each of its last compactions and answers
    # HashKV at those revisions after a later compaction; k8s-sql answered "compacted"
    *((f"Put fz/h{i}", "Put", pb.PutRequest(key=b"fz/h%d" % i).SerializeToString(), ()) for i in (2, 3, 4)),
    ("Compact(revision=2)", "Compact", pb.CompactionRequest(revision=2).SerializeToString(), ()),
    ("Compact(revision=3)", "Compact", pb.CompactionRequest(revision=3).SerializeToString(), ()),
    ("HashKV(revision=2) after Compact(3)", "HashKV", pb.HashKVRequest(revision=2).SerializeToString(), ()),
    ("HashKV(revision=1) after Compact(3)", "HashKV", pb.HashKVRequest(revision=1).SerializeToString(), ()),
    # etcd's checkTxnReq gives each nesting level the op budget left by the level above,
    # so a chain of single-op txns is accepted up to 127 levels; k8s-sql refused from 50
    *(
        (f"txn nested {d} deep", "Txn", nested_txn(d, DEEP_LEAF, 2), ("succeeded",))
        for d in (10, 49, 50, 64, 100, 127, 128, 1000)
    ),
    # known from the hardening issue: limits and keys at the extremes
    *(
        (f"Range limit={n}", "Range", pb.RangeRequest(key=b"fz/", range_end=b"fz0", limit=n).SerializeToString(),
         ("count", "more"))
        for n in (M64, m64, -1)
    ),
    ("Put with a 1,000,000-byte key", "Put", pb.PutRequest(key=b"fz/" + b"K" * 1_000_000).SerializeToString(), ()),
    ("Range of the 1,000,000-byte key", "Range", pb.RangeRequest(key=b"fz/" + b"K" * 1_000_000).SerializeToString(),
     ("count",)),
    # the short TTLs the sequential comparison leaves out (etcd grants its minimum)
    *(
        (f"LeaseGrant TTL={t}", "LeaseGrant", pb.LeaseGrantRequest(TTL=t).SerializeToString(), ("TTL",))
        for t in (0, 1, 2, -1, m64, M64, 9_000_000_000, 9_000_000_001)
    ),
    *(
        (f"LeaseGrant ID={i}", "LeaseGrant", pb.LeaseGrantRequest(TTL=60, ID=i).SerializeToString(), ("ID", "TTL"))
        for i in (-1, m64, M64)
    ),
    ("LeaseTimeToLive ID=min", "LeaseTimeToLive", pb.LeaseTimeToLiveRequest(ID=m64).SerializeToString(),
     ("ID", "TTL", "grantedTTL")),
]  # fmt: skip


# Deliberate differences, by backend: PostgreSQL and MariaDB cannot index keys past
# about 2.7 KB and 3 KB, and k8s-sql refuses such keys (errors.KeyTooLong) rather than
# fail in SQL. etcd's only limit is the request size.
COMPACTED = ("OUT_OF_RANGE", "etcdserver: mvcc: required revision has been compacted")
DELIBERATE: dict[str, Callable[[str, tuple[str, str]], bool]] = {
    # etcd starts with no compaction (-1), so Compact(0) records one at 0; k8s-sql's
    # store starts compacted at 0 (docs/architecture.md, What differs from etcd).
    "Compact(revision=0) on a fresh store": lambda backend, got: got == COMPACTED,
    # etcd keeps the hashes it computed at its last compactions; k8s-sql computes
    # HashKV from the retained history only.
    "HashKV(revision=2) after Compact(3)": lambda backend, got: got == COMPACTED,
    "HashKV(revision=1) after Compact(3)": lambda backend, got: got == COMPACTED,
    **{f"txn nested {d} deep": (lambda backend, got: got == TOO_DEEP) for d in (50, 64, 100, 127)},
    "Put with a 1,000,000-byte key": lambda backend, got: (
        backend in ("postgres", "mariadb")
        and got[0] == "INVALID_ARGUMENT"
        and got[1].startswith("etcdserver: key is too long for this database")
    ),
    "Range of the 1,000,000-byte key": lambda backend, got: (
        backend in ("postgres", "mariadb") and got == ("OK", "count=0")
    ),
}


async def _ask(endpoint: str, name: str, data: bytes, fields: tuple[str, ...]) -> tuple[str, str]:
    m = METHODS[name]
    async with grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS) as ch:
        try:
            raw = await ch.unary_unary(m.path, request_serializer=None, response_deserializer=None)(data, timeout=30)
        except grpc.aio.AioRpcError as e:
            return e.code().name, e.details() or ""
    return "OK", " ".join(f"{f}={_top_level_int(m.response, raw, f)}" for f in fields)


def _top_level_int(cls: type, raw: bytes, name: str) -> int:
    """An integer field of a response, read from the wire: a txn nested 100 deep is
    answered as deep, past what this client's decoder accepts."""
    number = cls.DESCRIPTOR.fields_by_name[name].number
    found = [f for f in wire.parse(raw)[0] if f.number == number and f.wire_type == wire.VARINT]
    if not found:
        return 0
    n = wire.read_varint(found[-1].payload, 0)[0]
    return n - (1 << 64) if n >= 1 << 63 else n


def test_extremes_match_etcd(etcd: ServerProcess, k8s_sql: ServerProcess, request: pytest.FixtureRequest) -> None:
    """Requests with extreme fields that the fuzzer found answered differently from
    etcd, or that the hardening issue names, each sent to a fresh etcd and a fresh
    k8s-sql: the same code, message and (when OK) the fields that matter."""

    backend = backend_of(request)

    async def both() -> list[str]:
        differ = []
        for what, name, data, fields in EXTREMES:
            want = await _ask(etcd.endpoint, name, data, fields)
            got = await _ask(k8s_sql.endpoint, name, data, fields)
            if want != got and not (what in DELIBERATE and DELIBERATE[what](backend, got)):
                differ.append(f"{what}: etcd {want[0]} {want[1][:100]!r}, k8s-sql {got[0]} {got[1][:100]!r}")
        return differ

    differ = asyncio.run(both())
    assert not differ, f"k8s-sql/{backend} differs from etcd:\n" + "\n".join(differ)
