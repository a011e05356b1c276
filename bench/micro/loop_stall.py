"""The event loop's worst stall while maintenance reads a large store.

Loads ``--keys`` keys (1 KiB values, one revision each) into a fresh store on each
backend, then streams a snapshot (as the Snapshot RPC does) and computes HashKV, in
the same process as a ticker task that wakes every millisecond and records how late
it woke: the longest lateness is the longest time the loop could serve no request.
Run it from the repository root (it starts throwaway PostgreSQL and MariaDB servers
with testing/databases.py):

    python3 bench/micro/loop_stall.py [--keys 100000] [--backends sqlite,postgres,mariadb]

It drives the backend's public interface only, and understands the snapshot
interface before the SQL engine (``snapshot()`` yielding ``(size, chunks)``) and
after (yielding a path that ``k8s_sql.backend.snapshot.frames`` streams -- converted
to etcd's format first where ``k8s_sql.formats.etcd_snapshot`` exists), so the
same script measures both; docs/architecture.md quotes its output.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # testing/

from k8s_sql.backend import open_backend
from k8s_sql.backend.base import LogRow, Row

TICK = 0.001
BATCH = 5000  # keys per load transaction


async def load(backend: Any, keys: int) -> None:
    rev = 1
    for start in range(0, keys, BATCH):
        async with backend.write() as tx:
            for i in range(start, min(keys, start + BATCH)):
                rev += 1
                row = Row(b"/registry/configmaps/bench/%08d" % i, rev, rev, 1, 0, os.urandom(512).hex().encode())
                await tx.put(row)
                tx.log(LogRow(rev, 0, 0, row, None))
            tx.revision = rev
            if hasattr(tx, "flush"):
                await tx.flush()


async def worst_stall(work: Callable[[], Awaitable[object]]) -> tuple[float, float, float]:
    """``(worst lateness of a 1 ms ticker in ms, the most CPU the loop's thread spent
    between two ticks in ms, seconds the work took)``. Lateness includes time the
    thread waited for a core or the GIL (other processes, our own threads); CPU is
    what the loop itself ran without yielding."""
    worst = worst_cpu = 0.0
    done = False

    async def ticker() -> None:
        nonlocal worst, worst_cpu
        loop = asyncio.get_running_loop()
        while not done:
            due = loop.time() + TICK
            cpu = time.thread_time()
            await asyncio.sleep(TICK)
            worst = max(worst, loop.time() - due)
            worst_cpu = max(worst_cpu, time.thread_time() - cpu)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    await work()
    took = time.perf_counter() - t0
    done = True
    await task
    return worst * 1000, worst_cpu * 1000, took


try:  # since the Snapshot RPC streams etcd's format: converted in a process first
    from k8s_sql.formats import etcd_snapshot  # imported here: a first import on the loop would be measured
except ImportError:
    etcd_snapshot = None  # type: ignore[assignment]


async def stream_snapshot(backend: Any) -> int:
    sent = 0
    async with backend.snapshot() as opened:
        if isinstance(opened, tuple):  # before the SQL engine: (size, chunks)
            chunks: AsyncIterator[bytes] = opened[1]
            async for chunk in chunks:
                sent += len(chunk)
        else:
            from k8s_sql.backend import snapshot

            if etcd_snapshot is None:
                async for _, blob in snapshot.frames(opened):
                    sent += len(blob)
            else:
                async with snapshot.temporary_path() as etcd_path:
                    await etcd_snapshot.export_elsewhere(opened, etcd_path)
                    async for _, blob in snapshot.frames(etcd_path):
                        sent += len(blob)
    return sent


async def measure(name: str, endpoint: str, keys: int) -> None:
    backend = open_backend(endpoint)
    await backend.open()
    try:
        await load(backend, keys)
        size = 0

        async def snap() -> None:
            nonlocal size
            size = await stream_snapshot(backend)

        stall, cpu, took = await worst_stall(snap)
        print(
            f"{name:9} snapshot {size / 1e6:6.1f} MB in {took:5.2f} s: worst loop stall {stall:7.1f} ms "
            f"(loop CPU without a break {cpu:6.1f} ms)",
            flush=True,
        )
        stall, cpu, took = await worst_stall(lambda: backend.hash_kv(0))
        print(
            f"{name:9} HashKV            in {took:5.2f} s: worst loop stall {stall:7.1f} ms "
            f"(loop CPU without a break {cpu:6.1f} ms)",
            flush=True,
        )
    finally:
        await backend.close()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=100_000)
    p.add_argument("--backends", default="sqlite,postgres,mariadb")
    args = p.parse_args()
    from testing.databases import MariaDBServer, PostgresServer
    from testing.servers import free_port

    for name in args.backends.split(","):
        if name == "sqlite":
            with tempfile.TemporaryDirectory() as d:
                await measure(name, f"sqlite:///{d}/state.db", args.keys)
            continue
        server: Any = PostgresServer(free_port()) if name == "postgres" else MariaDBServer(free_port())
        server.start()
        try:
            await measure(name, server.new_dsn(), args.keys)
        finally:
            server.stop()


if __name__ == "__main__":
    import uvloop  # the server's default loop (--event-loop auto)

    uvloop.run(main())
