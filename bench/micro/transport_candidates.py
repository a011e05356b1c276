"""Server CPU per unary gRPC call for every way a Python process can speak gRPC that
#15 asks about, on the same core, with the same etcd client.

Each candidate serves ``etcdserverpb.KV/Range`` with a canned RangeResponse (a header
and one 1 KiB key-value) and nothing else. The server runs pinned to CPU 0; etcd's own
``benchmark range`` (the Go client etcd ships, 16 clients on 1 connection) runs pinned
to CPU 1. The number is the server's CPU seconds from /proc (its whole process tree)
over the calls completed, after a warm-up. bench/limits.md records the table.

Candidates:

- ``aio``: grpc.aio with generated servicers, as a plain grpc.aio server is written;
- ``aio-k8s-sql``: the same plus what k8s-sql adds on every call: its server options
  and its two interceptors (the readiness gate and the error/metrics wrapper);
- ``aio-raw``: grpc.aio tuned: a generic handler taking and returning raw bytes (no
  protobuf objects on either side), no interceptors, a pre-encoded response;
- ``sync``: grpcio's thread-pool server, raw bytes (for scale: k8s-sql is asyncio);
- ``grpclib``: the pure-Python asyncio gRPC server (h2), raw bytes;
- ``pyvoy``: gRPC's wire protocol as an ASGI application on pyvoy (Envoy's HTTP/2 with
  trailers; what connect-python's gRPC support runs on), raw bytes;
- ``granian``: the same ASGI application on granian (a Rust HTTP/2 server).

Every Python candidate runs on uvloop where it can choose (``--loop``). Run:
``python3 bench/micro/transport_candidates.py [--calls N] [candidate ...]``; the
candidates' packages (grpclib, pyvoy, granian) are not k8s-sql's dependencies: install
them into the environment that runs this, and a missing one is reported, not run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

RANGE = "/etcdserverpb.KV/Range"


def canned() -> bytes:
    from k8s_sql.pb import kv_pb2, rpc_pb2 as pb

    resp = pb.RangeResponse(header=pb.ResponseHeader(cluster_id=1, member_id=2, revision=3, raft_term=1), count=1)
    resp.kvs.append(kv_pb2.KeyValue(key=b"k", value=b"v" * 1024, create_revision=2, mod_revision=3, version=1))
    return resp.SerializeToString()


# -- the servers (each runs as ``transport_candidates.py --serve NAME PORT``) -----------


def serve_aio(port: int, variant: str) -> None:
    import grpc
    import uvloop

    from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc

    body = canned()
    response = pb.RangeResponse.FromString(body)

    class KV(rpc_pb2_grpc.KVServicer):
        async def Range(self, request: pb.RangeRequest, context: grpc.aio.ServicerContext) -> pb.RangeResponse:
            return response

    async def raw(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return body

    async def main() -> None:
        options: list[tuple[str, int]] = []
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if variant == "k8s-sql":
            from k8s_sql.api.interceptor import ErrorInterceptor
            from k8s_sql.api.readiness import ReadinessGate
            from k8s_sql.config import Config
            from k8s_sql.server import grpc_options

            gate = ReadinessGate()
            gate.open()
            calls = ErrorInterceptor()
            calls.register(pb.DESCRIPTOR.services_by_name.values())
            options, interceptors = grpc_options(Config()), [gate, calls]
        server = grpc.aio.server(options=options, interceptors=interceptors)
        if variant == "raw":
            handlers = {"Range": grpc.unary_unary_rpc_method_handler(raw)}
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("etcdserverpb.KV", handlers),))
        else:
            rpc_pb2_grpc.add_KVServicer_to_server(KV(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.run(main())


def serve_sync(port: int) -> None:
    from concurrent import futures

    import grpc

    body = canned()
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: body)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("etcdserverpb.KV", {"Range": handler}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def serve_grpclib(port: int) -> None:
    import uvloop
    from grpclib.const import Cardinality, Handler
    from grpclib.encoding.base import CodecBase
    from grpclib.server import Server

    body = canned()

    class Raw(CodecBase):
        __content_subtype__ = "proto"

        def encode(self, message: bytes, message_type: object) -> bytes:
            return message

        def decode(self, data: bytes, message_type: object) -> bytes:
            return data

    class KV:
        async def range(self, stream) -> None:  # type: ignore[no-untyped-def]
            await stream.recv_message()
            await stream.send_message(body)

        def __mapping__(self) -> dict[str, Handler]:
            return {RANGE: Handler(self.range, Cardinality.UNARY_UNARY, bytes, bytes)}

    async def main() -> None:
        server = Server([KV()], codec=Raw())
        await server.start("127.0.0.1", port)
        await server.wait_closed()

    uvloop.run(main())


def asgi_app():  # type: ignore[no-untyped-def]
    """gRPC over ASGI: read the length-prefixed request, answer one length-prefixed
    message, then grpc-status in the trailers (ASGI's http.response.trailers)."""
    body = canned()
    framed = b"\0" + struct.pack(">I", len(body)) + body

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/grpc")],
                "trailers": True,
            }
        )
        await send({"type": "http.response.body", "body": framed, "more_body": False})
        await send({"type": "http.response.trailers", "headers": [(b"grpc-status", b"0")], "more_trailers": False})

    return app


