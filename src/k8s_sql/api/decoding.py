"""Undecodable messages get etcd's answer, not a crash report.

grpcio answers a request its deserializer cannot parse with UNKNOWN and logs a
traceback per message, so any client could flood the log. etcd (gRPC-Go) answers
INTERNAL. This interceptor decodes requests itself: a message that does not parse
becomes a :class:`Malformed` marker, and the call ends with INTERNAL and gRPC-Go's
message before any servicer code runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc


@dataclass(frozen=True)
class Malformed:
    reason: str


class MalformedMessage(Exception):
    """A streamed request could not be decoded."""


UNARY_PREFIX = "grpc: error unmarshalling request: "
STREAM_PREFIX = "grpc: failed to unmarshal the received message: "


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserializer(data) if deserializer is not None else data
        except Exception as e:
            return Malformed(str(e) or type(e).__name__)

    return decode


async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Pass requests through, raising :class:`MalformedMessage` at an undecodable one."""
    async for r in requests:
        if isinstance(r, Malformed):
            raise MalformedMessage(r.reason)
        yield r


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        decode = _tolerant(handler.request_deserializer)
        serialize = handler.response_serializer

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, Malformed):
                    await context.abort(grpc.StatusCode.INTERNAL, UNARY_PREFIX + request.reason)
                return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, decode, serialize)

        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, Malformed):
                    await context.abort(grpc.StatusCode.INTERNAL, UNARY_PREFIX + request.reason)
                async for resp in inner_us(request, context):
                    yield resp

            return grpc.unary_stream_rpc_method_handler(unary_stream, decode, serialize)

        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream

            async def stream_stream(
                requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                try:
                    async for resp in inner_ss(checked(requests), context):
                        yield resp
                except MalformedMessage as e:
                    await context.abort(grpc.StatusCode.INTERNAL, STREAM_PREFIX + str(e))

            return grpc.stream_stream_rpc_method_handler(stream_stream, decode, serialize)

        return handler  # no stream-unary methods in the etcd API
