"""Turning two servers' answers into comparable trees, and diffing them field by field.

Only what must differ between two servers is normalised:

* ``cluster_id``, ``member_id`` and ``raft_term`` of every response header (only
  whether they are set is compared);
* lease IDs chosen by the servers (the harness maps k8s-sql's IDs onto etcd's before
  comparing, see :func:`map_ids`);
* the remaining TTL of ``LeaseTimeToLive`` (the two leases were granted, and are
  read, a few milliseconds apart), compared to within one second;
* the order of ties when a range sorts by a non-unique target (etcd's ``sort.Sort``
  is not stable): tie groups are compared as sets, and the last group of a response
  truncated by ``limit`` -- where the two servers may legitimately have kept
  different members of the group -- only by its sort value and size;
* the order of ``LeaseTimeToLive.keys`` and ``LeaseLeases.leases`` (compared as sets).

Everything else, including presence of sub-messages, must be equal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from k8s_sql.pb import rpc_pb2 as pb

RR = pb.RangeRequest
ID_FIELDS = frozenset({"lease", "ID"})
HEADER = "etcdserverpb.ResponseHeader"


@dataclass(frozen=True)
class RpcError:
    """A failed call: the gRPC status code and the details string."""

    code: str
    details: str


Result = Message | RpcError


class Ttl(int):
    """A remaining TTL: equal to another within one second."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, int) and abs(int(self) - int(other)) <= 1

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = int.__hash__


def map_ids(msg: Message, mapping: dict[int, int]) -> None:
    """Replace, in place, every lease ID (fields ``lease`` and ``ID``) found in ``mapping``."""
    for field, value in msg.ListFields():
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for sub in value if field.is_repeated else (value,):
                map_ids(sub, mapping)
        elif field.name in ID_FIELDS and not field.is_repeated and value in mapping:
            setattr(msg, field.name, mapping[value])


def to_tree(msg: Message) -> dict[str, Any]:
    """Every field of ``msg`` (defaults included; absent sub-messages as None)."""
    if msg.DESCRIPTOR.full_name == HEADER:
        # Identity differs between any two clusters: compare only whether it is set.
        return {
            "revision": msg.revision,  # type: ignore[attr-defined]
            "cluster_id_set": msg.cluster_id != 0,  # type: ignore[attr-defined]
            "member_id_set": msg.member_id != 0,  # type: ignore[attr-defined]
            "raft_term_set": msg.raft_term != 0,  # type: ignore[attr-defined]
        }
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.is_repeated:
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                out[field.name] = [to_tree(v) for v in value]
            else:
                out[field.name] = list(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            out[field.name] = to_tree(value) if msg.HasField(field.name) else None
        else:
            out[field.name] = value
    return out


# values_at(range request, header revision) -> {key: value} of the range at that revision,
# used to group a keys_only response sorted by VALUE (its values are not in the response).
ValuesAt = Callable[[pb.RangeRequest, int], dict[bytes, bytes]]


def effective_sort(r: pb.RangeRequest) -> int:
    """etcd's executeRange: a non-KEY target defaults to ASCEND, KEY/ASCEND is NONE."""
    order = r.sort_order
    if r.sort_target != RR.KEY and order == RR.NONE:
        return RR.ASCEND
    if r.sort_target == RR.KEY and order == RR.ASCEND:
        return RR.NONE
    return order


_SORT_FIELD = {RR.VERSION: "version", RR.CREATE: "create_revision", RR.MOD: "mod_revision", RR.VALUE: "value"}


def _norm_range(r: pb.RangeRequest, tree: dict[str, Any], values_at: ValuesAt) -> None:
    if effective_sort(r) == RR.NONE or r.sort_target == RR.KEY or not tree["kvs"]:
        return
    field = _SORT_FIELD.get(r.sort_target)
    if field is None:
        return
    if field == "value" and r.keys_only:
        values = values_at(r, tree["header"]["revision"])

        def sort_value(kv: dict[str, Any]) -> Any:
            return values.get(kv["key"])
    else:

        def sort_value(kv: dict[str, Any]) -> Any:
            return kv[field]

    groups: list[dict[str, Any]] = []
    for kv in tree["kvs"]:
        v = sort_value(kv)
        if groups and groups[-1]["sort"] == v:
            groups[-1]["kvs"].append(kv)
        else:
            groups.append({"sort": v, "kvs": [kv]})
    for g in groups:
        g["kvs"].sort(key=lambda kv: kv["key"])
    if tree["more"]:
        # Truncated by limit: which members of the last tie group were kept depends on
        # the sort algorithm's treatment of ties, so only its value and size count.
        last = groups[-1]
        groups[-1] = {"sort": last["sort"], "truncated_group_size": len(last["kvs"])}
    tree["kvs"] = groups


def _norm_txn(r: pb.TxnRequest, tree: dict[str, Any], values_at: ValuesAt) -> None:
    ops = r.success if tree["succeeded"] else r.failure
    for op, resp in zip(ops, tree["responses"], strict=False):
        kind = op.WhichOneof("request")
        if kind == "request_range" and resp["response_range"] is not None:
            _norm_range(op.request_range, resp["response_range"], values_at)
        elif kind == "request_txn" and resp["response_txn"] is not None:
            _norm_txn(op.request_txn, resp["response_txn"], values_at)


def normalize(kind: str, request: Message, result: Result, values_at: ValuesAt) -> Any:
    """The comparable form of one server's answer to ``request``."""
    if isinstance(result, RpcError):
        return {"error": {"code": result.code, "details": result.details}}
    tree = to_tree(result)
    if kind == "Range":
        assert isinstance(request, pb.RangeRequest)
        _norm_range(request, tree, values_at)
    elif kind == "Txn":
        assert isinstance(request, pb.TxnRequest)
        _norm_txn(request, tree, values_at)
    elif kind == "LeaseTimeToLive":
        tree["TTL"] = Ttl(tree["TTL"])
        tree["keys"] = sorted(tree["keys"])
    elif kind == "LeaseLeases":
        tree["leases"] = sorted(x["ID"] for x in tree["leases"])
    return tree


_MISSING = object()


def short(v: Any, limit: int = 160) -> str:
    s = "<absent>" if v is _MISSING else repr(v)
    return s if len(s) <= limit else s[: limit - 20] + f"...({len(s)} chars)"


def diff(etcd: Any, k8s: Any, path: str = "") -> list[str]:
    """Human-readable differences between two trees (empty when they are equal)."""
    if isinstance(etcd, dict) and isinstance(k8s, dict):
        out: list[str] = []
        for k in sorted(set(etcd) | set(k8s), key=str):
            out += diff(etcd.get(k, _MISSING), k8s.get(k, _MISSING), f"{path}.{k}")
        return out
    if isinstance(etcd, list) and isinstance(k8s, list):
        out = []
        if len(etcd) != len(k8s):
            out.append(f"{path or '.'}: {len(etcd)} items from etcd, {len(k8s)} from k8s-sql")
        for i, (a, b) in enumerate(zip(etcd, k8s, strict=False)):
            out += diff(a, b, f"{path}[{i}]")
            if len(out) > 12:
                break
        return out
    if etcd is _MISSING or k8s is _MISSING or etcd != k8s:
        return [f"{path or '.'}: etcd={short(etcd)} k8s-sql={short(k8s)}"]
    return []