app = None  # set when an ASGI server imports this module (see serve_asgi)
if os.environ.get("TRANSPORT_CANDIDATE_ASGI"):
    app = asgi_app()


def asgi_argv(name: str, port: int) -> list[str]:
    bindir = Path(sys.executable).parent
    module = "transport_candidates:app"
    if name == "pyvoy":
        return [str(bindir / "pyvoy"), "--port", str(port), "--loop", "uvloop", "--log-level", "error", module]
    return [
        str(bindir / "granian"),
        "--interface",
        "asgi",
        "--http",
        "2",
        "--loop",
        "uvloop",
        "--port",
        str(port),
        "--log-level",
        "error",
        module,
    ]


# -- the measurement ---------------------------------------------------------------------

CANDIDATES = ["aio", "aio-k8s-sql", "aio-raw", "sync", "grpclib", "pyvoy", "granian"]
NEEDS = {"grpclib": "grpclib", "pyvoy": "pyvoy", "granian": "granian"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and every live descendant (utime + stime)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def bench(benchmark: str, port: int, calls: int) -> tuple[float, str]:
    argv = [
        "taskset", "-c", "1", benchmark, "--endpoints", f"127.0.0.1:{port}", "--conns", "1", "--clients", "16",
        "range", "k", "--total", str(calls),
    ]  # fmt: skip
    started = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    took = time.monotonic() - started
    if out.returncode != 0 or "Requests/sec" not in out.stdout:
        raise RuntimeError(f"benchmark failed: {(out.stdout + out.stderr)[-400:]}")
    errors = [line for line in out.stdout.splitlines() if "error" in line.lower()]
    return took, "; ".join(errors)


def measure(name: str, benchmark: str, calls: int) -> str:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).parent}:{ROOT / 'src'}", "GRPC_VERBOSITY": "ERROR"}
    if name in ("pyvoy", "granian"):
        env["TRANSPORT_CANDIDATE_ASGI"] = "1"
        argv = asgi_argv(name, port)
    else:
        argv = [sys.executable, __file__, "--serve", name, str(port)]
    proc = subprocess.Popen(["taskset", "-c", "0", *argv], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    return f"| {name} | did not start | | |"
                time.sleep(0.1)
        try:
            bench(benchmark, port, 2000)  # warm-up: connections, caches, JITs
            before = tree_cpu(proc.pid)
            took, errors = bench(benchmark, port, calls)
            used = tree_cpu(proc.pid) - before
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            return f"| {name} | failed: {' '.join(str(e).split())[:200]} | | |"
        note = f" ({errors})" if errors else ""
        return f"| {name} | {used / calls * 1e6:,.0f} | {calls / took:,.0f} |{note} |"
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", nargs=2, metavar=("NAME", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--benchmark", default=str(Path.home() / ".cache/k8s-sql/peers/v3.6.16/benchmark"))
    parser.add_argument("candidates", nargs="*", default=CANDIDATES)
    args = parser.parse_args()
    if args.serve:
        name, port = args.serve[0], int(args.serve[1])
        if name.startswith("aio"):
            serve_aio(port, name[4:] or "plain")
        else:
            {"sync": serve_sync, "grpclib": serve_grpclib}[name](port)
        return
    if not shutil.which(args.benchmark) and not Path(args.benchmark).exists():
        sys.exit(f"etcd's benchmark tool not found at {args.benchmark} (peers/build.sh builds it)")
    print("| candidate | µs server CPU / call | calls/s |")
    print("|---|---:|---:|")
    for name in args.candidates:
        need = NEEDS.get(name)
        if need:
            import importlib.util

            if importlib.util.find_spec(need) is None:
                print(f"| {name} | not installed (pip install {need}) | |")
                continue
        print(measure(name, args.benchmark, args.calls), flush=True)


if __name__ == "__main__":
    main()
