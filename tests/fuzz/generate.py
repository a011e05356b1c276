"""Well-formed requests for every RPC of etcdserverpb, with extreme field values.

Every method is found from the descriptors (``METHODS``), so an RPC added to the
.proto files is fuzzed without a change here. Each method has a generator that
knows what its fields mean (revisions near the current one, leases the server
granted, keys that collide); any method may instead get a message filled from its
descriptor alone (``from_descriptor``), which sets fields no hand-written generator
thought of. Everything here encodes to valid protobuf (``Request.wellformed``); the
byte-level damage is ``mutate``'s job.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from google.protobuf import descriptor as d, message_factory
from google.protobuf.message import Message

from k8s_sql.pb import rpc_pb2 as pb

from . import values as v, wire

# -- the methods ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    service: str
    name: str
    kind: str  # "unary", "server-stream" or "bidi"
    request: type[Message]
    response: type[Message]

    @property
    def path(self) -> str:
        return f"/etcdserverpb.{self.service}/{self.name}"

    @property
    def label(self) -> str:
        return f"{self.service}.{self.name}"


def _methods() -> dict[str, Method]:
    out = {}
    for service in pb.DESCRIPTOR.services_by_name.values():
        for m in service.methods:
            kind = "bidi" if m.client_streaming else "server-stream" if m.server_streaming else "unary"
            out[m.name] = Method(
                service.name,
                m.name,
                kind,
                message_factory.GetMessageClass(m.input_type),
                message_factory.GetMessageClass(m.output_type),
            )
    return out


METHODS = _methods()


@dataclass
class Request:
    """What the driver sends: one frame for a unary or server-streaming call, one or
    more for a bidirectional stream. ``wellformed`` says every frame is valid protobuf
    that any compliant decoder accepts, so INTERNAL is never a correct answer to it;
    ``client_end`` asks the driver to cut the call short ("deadline": a 1 ms deadline,
    "cancel": a cancel as soon as it is sent), the only causes of DEADLINE_EXCEEDED
    or CANCELLED that are not a server hang."""

    method: Method
    frames: list[bytes]
    label: str
    wellformed: bool = True
    client_end: str = ""


@dataclass
class Hints:
    """What the generators know of the server's state: they aim values at it
    (revisions around the current one, leases that exist).

    ``floor`` is the highest revision compaction may reach (the final check replays
    the history after it). ``sequential`` is True when requests go one at a time
    (the etcd comparison): only then is "the current revision + 1" a safe future
    revision for Compact, since no other request can make it current in between.
    """

    revision: int = 1
    floor: int = 1
    member_id: int = 0
    leases: list[int] = field(default_factory=list)
    sequential: bool = False

    def lease(self, rng: random.Random) -> int:
        """A lease the server granted, or an extreme. Draws the same randomness
        whatever the state, so two servers given one seed get the same requests
        for as long as they answer alike."""
        pick, index, other = rng.random(), rng.random(), v.int64(rng)
        if self.leases and pick < 0.5:
            return self.leases[int(index * len(self.leases))]
        return other

    def add_lease(self, lease_id: int) -> None:
        self.leases.append(lease_id)
        if len(self.leases) > 64:
            del self.leases[: len(self.leases) - 64]

    def rev(self, rng: random.Random) -> int:
        """A revision: an extreme, the current one or near it, below the floor."""
        r = rng.random()
        if r < 0.35:
            return rng.choice(v.INT64_EXTREMES)
        if r < 0.65:
            return max(1, self.revision - rng.randrange(0, 50))
        if r < 0.8:
            return self.revision + rng.randrange(1, 4)
        if r < 0.9:
            return max(1, self.floor - rng.randrange(0, 3))
        return rng.randrange(v.INT64_MIN, v.INT64_MAX + 1)


# -- from the descriptor --------------------------------------------------------------------

FD = d.FieldDescriptor
_SIGNED64 = {FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64}
_UNSIGNED64 = {FD.TYPE_UINT64, FD.TYPE_FIXED64}
_SIGNED32 = {FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32}
_UNSIGNED32 = {FD.TYPE_UINT32, FD.TYPE_FIXED32}


def _scalar(f: d.FieldDescriptor, rng: random.Random, hints: Hints, budget: v.Budget) -> object:
    t = f.type
    if t in _SIGNED64:
        return v.int64(rng, hints.revision)
    if t in _UNSIGNED64:
        own, other = rng.random() < 0.2, v.uint64(rng)
        return hints.member_id if hints.member_id and own else other
    if t in _SIGNED32:
        return rng.choice(v.INT32_EXTREMES)
    if t in _UNSIGNED32:
        return rng.choice(v.UINT32_EXTREMES)
    if t == FD.TYPE_BOOL:
        return rng.random() < 0.5
    if t == FD.TYPE_ENUM:
        known = [e.number for e in f.enum_type.values]
        if rng.random() < 0.7:
            return rng.choice(known)
        return rng.choice([-1, max(known) + 1, 100, v.INT32_MAX, v.INT32_MIN])
    if t == FD.TYPE_BYTES:
        return v.any_key(rng, budget, write=True) if rng.random() < 0.7 else v.value(rng, budget)
    if t == FD.TYPE_STRING:
        return v.string(rng)
    raise AssertionError(f"unhandled field type {t}")


def fill(msg: Message, rng: random.Random, hints: Hints, budget: v.Budget, depth: int = 0) -> Message:
    """Set a random subset of ``msg``'s fields (one member per oneof) to extreme values,
    recursing into submessages up to depth 4."""
    desc = msg.DESCRIPTOR
    chosen_oneof = {o.name: rng.choice(o.fields) for o in desc.oneofs}
    for f in desc.fields:
        if f.containing_oneof is not None:
            if chosen_oneof[f.containing_oneof.name] is not f or rng.random() < 0.1:
                continue
        elif rng.random() < 0.4:
            continue
        is_msg = f.type == FD.TYPE_MESSAGE
        if is_msg and depth >= 4:
            continue
        if f.is_repeated:
            n = rng.choice([0, 1, 1, 2, 3, 5])
            items = getattr(msg, f.name)
            for _ in range(n):
                if is_msg:
                    fill(items.add(), rng, hints, budget, depth + 1)
                else:
                    items.append(_scalar(f, rng, hints, budget))
        elif is_msg:
            fill(getattr(msg, f.name), rng, hints, budget, depth + 1)
            getattr(msg, f.name).SetInParent()
        else:
            setattr(msg, f.name, _scalar(f, rng, hints, budget))
    return msg


def from_descriptor(m: Method, rng: random.Random, hints: Hints, budget: v.Budget) -> Message:
    return fill(m.request(), rng, hints, budget)


# -- KV -------------------------------------------------------------------------------------


def _limit(rng: random.Random) -> int:
    return rng.choice([0, 0, 1, 2, 10, 100, -1, v.INT64_MAX, v.INT64_MIN, v.INT32_MAX, 1 << 62])


def _sort(rng: random.Random) -> tuple[int, int]:
    order = rng.choice([0, 1, 2]) if rng.random() < 0.85 else rng.choice([3, -1, v.INT32_MAX, v.INT32_MIN])
    target = rng.choice([0, 1, 2, 3, 4]) if rng.random() < 0.85 else rng.choice([5, -1, v.INT32_MAX, v.INT32_MIN])
    return order, target


def range_request(rng: random.Random, hints: Hints, budget: v.Budget) -> pb.RangeRequest:
    key = v.any_key(rng, budget, write=False)
    r = pb.RangeRequest(key=key, range_end=v.range_end_for(rng, key))
    if rng.random() < 0.4:
        r.limit = _limit(rng)
    if rng.random() < 0.3:
        r.revision = hints.rev(rng)
    if rng.random() < 0.3:
        r.sort_order, r.sort_target = _sort(rng)
    r.serializable = rng.random() < 0.2
    r.keys_only = rng.random() < 0.2
    r.count_only = rng.random() < 0.15
    for name in ("min_mod_revision", "max_mod_revision", "min_create_revision", "max_create_revision"):
        if rng.random() < 0.12:
            setattr(r, name, hints.rev(rng))
    return r


def put_request(rng: random.Random, hints: Hints, budget: v.Budget) -> pb.PutRequest:
    key = v.any_key(rng, budget, write=True)
    r = pb.PutRequest(key=key, value=v.value(rng, budget) if rng.random() < 0.9 else b"")
    if rng.random() < 0.15:
        r.lease = hints.lease(rng)
    r.prev_kv = rng.random() < 0.3
    r.ignore_value = rng.random() < 0.08
    r.ignore_lease = rng.random() < 0.08
    return r


def delete_request(rng: random.Random, hints: Hints, budget: v.Budget) -> pb.DeleteRangeRequest:
    key = v.any_key(rng, budget, write=True)
    return pb.DeleteRangeRequest(key=key, range_end=v.range_end_for(rng, key), prev_kv=rng.random() < 0.4)


def compare(rng: random.Random, hints: Hints, budget: v.Budget) -> pb.Compare:
    key = v.fuzz_key(rng) if rng.random() < 0.8 else v.any_key(rng, budget, write=False)
    c = pb.Compare(key=key)
    c.target = rng.choice([0, 1, 2, 3, 4]) if rng.random() < 0.9 else rng.choice([5, -1, v.INT32_MAX])
    c.result = rng.choice([0, 1, 2, 3]) if rng.random() < 0.9 else rng.choice([4, -1, v.INT32_MIN])
    # usually the union member that matches the target, sometimes another or none
    union = ["version", "create_revision", "mod_revision", "value", "lease"]
    member = union[c.target] if 0 <= c.target < 5 and rng.random() < 0.8 else rng.choice([*union, None])
    if member == "value":
        c.value = v.value(rng, budget) if rng.random() < 0.3 else b"v%d" % rng.randrange(1000)
    elif member == "lease":
        c.lease = hints.lease(rng)
    elif member is not None:
        setattr(c, member, hints.rev(rng) if member != "version" else rng.choice([0, 1, 2, -1, v.INT64_MAX]))
    if rng.random() < 0.2:
        c.range_end = v.range_end_for(rng, key)
    return c


def request_op(rng: random.Random, hints: Hints, budget: v.Budget, depth: int) -> pb.RequestOp:
    r = rng.random()
    if r < 0.3:
        return pb.RequestOp(request_range=range_request(rng, hints, budget))
    if r < 0.65:
        return pb.RequestOp(request_put=put_request(rng, hints, budget))
    if r < 0.85 or depth >= 3:
        return pb.RequestOp(request_delete_range=delete_request(rng, hints, budget))
    return pb.RequestOp(request_txn=txn_request(rng, hints, budget, depth + 1))


def txn_request(rng: random.Random, hints: Hints, budget: v.Budget, depth: int = 0) -> pb.TxnRequest:
    t = pb.TxnRequest()
    t.compare.extend(compare(rng, hints, budget) for _ in range(rng.choice([0, 1, 1, 2, 3])))
    t.success.extend(request_op(rng, hints, budget, depth) for _ in range(rng.choice([0, 1, 2, 3])))
    t.failure.extend(request_op(rng, hints, budget, depth) for _ in range(rng.choice([0, 1, 2])))
    if depth == 0 and rng.random() < 0.1:
        # etcd's duplicate-key rule: a key put twice, or put and deleted, in one branch
        k = v.fuzz_key(rng)
        branch = t.success if rng.random() < 0.5 else t.failure
        other = rng.choice(
            [
                pb.RequestOp(request_put=pb.PutRequest(key=k, value=b"dup")),
                pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=k)),
                pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=k[:-1], range_end=v.prefix_end(k))),
                pb.RequestOp(request_txn=pb.TxnRequest(success=[pb.RequestOp(request_put=pb.PutRequest(key=k))])),
            ]
        )
        branch.extend([pb.RequestOp(request_put=pb.PutRequest(key=k, value=b"first")), other])
    return t


NEST_DEPTHS = [2, 10, 24, 25, 48, 49, 50, 51, 64, 100, 127, 128, 129, 200, 1000]


def nested_txn(depth: int, leaf: pb.TxnRequest, branch: int) -> bytes:
    """A txn nested ``depth`` deep (each level one RequestOp holding the next txn in
    its success (``branch`` 2) or failure (3) branch), encoded by hand: past about
    50 levels the Python protobuf library refuses to build it."""
    inner = leaf.SerializeToString()
    for _ in range(depth):
        op = wire.tag(4, wire.LEN) + wire.varint(len(inner)) + inner  # RequestOp.request_txn
        inner = wire.tag(branch, wire.LEN) + wire.varint(len(op)) + op
    return inner


def txn_shaped(rng: random.Random, hints: Hints, budget: v.Budget) -> tuple[bytes, str]:
    """Txns at etcd's limits: nested deep, 128/129 operations or compares."""
    shape = rng.choice(["nest", "nest", "ops", "compares", "both-branches"])
    if shape == "nest":
        depth = rng.choice(NEST_DEPTHS)
        leaf = pb.TxnRequest(success=[pb.RequestOp(request_put=pb.PutRequest(key=v.fuzz_key(rng), value=b"deep"))])
        if rng.random() < 0.3:
            leaf = pb.TxnRequest(success=[pb.RequestOp(request_range=pb.RangeRequest(key=v.fuzz_key(rng)))])
        return nested_txn(depth, leaf, rng.choice([2, 3])), f"nested-{depth}"
    n = rng.choice([127, 128, 129, 1000])
    if shape == "ops":
        kind = rng.choice(["put", "range", "delete"])
        ops = []
        for i in range(n):
            k = v.FUZZ_PREFIX + b"ops/%d" % i
            if kind == "put":
                ops.append(pb.RequestOp(request_put=pb.PutRequest(key=k, value=b"o")))
            elif kind == "range":
                ops.append(pb.RequestOp(request_range=pb.RangeRequest(key=k)))
            else:
                ops.append(pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=k)))
        t = pb.TxnRequest(success=ops) if rng.random() < 0.5 else pb.TxnRequest(failure=ops)
        return t.SerializeToString(), f"{n}-{kind}-ops"
    if shape == "compares":
        t = pb.TxnRequest(
            compare=[pb.Compare(key=v.FUZZ_PREFIX + b"c/%d" % i, target=pb.Compare.VERSION) for i in range(n)]
        )
        return t.SerializeToString(), f"{n}-compares"
    # 100 ops in each branch with 100 compares: within the limit per branch
    t = pb.TxnRequest(
        compare=[pb.Compare(key=v.FUZZ_PREFIX + b"b/%d" % i, target=pb.Compare.MOD) for i in range(100)],
        success=[pb.RequestOp(request_put=pb.PutRequest(key=v.FUZZ_PREFIX + b"s/%d" % i)) for i in range(100)],
        failure=[pb.RequestOp(request_put=pb.PutRequest(key=v.FUZZ_PREFIX + b"f/%d" % i)) for i in range(100)],
    )
    return t.SerializeToString(), "100x3"


