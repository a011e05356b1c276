"""What every servicer shares: response headers and etcd's error mapping."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from k8s_sql import errors
from k8s_sql.backend.base import BackendUnavailable
from k8s_sql.cluster import Membership
from k8s_sql.pb import rpc_pb2 as pb
from k8s_sql.store.store import Store

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Identity:
    """Who answers: the cluster (the database) and this frontend (the member)."""

    cluster_id: int
    member_id: int
    name: str
    client_urls: list[str]
    raft_term: int = 1


@dataclass
class Context:
    """Everything a servicer needs."""

    store: Store
    identity: Identity
    membership: Membership
    max_request_bytes: int
    version: str

    def fill(self, h: pb.ResponseHeader) -> None:
        """etcd's header fill: identity always, the current revision when unset."""
        h.cluster_id = self.identity.cluster_id
        h.member_id = self.identity.member_id
        h.raft_term = self.identity.raft_term
        if h.revision == 0:
            h.revision = self.store.revision

    def header(self) -> pb.ResponseHeader:
        h = pb.ResponseHeader()
        self.fill(h)
        return h

    def check_size(self, request: Any) -> None:
        if request.ByteSize() > self.max_request_bytes:
            raise errors.REQUEST_TOO_LARGE


def unary(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Turn :class:`EtcdError` into the gRPC status etcd would send, and a database
    outage into UNAVAILABLE, which etcd clients retry."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await fn(self, request, context)
        except errors.EtcdError as e:
            await context.abort(e.code, e.message)
            raise  # unreachable: abort raises
        except BackendUnavailable as e:
            log.warning("%s: database unavailable: %s", fn.__name__, e)
            err = errors.DATABASE_UNAVAILABLE
            await context.abort(err.code, err.message)
            raise  # unreachable: abort raises

    return wrapper
