"""gRPC's wire protocol as an ASGI application, for ``--transport envoy``.

Envoy (through pyvoy) owns the sockets, TLS, HTTP/2 and its flow control, and hands
this application whole HTTP requests: a path, headers and body chunks, with response
trailers. What gRPC adds on top is small and settled here once:

- a message is a 5-byte prefix (compressed flag, big-endian length) and its bytes;
- the status travels in the trailers, ``grpc-status`` and a percent-encoded
  ``grpc-message``; a call that ends before any message still sends headers first
  and the status in trailers, which every client accepts;
- ``grpc-timeout`` is the call's deadline (DEADLINE_EXCEEDED when it passes);
- a request larger than ``max_receive`` ends the call with RESOURCE_EXHAUSTED before
  its bytes are held, as grpc.aio's ``grpc.max_receive_message_length`` does.

The servicers, the readiness gate and :class:`k8s_sql.api.interceptor.ErrorInterceptor`
are the same objects grpc.aio serves: :class:`GrpcOverAsgi` takes their generic
handlers and interceptors as a ``grpc.aio.Server`` would, and gives each call a
:class:`CallContext` with the part of ``grpc.aio.ServicerContext`` they use (abort,
code, write, metadata). So every status, metric and log line is the one grpc.aio
gives; only the bytes on the wire are produced here.

Measured (``bench/micro/transport_candidates.py``, one pinned core, a canned one-key
Range): grpc.aio 204 µs of server CPU per call, pyvoy 49 µs, Envoy included.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NoReturn
from urllib.parse import quote

import grpc

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_RESPONSE_HEADERS = [(b"content-type", b"application/grpc")]
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
# Requests a streaming call has read ahead of its handler: the rest waits in Envoy,
# and HTTP/2 flow control holds the client back (a bound on what one stream holds).
STREAM_READ_AHEAD = 16
# A response message larger than this goes to Envoy in pieces of this size (see
# _Response._chunked); smaller ones in one piece with their prefix.
SEND_CHUNK = 1 << 20
# The most of a refused (too large) message read and dropped before its status.
DRAIN_LIMIT = 16 << 20


class CallEnded(Exception):
    """The client went away (ASGI's http.disconnect) while the call was reading."""


def status_trailers(code: grpc.StatusCode, message: str) -> list[tuple[bytes, bytes]]:
    """grpc-status and grpc-message as the gRPC spec encodes them: the message
    percent-encoded outside printable ASCII (and ``%`` itself)."""
    out = [(b"grpc-status", str(code.value[0]).encode())]
    if message:
        out.append((b"grpc-message", quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode()))
    return out


def parse_timeout(value: bytes) -> float | None:
    """``grpc-timeout``: up to 8 digits and a unit (H M S m u n); None if malformed."""
    if len(value) < 2 or len(value) > 9 or not value[:-1].isdigit():
        return None
    unit = _TIMEOUT_UNITS.get(value[-1:])
    return None if unit is None else int(value[:-1]) * unit


def frame(message: bytes) -> bytes:
    return b"\0" + len(message).to_bytes(4, "big") + message


class Abort(grpc.aio.AbortError):
    """What :meth:`CallContext.abort` raises: the status is on the context."""


class CallContext:
    """The part of ``grpc.aio.ServicerContext`` the servicers and interceptors use."""

    __slots__ = ("_code", "_details", "_metadata", "_write")

    def __init__(self, metadata: tuple[tuple[str, str], ...], write: Callable[[Any], Awaitable[None]]) -> None:
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._metadata = metadata
        self._write = write

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> NoReturn:
        self._code, self._details = code, details
        raise Abort()

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def write(self, message: Any) -> None:
        await self._write(message)


class _Details:
    """grpc.HandlerCallDetails for the interceptors."""

    __slots__ = ("invocation_metadata", "method")

    def __init__(self, method: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self.method = method
        self.invocation_metadata = metadata


class _Response:
    """One call's response side: headers once, then messages, then the status."""

    __slots__ = ("_send", "_serialize", "started")

    def __init__(self, send: Send, serialize: Callable[[Any], bytes] | None) -> None:
        # Shielded like the reads (_Requests): pyvoy fails a send's future when the
        # client has gone, and failing one whose caller was cancelled meanwhile (the
        # stream's reader saw the disconnect first) logs an asyncio error. Only a
        # future is shielded: a send Envoy took at once returns an awaitable that is
        # already done, and shielding that would wrap it in a Task (measured: W1 at
        # 128 clients 15% slower).
        def shielded(message: Message) -> Awaitable[None]:
            sent = send(message)
            return asyncio.shield(sent) if isinstance(sent, asyncio.Future) else sent

        self._send = shielded
        self._serialize = serialize
        self.started = False

    async def message(self, message: Any) -> None:
        data = self._serialize(message) if self._serialize is not None else message
        if not self.started:
            self.started = True
            await self._send(
                {"type": "http.response.start", "status": 200, "headers": _RESPONSE_HEADERS, "trailers": True}
            )
        if len(data) > SEND_CHUNK:
            await self._chunked(data, more=True)
        else:
            await self._send({"type": "http.response.body", "body": frame(data), "more_body": True})

    async def _chunked(self, data: bytes, more: bool) -> None:
        """A large message in SEND_CHUNK pieces: each send waits while Envoy's buffer
        for the client is full, so Envoy holds about one piece, not the whole message
        (a 63 MB Range otherwise sat in Envoy's heap, which keeps what it once used)."""
        send = self._send
        await send({"type": "http.response.body", "body": b"\0" + len(data).to_bytes(4, "big"), "more_body": True})
        view = memoryview(data)
        last = len(data) - SEND_CHUNK
        for i in range(0, len(data), SEND_CHUNK):
            piece = bytes(view[i : i + SEND_CHUNK])
            await send({"type": "http.response.body", "body": piece, "more_body": more or i < last})

    async def finish(self, code: grpc.StatusCode, message: str) -> None:
        if not self.started:
            self.started = True
            await self._send(
                {"type": "http.response.start", "status": 200, "headers": _RESPONSE_HEADERS, "trailers": True}
            )
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})
        await self._send(
            {"type": "http.response.trailers", "headers": status_trailers(code, message), "more_trailers": False}
        )

    async def unary(self, message: Any) -> None:
        """A unary call's one message and its OK status."""
        data = self._serialize(message) if self._serialize is not None else message
        self.started = True
        send = self._send
        await send({"type": "http.response.start", "status": 200, "headers": _RESPONSE_HEADERS, "trailers": True})
        if len(data) > SEND_CHUNK:
            await self._chunked(data, more=False)
        else:
            await send({"type": "http.response.body", "body": frame(data), "more_body": False})
        await send({"type": "http.response.trailers", "headers": _OK_TRAILERS, "more_trailers": False})