def compact_request(rng: random.Random, hints: Hints, budget: v.Budget) -> pb.CompactionRequest:
    r = rng.random()
    if r < 0.5:
        rev = rng.choice([0, -1, 1, v.INT64_MIN, v.INT64_MAX, v.INT64_MAX - 1, 1 << 40])
    elif r < 0.8:
        rev = max(1, hints.floor - rng.randrange(0, 3))
    elif hints.sequential:
        rev = hints.revision + rng.randrange(1, 3)
    else:
        rev = hints.revision + 1_000_000
    return pb.CompactionRequest(revision=rev, physical=rng.random() < 0.5)


# -- the other services ---------------------------------------------------------------------


SHORT_TTLS = [0, 1, 2, 3, 5, -1, v.INT64_MIN]  # etcd grants its minimum TTL (about 2 s) for the first ones


def lease_grant(rng: random.Random, hints: Hints, budget: v.Budget) -> pb.LeaseGrantRequest:
    """Extreme TTLs, server- and client-chosen IDs. When two servers are compared
    (``hints.sequential``) no TTL is short: a lease that expires after a few seconds
    expires at a different request on each, and every later answer naming it would
    differ for no fault of either (``test_fuzz`` checks short TTLs separately)."""
    ttl = rng.choice([*SHORT_TTLS, 60, 3600, v.INT64_MAX, 9_000_000_000, 9_000_000_001])
    if hints.sequential and ttl in SHORT_TTLS:
        ttl = 600
    lease_id = 0 if rng.random() < 0.5 else hints.lease(rng)
    return pb.LeaseGrantRequest(TTL=ttl, ID=lease_id)


