"""The one place where a call's failure becomes the gRPC status etcd would send.

Every handler, unary or streaming, runs inside :class:`ErrorInterceptor`:

- a request the deserializer cannot parse ends with INTERNAL and gRPC-Go's text, as
  from etcd, before any servicer code runs (grpcio itself would answer UNKNOWN and
  log a traceback per message, so any client could flood the log);
- a domain error (:mod:`k8s_sql.errors`, a database outage, a full database) ends
  the call with etcd's code and message from :mod:`k8s_sql.api.status`, whether it
  is raised by a unary handler, before a stream's first response or in the middle
  of one;
- anything else is a bug: it is logged once per call site with its traceback and
  answered UNKNOWN with one line, never with grpcio's internal error.

Servicers therefore just raise; none of them catches to abort.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from k8s_sql import errors
from k8s_sql.api.status import to_status

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Malformed:
    reason: str
    too_deep: bool = False  # nested past the decoder's depth limit (see _tolerant)


class MalformedMessage(Exception):
    """A streamed request could not be decoded."""


UNARY_PREFIX = "grpc: error unmarshalling request: "
STREAM_PREFIX = "grpc: failed to unmarshal the received message: "

_logged_bugs: set[tuple[str, str]] = set()


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserializer(data) if deserializer is not None else data
        except Exception as e:
            # A protobuf decode error can be many lines long (nested messages): one line.
            reason = " ".join((str(e) or type(e).__name__).split())
            return Malformed(reason, too_deep="MaxDepth" in reason)

    return decode


async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Pass requests through, raising :class:`MalformedMessage` at an undecodable one."""
    async for r in requests:
        if isinstance(r, Malformed):
            raise MalformedMessage(r.reason)
        yield r


async def abort_malformed(context: grpc.aio.ServicerContext, request: Malformed) -> NoReturn:
    """etcd (gRPC-Go) answers an undecodable request INTERNAL. Go's decoder has no
    practical depth limit, while upb stops at 100 nested messages, i.e. a txn nested
    about 50 deep (each level is a TxnRequest in a RequestOp). etcd's checkTxnRequest
    gives each nesting level the op budget its parent left, and answers "too many
    operations" once it runs out; a txn too deep to decode here gets that answer."""
    if request.too_deep:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, errors.TooManyOps.message)
    await context.abort(grpc.StatusCode.INTERNAL, UNARY_PREFIX + request.reason)
    raise AssertionError("unreachable: abort raises")


async def abort_with(context: grpc.aio.ServicerContext, method: str, e: BaseException) -> NoReturn:
    """End the call with the status etcd would send for ``e``."""
    if isinstance(e, MalformedMessage):
        await context.abort(grpc.StatusCode.INTERNAL, STREAM_PREFIX + str(e))
    status = to_status(e)
    if status is not None:
        code, message = status
        if code == grpc.StatusCode.UNAVAILABLE:
            log.warning("%s: %s (%s)", method, message, errors.one_line(e))
        await context.abort(code, message)
    key = (method, type(e).__name__)
    if key not in _logged_bugs:  # once per method and kind: a client cannot flood the log
        _logged_bugs.add(key)
        log.error("%s failed unexpectedly", method, exc_info=e)
    await context.abort(grpc.StatusCode.UNKNOWN, f"k8s-sql: internal error: {errors.one_line(e)}")
    raise AssertionError("unreachable: abort raises")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        decode = _tolerant(handler.request_deserializer)
        serialize = handler.response_serializer

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, Malformed):
                    await abort_malformed(context, request)
                try:
                    return await inner_uu(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await abort_with(context, method, e)

            return grpc.unary_unary_rpc_method_handler(unary_unary, decode, serialize)

        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, Malformed):
                    await abort_malformed(context, request)
                try:
                    async for resp in inner_us(request, context):
                        yield resp
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await abort_with(context, method, e)

            return grpc.unary_stream_rpc_method_handler(unary_stream, decode, serialize)

        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream

            async def stream_stream(
                requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                try:
                    async for resp in inner_ss(checked(requests), context):
                        yield resp
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await abort_with(context, method, e)

            return grpc.stream_stream_rpc_method_handler(stream_stream, decode, serialize)

        return handler  # no stream-unary methods in the etcd API