_OK_TRAILERS = status_trailers(grpc.StatusCode.OK, "")


class _Requests:
    """The request side: gRPC messages cut from the body chunks ASGI delivers."""

    __slots__ = ("_buffer", "_decompress", "_more", "_receive", "max_receive")

    def __init__(self, receive: Receive, max_receive: int, encoding: bytes) -> None:
        # Each read is shielded: pyvoy's receive() is a future it completes from
        # Envoy's thread, and completing one its caller cancelled (a deadline, a
        # stopping server, a finished stream's reader) logs an asyncio error.
        self._receive = receive
        self._buffer = bytearray()
        self._more = True
        self.max_receive = max_receive
        self._decompress = encoding

    async def _fill(self, n: int) -> bool:
        """Read until ``n`` bytes are buffered; False at the end of the body."""
        while len(self._buffer) < n:
            if not self._more:
                return False
            message = await asyncio.shield(self._receive())
            kind = message["type"]
            if kind == "http.disconnect":
                raise CallEnded()
            self._buffer += message.get("body", b"")
            self._more = message.get("more_body", False)
        return True

    async def _skip(self, n: int) -> None:
        """Read and drop the rest of a refused message, up to DRAIN_LIMIT bytes, so
        that its status reaches a client still sending it: a response that ends while
        the request is unread makes Envoy reset the stream, and a gRPC client still
        writing then sometimes reports the reset (INTERNAL) instead of the status."""
        left = min(n, DRAIN_LIMIT)
        while left > 0:
            if len(self._buffer) >= left:
                del self._buffer[:left]
                return
            left -= len(self._buffer)
            self._buffer.clear()
            if not self._more:
                return
            message = await asyncio.shield(self._receive())
            if message["type"] == "http.disconnect":
                raise CallEnded()
            self._buffer += message.get("body", b"")
            self._more = message.get("more_body", False)

    async def wait_disconnect(self) -> None:
        """After the body: wait for the client to go away (ASGI's http.disconnect)."""
        while (await asyncio.shield(self._receive()))["type"] != "http.disconnect":
            pass

    async def next(self) -> bytes | None:
        """The next message's bytes, None at the end of the requests. Raises
        :class:`_Refused` for a message over the limit or one this server cannot read."""
        if not await self._fill(5):
            if self._buffer:
                raise _Refused(grpc.StatusCode.INTERNAL, "grpc: received an incomplete message prefix")
            return None
        flag = self._buffer[0]
        length = int.from_bytes(self._buffer[1:5], "big")
        if length > self.max_receive:
            await self._skip(5 + length)
            raise _Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"grpc: received message larger than max ({length} vs. {self.max_receive})",
            )
        if not await self._fill(5 + length):
            raise _Refused(grpc.StatusCode.INTERNAL, "grpc: received an incomplete message")
        data = bytes(self._buffer[5 : 5 + length])
        del self._buffer[: 5 + length]
        if flag & 1:
            data = self._inflate(data)
        return data

    def _inflate(self, data: bytes) -> bytes:
        if self._decompress not in (b"gzip", b"deflate"):
            raise _Refused(
                grpc.StatusCode.INTERNAL,
                "grpc: compressed flag set with identity or empty encoding",
            )
        try:
            d = zlib.decompressobj(wbits=31 if self._decompress == b"gzip" else 15)
            out = d.decompress(data, self.max_receive + 1)
        except zlib.error as e:
            raise _Refused(grpc.StatusCode.INTERNAL, f"grpc: failed to decompress the received message: {e}") from None
        if len(out) > self.max_receive or d.unconsumed_tail:
            raise _Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"grpc: received message after decompression larger than max ({self.max_receive})",
            )
        return out


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class GrpcOverAsgi:
    """Serves generic gRPC handlers through their interceptors as an ASGI application
    (the http scopes of gRPC requests; see the module docstring).

    It takes the place of the ``grpc.aio.Server`` the frontend registers its
    services with: ``add_generic_rpc_handlers``, ``start`` and ``stop`` are the ones
    the frontend calls."""

    def __init__(self, interceptors: Sequence[grpc.aio.ServerInterceptor], max_receive: int) -> None:
        self._handlers: list[grpc.GenericRpcHandler] = []
        self.interceptors = list(interceptors)
        self._chain: tuple[list[Any], Callable[[Any], Awaitable[grpc.RpcMethodHandler | None]]] | None = None
        self.max_receive = max_receive
        self._calls: set[asyncio.Task[Any]] = set()
        self._stopping = False

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._handlers.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        pass  # generic handlers only, as with grpc.aio (server._GenericHandlersOnly)

    async def start(self) -> None:
        pass  # Envoy listens

    async def stop(self, grace: float | None) -> None:
        """Refuse new calls; give the running ones ``grace`` seconds, then cancel them."""
        self._stopping = True
        calls = list(self._calls)
        if calls and grace:
            await asyncio.wait(calls, timeout=grace)
        for task in calls:
            task.cancel()
        if calls:
            await asyncio.gather(*calls, return_exceptions=True)

    async def _find(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        for h in self._handlers:
            found = h.service(details)
            if found is not None:
                return found
        return None

    async def _lookup(self, details: _Details) -> grpc.RpcMethodHandler | None:
        """The call's handler through the interceptors; the chain of continuations is
        built once per interceptor list (set by the frontend before it serves), not per
        call."""
        built = self._chain
        if built is None or built[0] is not self.interceptors:
            continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler | None]] = self._find
            for interceptor in reversed(self.interceptors):
                continuation = _chain(interceptor, continuation)
            built = self._chain = (self.interceptors, continuation)
        return await built[1](details)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        timeout: float | None = None
        encoding = b""
        metadata = []
        for name, value in scope["headers"]:
            if name == b"grpc-timeout":
                timeout = parse_timeout(value)
            elif name == b"grpc-encoding":
                encoding = value
            elif (
                not name.startswith((b":", b"grpc-"))
                and name not in (b"content-type", b"te", b"user-agent")
                and not name.endswith(b"-bin")
            ):
                metadata.append((name.decode("latin-1"), value.decode("latin-1")))
        md = tuple(metadata)
        if self._stopping:
            await _Response(send, None).finish(grpc.StatusCode.UNAVAILABLE, "transport is closing")
            return
        handler = await self._lookup(_Details(path, md))
        if handler is None:
            service, _, method = path[1:].rpartition("/")
            known = any(path.startswith(f"/{service}/") for service in self._services())
            text = f"unknown method {method} for service {service}" if known else f"unknown service {service}"
            await _Response(send, None).finish(grpc.StatusCode.UNIMPLEMENTED, text)
            return
        task = asyncio.current_task()
        assert task is not None
        self._calls.add(task)
        try:
            if timeout is None:
                await self._serve(handler, md, receive, send, encoding)
            else:
                try:
                    async with asyncio.timeout(timeout):
                        await self._serve(handler, md, receive, send, encoding)
                except TimeoutError:
                    await _quietly(
                        _Response(send, None).finish(grpc.StatusCode.DEADLINE_EXCEEDED, "context deadline exceeded")
                    )
        finally:
            self._calls.discard(task)

    def _services(self) -> list[str]:
        names = []
        for h in self._handlers:
            name = getattr(h, "_name", None) or getattr(h, "service_name", lambda: None)()
            if name:
                names.append(name)
        return names

    async def _serve(
        self,
        handler: grpc.RpcMethodHandler,
        md: tuple[tuple[str, str], ...],
        receive: Receive,
        send: Send,
        encoding: bytes,
    ) -> None:
        response = _Response(send, handler.response_serializer)
        requests = _Requests(receive, self.max_receive, encoding)
        context = CallContext(md, response.message)
        decode = handler.request_deserializer
        pump: _Pump | None = None
        try:
            if not handler.request_streaming:
                data = await requests.next()
                if data is None:
                    raise _Refused(grpc.StatusCode.INTERNAL, "grpc: error while receiving the request: EOF")
                request = decode(data) if decode is not None else data
                if handler.unary_unary is not None:
                    await response.unary(await handler.unary_unary(request, context))
                    return
                pump = _Pump(requests)
                stream = handler.unary_stream(request, context)
            else:
                pump = _Pump(requests)
                stream = handler.stream_stream(pump.messages(decode), context)
            if asyncio.iscoroutine(stream):  # a handler that writes (context.write)
                await stream
            else:
                try:
                    async for message in stream:
                        await response.message(message)
                finally:
                    await stream.aclose()  # its cleanup (a watch detached) now, not at GC
            code = context.code()
            await response.finish(code or grpc.StatusCode.OK, context.details() if code else "")
        except grpc.aio.AbortError:
            await _quietly(response.finish(context.code() or grpc.StatusCode.UNKNOWN, context.details()))
        except _Refused as e:
            await _quietly(response.finish(e.code, e.message))
        except (CallEnded, OSError):
            pass  # nobody to answer (pyvoy's ClientDisconnectedError is an OSError)
        except asyncio.CancelledError:
            if pump is None or pump.ended is None:
                raise  # the deadline or the server stopping
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            if isinstance(pump.ended, _Refused):
                await _quietly(response.finish(pump.ended.code, pump.ended.message))
        except Exception as e:  # the interceptor maps every error; this is the last guard
            log.error("%s failed unexpectedly", type(e).__name__, exc_info=e)
            await _quietly(response.finish(grpc.StatusCode.UNKNOWN, f"k8s-sql: internal error: {type(e).__name__}"))
        finally:
            if pump is not None:
                pump.close()