def watch_create(rng: random.Random, hints: Hints, budget: v.Budget) -> pb.WatchCreateRequest:
    key = v.any_key(rng, budget, write=False)
    c = pb.WatchCreateRequest(key=key, range_end=v.range_end_for(rng, key))
    r = rng.random()
    if r < 0.4:
        c.start_revision = 0
    elif r < 0.7:
        c.start_revision = max(1, hints.revision - rng.randrange(0, 100))
    elif r < 0.8:
        c.start_revision = hints.revision + rng.randrange(1, 5)
    else:
        c.start_revision = rng.choice([-1, 1, v.INT64_MIN, v.INT64_MAX, hints.floor, max(1, hints.floor - 1)])
        # an old start over a wide range replays much of the history: a few per run
        if 0 < c.start_revision < hints.revision - 100 and not budget.take("big"):
            c.key, c.range_end = v.fuzz_key(rng), b""
    if rng.random() < 0.3:
        c.filters.extend(rng.choice([0, 1, 2, -1, v.INT32_MAX]) for _ in range(rng.choice([1, 2, 3])))
    c.prev_kv = rng.random() < 0.3
    c.progress_notify = rng.random() < 0.2
    c.fragment = rng.random() < 0.2
    if rng.random() < 0.3:
        c.watch_id = rng.choice([0, 1, 2, -1, -2, 100, v.INT64_MAX, v.INT64_MIN])
    return c


