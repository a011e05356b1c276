"""Recording the differential generator's operations and a real etcd's answers.

Run by hand (the real etcd comes from ``peers/build.sh``, found as tests/conftest.py's
``peers_bin`` finds it)::

    python3 -m tests.differential.record --seed 11 --ops 800

writes ``tests/differential/recorded/seed-11.jsonl``: the trace that
``tests/inprocess`` replays through the store, without gRPC or an etcd, and compares
answer by answer with ``compare.normalize`` (as the differential test does).

A trace is JSON lines. The first line describes the recording::

    {"trace": "k8s-sql/differential", "format": 1, "seed": 11, "ops": 800, "etcd": "3.6.16"}

then one line per operation, in the order sent::

    {"i": 0, "t": 0.0021, "kind": "Put", "note": "put", "request": "<base64>",
     "etcd": "<base64>" | "etcd_error": {"code": "NOT_FOUND", "details": "etcdserver: ..."},
     "values": [...]}

``kind`` is the gRPC method, ``request`` and ``etcd`` the request's and etcd's
answer's binary protobuf encodings (``request_z``/``etcd_z``: zlib-compressed, for
the long ones such as the 1.8 MB requests and 128-op txns; protobuf's text format
would be readable but takes six times as long to parse). ``t`` is when the
request was sent, in seconds from the first one: the replay runs the store on a
clock that follows it, so that remaining lease TTLs compare. ``values`` (rarely
present) holds what ``compare.normalize`` asked the oracle: the values of a range
at a revision, used to group a ``keys_only`` answer sorted by value --
``[{"key": b64, "range_end": b64, "revision": n, "kvs": [[b64 key, b64 value], ...]}]``.

Read a trace with ``python3 -m tests.differential.record --show FILE``.

The answers are etcd's own messages, not their normalised form: the replay
normalises both sides with the same ``compare.normalize``, so a trace stays valid
when the normalisation changes. Only the response headers' ``cluster_id``,
``member_id`` and ``raft_term`` are recorded as 1 where set (compare.py compares
only whether they are set). Re-record a seed after changing ``ops.py``.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from google.protobuf.message import Message

from k8s_sql.pb import rpc_pb2 as pb

from .compare import HEADER, Result, RpcError, normalize
from .harness import CALL_TIMEOUT, Side, _result
from .ops import Generator, Op

FORMAT = 1
RECORDED = Path(__file__).resolve().parent / "recorded"
COMPRESS_ABOVE = 1024  # bytes: longer messages are stored compressed

# The messages each kind of request and answer decodes to.
REQUESTS: dict[str, type[Message]] = {
    "Range": pb.RangeRequest,
    "Put": pb.PutRequest,
    "DeleteRange": pb.DeleteRangeRequest,
    "Txn": pb.TxnRequest,
    "Compact": pb.CompactionRequest,
    "LeaseGrant": pb.LeaseGrantRequest,
    "LeaseRevoke": pb.LeaseRevokeRequest,
    "LeaseTimeToLive": pb.LeaseTimeToLiveRequest,
    "LeaseLeases": pb.LeaseLeasesRequest,
    "LeaseKeepAlive": pb.LeaseKeepAliveRequest,
}
RESPONSES: dict[str, type[Message]] = {
    "Range": pb.RangeResponse,
    "Put": pb.PutResponse,
    "DeleteRange": pb.DeleteRangeResponse,
    "Txn": pb.TxnResponse,
    "Compact": pb.CompactionResponse,
    "LeaseGrant": pb.LeaseGrantResponse,
    "LeaseRevoke": pb.LeaseRevokeResponse,
    "LeaseTimeToLive": pb.LeaseTimeToLiveResponse,
    "LeaseLeases": pb.LeaseLeasesResponse,
    "LeaseKeepAlive": pb.LeaseKeepAliveResponse,
}


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def unb64(s: str) -> bytes:
    return base64.b64decode(s)


def plain_identity(msg: Message) -> None:
    """Every response header's ``cluster_id``, ``member_id`` and ``raft_term`` set to 1
    where set: they differ between any two clusters, compare.py compares only whether
    they are set, and so a trace is smaller and a re-recording differs less."""
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        for sub in value if field.is_repeated else (value,):
            if sub.DESCRIPTOR.full_name == HEADER:
                for name in ("cluster_id", "member_id", "raft_term"):
                    if getattr(sub, name):
                        setattr(sub, name, 1)
            else:
                plain_identity(sub)


def encode_message(name: str, msg: Message) -> dict[str, str]:
    """``{name: base64 of the binary encoding}``, or ``{name + "_z": the same
    zlib-compressed}`` when it is long."""
    data = msg.SerializeToString(deterministic=True)
    if len(data) <= COMPRESS_ABOVE:
        return {name: b64(data)}
    return {f"{name}_z": b64(zlib.compress(data, 9))}


def decode_message(line: dict[str, Any], name: str, cls: type[Message]) -> Message | None:
    msg = cls()
    if name in line:
        msg.ParseFromString(unb64(line[name]))
        return msg
    if f"{name}_z" in line:
        msg.ParseFromString(zlib.decompress(unb64(line[f"{name}_z"])))
        return msg
    return None


class Values:
    """``compare.ValuesAt`` over recorded lookups: what etcd held in a range at a revision."""

    def __init__(self, recorded: list[dict[str, Any]] | None = None) -> None:
        self.seen: dict[tuple[bytes, bytes, int], dict[bytes, bytes]] = {}
        for v in recorded or []:
            kvs = {unb64(k): unb64(x) for k, x in v["kvs"]}
            self.seen[(unb64(v["key"]), unb64(v["range_end"]), v["revision"])] = kvs

    @staticmethod
    def at(r: pb.RangeRequest, revision: int) -> tuple[bytes, bytes, int]:
        return r.key, r.range_end, r.revision if r.revision > 0 else revision

    def __call__(self, r: pb.RangeRequest, revision: int) -> dict[bytes, bytes]:
        # A lookup never recorded (the answer under test differs from etcd's in its
        # revision or keys, which the comparison reports anyway) finds nothing.
        return self.seen.get(self.at(r, revision), {})

    def dump(self) -> list[dict[str, Any]]:
        return [
            {"key": b64(k), "range_end": b64(e), "revision": rev, "kvs": [[b64(a), b64(b)] for a, b in kvs.items()]}
            for (k, e, rev), kvs in self.seen.items()
        ]


class OracleValues(Values):
    """Asks the real etcd, and remembers the answers for the trace."""

    def __init__(self, side: Side) -> None:
        super().__init__()
        self.side = side

    def __call__(self, r: pb.RangeRequest, revision: int) -> dict[bytes, bytes]:
        key, end, rev = self.at(r, revision)
        if (key, end, rev) not in self.seen:
            resp = self.side.kv.Range(pb.RangeRequest(key=key, range_end=end, revision=rev), timeout=CALL_TIMEOUT)
            self.seen[(key, end, rev)] = {kv.key: kv.value for kv in resp.kvs}
        return self.seen[(key, end, rev)]


# -- reading a trace (the replay's side) -------------------------------------------------


def read_trace(path: Path) -> tuple[dict[str, Any], Iterator[tuple[dict[str, Any], Op, Result, Values]]]:
    """The header, and each operation: its line, the request, etcd's answer and the
    recorded oracle lookups."""
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: trace format {header.get('format')}, expected {FORMAT}")

    def ops() -> Iterator[tuple[dict[str, Any], Op, Result, Values]]:
        for raw in lines[1:]:
            line = json.loads(raw)
            kind = line["kind"]
            request = decode_message(line, "request", REQUESTS[kind])
            assert request is not None, f"{path}: op {line['i']} has no request"
            answer: Result | None
            if "etcd_error" in line:
                answer = RpcError(line["etcd_error"]["code"], line["etcd_error"]["details"])
            else:
                answer = decode_message(line, "etcd", RESPONSES[kind])
            assert answer is not None, f"{path}: op {line['i']} has no answer"
            yield line, Op(kind, request, line.get("note", "")), answer, Values(line.get("values"))

    return header, ops()


# -- recording -----------------------------------------------------------------------------


def record(seed: int, n_ops: int, endpoint: str, out: Path, etcd_version: str) -> dict[str, int]:
    """Send ``n_ops`` generated operations to the etcd at ``endpoint``; write the trace."""
    side = Side("etcd", endpoint)
    gen = Generator(seed)
    kinds: dict[str, int] = {}
    header = {"trace": "k8s-sql/differential", "format": FORMAT, "seed": seed, "ops": n_ops, "etcd": etcd_version}
    lines = [json.dumps(header)]
    start = time.monotonic()
    try:
        for i in range(n_ops):
            op = gen.next()
            t = time.monotonic() - start
            answer = _result(side.start(op.kind, op.request))
            gen.observe(op, answer)
            values = OracleValues(side)
            normalize(op.kind, op.request, answer, values)  # only to learn what it asks the oracle
            line: dict[str, Any] = {"i": i, "t": round(t, 4), "kind": op.kind, "note": op.note}
            line.update(encode_message("request", op.request))
            if isinstance(answer, RpcError):
                line["etcd_error"] = {"code": answer.code, "details": answer.details}
            else:
                plain_identity(answer)
                line.update(encode_message("etcd", answer))
            if values.seen:
                line["values"] = values.dump()
            lines.append(json.dumps(line, ensure_ascii=True))
            kinds[op.kind] = kinds.get(op.kind, 0) + 1
    finally:
        side.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return kinds


def show(path: Path) -> None:
    """Print a trace readably: each request and etcd's answer in protobuf's text format."""
    header, ops = read_trace(path)
    print(json.dumps(header))
    for line, op, answer, _ in ops:
        print(f"#{line['i']} t={line['t']} {op.kind} [{op.note}]")
        print(f"  > {text_format.MessageToString(op.request, as_one_line=True)[:2000]}")
        if isinstance(answer, RpcError):
            print(f"  < error {answer.code}: {answer.details}")
        else:
            print(f"  < {text_format.MessageToString(answer, as_one_line=True)[:2000]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m tests.differential.record", description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int)
    p.add_argument("--ops", type=int, default=800)
    p.add_argument("--out", type=Path, help="default: tests/differential/recorded/seed-SEED.jsonl")
    p.add_argument("--etcd-endpoint", help="an etcd to record from (must be fresh); default: start one")
    p.add_argument("--show", type=Path, metavar="TRACE", help="print a recorded trace readably instead")
    args = p.parse_args(argv)
    if args.show:
        show(args.show)
        return 0
    if args.seed is None:
        p.error("--seed is required")
    out = args.out or RECORDED / f"seed-{args.seed}.jsonl"

    # tests/conftest.py knows how to find and start the real etcd.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from conftest import PEERS_BIN, PEERS_VERSION, ServerProcess, etcd_argv, free_port

    version = PEERS_VERSION.lstrip("v")
    started = time.monotonic()
    if args.etcd_endpoint:
        kinds = record(args.seed, args.ops, args.etcd_endpoint, out, version)
    else:
        if not (PEERS_BIN / "etcd").exists():
            print(f"no etcd at {PEERS_BIN}: build it with peers/build.sh (or set K8S_SQL_PEERS_BIN)", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory(prefix="k8s-sql-record-") as tmp:
            port, peer = free_port(), free_port()
            data = Path(tmp) / "etcd"
            etcd = ServerProcess(
                f"127.0.0.1:{port}", data, etcd_argv(PEERS_BIN, port, peer, data), Path(tmp) / "etcd.log"
            )
            etcd.start()
            try:
                kinds = record(args.seed, args.ops, etcd.endpoint, out, version)
            finally:
                etcd.stop()
    size = out.stat().st_size
    print(
        f"recorded seed {args.seed}: {args.ops} operations in {time.monotonic() - started:.1f}s, "
        f"{size // 1024} KB to {out} ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