class _Pump:
    """A streaming call's reader: a task that keeps reading the request body, so that
    a client that goes away (or sends a message it may not) ends the call at once, as
    grpc.aio cancels a handler whose client is gone, even while the handler is not
    reading. At most STREAM_READ_AHEAD messages wait for the handler; past that the
    task stops reading and HTTP/2 flow control holds the client."""

    __slots__ = ("_call", "_queue", "_requests", "_task", "ended")

    def __init__(self, requests: _Requests) -> None:
        self._requests = requests
        self._call = asyncio.current_task()
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(STREAM_READ_AHEAD)
        self.ended: BaseException | None = None
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        requests = self._requests
        try:
            while (data := await requests.next()) is not None:
                await self._queue.put(data)
            await self._queue.put(None)
            await requests.wait_disconnect()
            raise CallEnded()
        except (CallEnded, _Refused) as e:
            self.ended = e
            if self._call is not None:
                self._call.cancel()

    async def messages(self, decode: Callable[[bytes], Any] | None) -> AsyncIterator[Any]:
        queue = self._queue
        while (data := await queue.get()) is not None:
            yield decode(data) if decode is not None else data

    def close(self) -> None:
        self._task.cancel()


def _chain(
    interceptor: grpc.aio.ServerInterceptor, continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler | None]]
) -> Callable[[Any], Awaitable[grpc.RpcMethodHandler | None]]:
    async def call(details: Any) -> grpc.RpcMethodHandler | None:
        return await interceptor.intercept_service(continuation, details)  # type: ignore[arg-type]

    return call


async def _quietly(step: Awaitable[None]) -> None:
    """Send a status to a client that may already be gone."""
    try:
        await step
    except Exception:  # the stream is closed: there is no one to tell
        log.debug("could not send a status", exc_info=True)