def watch_frames(rng: random.Random, hints: Hints, budget: v.Budget) -> tuple[list[bytes], str]:
    """1 to 6 Watch requests: creates, cancels (of ids it made, and extremes), progress."""
    frames: list[bytes] = []
    kinds = []
    for _ in range(rng.choice([1, 1, 2, 3, 6])):
        r = rng.random()
        if r < 0.55:
            req = pb.WatchRequest(create_request=watch_create(rng, hints, budget))
            kinds.append("c")
        elif r < 0.8:
            req = pb.WatchRequest(
                cancel_request=pb.WatchCancelRequest(watch_id=rng.choice([0, 1, 2, -1, v.INT64_MAX, v.INT64_MIN]))
            )
            kinds.append("x")
        elif r < 0.95:
            req = pb.WatchRequest(progress_request=pb.WatchProgressRequest())
            kinds.append("p")
        else:
            req = pb.WatchRequest()
            kinds.append("0")
        frames.append(req.SerializeToString())
    return frames, "".join(kinds)


def keepalive_frames(rng: random.Random, hints: Hints, budget: v.Budget) -> list[bytes]:
    return [pb.LeaseKeepAliveRequest(ID=hints.lease(rng)).SerializeToString() for _ in range(rng.choice([1, 1, 2, 5]))]


