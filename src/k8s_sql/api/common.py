"""What every servicer shares: the response header and the request-size check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from k8s_sql import errors
from k8s_sql.cluster import Membership
from k8s_sql.pb import rpc_pb2 as pb
from k8s_sql.store.space import Space
from k8s_sql.store.store import Store


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
    space: Space
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
            raise errors.RequestTooLarge()
