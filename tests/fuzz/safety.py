"""What the fuzzer may not send, so the invariants it checks stay checkable.

- No write or delete may reach the sentinel interval ``[SENTINEL_PREFIX,
  SENTINEL_END)``: a sentinel that changes is then a server bug, never the fuzzer's
  own doing. Reads, compares and watches may name the sentinels.
- No compaction may pass ``hints.floor``: the final check replays the history after
  it. A revision between the floor and the current one is refused here; a revision
  far in the future is allowed (the server must refuse it), and near the current one
  only when requests go one at a time (``hints.sequential``).
- No Auth request may name the user "root": on a real etcd, a root user with the
  root role lets AuthEnable succeed, after which every request without a token fails.
- When a real etcd is in the run (``hints.sequential``), no lease shorter than a
  minute (``generate.lease_grant`` says why), no MemberAdd but of a learner (a
  voting member that never starts takes etcd's quorum, and every later request
  times out), and no Alarm action other than
  GET, ACTIVATE, DEACTIVATE: etcd 3.6.16 dereferences a nil response for any other
  action and the whole process panics (``maintenanceServer.Alarm``,
  maintenance.go:251), so there is no etcd answer to compare with.

When two servers are compared, a malformed write must also read the same to both
(``same_to_every_decoder``), else one server applies it and the other refuses it, and
every later answer about that key or lease differs for that one reason.

The check runs on what the server will decode: the same bytes through the same
protobuf library (upb) the server uses. Bytes that do not decode are always safe.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError, Message

from k8s_sql.pb import rpc_pb2 as pb

from . import values as v
from .generate import Hints, Method


def _touches(key: bytes, range_end: bytes) -> bool:
    """Whether etcd's interval for (key, range_end) meets the sentinel interval: one
    key when range_end is empty, every key >= key for "\\0", else [key, range_end)."""
    lo, hi = v.SENTINEL_PREFIX, v.SENTINEL_END
    if not range_end:
        return lo <= key < hi
    if range_end == b"\0":
        return key < hi
    return key < hi and range_end > lo and key < range_end


def _ops_safe(ops: object) -> bool:
    for op in ops:  # type: ignore[attr-defined]
        kind = op.WhichOneof("request")
        if kind == "request_put" and _touches(op.request_put.key, b""):
            return False
        if kind == "request_delete_range" and _touches(op.request_delete_range.key, op.request_delete_range.range_end):
            return False
        if kind == "request_txn" and not txn_safe(op.request_txn):
            return False
    return True


def txn_safe(t: pb.TxnRequest) -> bool:
    """Both branches, nested txns included: which branch runs depends on state."""
    return _ops_safe(t.success) and _ops_safe(t.failure)


def compaction_safe(revision: int, hints: Hints) -> bool:
    if revision <= hints.floor:
        return True
    if hints.sequential:
        return revision > hints.revision
    return revision > hints.revision + 100_000


def message_safe(name: str, msg: Message, hints: Hints) -> bool:
    if name == "Put":
        return not _touches(msg.key, b"")  # type: ignore[attr-defined]
    if name == "DeleteRange":
        return not _touches(msg.key, msg.range_end)  # type: ignore[attr-defined]
    if name == "Txn":
        return txn_safe(msg)  # type: ignore[arg-type]
    if name == "Compact":
        return compaction_safe(msg.revision, hints)  # type: ignore[attr-defined]
    if name == "UserAdd":
        return msg.name != "root"  # type: ignore[attr-defined]
    if name == "LeaseGrant" and hints.sequential:
        return msg.TTL >= 60  # type: ignore[attr-defined]  # see generate.lease_grant
    if name == "MemberAdd" and hints.sequential:
        return msg.isLearner  # type: ignore[attr-defined]  # a voter that never starts costs etcd its quorum
    if name == "Alarm" and hints.sequential:
        return msg.action in (0, 1, 2)  # type: ignore[attr-defined]
    return True


def decode(m: Method, data: bytes) -> Message | None:
    try:
        return m.request.FromString(data)
    except DecodeError:
        return None
    except Exception:  # upb raises its own types for a few inputs
        return None


def frame_safe(m: Method, data: bytes, hints: Hints) -> bool:
    msg = decode(m, data)
    return msg is None or message_safe(m.name, msg, hints)


# RPCs whose effect later answers depend on
STATEFUL = frozenset({"Put", "DeleteRange", "Txn", "Compact", "LeaseGrant", "LeaseRevoke", "Alarm"})


def same_to_every_decoder(m: Method, data: bytes) -> bool:
    """Whether any protobuf decoder must read ``data`` as upb does: it decodes and is
    the canonical encoding of what it decodes to (no unknown fields, no duplicate or
    out-of-order fields, no over-long varints, no wrong wire types). gogoproto (etcd)
    and upb (k8s-sql) disagree on some non-canonical inputs: a known field with
    another wire type, a group whose end does not match, a oneof member sent twice."""
    msg = decode(m, data)
    if msg is None:
        return False
    msg.DiscardUnknownFields()  # upb keeps unknown fields and writes them back out
    return msg.SerializeToString() == data
