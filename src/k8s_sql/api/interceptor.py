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

The same wrapper counts what go-grpc-prometheus counts for etcd (calls started and
handled by code, messages received and sent, handling time: :mod:`k8s_sql.metrics`)
and logs etcd's ``apply request took too long`` warning for a unary request slower
than ``--warning-apply-duration``, with its method and key range (never a value).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any, NoReturn

import grpc

from k8s_sql import errors
from k8s_sql.api.status import to_status
from k8s_sql.metrics import GrpcMethod, grpc_code_name

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


async def checked(requests: AsyncIterator[Any], m: GrpcMethod) -> AsyncIterator[Any]:
    """Pass requests through, counting them and raising :class:`MalformedMessage`
    at an undecodable one."""
    received = m.received
    async for r in requests:
        received.inc()
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


def _ended(context: grpc.aio.ServicerContext, e: BaseException) -> str:
    """The status a call that raised ended with, as go-grpc names it: Canceled when the
    client went away (the handler is cancelled or its generator closed)."""
    if isinstance(e, (asyncio.CancelledError, GeneratorExit)):
        return "Canceled"
    code = context.code()
    return grpc_code_name(code) if code is not None else "Unknown"


def method_kind(client_streaming: bool, server_streaming: bool) -> str:
    """go-grpc-prometheus's grpc_type label."""
    if client_streaming:
        return "bidi_stream" if server_streaming else "client_stream"
    return "server_stream" if server_streaming else "unary"


