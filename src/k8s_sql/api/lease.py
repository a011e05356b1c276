"""etcdserverpb.Lease: Grant, Revoke, KeepAlive (stream), TimeToLive, Leases."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import grpc

from k8s_sql.api.common import Context
from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc
from k8s_sql.store.space import LEASE_OVERHEAD


class LeaseServicer(rpc_pb2_grpc.LeaseServicer):
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.store = ctx.store

    async def LeaseGrant(
        self, request: pb.LeaseGrantRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaseGrantResponse:
        await self.ctx.space.check(LEASE_OVERHEAD)
        lease_id, ttl = await self.store.lease_grant(request.ID, request.TTL)
        return pb.LeaseGrantResponse(header=self.ctx.header(), ID=lease_id, TTL=ttl)

    async def LeaseRevoke(
        self, request: pb.LeaseRevokeRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaseRevokeResponse:
        rev = await self.store.lease_revoke(request.ID)
        resp = pb.LeaseRevokeResponse()
        resp.header.revision = rev
        self.ctx.fill(resp.header)
        return resp

    async def LeaseKeepAlive(
        self, request_iterator: AsyncIterator[pb.LeaseKeepAliveRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.LeaseKeepAliveResponse]:
        async for req in request_iterator:
            ttl = await self.store.lease_keepalive(req.ID)
            yield pb.LeaseKeepAliveResponse(header=self.ctx.header(), ID=req.ID, TTL=ttl)

    async def LeaseTimeToLive(
        self, request: pb.LeaseTimeToLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaseTimeToLiveResponse:
        lease, keys = await self.store.lease(request.ID)
        now = self.store.clock()
        if lease is None:
            return pb.LeaseTimeToLiveResponse(header=self.ctx.header(), ID=request.ID, TTL=-1)
        # A lease past its deadline exists until it is revoked (with its keys), as in
        # etcd: its remaining TTL is 0 meanwhile.
        remaining = max(0, math.floor(lease.expires_at - now))
        resp = pb.LeaseTimeToLiveResponse(header=self.ctx.header(), ID=lease.id, TTL=remaining, grantedTTL=lease.ttl)
        if request.keys:
            resp.keys.extend(keys)
        return resp

    async def LeaseLeases(
        self, request: pb.LeaseLeasesRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaseLeasesResponse:
        # Every lease not yet revoked, as etcd lists them (one past its deadline still
        # holds its keys until the expirer revokes it).
        leases = [pb.LeaseStatus(ID=x.id) for x in await self.store.leases()]
        return pb.LeaseLeasesResponse(header=self.ctx.header(), leases=leases)
