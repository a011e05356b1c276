"""Domain errors to gRPC statuses, in one table (etcd's ``toGRPCError``).

The store and the backends raise :mod:`k8s_sql.errors` classes and the backends'
:class:`BackendUnavailable` / :class:`DatabaseFull`; only this module knows which
gRPC code each travels with. The codes are etcd's ``rpctypes`` ones, so clients
that branch on them (retry UNAVAILABLE, stop on INVALID_ARGUMENT, relist on
OUT_OF_RANGE "compacted") behave as they do against etcd.
"""

from __future__ import annotations

import grpc

from k8s_sql import errors
from k8s_sql.backend.base import BackendUnavailable, DatabaseFull

S = grpc.StatusCode

# Looked up along the exception's class hierarchy (most derived first), so a subclass
# travels with its base class's code unless it has a row of its own.
_CODES: dict[type[BaseException], grpc.StatusCode] = {
    errors.InvalidRequest: S.INVALID_ARGUMENT,
    errors.Compacted: S.OUT_OF_RANGE,
    errors.FutureRevision: S.OUT_OF_RANGE,
    errors.LeaseTTLTooLarge: S.OUT_OF_RANGE,
    errors.LeaseNotFound: S.NOT_FOUND,
    errors.MemberNotFound: S.NOT_FOUND,
    errors.LeaseExists: S.FAILED_PRECONDITION,
    errors.NotCapable: S.FAILED_PRECONDITION,
    errors.AuthNotEnabled: S.FAILED_PRECONDITION,
    errors.Stopped: S.UNAVAILABLE,
    errors.Timeout: S.UNAVAILABLE,
    errors.DatabaseUnavailable: S.UNAVAILABLE,
    errors.NoSpace: S.RESOURCE_EXHAUSTED,
    errors.WatchCanceled: S.CANCELLED,
    errors.Corrupt: S.DATA_LOSS,
}


def to_status(e: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """etcd's code and message for a domain error; None for anything else (a bug)."""
    if isinstance(e, BackendUnavailable):
        return S.UNAVAILABLE, errors.DatabaseUnavailable.message
    if isinstance(e, DatabaseFull):
        return S.RESOURCE_EXHAUSTED, errors.NoSpace.message
    for cls in type(e).__mro__:
        code = _CODES.get(cls)
        if code is not None:
            assert isinstance(e, errors.EtcdError)
            return code, e.text
    return None
