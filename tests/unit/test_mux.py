"""mux.py: gRPC and HTTP/1 on one port, in process, on uvloop (the default loop).

Many short connections (each a new TCP connection whose first frames race the relay's
connection to the gRPC server), a large streamed response (flow control), and an
HTTP/1 request on the same port.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest
from aiohttp import web

from k8s_sql import mux
from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc

uvloop = pytest.importorskip("uvloop")
BIG = 4 * 1024 * 1024
CONNECTIONS = 200


class _KV(rpc_pb2_grpc.KVServicer):
    async def Put(self, request: pb.PutRequest, context: grpc.aio.ServicerContext) -> pb.PutResponse:
        return pb.PutResponse(header=pb.ResponseHeader(revision=len(request.value)))

    async def RangeStream(self, request: pb.RangeRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
        for _ in range(8):  # 32 MiB in all: more than any socket buffer
            yield pb.RangeStreamResponse(range_response=pb.RangeResponse(kvs=[{"key": b"k", "value": b"x" * BIG}]))


async def _serve() -> tuple[grpc.aio.Server, mux.Mux, web.AppRunner, int]:
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 2 * BIG)])
    rpc_pb2_grpc.add_KVServicer_to_server(_KV(), server)
    path = mux.private_socket_path(0)
    server.add_insecure_port("unix-abstract:" + path[1:])
    await server.start()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello over HTTP/1\n")

    app = web.Application()
    app.router.add_get("/hello", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    assert runner.server is not None
    m = mux.Mux(path, runner.server)
    port = await m.listen("127.0.0.1", 0, False)
    return server, m, runner, port


def _clients(port: int) -> tuple[list[int], int, str]:
    revisions = []
    for i in range(CONNECTIONS):  # a new connection each time
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            revisions.append(rpc_pb2_grpc.KVStub(ch).Put(pb.PutRequest(value=b"v" * i), timeout=10).header.revision)
    options = [("grpc.max_receive_message_length", 2 * BIG)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as ch:
        received = sum(
            len(r.range_response.kvs[0].value)
            for r in rpc_pb2_grpc.KVStub(ch).RangeStream(pb.RangeRequest(), timeout=60)
        )
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/hello", timeout=10) as r:
        text = r.read().decode()
    return revisions, received, text


def test_grpc_and_http_share_the_port() -> None:
    async def main() -> tuple[list[int], int, str]:
        server, m, runner, port = await _serve()
        try:
            return await asyncio.to_thread(_clients, port)
        finally:
            await m.close()
            await runner.cleanup()
            await server.stop(None)

    revisions, received, text = uvloop.run(main())
    assert revisions == list(range(CONNECTIONS))  # every call answered, none lost to the relay's start
    assert received == 8 * BIG
    assert text == "hello over HTTP/1\n"
