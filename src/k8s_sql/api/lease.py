"""etcdserverpb.Lease: Grant, Revoke, KeepAlive (stream), TimeToLive, Leases."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import grpc

from k8s_sql import errors
from k8s_sql.api.common import Context, unary
from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc


class LeaseServicer(rpc_pb2_grpc.LeaseServicer):
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.store = ctx.store

    @unary
    async def LeaseGrant(
        self, request: pb.LeaseGrantRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaseGrantResponse:
        lease_id, ttl = await self.store.lease_grant(request.ID, request.TTL)
        return pb.LeaseGrantResponse(header=self.ctx.header(), ID=lease_id, TTL=ttl)

    @unary
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
            try:
                ttl = await self.store.lease_keepalive(req.ID)
            except errors.EtcdError as e:
                await context.abort(e.code, e.message)
            yield pb.LeaseKeepAliveResponse(header=self.ctx.header(), ID=req.ID, TTL=ttl)

    @unary
    async def LeaseTimeToLive(
        self, request: pb.LeaseTimeToLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaseTimeToLiveResponse:
        lease, keys = await self.store.backend.lease(request.ID)
        now = self.store.clock()
        if lease is None or lease.expires_at <= now:
            return pb.LeaseTimeToLiveResponse(header=self.ctx.header(), ID=request.ID, TTL=-1)
        remaining = max(0, math.floor(lease.expires_at - now))
        resp = pb.LeaseTimeToLiveResponse(header=self.ctx.header(), ID=lease.id, TTL=remaining, grantedTTL=lease.ttl)
        if request.keys:
            resp.keys.extend(keys)
        return resp

    @unary
    async def LeaseLeases(
        self, request: pb.LeaseLeasesRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaseLeasesResponse:
        now = self.store.clock()
        leases = [pb.LeaseStatus(ID=x.id) for x in await self.store.backend.leases() if x.expires_at > now]
        return pb.LeaseLeasesResponse(header=self.ctx.header(), leases=leases)
