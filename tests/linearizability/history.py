"""The records a run produces: client operations and watch streams, as plain Python.

Nothing here knows protobuf: ``workload`` converts responses, and the self-test builds
histories by hand or by simulation. Times are ``time.monotonic()`` seconds taken in
one process, so real-time order between any two records is well defined.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# --- values ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KV:
    """A key's state as etcd reports it (``mvccpb.KeyValue`` without the raft fields)."""

    key: bytes
    value: bytes
    create: int
    mod: int
    version: int
    lease: int = 0


# --- requests ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Put:
    key: bytes
    value: bytes
    lease: int = 0
    prev_kv: bool = False


@dataclass(frozen=True)
class Delete:
    key: bytes
    end: bytes = b""  # etcd's range_end: empty means the single key
    prev_kv: bool = False


@dataclass(frozen=True)
class Range:
    key: bytes
    end: bytes = b""
    revision: int = 0  # 0: the current state
    limit: int = 0
    count_only: bool = False
    serializable: bool = False


CompareTarget = Literal["value", "version", "create", "mod", "lease"]
CompareResult = Literal["=", "!=", "<", ">"]


@dataclass(frozen=True)
class Compare:
    key: bytes
    target: CompareTarget
    result: CompareResult
    operand: bytes | int


TxnOp = Put | Delete | Range


@dataclass(frozen=True)
class Txn:
    compares: tuple[Compare, ...]
    success: tuple[TxnOp, ...]
    failure: tuple[TxnOp, ...] = ()


@dataclass(frozen=True)
class LeaseGrant:
    ttl: int
    id: int = 0  # client-chosen ID (0: the server chooses)


@dataclass(frozen=True)
class LeaseRevoke:
    lease: int


@dataclass(frozen=True)
class LeaseKeepAlive:
    lease: int


@dataclass(frozen=True)
class Compact:
    revision: int


Request = Put | Delete | Range | Txn | LeaseGrant | LeaseRevoke | LeaseKeepAlive | Compact

# --- responses --------------------------------------------------------------------------


@dataclass(frozen=True)
class PutResp:
    prev: KV | None = None


@dataclass(frozen=True)
class DeleteResp:
    deleted: int
    prevs: tuple[KV, ...] = ()


@dataclass(frozen=True)
class RangeResp:
    kvs: tuple[KV, ...]
    count: int
    more: bool = False


OpResp = PutResp | DeleteResp | RangeResp


@dataclass(frozen=True)
class TxnResp:
    succeeded: bool
    responses: tuple[OpResp, ...]


@dataclass(frozen=True)
class LeaseGrantResp:
    id: int
    ttl: int


@dataclass(frozen=True)
class KeepAliveResp:
    ttl: int  # 0: the lease is gone (etcd answers a keepalive of an unknown lease so)


@dataclass(frozen=True)
class Empty:
    """A response with nothing but its header (LeaseRevoke, Compact)."""


Response = PutResp | DeleteResp | RangeResp | TxnResp | LeaseGrantResp | KeepAliveResp | Empty

# The errors whose meaning is definite: the request had no effect, for the stated reason.
# Every other error (UNAVAILABLE, DEADLINE_EXCEEDED, ...) leaves the outcome unknown.
COMPACTED = "compacted"
FUTURE = "future-revision"
LEASE_NOT_FOUND = "lease-not-found"
DEFINITE_ERRORS = (COMPACTED, FUTURE, LEASE_NOT_FOUND)


@dataclass
class Op:
    """One client request.

    ``status``: "ok" (``resp`` and ``revision``, the header revision, are set), "error"
    (``error`` is one of ``DEFINITE_ERRORS``: no effect), or "unknown" (no answer, or an
    error that does not say whether the request took effect; ``ret`` is then None,
    since the request may take effect at any later time).
    """

    id: int
    client: str
    req: Request
    inv: float
    ret: float | None = None
    status: Literal["ok", "error", "unknown"] = "unknown"
    resp: Response | None = None
    revision: int = 0
    error: str = ""  # a DEFINITE_ERRORS kind, or the code and details of an unknown outcome
    endpoint: str = ""

    def describe(self) -> str:
        end = f"{self.ret:.3f}" if self.ret is not None else "?"
        where = f" rev {self.revision}" if self.status == "ok" else f" {self.status} {self.error}".rstrip()
        return f"op#{self.id} {self.client} [{self.inv:.3f}..{end}] {self.req}{where}"


# --- watches ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    type: Literal["put", "delete"]
    kv: KV  # for a delete: the key and the deleting revision (mod), other fields zero
    prev: KV | None = None


@dataclass(frozen=True)
class WatchCreate:
    key: bytes
    end: bytes = b""
    start_revision: int = 0
    prev_kv: bool = False
    progress_notify: bool = False


@dataclass(frozen=True)
class WatchResp:
    """One WatchResponse. ``watch_id`` -1 with no events is a stream-wide progress reply
    (etcd's answer to RequestProgress)."""

    t: float
    watch_id: int
    header_revision: int
    events: tuple[Event, ...] = ()
    created: bool = False
    canceled: bool = False
    compact_revision: int = 0
    cancel_reason: str = ""

    @property
    def is_progress(self) -> bool:
        return not self.events and not self.created and not self.canceled


@dataclass
class WatchStream:
    """One Watch RPC. ``creates`` are the create requests in the order sent (etcd answers
    them in that order, so the n-th created response belongs to the n-th create).
    ``chain`` names a logical watch that is resumed on a new stream after a fault: the
    next stream of the chain starts at the revision after the last one delivered."""

    id: str
    endpoint: str
    creates: list[WatchCreate] = field(default_factory=list)
    responses: list[WatchResp] = field(default_factory=list)
    chain: str = ""
    reference: bool = False  # watches every key from the chain's start: the witness of the write order
    end: str = ""  # why it ended (for the report)


@dataclass
class History:
    ops: list[Op] = field(default_factory=list)
    streams: list[WatchStream] = field(default_factory=list)
    initial_revision: int = 1  # the store's revision before the run (a fresh store: 1, empty)
    # After the run: the revision of the final read (nothing changes after it: the reference
    # watch must reach it and nothing beyond), and the leases that still exist then.
    final_revision: int = 0
    final_leases: frozenset[int] | None = None
