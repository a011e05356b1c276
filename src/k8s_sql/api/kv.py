"""etcdserverpb.KV: Range, RangeStream, Put, DeleteRange, Txn, Compact."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from k8s_sql.api import validate
from k8s_sql.api.common import Context
from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc
from k8s_sql.store.space import put_cost, txn_cost

RR = pb.RangeRequest


class KVServicer(rpc_pb2_grpc.KVServicer):
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.store = ctx.store

    async def Range(self, request: pb.RangeRequest, context: grpc.aio.ServicerContext) -> pb.RangeResponse:
        validate.check_range(request)
        resp = await self.store.range(request)
        self.ctx.fill(resp.header)
        return resp

    async def RangeStream(
        self, request: pb.RangeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RangeStreamResponse]:
        """etcd 3.7's streamed range: chunks at one pinned revision, growing towards
        the request-size limit; only the last chunk carries header, count and more."""
        validate.check_range(request)
        if not (request.sort_target == RR.KEY and request.sort_order in (RR.NONE, RR.ASCEND)):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "RangeStream does not support custom sort orders")
        if (
            request.min_mod_revision
            or request.max_mod_revision
            or request.min_create_revision
            or request.max_create_revision
        ):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "RangeStream does not support revision filters")
        r = pb.RangeRequest()
        r.CopyFrom(request)
        if r.count_only:
            first = await self.store.range(r)
            out = pb.RangeResponse(count=first.count)
            out.header.revision = first.header.revision
            self.ctx.fill(out.header)
            yield pb.RangeStreamResponse(range_response=out)
            return
        total_limit = r.limit or (1 << 62)
        r.limit = min(100, total_limit)
        sent = 0
        header_rev = 0
        while True:
            resp = await self.store.range(r)
            if header_rev == 0:
                header_rev = resp.header.revision
                if r.revision == 0:
                    r.revision = header_rev
            sent += len(resp.kvs)
            done = not resp.more or sent >= total_limit
            out = pb.RangeResponse()
            out.kvs.extend(resp.kvs)
            if done:
                out.header.revision = header_rev
                self.ctx.fill(out.header)
                out.more = resp.more
                # resp.count is the whole range from the current start key on
                out.count = sent - len(resp.kvs) + resp.count
            yield pb.RangeStreamResponse(range_response=out)
            if done:
                return
            r.key = resp.kvs[-1].key + b"\0"
            size = resp.ByteSize()
            if size < self.ctx.max_request_bytes // 2:
                r.limit *= 2
            elif size > self.ctx.max_request_bytes * 2:
                r.limit = max(1, r.limit // 2)
            r.limit = min(r.limit, total_limit - sent)

    async def Put(self, request: pb.PutRequest, context: grpc.aio.ServicerContext) -> pb.PutResponse:
        validate.check_put(request)
        self.ctx.check_size(request)
        validate.check_key_length(request, self.store.max_key_bytes)
        await self.ctx.space.check(put_cost(request))
        resp = await self.store.put(request)
        self.ctx.fill(resp.header)
        return resp

    async def DeleteRange(
        self, request: pb.DeleteRangeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteRangeResponse:
        validate.check_delete(request)
        self.ctx.check_size(request)
        resp = await self.store.delete_range(request)
        self.ctx.fill(resp.header)
        return resp

    async def Txn(self, request: pb.TxnRequest, context: grpc.aio.ServicerContext) -> pb.TxnResponse:
        validate.check_txn(request, self.store.max_txn_ops)
        if not validate.is_read_only(request):
            # etcd serves a txn of ranges only without raft, hence without its size limit.
            self.ctx.check_size(request)
        validate.check_key_length(request, self.store.max_key_bytes)
        cost = txn_cost(request)
        if cost:
            await self.ctx.space.check(cost)
        resp = await self.store.txn(request)
        self.ctx.fill(resp.header)
        return resp

    async def Compact(self, request: pb.CompactionRequest, context: grpc.aio.ServicerContext) -> pb.CompactionResponse:
        resp = await self.store.compact(request)
        self.ctx.fill(resp.header)
        return resp
