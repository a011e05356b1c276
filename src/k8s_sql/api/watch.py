"""etcdserverpb.Watch: one bidirectional stream carrying many watches."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from k8s_sql.api.common import Context
from k8s_sql.background import BackgroundLoop
from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc
from k8s_sql.watch.hub import Hub
from k8s_sql.watch.stream import WatchStream


def _encode(resp: pb.WatchResponse | bytes) -> bytes:
    """Responses carrying events arrive already encoded (see Hub.encoded_event)."""
    return resp if isinstance(resp, bytes) else resp.SerializeToString()


def add_to_server(servicer: WatchServicer, server: grpc.aio.Server) -> None:
    """Register the Watch service as the generated code would, except that responses
    may come pre-encoded, and as a generic handler only (see server._GenericHandlersOnly)."""
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.Watch, request_deserializer=pb.WatchRequest.FromString, response_serializer=_encode
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("etcdserverpb.Watch", {"Watch": handler}),))


class WatchServicer(rpc_pb2_grpc.WatchServicer, BackgroundLoop):
    task_name = "watch-progress"

    def __init__(self, ctx: Context, hub: Hub, progress_interval: float) -> None:
        self.ctx = ctx
        self.hub = hub
        self.progress_interval = progress_interval

    async def run(self) -> None:
        """The periodic progress notification of every stream's idle watches."""
        while True:
            await asyncio.sleep(self.progress_interval)
            for s in list(self.hub.streams):
                if isinstance(s, WatchStream):
                    s.tick_progress()

    async def Watch(
        self, request_iterator: AsyncIterator[pb.WatchRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchResponse | bytes]:
        header = pb.ResponseHeader()
        self.ctx.fill(header)
        stream = WatchStream(self.hub, header, self.ctx.max_request_bytes)
        self.hub.attach(stream)
        reader = asyncio.create_task(stream.read_requests(request_iterator))
        try:
            async for resp in stream.responses():
                yield resp
            if stream.error is not None:
                raise stream.error
        finally:
            self.hub.detach(stream)
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
