"""The CPU a Python gRPC server spends per call before doing any work of its own.

Serves a canned RangeResponse (unary) and a canned 1 KiB WatchResponse stream from
grpc.aio, on the standard asyncio loop and on uvloop, with the client in a child
process, and prints the server process's CPU time per call and per streamed
message. Pin it like the benchmark pins servers: ``taskset -c 0 python3
bench/micro/grpc_floor.py``. bench/limits.md quotes its output.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import AsyncIterator

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # not the fork notes of starting the client

import grpc

from k8s_sql.pb import kv_pb2, rpc_pb2 as pb, rpc_pb2_grpc

CALLS = 10_000
MESSAGES = 20_000
CLIENT_THREADS = 16


class KV(rpc_pb2_grpc.KVServicer):
    async def Range(self, request: pb.RangeRequest, context: grpc.aio.ServicerContext) -> pb.RangeResponse:
        return pb.RangeResponse(header=pb.ResponseHeader(revision=1))


class Watch(rpc_pb2_grpc.WatchServicer):
    async def Watch(
        self, requests: AsyncIterator[pb.WatchRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchResponse]:
        await requests.__anext__()
        event = kv_pb2.Event(kv=kv_pb2.KeyValue(key=b"/registry/pods/ns/name", value=b"v" * 1024, mod_revision=2))
        for i in range(MESSAGES):
            resp = pb.WatchResponse(header=pb.ResponseHeader(revision=i + 1), watch_id=i % 10)
            resp.events.append(event)
            yield resp


def _unary_client(port: int) -> None:
    stub = rpc_pb2_grpc.KVStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

    def work() -> None:
        for _ in range(CALLS // CLIENT_THREADS):
            stub.Range(pb.RangeRequest(key=b"a"))

    threads = [threading.Thread(target=work) for _ in range(CLIENT_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _stream_client(port: int) -> None:
    stub = rpc_pb2_grpc.WatchStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    for _ in stub.Watch(iter([pb.WatchRequest()])):
        pass


async def _measure(client: str, count: int) -> float:
    server = grpc.aio.server()
    rpc_pb2_grpc.add_KVServicer_to_server(KV(), server)
    rpc_pb2_grpc.add_WatchServicer_to_server(Watch(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    cpu = time.process_time()
    # A fresh interpreter for the client, so that its CPU is not counted here.
    proc = await asyncio.create_subprocess_exec(sys.executable, __file__, client, str(port))
    await proc.wait()
    used = time.process_time() - cpu
    await server.stop(None)
    return used / count * 1e6


def main() -> None:
    if len(sys.argv) == 3:  # the client side
        {"unary": _unary_client, "stream": _stream_client}[sys.argv[1]](int(sys.argv[2]))
        return
    loops: list[tuple[str, object]] = [("asyncio", None)]
    try:
        import uvloop

        loops.append(("uvloop", uvloop.new_event_loop))
    except ImportError:
        pass
    for name, factory in loops:
        with asyncio.Runner(loop_factory=factory) as runner:  # type: ignore[arg-type]
            unary = runner.run(_measure("unary", CALLS))
            stream = runner.run(_measure("stream", MESSAGES))
        print(f"{name:8} unary call: {unary:4.0f} us server CPU   streamed 1 KiB WatchResponse: {stream:4.0f} us")


if __name__ == "__main__":
    main()