def alarm_request(rng: random.Random, hints: Hints, budget: v.Budget) -> pb.AlarmRequest:
    """Every action with every alarm type (and values past both enums); the driver
    disarms whatever an ACTIVATE raised before it sends the next request."""
    return pb.AlarmRequest(
        action=rng.choice([0, 0, 1, 2, 3, -1]),
        alarm=rng.choice([0, 1, 2, 3, -1]),
        memberID=hints.member_id if rng.random() < 0.6 else v.uint64(rng),
    )


def member_id_request(m: Method, rng: random.Random, hints: Hints, budget: v.Budget) -> Message:
    msg = fill(m.request(), rng, hints, budget)
    for name in ("ID", "targetID"):
        if name in msg.DESCRIPTOR.fields_by_name and rng.random() < 0.5:
            setattr(msg, name, hints.member_id)
    return msg


# -- one request ----------------------------------------------------------------------------

WEIGHTS = {
    "Range": 14, "RangeStream": 4, "Put": 16, "DeleteRange": 6, "Txn": 16, "Compact": 1,
    "Watch": 4,
    "LeaseGrant": 4, "LeaseRevoke": 3, "LeaseKeepAlive": 3, "LeaseTimeToLive": 3, "LeaseLeases": 1,
    "Alarm": 1.5, "Status": 1, "Defragment": 0.2, "Hash": 0.5, "HashKV": 1.5, "Snapshot": 0.2,
    "MoveLeader": 0.5, "Downgrade": 0.7,
    "MemberAdd": 0.5, "MemberRemove": 0.5, "MemberUpdate": 0.5, "MemberList": 0.5, "MemberPromote": 0.5,
}  # fmt: skip
AUTH_WEIGHT = 0.25  # each of the Auth methods