def go_duration(seconds: float) -> str:
    """A duration as Go's time.Duration.String() writes it (etcd's took, expected-duration)."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{round(seconds / scale, 6):g}{unit}"
    return f"{round(seconds * 1e9)}ns"


APPLIED = ("/etcdserverpb.KV/", "/etcdserverpb.Lease/")
INFINITY = float("inf")
MAX_LOGGED_KEY = 200  # bytes of a key quoted in a log line


def quote_key(key: bytes) -> str:
    """A key for a log line: printable ASCII as is, ``"`` and ``\\`` escaped, any other
    byte as ``\\xNN`` (as Go's %q shows bytes that are not UTF-8), cut at MAX_LOGGED_KEY."""
    out = []
    for b in key[:MAX_LOGGED_KEY]:
        if b in (0x22, 0x5C):
            out.append("\\" + chr(b))
        elif 0x20 <= b < 0x7F:
            out.append(chr(b))
        else:
            out.append(f"\\x{b:02x}")
    return '"' + "".join(out) + '"' + ("..." if len(key) > MAX_LOGGED_KEY else "")


def _first_key(txn: Any) -> bytes | None:
    """The first key a txn names: its first compare's, else its first op's (nested txns
    searched depth first)."""
    for c in txn.compare:
        return bytes(c.key)
    for op in (*txn.success, *txn.failure):
        kind = op.WhichOneof("request")
        if kind == "request_txn":
            key = _first_key(op.request_txn)
            if key is not None:
                return key
        elif kind is not None:
            return bytes(getattr(op, kind).key)
    return None


def describe(request: Any) -> str:
    """What a slow request asked for, in etcd's log style: keys, ranges, sizes and
    counts -- never a value (values are Secrets' data)."""
    name = type(request).__name__
    parts: list[str] = []
    key = getattr(request, "key", None)
    if isinstance(key, bytes):
        parts.append(f"key:{quote_key(key)}")
        end = getattr(request, "range_end", b"")
        if end:
            parts.append(f"range_end:{quote_key(end)}")
    if name == "RangeRequest":
        for field in ("limit", "revision"):
            if getattr(request, field):
                parts.append(f"{field}:{getattr(request, field)}")
        for flag in ("count_only", "keys_only", "serializable"):
            if getattr(request, flag):
                parts.append(f"{flag}:true")
    elif name == "PutRequest":
        parts.append(f"value_size:{len(request.value)}")
        if request.lease:
            parts.append(f"lease:{request.lease}")
    elif name == "TxnRequest":
        key = _first_key(request)
        if key is not None:
            parts.append(f"key:{quote_key(key)}")
        parts.append(f"compare:{len(request.compare)} success:{len(request.success)} failure:{len(request.failure)}")
    elif name in ("LeaseGrantRequest", "LeaseRevokeRequest", "LeaseTimeToLiveRequest"):
        parts.append(f"id:{request.ID}")
    elif name == "CompactionRequest":
        parts.append(f"revision:{request.revision}")
    return " ".join(parts)


async def _counted(
    m: GrpcMethod, method: str, context: grpc.aio.ServicerContext, started: float, responses: AsyncIterator[Any]
) -> AsyncIterator[Any]:
    """A streaming call's responses, each counted as sent; its end counted by code, an
    error ended with etcd's status (see :func:`abort_with`)."""
    sent = m.sent
    try:
        try:
            async for resp in responses:
                sent.inc()
                yield resp
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await abort_with(context, method, e)
    except BaseException as e:
        m.handled(_ended(context, e), started)
        raise
    m.handled("OK", started)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """See the module docstring: errors mapped, calls counted, slow requests logged.
    ``slow``: etcd's --warning-apply-duration in seconds (0: never warn)."""

    def __init__(self, slow: float = 0.1) -> None:
        self.slow = slow
        self._methods: dict[str, GrpcMethod] = {}
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def register(self, services: Any) -> None:
        """Create every method's series at 0 (protobuf ServiceDescriptors)."""
        for service in services:
            for md in service.methods:
                self.method(f"/{service.full_name}/{md.name}", method_kind(md.client_streaming, md.server_streaming))

    def method(self, full_method: str, kind: str) -> GrpcMethod:
        m = self._methods.get(full_method)
        if m is None:
            m = self._methods[full_method] = GrpcMethod(full_method, kind)
            # etcd warns of slow applies and reads: KV and Lease requests, not maintenance.
            m.slow = (self.slow or INFINITY) if full_method.startswith(APPLIED) else INFINITY
        return m

    def _warn_slow(self, method: str, took: float, request: Any) -> None:
        try:
            what = describe(request)
        except Exception as e:  # a log line must never fail the request it describes
            what = f"(not described: {type(e).__name__})"
        if self.slow and took > self.slow:
            fields = {
                "method": method,
                "took": go_duration(took),
                "expected-duration": go_duration(self.slow),
                "request": what,
            }
            log.warning(
                "apply request took too long: %s",
                " ".join(f"{k}={v}" for k, v in fields.items()),
                extra={"fields": fields},
            )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        # The wrapper holds nothing of one call: made once per method, not per call
        # (three closures and a handler tuple each time before).
        known = self._wrapped.get(details.method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(details.method, handler)
        self._wrapped[details.method] = (handler, wrapped)  # one per served method: bounded
        return wrapped

    def _wrap(self, full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        method = full_method.rsplit("/", 1)[-1]
        decode = _tolerant(handler.request_deserializer)
        serialize = handler.response_serializer
        warn_slow = self._warn_slow

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary
            m = self.method(full_method, "unary")
            slow = m.slow

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = perf_counter()
                m.started.inc()
                m.received.inc()
                try:
                    if isinstance(request, Malformed):
                        await abort_malformed(context, request)
                    try:
                        resp = await inner_uu(request, context)
                    except grpc.aio.AbortError:
                        raise
                    except Exception as e:
                        await abort_with(context, method, e)
                except BaseException as e:
                    m.handled(_ended(context, e), started)
                    raise
                m.sent.inc()
                took = m.handled("OK", started)
                if took > slow:
                    warn_slow(method, took, request)
                return resp

            return grpc.unary_unary_rpc_method_handler(unary_unary, decode, serialize)

        if handler.unary_stream is not None and inspect.iscoroutinefunction(handler.unary_stream):
            # A streaming handler that writes with context.write (grpc.health.v1's Watch).
            inner_writer = handler.unary_stream
            m = self.method(full_method, "server_stream")

            async def unary_stream_writer(request: Any, context: grpc.aio.ServicerContext) -> None:
                started = perf_counter()
                m.started.inc()
                m.received.inc()
                try:
                    await inner_writer(request, context)
                except BaseException as e:
                    m.handled(_ended(context, e), started)
                    raise
                m.handled("OK", started)

            return grpc.unary_stream_rpc_method_handler(unary_stream_writer, decode, serialize)

        if handler.unary_stream is not None:
            inner_us = handler.unary_stream
            m = self.method(full_method, "server_stream")

            async def first_checked(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, Malformed):
                    await abort_malformed(context, request)
                async for resp in inner_us(request, context):
                    yield resp

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                started = perf_counter()
                m.started.inc()
                m.received.inc()
                async for resp in _counted(m, method, context, started, first_checked(request, context)):
                    yield resp

            return grpc.unary_stream_rpc_method_handler(unary_stream, decode, serialize)

        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream
            m = self.method(full_method, "bidi_stream")

            async def stream_stream(
                requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                started = perf_counter()
                m.started.inc()
                async for resp in _counted(m, method, context, started, inner_ss(checked(requests, m), context)):
                    yield resp

            return grpc.stream_stream_rpc_method_handler(stream_stream, decode, serialize)

        return handler  # no stream-unary methods in the etcd API
