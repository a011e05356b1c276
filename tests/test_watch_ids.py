"""Watch ids over a stream's life, answered as etcd answers them: a watcher canceled by
compaction keeps its id taken until the client cancels it (etcd's watchStream keeps
its cancel func), so a create with that id is a duplicate and the next automatic id
skips it; cancelling it then succeeds and frees the id. (The fuzzer met the
difference: k8s-sql freed the id at once.)"""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc
from conftest import ServerProcess

from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc


def _script(endpoint: str) -> list[tuple[int, bool, bool, bool, str]]:
    with grpc.insecure_channel(endpoint) as ch:
        kv = rpc_pb2_grpc.KVStub(ch)
        for i in range(5):
            rev = kv.Put(pb.PutRequest(key=b"k", value=b"%d" % i), timeout=10).header.revision
        kv.Compact(pb.CompactionRequest(revision=rev), timeout=10)
        requests: queue.Queue[pb.WatchRequest | None] = queue.Queue()

        def send() -> Iterator[pb.WatchRequest]:
            while (r := requests.get()) is not None:
                yield r

        answers = rpc_pb2_grpc.WatchStub(ch).Watch(send(), timeout=30)
        seen: list[tuple[int, bool, bool, bool, str]] = []

        def step(request: pb.WatchRequest, responses: int) -> None:
            requests.put(request)
            for _ in range(responses):
                m = next(answers)
                seen.append((m.watch_id, m.created, m.canceled, m.compact_revision > 0, m.cancel_reason))

        create = pb.WatchCreateRequest
        step(pb.WatchRequest(create_request=create(key=b"k", start_revision=1, watch_id=5)), 2)  # compacted
        step(pb.WatchRequest(create_request=create(key=b"k", watch_id=5)), 1)  # still taken
        step(pb.WatchRequest(create_request=create(key=b"k")), 1)  # automatic: 0
        step(pb.WatchRequest(create_request=create(key=b"k", start_revision=2)), 2)  # 1, compacted
        step(pb.WatchRequest(create_request=create(key=b"k")), 1)  # automatic: 2, skipping 1
        step(pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=5)), 1)  # frees 5
        step(pb.WatchRequest(create_request=create(key=b"k", watch_id=5)), 1)
        requests.put(None)
        return seen


def test_watch_ids_after_compaction_match_etcd(etcd: ServerProcess, k8s_sql: ServerProcess) -> None:
    expected = _script(etcd.endpoint)
    assert expected[2][4] == "mvcc: duplicate watch ID provided on the WatchStream"  # etcd's own, as observed
    assert _script(k8s_sql.endpoint) == expected
