"""What idle watchers cost each commit: the publish path with 0, 1,000 and 10,000 watchers
on keys the commits never touch.

In-process, no gRPC and no database: a :class:`Hub` with real :class:`WatchStream`
objects, 100 watchers per stream, each stream's response generator running in a task
as the Watch servicer runs it (parked, waiting to be woken). The idle watchers are a
mix of what Kubernetes and etcdctl ask for, spread on both sides of the committed keys
in key order: 40% single keys (``/registry/configmaps/...``), 40% prefixes
(``/registry/secrets/ns-N/``), 10% bounded ranges (``/registry/leases/...``) and 10%
open-ended ranges (``[/zz/N, end of keyspace)``). One more stream watches
``/registry/pods/``.

Two numbers per row, CPU time of this process (``time.process_time``, so other load
on a shared machine moves them less than wall time would), median over rounds:

- ``publish``: :meth:`Hub.publish` of one commit of a key no watcher watches
  (``/registry/events/...``, inside the idle ranges' span) -- the work a commit does
  for watchers before the store answers it;
- ``commit+deliver``: a commit of a ``/registry/pods/`` key, published and run on the
  event loop until the pods stream has yielded its event (already encoded) -- what a
  watched commit costs the process in all.

A second table is the other side: 1,000 watchers on the committed prefix (10 streams),
as Kubernetes puts many watchers on few prefixes, where every commit is delivered 1,000
times -- what the index costs the watchers a commit does touch.

Pin it like the other micro benchmarks: ``taskset -c 0 python3 bench/micro/idle_watchers.py``.
Run it against another tree with ``PYTHONPATH=/that/tree/src``.

Measured on a 2-core machine shared with other work (a few tenths of a microsecond are noise),
median (min-max) CPU per commit:

    idle watchers   publish, before        after            commit+deliver, before   after
    0               3.9 us (3.7-4.2)       4.4 us (4.1-4.8)    75.9 us                 33.5 us
    1,000           147.4 us               4.4 us (4.2-5.0)   251.7 us                 34.7 us
    10,000          1,546.3 us             4.9 us (4.5-5.4)   1,706.8 us               33.9 us
    1,000 on pods   --                     --                 20,695 us (4,870-41,474)  5,889 us (5,818-7,129)

Before, every commit looked at every stream and watcher; after, the synced index
(watch/index.py) finds the commit's watchers. What 10,000 idle watchers still add
(about 0.5 us) is mostly the collector walking a larger heap: with ``gc.disable()``
3.3 us against 3.5 us. The fan-out row before grows with the ring (``from_ring``
stepped over it, fixed with the index): with that fix alone it is 5,239 us, so the
index's bookkeeping costs a watcher about 0.6 us per event here, against the 30-40 us
gRPC spends per streamed message (grpc_floor.py).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

from k8s_sql.backend.base import PUT, LogRow, Row
from k8s_sql.pb import rpc_pb2 as pb
from k8s_sql.watch.hub import Hub
from k8s_sql.watch.stream import WatchStream

IDLE = (0, 1_000, 10_000)
PER_STREAM = 100
ROUNDS = 5
ROUND_SECONDS = 0.5  # CPU seconds of commits per round, at least
VALUE = b"v" * 100


def idle_request(i: int) -> pb.WatchCreateRequest:
    """The i-th idle watch: none of them contains a /registry/pods/ key."""
    kind = i % 10
    if kind < 4:
        return pb.WatchCreateRequest(key=b"/registry/configmaps/ns-%d/cm-%d" % (i, i))
    if kind < 8:
        return pb.WatchCreateRequest(key=b"/registry/secrets/ns-%d/" % i, range_end=b"/registry/secrets/ns-%d0" % i)
    if kind < 9:
        return pb.WatchCreateRequest(key=b"/registry/leases/%d/a" % i, range_end=b"/registry/leases/%d/m" % i)
    return pb.WatchCreateRequest(key=b"/zz/%d" % i, range_end=b"\0")


class Setup:
    """A hub at revision 1 with ``idle`` idle watchers and ``pods`` watchers of the pods
    (at least one stream)."""

    def __init__(self, idle: int, pods: int = 1) -> None:
        self.hub = Hub(log=None)  # type: ignore[arg-type]  # everything stays in the ring
        self.hub.start(1)
        self.revision = 1
        self.delivered = 0
        self.streams: list[WatchStream] = []
        for first in range(0, idle, PER_STREAM):
            s = self._stream()
            for i in range(first, min(first + PER_STREAM, idle)):
                s.create(idle_request(i))
        self.pods = pods
        for first in range(0, pods, PER_STREAM):
            s = self._stream()
            for _ in range(first, min(first + PER_STREAM, pods)):
                s.create(pb.WatchCreateRequest(key=b"/registry/pods/", range_end=b"/registry/pods0"))
        self.tasks: list[asyncio.Task[None]] = []

    def _stream(self) -> WatchStream:
        s = WatchStream(self.hub, pb.ResponseHeader(cluster_id=1, member_id=1, raft_term=1), 1 << 20)
        self.hub.attach(s)
        self.streams.append(s)
        return s

    async def start(self) -> None:
        for s in self.streams:
            s.wake()  # the created responses
            self.tasks.append(asyncio.create_task(self._drain(s)))
        while any(s.control for s in self.streams):
            await asyncio.sleep(0)
        await asyncio.sleep(0)

    async def _drain(self, s: WatchStream) -> None:
        async for resp in s.responses():
            if isinstance(resp, bytes):
                self.delivered += 1

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def commit(self, prefix: bytes) -> None:
        self.revision += 1
        rev = self.revision
        row = Row(prefix + b"%d" % (rev % 1000), rev, rev, 1, 0, VALUE)
        self.hub.publish(rev, [LogRow(rev, 0, PUT, row, None)])


def publish_round(setup: Setup) -> float:
    """CPU microseconds per commit of Hub.publish alone."""
    n = 0
    start = time.process_time()
    while True:
        for _ in range(100):
            setup.commit(b"/registry/events/default/ev-")
        n += 100
        used = time.process_time() - start
        if used >= ROUND_SECONDS:
            return used / n * 1e6


async def deliver_round(setup: Setup) -> float:
    """CPU microseconds per commit, publish and delivery of its event."""
    n = 0
    start = time.process_time()
    while True:
        for _ in range(100):
            want = setup.delivered + setup.pods
            setup.commit(b"/registry/pods/default/pod-")
            while setup.delivered < want:
                await asyncio.sleep(0)
        n += 100
        used = time.process_time() - start
        if used >= ROUND_SECONDS:
            return used / n * 1e6


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f} us ({min(values):.1f}-{max(values):.1f})"


async def measure(idle: int, pods: int = 1) -> tuple[list[float], list[float]]:
    setup = Setup(idle, pods)
    await setup.start()
    publish: list[float] = []
    deliver: list[float] = []
    for _ in range(ROUNDS):
        deliver.append(await deliver_round(setup))
        publish.append(publish_round(setup))
        await asyncio.sleep(0.01)
    await setup.stop()
    return publish, deliver


def main() -> None:
    import k8s_sql.watch.hub as hub_module

    print(f"# {hub_module.__file__}")
    print(f"# CPU per commit, median (min-max) of {ROUNDS} rounds; {PER_STREAM} idle watchers per stream")
    print(f"{'idle watchers':>13} {'streams':>8} {'publish':>26} {'commit+deliver':>26}")
    for idle in IDLE:
        publish, deliver = asyncio.run(measure(idle))
        streams = -(-idle // PER_STREAM)
        print(f"{idle:13,} {streams:8,} {summary(publish):>26} {summary(deliver):>26}")
        sys.stdout.flush()
    print(f"{'pods watchers':>13} {'streams':>8} {'':>26} {'commit+deliver':>26}")
    for pods in (1_000,):
        _, deliver = asyncio.run(measure(0, pods))
        print(f"{pods:13,} {pods // PER_STREAM:8,} {'':>26} {summary(deliver):>26}")


if __name__ == "__main__":
    main()
