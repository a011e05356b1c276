"""The domain errors the store and the backends raise, with etcd's exact messages.

Kubernetes and etcd's Go client compare these strings (for example
``etcdserver: mvcc: required revision has been compacted``), so they are kept
byte for byte as etcd sends them. Which gRPC status code each one travels with is
the API layer's business (``api/status.py``, etcd's ``toGRPCError``): nothing below
the API imports grpc.

Every error is a *class*, raised as a new instance each time. A shared exception
instance would collect the traceback of every raise in ``__traceback__``, and the
frames it pins (a write batch and its prefetched rows) were measured to keep about
4 KB alive per failed request: 20,000 Puts naming an unknown lease took a server
from 45 to 132 MB.
"""

from __future__ import annotations

from typing import ClassVar


class EtcdError(Exception):
    """An error answered to the client: ``message`` is etcd's text for it."""

    message: ClassVar[str] = "etcdserver: unknown error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or type(self).message)

    @property
    def text(self) -> str:
        """The message this instance answers with (a class may vary it per instance)."""
        return str(self.args[0])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.text!r})"


# -- the request is wrong (etcd's InvalidArgument) ---------------------------------


class InvalidRequest(EtcdError):
    """The request can never succeed as sent (etcd answers INVALID_ARGUMENT)."""


class EmptyKey(InvalidRequest):
    message = "etcdserver: key is not provided"


class KeyNotFound(InvalidRequest):
    message = "etcdserver: key not found"


class ValueProvided(InvalidRequest):
    message = "etcdserver: value is provided"


class LeaseProvided(InvalidRequest):
    message = "etcdserver: lease is provided"


class TooManyOps(InvalidRequest):
    message = "etcdserver: too many operations in txn request"


class DuplicateKey(InvalidRequest):
    message = "etcdserver: duplicate key given in txn request"


class InvalidSortOption(InvalidRequest):
    message = "etcdserver: invalid sort option"


class RequestTooLarge(InvalidRequest):
    message = "etcdserver: request is too large"


class KeyTooLong(InvalidRequest):
    """A key longer than the database can index (MySQL's and PostgreSQL's index limits);
    etcd itself has no such limit below its request size."""

    message = "etcdserver: key is too long for this database"

    def __init__(self, max_key_bytes: int) -> None:
        super().__init__(f"{type(self).message} (at most {max_key_bytes} bytes)")


class RequestRejected(InvalidRequest):
    """The database refused one request of a batch while it accepted the others: the
    request itself is what the database cannot store (the rest of the batch commits)."""

    message = "etcdserver: request rejected by the database"


# -- revisions (etcd's OutOfRange) ------------------------------------------------------


class Compacted(EtcdError):
    message = "etcdserver: mvcc: required revision has been compacted"


class FutureRevision(EtcdError):
    message = "etcdserver: mvcc: required revision is a future revision"


# -- leases ----------------------------------------------------------------------------


class LeaseNotFound(EtcdError):
    message = "etcdserver: requested lease not found"


class LeaseExists(EtcdError):
    message = "etcdserver: lease already exists"


class LeaseTTLTooLarge(EtcdError):
    message = "etcdserver: too large lease TTL"


# -- what this server does not do ------------------------------------------------------


class MemberNotFound(EtcdError):
    message = "etcdserver: member not found"


class NotCapable(EtcdError):
    message = "etcdserver: not capable"


class AuthNotEnabled(EtcdError):
    message = "etcdserver: authentication is not enabled"


# -- the server or its database cannot serve now ---------------------------------------


class Stopped(EtcdError):
    message = "etcdserver: server stopped"


class Timeout(EtcdError):
    message = "etcdserver: request timed out"


class DatabaseUnavailable(EtcdError):
    """The database is away (restarting, failing over, unreachable): clients retry."""

    message = "etcdserver: request timed out, database unavailable"


class NoSpace(EtcdError):
    """The quota (``--quota-backend-bytes``) is reached or the database's disk is full:
    the NOSPACE alarm is raised and writes that add data are refused until it is disarmed."""

    message = "etcdserver: mvcc: database space exceeded"


class Corrupt(EtcdError):
    """The database lost commits that were already acknowledged (store/corruption.py):
    the CORRUPT alarm is raised and every request is refused until it is disarmed."""

    message = "etcdserver: corrupt cluster"


class WatchCanceled(EtcdError):
    message = "etcdserver: watch canceled"


def one_line(e: BaseException, most: int = 500) -> str:
    """An exception as one line of at most ``most`` characters, for a log or a status
    message: driver errors can span lines (PostgreSQL's DETAIL, protobuf's paths)."""
    return " ".join((str(e) or type(e).__name__).split())[:most]