def weight(name: str) -> float:
    return WEIGHTS.get(name, AUTH_WEIGHT if METHODS[name].service == "Auth" else 1.0)


SPECIFIC = {
    "Range": range_request,
    "RangeStream": range_request,
    "Put": put_request,
    "DeleteRange": delete_request,
    "Txn": txn_request,
    "Compact": compact_request,
    "LeaseGrant": lease_grant,
    "Alarm": alarm_request,
}


def well_formed(m: Method, rng: random.Random, hints: Hints, budget: v.Budget) -> Request:
    """A valid request for ``m``: from its own generator mostly, from the descriptor
    alone sometimes."""
    name = m.name
    if name == "Watch":
        frames, kinds = watch_frames(rng, hints, budget)
        return Request(m, frames, f"gen:{kinds}")
    if name == "LeaseKeepAlive":
        return Request(m, keepalive_frames(rng, hints, budget), "gen")
    if name == "Txn" and rng.random() < 0.06 and budget.take("deep"):
        data, label = txn_shaped(rng, hints, budget)
        return Request(m, [data], f"gen:{label}")
    if name in SPECIFIC and rng.random() < 0.8:
        return Request(m, [SPECIFIC[name](rng, hints, budget).SerializeToString()], "gen")
    if name in ("LeaseRevoke", "LeaseTimeToLive"):
        msg = m.request(ID=hints.lease(rng))
        if name == "LeaseTimeToLive":
            msg.keys = rng.random() < 0.5
        return Request(m, [msg.SerializeToString()], "gen")
    if name == "HashKV" and rng.random() < 0.8:
        return Request(m, [pb.HashKVRequest(revision=hints.rev(rng)).SerializeToString()], "gen")
    if name in ("MemberRemove", "MemberUpdate", "MemberPromote", "MoveLeader"):
        return Request(m, [member_id_request(m, rng, hints, budget).SerializeToString()], "gen")
    return Request(m, [from_descriptor(m, rng, hints, budget).SerializeToString()], "desc")
