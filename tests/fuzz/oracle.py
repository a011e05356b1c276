"""Which answers are acceptable: etcd's status codes per RPC, etcd's message shapes.

The codes come from etcd's own error table (``api/v3rpc/rpctypes/error.go``): what
etcd can answer to each RPC when authentication is off, on a healthy single member.
``test_fuzz.py`` checks the table against a real etcd fed the same generated inputs.
Left out on purpose:

- UNKNOWN: never right (it is what grpcio answers when a handler raises).
- UNAVAILABLE: etcd's "no leader" or "timed out"; on a healthy server with its
  database up it means something broke.
- DEADLINE_EXCEEDED and CANCELLED: only when the client cut the call short
  (``Request.client_end``); otherwise the server hung.
- INTERNAL: only gRPC's answer to a message it cannot decode, with gRPC-Go's text,
  and only when the bytes really do not decode.
"""

from __future__ import annotations

from .generate import METHODS, Request
from .values import GRPC_LIMIT

OK, IA, OOR, NF = "OK", "INVALID_ARGUMENT", "OUT_OF_RANGE", "NOT_FOUND"
FP, RE = "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"

UNARY_DECODE_PREFIX = "grpc: error unmarshalling request: "
STREAM_DECODE_PREFIX = "grpc: failed to unmarshal the received message: "
CLIENT_CORE_ERROR = "Internal error from Core"

# RESOURCE_EXHAUSTED is always possible: gRPC refuses a message over its limit
# before any handler runs (and etcd answers NOSPACE to writes while that alarm is raised).
ALLOWED: dict[str, set[str]] = {
    "Range": {OK, IA, OOR, RE},
    "RangeStream": {OK, IA, OOR, RE, "UNIMPLEMENTED"},
    "Put": {OK, IA, NF, RE},
    "DeleteRange": {OK, IA, RE},
    "Txn": {OK, IA, OOR, NF, RE},
    "Compact": {OK, OOR, RE},
    "Watch": {OK, RE},
    "LeaseGrant": {OK, OOR, FP, RE},
    "LeaseRevoke": {OK, NF, RE},
    "LeaseKeepAlive": {OK, RE},
    "LeaseTimeToLive": {OK, RE},
    "LeaseLeases": {OK, RE},
    "Alarm": {OK, IA, RE},
    "Status": {OK, RE},
    "Defragment": {OK, RE},
    "Hash": {OK, RE},
    "HashKV": {OK, OOR, RE},
    "Snapshot": {OK, RE},
    "MoveLeader": {OK, FP, RE},
    "Downgrade": {OK, IA, FP, RE},
    "MemberList": {OK, RE},
    "MemberAdd": {OK, IA, FP, RE},
    "MemberRemove": {OK, NF, FP, RE},
    "MemberUpdate": {OK, IA, NF, FP, RE},
    "MemberPromote": {OK, NF, FP, RE},
    "AuthStatus": {OK, RE},
}
for _name, _m in METHODS.items():
    if _m.service == "Auth" and _name not in ALLOWED:
        ALLOWED[_name] = {OK, IA, FP, RE}
assert set(ALLOWED) == set(METHODS), set(METHODS) ^ set(ALLOWED)


def violation(req: Request, code: str, details: str, decodes: bool) -> str | None:
    """Why (code, details) is not an acceptable answer to ``req``, or None.
    ``decodes``: every frame of the request decodes with the server's protobuf library."""
    name = req.method.name
    if "\n" in details or "\r" in details:
        return "multi-line status message"
    if "Traceback" in details or "Exception" in details:
        return "a Python exception in the status message"
    if code == "DEADLINE_EXCEEDED":
        return None if req.client_end == "deadline" else "no answer within the deadline (hang)"
    if code == "CANCELLED":
        return None if req.client_end else "cancelled by the server"
    if code == "INTERNAL":
        refused = not decodes or any(len(f) > GRPC_LIMIT for f in req.frames)
        if details == CLIENT_CORE_ERROR and req.method.kind == "bidi" and refused:
            # the server ended the stream at an undecodable or oversized frame while the
            # client was still writing the next: grpcio's client then reports its own
            # failed write instead of the server's status (seen once in CI: a 3 MiB
            # Watch frame, then another, on grpc.aio)
            return None
        if not details.startswith((UNARY_DECODE_PREFIX, STREAM_DECODE_PREFIX)):
            return "INTERNAL without gRPC's decode-error text"
        if req.wellformed:
            return "INTERNAL (decode error) for a well-formed message"
        if decodes:
            return "INTERNAL (decode error) for bytes that do decode"
        return None
    if code not in ALLOWED[name]:
        return f"{code} is not an answer etcd gives to {name}"
    if code in (IA, OOR, NF, FP) and not details.startswith("etcdserver: "):
        return "an etcd error without etcd's 'etcdserver: ' message"
    return None


def same_answer(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Whether two servers' answers agree: the same code, and the same message except
    where the text is a library's own (decode errors, gRPC's size limit)."""
    (ca, da), (cb, db) = a, b
    if CLIENT_CORE_ERROR in (da, db) and "OK" not in (ca, cb):
        return True  # grpcio's client masked the server's status (see ``violation``)
    if ca != cb:
        return False
    if ca in ("OK", "RESOURCE_EXHAUSTED", "CANCELLED", "DEADLINE_EXCEEDED"):
        return True
    if ca == "INTERNAL":
        return da.split(":")[:2] == db.split(":")[:2]
    return da == db
