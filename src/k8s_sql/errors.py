"""etcd's gRPC errors: the exact status codes and messages clients match on.

Kubernetes and etcd's Go client compare these strings (for example
``etcdserver: mvcc: required revision has been compacted``), so they are kept
byte for byte as etcd sends them.
"""

from __future__ import annotations

import grpc


class EtcdError(Exception):
    """An error answered to the client with etcd's status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"EtcdError({self.code.name}, {self.message!r})"


def _e(code: grpc.StatusCode, message: str) -> EtcdError:
    return EtcdError(code, message)


_IA = grpc.StatusCode.INVALID_ARGUMENT
_FP = grpc.StatusCode.FAILED_PRECONDITION

EMPTY_KEY = _e(_IA, "etcdserver: key is not provided")
KEY_NOT_FOUND = _e(_IA, "etcdserver: key not found")
VALUE_PROVIDED = _e(_IA, "etcdserver: value is provided")
LEASE_PROVIDED = _e(_IA, "etcdserver: lease is provided")
TOO_MANY_OPS = _e(_IA, "etcdserver: too many operations in txn request")
DUPLICATE_KEY = _e(_IA, "etcdserver: duplicate key given in txn request")
INVALID_SORT_OPTION = _e(_IA, "etcdserver: invalid sort option")
COMPACTED = _e(grpc.StatusCode.OUT_OF_RANGE, "etcdserver: mvcc: required revision has been compacted")
FUTURE_REV = _e(grpc.StatusCode.OUT_OF_RANGE, "etcdserver: mvcc: required revision is a future revision")
LEASE_NOT_FOUND = _e(grpc.StatusCode.NOT_FOUND, "etcdserver: requested lease not found")
LEASE_EXIST = _e(_FP, "etcdserver: lease already exists")
LEASE_TTL_TOO_LARGE = _e(grpc.StatusCode.OUT_OF_RANGE, "etcdserver: too large lease TTL")
REQUEST_TOO_LARGE = _e(_IA, "etcdserver: request is too large")
MEMBER_NOT_FOUND = _e(grpc.StatusCode.NOT_FOUND, "etcdserver: member not found")
NOT_CAPABLE = _e(_FP, "etcdserver: not capable")
AUTH_NOT_ENABLED = _e(_FP, "etcdserver: authentication is not enabled")
STOPPED = _e(grpc.StatusCode.UNAVAILABLE, "etcdserver: server stopped")
TIMEOUT = _e(grpc.StatusCode.UNAVAILABLE, "etcdserver: request timed out")
# The database is away (restarting, failing over, unreachable): clients retry on UNAVAILABLE.
DATABASE_UNAVAILABLE = _e(grpc.StatusCode.UNAVAILABLE, "etcdserver: request timed out, database unavailable")
WATCH_CANCELED = _e(grpc.StatusCode.CANCELLED, "etcdserver: watch canceled")
