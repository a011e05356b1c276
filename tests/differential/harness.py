"""Sending the same request to etcd and k8s-sql, and watching both.

Synchronous gRPC: each unary request goes to both servers at once (two futures) and
the answers are compared after both arrive. Lease IDs the servers chose themselves are
mapped: requests carry etcd's IDs and are translated for k8s-sql; k8s-sql's answers
are translated back before comparison.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import Message

from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc

from .compare import Result, RpcError, map_ids

CALL_TIMEOUT = 30.0
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


def _result(call: Any) -> Result:
    try:
        return call.result()  # type: ignore[no-any-return]
    except grpc.RpcError as e:
        return RpcError(e.code().name, e.details() or "")


class Side:
    """One server: its channel and stubs."""

    def __init__(self, name: str, endpoint: str) -> None:
        self.name = name
        self.channel = grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
        self.kv = rpc_pb2_grpc.KVStub(self.channel)
        self.lease = rpc_pb2_grpc.LeaseStub(self.channel)
        self.watch = rpc_pb2_grpc.WatchStub(self.channel)
        self.methods = {
            "Range": self.kv.Range,
            "Put": self.kv.Put,
            "DeleteRange": self.kv.DeleteRange,
            "Txn": self.kv.Txn,
            "Compact": self.kv.Compact,
            "LeaseGrant": self.lease.LeaseGrant,
            "LeaseRevoke": self.lease.LeaseRevoke,
            "LeaseTimeToLive": self.lease.LeaseTimeToLive,
            "LeaseLeases": self.lease.LeaseLeases,
        }

    def start(self, kind: str, request: Message) -> Any:
        if kind == "LeaseKeepAlive":
            return _KeepAliveCall(self.lease, request)
        return self.methods[kind].future(request, timeout=CALL_TIMEOUT)

    def close(self) -> None:
        self.channel.close()


class _KeepAliveCall:
    """One keepalive on its own stream, run on a thread so both servers are asked at once."""

    def __init__(self, stub: rpc_pb2_grpc.LeaseStub, request: Message) -> None:
        self._out: Result | None = None
        self._done = threading.Event()

        def run() -> None:
            try:
                answers = list(stub.LeaseKeepAlive(iter([request]), timeout=CALL_TIMEOUT))
                if len(answers) != 1:
                    self._out = RpcError("PROTOCOL", f"{len(answers)} keepalive answers to one request")
                else:
                    self._out = answers[0]
            except grpc.RpcError as e:
                self._out = RpcError(e.code().name, e.details() or "")
            self._done.set()

        threading.Thread(target=run, daemon=True).start()

    def result(self) -> Result:
        self._done.wait(CALL_TIMEOUT + 5)
        assert self._out is not None
        return self._out


@dataclass
class Pair:
    etcd: Side
    k8s: Side
    e2k: dict[int, int] = field(default_factory=dict)  # etcd lease ID -> k8s-sql's
    k2e: dict[int, int] = field(default_factory=dict)

    @classmethod
    def connect(cls, etcd_endpoint: str, k8s_endpoint: str) -> Pair:
        return cls(Side("etcd", etcd_endpoint), Side("k8s-sql", k8s_endpoint))

    def close(self) -> None:
        self.etcd.close()
        self.k8s.close()

    def translate(self, request: Message) -> Message:
        out = type(request)()
        out.CopyFrom(request)
        map_ids(out, self.e2k)
        return out

    def call(self, kind: str, request: Message) -> tuple[Result, Result]:
        """Send ``request`` to both servers; k8s-sql's answer comes back in etcd's IDs."""
        fe = self.etcd.start(kind, request)
        fk = self.k8s.start(kind, self.translate(request))
        re, rk = _result(fe), _result(fk)
        if isinstance(rk, Message):
            if (
                kind == "LeaseGrant"
                and isinstance(re, pb.LeaseGrantResponse)
                and isinstance(rk, pb.LeaseGrantResponse)
                and request.ID == 0  # type: ignore[attr-defined]
            ):
                self.e2k[re.ID] = rk.ID
                self.k2e[rk.ID] = re.ID
            map_ids(rk, self.k2e)
        return re, rk

    def etcd_values(self, r: pb.RangeRequest, revision: int) -> dict[bytes, bytes]:
        """The values of a range at a revision, from the oracle."""
        q = pb.RangeRequest(key=r.key, range_end=r.range_end, revision=r.revision if r.revision > 0 else revision)
        resp = self.etcd.kv.Range(q, timeout=CALL_TIMEOUT)
        return {kv.key: kv.value for kv in resp.kvs}


class WatchSession:
    """One Watch stream: requests from a queue, responses pumped into a queue by a thread."""

    def __init__(self, side: Side) -> None:
        self.side = side
        self._requests: queue.Queue[pb.WatchRequest | None] = queue.Queue()
        self._responses: queue.Queue[pb.WatchResponse | RpcError | None] = queue.Queue()
        self._call = side.watch.Watch(self._iterate())
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()
        self.ended = False

    def _iterate(self) -> Iterator[pb.WatchRequest]:
        while True:
            r = self._requests.get()
            if r is None:
                return
            yield r

    def _pump(self) -> None:
        try:
            for resp in self._call:
                self._responses.put(resp)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self._responses.put(RpcError(e.code().name, e.details() or ""))
        self._responses.put(None)

    def send(self, r: pb.WatchRequest) -> None:
        self._requests.put(r)

    def create(self, **kw: Any) -> None:
        self.send(pb.WatchRequest(create_request=pb.WatchCreateRequest(**kw)))

    def progress(self) -> None:
        self.send(pb.WatchRequest(progress_request=pb.WatchProgressRequest()))

    def recv(self, timeout: float) -> pb.WatchResponse | RpcError | None:
        """The next response; None when the stream ended. Raises queue.Empty on timeout."""
        if self.ended:
            return None
        r = self._responses.get(timeout=timeout)
        if r is None:
            self.ended = True
        return r

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()
        self._thread.join(5)


@dataclass
class WatchLog:
    """Everything one watch stream delivered, sorted by watch."""

    created: list[pb.WatchResponse] = field(default_factory=list)
    canceled: dict[int, pb.WatchResponse] = field(default_factory=dict)
    events: dict[int, list[Any]] = field(default_factory=dict)  # watch id -> Event messages
    progress_rev: int = 0  # the highest stream-wide progress revision seen
    errors: list[str] = field(default_factory=list)
    last_event_rev: dict[int, int] = field(default_factory=dict)
    # created / canceled / stream-wide progress, in the order they came
    order: list[tuple[str, int]] = field(default_factory=list)

    def take(self, r: pb.WatchResponse) -> None:
        if r.created:
            self.created.append(r)
            self.order.append(("created", r.watch_id))
            return
        if r.canceled:
            self.canceled[r.watch_id] = r
            self.order.append(("canceled", r.watch_id))
            return
        if r.watch_id == -1 and not r.events:
            self.progress_rev = max(self.progress_rev, r.header.revision)
            self.order.append(("progress", r.header.revision))
            return
        if r.events:
            self.events.setdefault(r.watch_id, []).extend(r.events)
            self.last_event_rev[r.watch_id] = r.events[-1].kv.mod_revision


def pump_until(session: WatchSession, log: WatchLog, done: Any, timeout: float, poke: float | None = 0.25) -> bool:
    """Read responses into ``log`` until ``done(log)``; every ``poke`` seconds without an
    answer, ask for stream-wide progress (etcd 3.6 drops a progress request made while
    a watch is still catching up, so the request is repeated). False on timeout."""
    deadline = time.monotonic() + timeout
    while not done(log):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            r = session.recv(min(poke, left) if poke else left)
        except queue.Empty:
            if poke:
                session.progress()
            continue
        if r is None:
            return done(log)  # type: ignore[no-any-return]
        if isinstance(r, RpcError):
            log.errors.append(f"stream failed: {r}")
            return False
        log.take(r)
    return True
