"""gRPC over ASGI (k8s_sql/asgi.py), driven by a scripted ASGI peer: framing, status
trailers, limits, deadlines, and the end of a stream whose client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

import grpc
import pytest

from k8s_sql.api.interceptor import ErrorInterceptor
from k8s_sql.asgi import GrpcOverAsgi, frame, parse_timeout, status_trailers
from k8s_sql.errors import KeyNotFound


class Peer:
    """One call: the request body chunks to deliver, and what the app sent back."""

    def __init__(self, chunks: list[bytes], *, disconnect: asyncio.Event | None = None) -> None:
        self.chunks = list(chunks)
        self.sent: list[dict[str, Any]] = []
        self.disconnect = disconnect or asyncio.Event()
        self.body_sent = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        if self.chunks:
            body = self.chunks.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(self.chunks)}
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and message["body"]:
            self.body_sent.set()

    def messages(self) -> list[bytes]:
        data = b"".join(m["body"] for m in self.sent if m["type"] == "http.response.body")
        out = []
        while data:
            n = int.from_bytes(data[1:5], "big")
            out.append(data[5 : 5 + n])
            data = data[5 + n :]
        return out

    def status(self) -> tuple[int, str]:
        trailers = [m for m in self.sent if m["type"] == "http.response.trailers"]
        assert len(trailers) == 1, self.sent
        fields = dict(trailers[0]["headers"])
        return int(fields[b"grpc-status"]), unquote(fields.get(b"grpc-message", b"").decode())


def scope(path: str, headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {"type": "http", "path": path, "headers": [(b"content-type", b"application/grpc"), *(headers or [])]}


def app(max_receive: int = 1 << 20) -> GrpcOverAsgi:
    calls = ErrorInterceptor(slow=0)
    server = GrpcOverAsgi([calls], max_receive)

    async def echo(request: bytes, context: Any) -> bytes:
        return request[::-1]

    async def missing(request: bytes, context: Any) -> bytes:
        raise KeyNotFound()

    async def slow(request: bytes, context: Any) -> bytes:
        await asyncio.sleep(30)
        return b""

    async def chat(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for r in requests:
            yield r.upper()

    stream_ended = asyncio.Event()
    server.stream_ended = stream_ended  # type: ignore[attr-defined]

    async def forever(request: bytes, context: Any) -> AsyncIterator[bytes]:
        try:
            yield b"first"
            await asyncio.sleep(3600)
        finally:
            stream_ended.set()

    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Missing": grpc.unary_unary_rpc_method_handler(missing),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
        "Forever": grpc.unary_stream_rpc_method_handler(forever),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Svc", handlers),))
    return server


async def test_unary_call_is_one_framed_message_and_ok_trailers() -> None:
    peer = Peer([frame(b"abc")[:3], frame(b"abc")[3:]])  # a prefix split across chunks
    await app()(scope("/test.Svc/Echo"), peer.receive, peer.send)
    assert peer.sent[0]["type"] == "http.response.start"
    assert (b"content-type", b"application/grpc") in peer.sent[0]["headers"]
    assert peer.messages() == [b"cba"]
    assert peer.status() == (0, "")


async def test_domain_error_is_etcds_status_in_the_trailers() -> None:
    peer = Peer([frame(b"")])
    await app()(scope("/test.Svc/Missing"), peer.receive, peer.send)
    assert peer.messages() == []
    assert peer.status() == (grpc.StatusCode.INVALID_ARGUMENT.value[0], KeyNotFound.message)


async def test_unknown_service_and_method_are_unimplemented() -> None:
    for path in ("/no.Such/Echo", "/test.Svc/Nope"):
        peer = Peer([frame(b"")])
        await app()(scope(path), peer.receive, peer.send)
        assert peer.status()[0] == grpc.StatusCode.UNIMPLEMENTED.value[0], path


async def test_message_over_the_limit_is_refused_before_it_is_read() -> None:
    big = frame(b"x" * 1000)
    peer = Peer([big[:5]])  # only the prefix arrives: the length alone refuses it
    await app(max_receive=999)(scope("/test.Svc/Echo"), peer.receive, peer.send)
    code, message = peer.status()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert message == "grpc: received message larger than max (1000 vs. 999)"


async def test_deadline_from_grpc_timeout() -> None:
    peer = Peer([frame(b"")])
    await app()(scope("/test.Svc/Slow", [(b"grpc-timeout", b"50m")]), peer.receive, peer.send)
    assert peer.status()[0] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


async def test_bidi_stream_answers_each_message() -> None:
    peer = Peer([frame(b"a") + frame(b"b"), frame(b"c")])
    await app()(scope("/test.Svc/Chat"), peer.receive, peer.send)
    assert peer.messages() == [b"A", b"B", b"C"]
    assert peer.status() == (0, "")


async def test_stream_ends_when_the_client_goes_away() -> None:
    """A server stream that would run for an hour ends as soon as ASGI reports the
    disconnect, although its handler never reads again."""
    server = app()
    peer = Peer([frame(b"")])
    call = asyncio.ensure_future(server(scope("/test.Svc/Forever"), peer.receive, peer.send))
    await peer.body_sent.wait()
    peer.disconnect.set()
    await asyncio.wait_for(call, 5)
    assert server.stream_ended.is_set()  # type: ignore[attr-defined]
    assert not [m for m in peer.sent if m["type"] == "http.response.trailers"]


async def test_stop_cancels_running_calls() -> None:
    server = app()
    peer = Peer([frame(b"")])
    call = asyncio.ensure_future(server(scope("/test.Svc/Forever"), peer.receive, peer.send))
    await peer.body_sent.wait()
    await server.stop(0.01)
    await asyncio.wait_for(asyncio.gather(call, return_exceptions=True), 5)
    assert server.stream_ended.is_set()  # type: ignore[attr-defined]
    late = Peer([frame(b"x")])
    await server(scope("/test.Svc/Echo"), late.receive, late.send)
    assert late.status()[0] == grpc.StatusCode.UNAVAILABLE.value[0]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(b"1S", 1.0), (b"250m", 0.25), (b"3H", 10800.0), (b"100000000S", None), (b"5x", None), (b"S", None)],
)
def test_grpc_timeout_header(value: bytes, seconds: float | None) -> None:
    assert parse_timeout(value) == seconds


def test_grpc_message_is_percent_encoded() -> None:
    fields = dict(status_trailers(grpc.StatusCode.INTERNAL, "50% done: \u00e9\n"))
    assert fields[b"grpc-message"] == b"50%25 done: %C3%A9%0A"
    assert unquote(fields[b"grpc-message"].decode()) == "50% done: \u00e9\n"


async def test_large_response_goes_in_bounded_pieces() -> None:
    """A message over SEND_CHUNK reaches the client whole, sent in pieces no larger
    than SEND_CHUNK (so Envoy holds one piece at a time, not the message)."""
    from k8s_sql.asgi import SEND_CHUNK

    payload = bytes(range(256)) * (3 * SEND_CHUNK // 256 + 7)
    peer = Peer([frame(payload)])
    await app(max_receive=len(payload))(scope("/test.Svc/Echo"), peer.receive, peer.send)
    assert peer.messages() == [payload[::-1]]
    bodies = [m["body"] for m in peer.sent if m["type"] == "http.response.body"]
    assert len(bodies) > 3 and max(len(b) for b in bodies) <= SEND_CHUNK
    assert peer.status() == (0, "")
