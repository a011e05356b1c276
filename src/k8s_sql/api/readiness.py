"""Answering before the database is open.

k8s-sql listens before it has reached its database, so that a frontend started
while the database is still down (a cluster coming up in any order, a failover in
progress) is already an endpoint that answers. Until :meth:`ReadinessGate.open`,
every call ends at once with UNAVAILABLE and etcd's text for a store it cannot
reach, ``etcdserver: request timed out, database unavailable``: etcd clients and
kube-apiserver retry UNAVAILABLE, exactly as they do while a running frontend's
database is away. Servicers never see a call before the store they use has started.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc

from k8s_sql import errors

# The gRPC health service answers from the start (NOT_SERVING until the store is
# ready), as a health check must.
HEALTH_SERVICE = "/grpc.health.v1.Health/"


async def _refuse(context: grpc.aio.ServicerContext) -> NoReturn:
    await context.abort(grpc.StatusCode.UNAVAILABLE, errors.DatabaseUnavailable.message)
    raise AssertionError("unreachable: abort raises")


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind (so the call is framed as the client expects) that
    refuses without reading a request."""
    decode, encode = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await _refuse(context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, decode, encode)
    if handler.unary_stream is not None:

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await _refuse(context)
            yield  # makes this an async generator, as a streaming handler must be

        return grpc.unary_stream_rpc_method_handler(unary_stream, decode, encode)
    if handler.stream_unary is not None:

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            await _refuse(context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, decode, encode)

    async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await _refuse(context)
        yield

    return grpc.stream_stream_rpc_method_handler(stream_stream, decode, encode)


class ReadinessGate(grpc.aio.ServerInterceptor):
    """Refuses every call but health checks with UNAVAILABLE until :meth:`open`, then
    steps aside (the cost of an open gate is one ``await`` per call). Unknown methods
    still get UNIMPLEMENTED, as from etcd. The gate only opens: a database lost later is the
    servicers' business (they answer the same UNAVAILABLE per request)."""

    def __init__(self) -> None:
        self._open = False

    @property
    def is_open(self) -> bool:
        return self._open

    def open(self) -> None:
        self._open = True

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if self._open or handler is None or details.method.startswith(HEALTH_SERVICE):
            return handler
        return _refusing(handler)
