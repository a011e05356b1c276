"""Hostile and unusual input through the gRPC API: invalid requests get etcd's exact
errors, every byte value survives in keys and values, oversized and malformed
messages are refused, and clients that vanish mid-stream do not hurt the server.

The error table runs against real etcd too, so the expected codes and messages are
etcd's own.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from conftest import ServerProcess

from k8s_sql.pb import kv_pb2, rpc_pb2 as pb, rpc_pb2_grpc
from testing.keys import prefix_end

MiB = 1024 * 1024
IA = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
OOR = grpc.StatusCode.OUT_OF_RANGE
UNKNOWN_LEASE = 0x5EED_0000_0001


@dataclass
class Client:
    channel: grpc.Channel
    kv: rpc_pb2_grpc.KVStub
    lease: rpc_pb2_grpc.LeaseStub
    watch: rpc_pb2_grpc.WatchStub
    maint: rpc_pb2_grpc.MaintenanceStub


@pytest.fixture
def connect() -> Iterator[Callable[[ServerProcess], Client]]:
    channels: list[grpc.Channel] = []

    def make(server: ServerProcess) -> Client:
        ch = grpc.insecure_channel(
            server.endpoint,
            options=[("grpc.max_receive_message_length", 64 * MiB), ("grpc.max_send_message_length", 64 * MiB)],
        )
        channels.append(ch)
        return Client(
            ch,
            rpc_pb2_grpc.KVStub(ch),
            rpc_pb2_grpc.LeaseStub(ch),
            rpc_pb2_grpc.WatchStub(ch),
            rpc_pb2_grpc.MaintenanceStub(ch),
        )

    yield make
    for ch in channels:
        ch.close()


def assert_serving(server: ServerProcess, c: Client, *, clean_log: bool = True) -> None:
    """The process is alive, a write and a read still work, and (``clean_log``) the
    server logged no unhandled exception."""
    assert server.proc is not None and server.proc.poll() is None, server.log()
    if clean_log:
        assert "Traceback" not in server.log(), server.log()
    resp = c.kv.Put(pb.PutRequest(key=b"still/alive", value=b"yes", prev_kv=True), timeout=10)
    got = c.kv.Range(pb.RangeRequest(key=b"still/alive"), timeout=10)
    assert [kv.value for kv in got.kvs] == [b"yes"]
    assert got.kvs[0].mod_revision == resp.header.revision == got.header.revision


def put_op(key: bytes, value: bytes = b"v", lease: int = 0) -> pb.RequestOp:
    return pb.RequestOp(request_put=pb.PutRequest(key=key, value=value, lease=lease))


# -- the error table ------------------------------------------------------------------------

# (name, call, expected code, expected message; None = message not compared)
Case = tuple[str, Callable[[Client], Any], grpc.StatusCode, "str | None"]

VERSION_EQ_0 = dict(target=pb.Compare.VERSION, result=pb.Compare.EQUAL, version=0)

CASES: list[Case] = [
    ("range empty key", lambda c: c.kv.Range(pb.RangeRequest(key=b"")), IA, "etcdserver: key is not provided"),
    (
        "range empty key with range_end",
        lambda c: c.kv.Range(pb.RangeRequest(key=b"", range_end=b"z")),
        IA,
        "etcdserver: key is not provided",
    ),
    ("put empty key", lambda c: c.kv.Put(pb.PutRequest(key=b"", value=b"v")), IA, "etcdserver: key is not provided"),
    (
        "delete empty key",
        lambda c: c.kv.DeleteRange(pb.DeleteRangeRequest(key=b"")),
        IA,
        "etcdserver: key is not provided",
    ),
    (
        "txn compare empty key",
        lambda c: c.kv.Txn(pb.TxnRequest(compare=[pb.Compare(key=b"", **VERSION_EQ_0)], success=[put_op(b"x")])),
        IA,
        "etcdserver: key is not provided",
    ),
    (
        "txn put empty key",
        lambda c: c.kv.Txn(pb.TxnRequest(success=[put_op(b"")])),
        IA,
        "etcdserver: key is not provided",
    ),
    (
        "txn range empty key (else branch)",
        lambda c: c.kv.Txn(pb.TxnRequest(failure=[pb.RequestOp(request_range=pb.RangeRequest(key=b""))])),
        IA,
        "etcdserver: key is not provided",
    ),
    (
        "txn delete empty key (nested)",
        lambda c: c.kv.Txn(
            pb.TxnRequest(
                success=[
                    pb.RequestOp(
                        request_txn=pb.TxnRequest(
                            success=[pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=b""))]
                        )
                    )
                ]
            )
        ),
        IA,
        "etcdserver: key is not provided",
    ),
    (
        "put with unknown lease",
        lambda c: c.kv.Put(pb.PutRequest(key=b"k", value=b"v", lease=UNKNOWN_LEASE)),
        NOT_FOUND,
        "etcdserver: requested lease not found",
    ),
    (
        "txn put with unknown lease",
        lambda c: c.kv.Txn(pb.TxnRequest(success=[put_op(b"k", lease=UNKNOWN_LEASE)])),
        NOT_FOUND,
        "etcdserver: requested lease not found",
    ),
    (
        "revoke unknown lease",
        lambda c: c.lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=UNKNOWN_LEASE)),
        NOT_FOUND,
        "etcdserver: requested lease not found",
    ),
    (
        "lease TTL too large",
        lambda c: c.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=9_000_000_001)),
        OOR,
        "etcdserver: too large lease TTL",
    ),
    (
        "129 ops in a txn",
        lambda c: c.kv.Txn(pb.TxnRequest(success=[put_op(b"op/%d" % i) for i in range(129)])),
        IA,
        "etcdserver: too many operations in txn request",
    ),
    (
        "129 compares in a txn",
        lambda c: c.kv.Txn(pb.TxnRequest(compare=[pb.Compare(key=b"c/%d" % i, **VERSION_EQ_0) for i in range(129)])),
        IA,
        "etcdserver: too many operations in txn request",
    ),
    (
        "same key put twice in a txn",
        lambda c: c.kv.Txn(pb.TxnRequest(success=[put_op(b"dup", b"1"), put_op(b"dup", b"2")])),
        IA,
        "etcdserver: duplicate key given in txn request",
    ),
    (
        "put and delete of one key in a txn",
        lambda c: c.kv.Txn(
            pb.TxnRequest(
                failure=[
                    pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=b"d/", range_end=b"d0")),
                    put_op(b"d/x"),
                ]
            )
        ),
        IA,
        "etcdserver: duplicate key given in txn request",
    ),
    (
        "range at a future revision",
        lambda c: c.kv.Range(pb.RangeRequest(key=b"k", revision=1_000_000)),
        OOR,
        "etcdserver: mvcc: required revision is a future revision",
    ),
    (
        "compact to a future revision",
        lambda c: c.kv.Compact(pb.CompactionRequest(revision=1_000_000)),
        OOR,
        "etcdserver: mvcc: required revision is a future revision",
    ),
    (
        "put ignore_value with a value",
        lambda c: c.kv.Put(pb.PutRequest(key=b"k", value=b"v", ignore_value=True)),
        IA,
        "etcdserver: value is provided",
    ),
    (
        "put ignore_lease with a lease",
        lambda c: c.kv.Put(pb.PutRequest(key=b"k", lease=5, ignore_lease=True)),
        IA,
        "etcdserver: lease is provided",
    ),
    (
        "put ignore_value on a missing key",
        lambda c: c.kv.Put(pb.PutRequest(key=b"missing", ignore_value=True)),
        IA,
        "etcdserver: key not found",
    ),
    (
        "request over --max-request-bytes (1.6 MiB)",
        lambda c: c.kv.Put(pb.PutRequest(key=b"big", value=b"x" * (1536 * 1024 + 100 * 1024))),
        IA,
        "etcdserver: request is too large",
    ),
    (
        "txn over --max-request-bytes",
        lambda c: c.kv.Txn(pb.TxnRequest(success=[put_op(b"t%d" % i, b"y" * (400 * 1024)) for i in range(4)])),
        IA,
        "etcdserver: request is too large",
    ),
    (
        "message over the gRPC limit (2.5 MiB)",
        lambda c: c.kv.Put(pb.PutRequest(key=b"huge", value=b"z" * (2 * MiB + 512 * 1024))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        None,
    ),
]


def run_case(c: Client, call: Callable[[Client], Any]) -> tuple[str, str]:
    try:
        call(c)
    except grpc.RpcError as e:
        return e.code().name, e.details() or ""
    return "OK", ""


def check_error_table(server: ServerProcess, c: Client) -> None:
    c.kv.Put(pb.PutRequest(key=b"k", value=b"v"), timeout=10)
    before = c.kv.Range(pb.RangeRequest(key=b"k"), timeout=10).header.revision
    mismatches = []
    for name, call, code, message in CASES:
        got_code, got_message = run_case(c, call)
        if got_code != code.name or (message is not None and got_message != message):
            mismatches.append(f"{name}: got {got_code} {got_message!r}, want {code.name} {message!r}")
    assert not mismatches, "\n".join(mismatches)
    # none of the refused requests wrote anything
    after = c.kv.Range(pb.RangeRequest(key=b"\0", range_end=b"\0"), timeout=10)
    assert after.header.revision == before
    assert [kv.key for kv in after.kvs] == [b"k"]

    # answers that are not errors
    ka = list(c.lease.LeaseKeepAlive(iter([pb.LeaseKeepAliveRequest(ID=UNKNOWN_LEASE)]), timeout=10))
    assert [(r.ID, r.TTL) for r in ka] == [(UNKNOWN_LEASE, 0)]
    ttl = c.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=UNKNOWN_LEASE, keys=True), timeout=10)
    assert (ttl.ID, ttl.TTL, list(ttl.keys)) == (UNKNOWN_LEASE, -1, [])
    gone = c.kv.DeleteRange(pb.DeleteRangeRequest(key=b"nothing/", range_end=b"nothing0"), timeout=10)
    assert (gone.deleted, gone.header.revision) == (0, before)
    lease = c.lease.LeaseGrant(pb.LeaseGrantRequest(ID=0x1234, TTL=60), timeout=10)
    assert lease.ID == 0x1234 and not lease.error
    with pytest.raises(grpc.RpcError) as err:
        c.lease.LeaseGrant(pb.LeaseGrantRequest(ID=0x1234, TTL=60), timeout=10)
    assert (err.value.code(), err.value.details()) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "etcdserver: lease already exists",
    )
    c.kv.Compact(pb.CompactionRequest(revision=before), timeout=10)
    for stale in (before - 1, before):
        with pytest.raises(grpc.RpcError) as err:
            c.kv.Compact(pb.CompactionRequest(revision=stale), timeout=10)
        assert (err.value.code(), err.value.details()) == (
            OOR,
            "etcdserver: mvcc: required revision has been compacted",
        )
    with pytest.raises(grpc.RpcError) as err:
        c.kv.Range(pb.RangeRequest(key=b"k", revision=before - 1), timeout=10)
    assert (err.value.code(), err.value.details()) == (OOR, "etcdserver: mvcc: required revision has been compacted")


def test_errors_match_etcd(k8s_sql, connect) -> None:
    c = connect(k8s_sql)
    check_error_table(k8s_sql, c)
    assert_serving(k8s_sql, c)


def test_errors_on_real_etcd(etcd, connect) -> None:
    """The same table against etcd itself: the expected codes and messages are etcd's."""
    check_error_table(etcd, connect(etcd))


# -- every byte value -------------------------------------------------------------------------


ODD_KEYS = [
    b"'",
    b'"',
    b"';DROP TABLE kv;--",
    b'"quoted"',
    b"\\",
    b"\\x00",
    b"a\\b",
    b"%",
    b"_",
    b"a%b",
    b"a_b",
    b"a%",
    b"axb",
    b"a\x00",
    b"a\x00b",
    b"a",
    b"A",
    b"a ",
    b"a  ",
    b"a\t",
    b"e",
    "é".encode(),
    "e\u0301".encode(),
    "😀".encode(),
    b"\xc3\x28",  # invalid UTF-8
    b"\xed\xa0\x80",  # a UTF-16 surrogate
    b"\xf8\x88\x80\x80\x80",
    b"\xff",
    b"\xff\xff",
    b"\xff\x00",
    b"\x80",
    b"\x7f",
    b"\x00",
    b"\x00\x00",
]


def binary_corpus() -> dict[bytes, bytes]:
    rnd = random.Random(20240601)
    data = {k: k[::-1] + bytes(range(256)) for k in ODD_KEYS}
    for _ in range(200):
        key = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 48)))
        data[key] = bytes(rnd.randrange(256) for _ in range(rnd.randrange(0, 600)))
    data[b"empty-value"] = b""
    return data


def check_every_byte(c: Client) -> None:
    # all 256 single-byte keys, values with every byte too
    for i in range(256):
        c.kv.Put(pb.PutRequest(key=bytes([i]), value=bytes([i, 255 - i, 0, i])), timeout=10)
    everything = c.kv.Range(pb.RangeRequest(key=b"\0", range_end=b"\0"), timeout=10)
    assert [kv.key for kv in everything.kvs] == [bytes([i]) for i in range(256)]
    assert [kv.value for kv in everything.kvs] == [bytes([i, 255 - i, 0, i]) for i in range(256)]
    assert everything.count == 256
    assert [kv.mod_revision for kv in everything.kvs] == list(range(2, 258))

    high = c.kv.Range(pb.RangeRequest(key=b"\x80", range_end=b"\xff"), timeout=10)
    assert [kv.key for kv in high.kvs] == [bytes([i]) for i in range(0x80, 0xFF)]
    tail = c.kv.Range(pb.RangeRequest(key=b"\xfe", range_end=b"\0"), timeout=10)
    assert [kv.key for kv in tail.kvs] == [b"\xfe", b"\xff"]
    page = c.kv.Range(pb.RangeRequest(key=b"\0", range_end=b"\0", limit=10), timeout=10)
    assert [kv.key for kv in page.kvs] == [bytes([i]) for i in range(10)]
    assert (page.count, page.more) == (256, True)
    nxt = c.kv.Range(pb.RangeRequest(key=page.kvs[-1].key + b"\0", range_end=b"\0", limit=10), timeout=10)
    assert [kv.key for kv in nxt.kvs] == [bytes([i]) for i in range(10, 20)]
    desc = c.kv.Range(
        pb.RangeRequest(key=b"\0", range_end=b"\0", sort_order=pb.RangeRequest.DESCEND, limit=3), timeout=10
    )
    assert [kv.key for kv in desc.kvs] == [b"\xff", b"\xfe", b"\xfd"]
    for i in (0, 0x25, 0x5C, 0x5F, 0x7F, 0x80, 0xFF):  # NUL, %, \, _, DEL, high bytes
        one = c.kv.Range(pb.RangeRequest(key=bytes([i])), timeout=10)
        assert [kv.key for kv in one.kvs] == [bytes([i])], i
    deleted = c.kv.DeleteRange(pb.DeleteRangeRequest(key=b"\0", range_end=b"\0"), timeout=10)
    assert deleted.deleted == 256

    # binary, invalid UTF-8, quotes, backslashes, LIKE wildcards, NULs, case, padding
    data = binary_corpus()
    prefix = b"z\xff/"
    start = c.kv.Range(pb.RangeRequest(key=b"z"), timeout=10).header.revision + 1
    for k, v in data.items():
        c.kv.Put(pb.PutRequest(key=prefix + k, value=v), timeout=10)
    got = c.kv.Range(pb.RangeRequest(key=prefix, range_end=prefix_end(prefix)), timeout=10)
    assert [kv.key[len(prefix) :] for kv in got.kvs] == sorted(data)
    assert {kv.key[len(prefix) :]: kv.value for kv in got.kvs} == data
    assert got.count == len(data)
    for k, v in data.items():
        one = c.kv.Range(pb.RangeRequest(key=prefix + k), timeout=10)
        assert [(kv.key, kv.value) for kv in one.kvs] == [(prefix + k, v)], k
    for sub in (b"a", b"a%", b"a_", b"a\x00", b"\\", b"'", b"\xff", b"\xc3", b"e"):
        p = prefix + sub
        r = c.kv.Range(pb.RangeRequest(key=p, range_end=prefix_end(p), keys_only=True), timeout=10)
        assert [kv.key for kv in r.kvs] == sorted(prefix + k for k in data if k.startswith(sub)), sub
        assert all(kv.value == b"" for kv in r.kvs)

    # a watch replays the same bytes
    events = watch_replay(c, prefix, start, len(data))
    assert [(e.kv.key, e.kv.value) for e in events] == [(prefix + k, v) for k, v in data.items()]

    # deleting a wildcard-looking prefix deletes exactly that prefix
    p = prefix + b"a%"
    d = c.kv.DeleteRange(pb.DeleteRangeRequest(key=p, range_end=prefix_end(p), prev_kv=True), timeout=10)
    assert sorted(kv.key for kv in d.prev_kvs) == sorted(prefix + k for k in data if k.startswith(b"a%"))
    assert d.deleted == len(d.prev_kvs) == 2
    left = c.kv.Range(pb.RangeRequest(key=prefix, range_end=prefix_end(prefix), count_only=True), timeout=10)
    assert left.count == len(data) - 2

    # compares see exact bytes
    k = prefix + "é".encode()
    ok = c.kv.Txn(
        pb.TxnRequest(
            compare=[pb.Compare(key=k, target=pb.Compare.VALUE, result=pb.Compare.EQUAL, value=data["é".encode()])],
            success=[put_op(k, b"\x00matched\xff")],
        ),
        timeout=10,
    )
    assert ok.succeeded
    miss = c.kv.Txn(
        pb.TxnRequest(
            compare=[pb.Compare(key=prefix + b"e", target=pb.Compare.VALUE, result=pb.Compare.EQUAL, value=b"x")],
        ),
        timeout=10,
    )
    assert not miss.succeeded
    assert c.kv.Range(pb.RangeRequest(key=k), timeout=10).kvs[0].value == b"\x00matched\xff"


def watch_replay(c: Client, prefix: bytes, start: int, n: int) -> list[kv_pb2.Event]:
    requests: queue.Queue[pb.WatchRequest | None] = queue.Queue()
    requests.put(
        pb.WatchRequest(
            create_request=pb.WatchCreateRequest(key=prefix, range_end=prefix_end(prefix), start_revision=start)
        )
    )

    def gen() -> Iterator[pb.WatchRequest]:
        while (r := requests.get()) is not None:
            yield r

    call = c.watch.Watch(gen(), timeout=30)
    events: list[kv_pb2.Event] = []
    try:
        for resp in call:
            assert not resp.canceled, resp
            events.extend(resp.events)
            if len(events) >= n:
                break
    finally:
        requests.put(None)
        call.cancel()
    return events


def test_every_byte_value_round_trips_and_sorts(k8s_sql, connect) -> None:
    c = connect(k8s_sql)
    check_every_byte(c)
    assert_serving(k8s_sql, c)


def test_every_byte_value_on_real_etcd(etcd, connect) -> None:
    check_every_byte(connect(etcd))


def test_large_values(k8s_sql, connect) -> None:
    c = connect(k8s_sql)
    rnd = random.Random(7)
    big = rnd.randbytes(MiB)
    resp = c.kv.Put(pb.PutRequest(key=b"big/1", value=big), timeout=30)
    assert resp.header.revision == 2
    got = c.kv.Range(pb.RangeRequest(key=b"big/1"), timeout=30)
    assert got.kvs[0].value == big
    # just under the request limit, in a txn, twice the same revision
    near = rnd.randbytes(1536 * 1024 - 4096)
    t = c.kv.Txn(pb.TxnRequest(success=[put_op(b"big/2", near)]), timeout=30)
    assert t.succeeded and t.header.revision == 3
    both = c.kv.Range(pb.RangeRequest(key=b"big/", range_end=b"big0"), timeout=30)
    assert [kv.value for kv in both.kvs] == [big, near]
    # the history keeps the old large value
    c.kv.Put(pb.PutRequest(key=b"big/1", value=b"small"), timeout=30)
    old = c.kv.Range(pb.RangeRequest(key=b"big/1", revision=2), timeout=30)
    assert old.kvs[0].value == big
    events = watch_replay(c, b"big/", 2, 3)
    assert [len(e.kv.value) for e in events] == [len(big), len(near), 5]
    assert_serving(k8s_sql, c)


# -- malformed messages and connections ---------------------------------------------------------

GARBAGE = [
    b"\x0a\x7f",  # key: length 127, no bytes follow
    b"\x08",  # a varint field with no varint
    b"\x0f",  # field 1 with wire type 7 (no such type)
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # a tag varint longer than 64 bits
    b"\x0a\x02k",  # truncated key
    b"\x12\xff\xff\xff\xff\x0fabc",  # value: length 4 GiB
]


def raw_unary(ch: grpc.Channel, method: str) -> Callable[..., bytes]:
    return ch.unary_unary(method, request_serializer=None, response_deserializer=None)


def status_of(call: Callable[[], Any]) -> str:
    """The status code name a call ends with ("OK" when it ends without an error)."""
    try:
        call()
    except grpc.RpcError as e:
        return e.code().name
    return "OK"


def check_malformed(server: ServerProcess, c: Client) -> dict[str, str]:
    """Send undecodable messages; return {what was sent: status code}."""
    codes: dict[str, str] = {}
    for i, blob in enumerate(GARBAGE):
        for method in ("/etcdserverpb.KV/Put", "/etcdserverpb.KV/Range", "/etcdserverpb.KV/Txn"):
            codes[f"{method} #{i}"] = status_of(lambda m=method, b=blob: raw_unary(c.channel, m)(b, timeout=10))
    for method in ("/etcdserverpb.Watch/Watch", "/etcdserverpb.Lease/LeaseKeepAlive"):
        stream = c.channel.stream_stream(method, request_serializer=None, response_deserializer=None)
        for i, blob in enumerate(GARBAGE[:2]):
            codes[f"{method} #{i}"] = status_of(lambda st=stream, b=blob: list(st(iter([b]), timeout=10)))
    codes["unknown method"] = status_of(lambda: raw_unary(c.channel, "/etcdserverpb.KV/NoSuchMethod")(b"", timeout=10))
    codes["unknown service"] = status_of(lambda: raw_unary(c.channel, "/no.such.Service/Put")(b"", timeout=10))

    # not even HTTP/2: raw bytes on the socket, then the preface followed by junk
    host, port = server.endpoint.rsplit(":", 1)
    for junk in (
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        os.urandom(4096),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" + os.urandom(512),
    ):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                pass
    return codes


@pytest.fixture
def frontend(k8s_sql_factory) -> ServerProcess:
    """A k8s-sql on SQLite, for checks of the gRPC layer that no backend affects."""
    return k8s_sql_factory()


def test_malformed_messages_are_refused(frontend, connect) -> None:
    k8s_sql = frontend
    c = connect(k8s_sql)
    c.kv.Put(pb.PutRequest(key=b"before", value=b"1"), timeout=10)
    codes = check_malformed(k8s_sql, c)
    assert codes.pop("unknown method") == "UNIMPLEMENTED"
    assert codes.pop("unknown service") == "UNIMPLEMENTED"
    # a message that cannot be decoded ends its call with an error, streams included
    accepted = {k: v for k, v in codes.items() if v == "OK"}
    assert not accepted, f"undecodable messages answered with OK: {accepted}"
    r = c.kv.Range(pb.RangeRequest(key=b"\0", range_end=b"\0"), timeout=10)
    assert [kv.key for kv in r.kvs] == [b"before"] and r.header.revision == 2
    assert_serving(k8s_sql, c, clean_log=False)


def test_malformed_messages_get_etcds_status_code(frontend, connect) -> None:
    """etcd (gRPC-Go) answers INTERNAL "grpc: error unmarshalling request: ..." (unary)
    and "grpc: failed to unmarshal the received message: ..." (streams)."""
    k8s_sql = frontend
    c = connect(k8s_sql)
    codes = check_malformed(k8s_sql, c)
    del codes["unknown method"], codes["unknown service"]
    differ = {k: v for k, v in codes.items() if v != "INTERNAL"}
    assert not differ, f"want INTERNAL as etcd answers; got {differ}"
    assert_serving(k8s_sql, c, clean_log=False)


def test_malformed_messages_on_real_etcd(etcd, connect) -> None:
    codes = check_malformed(etcd, connect(etcd))
    assert codes.pop("unknown method") == codes.pop("unknown service") == "UNIMPLEMENTED"
    assert set(codes.values()) == {"INTERNAL"}, codes


# -- clients that vanish -----------------------------------------------------------------------

VANISHING_CLIENT = r"""
import sys, queue, grpc
from k8s_sql.pb import rpc_pb2 as pb, rpc_pb2_grpc
endpoint, lease_id = sys.argv[1], int(sys.argv[2])
ch = grpc.insecure_channel(endpoint, options=[("grpc.max_receive_message_length", 64 << 20)])
hold = queue.Queue()
def watch_requests():
    yield pb.WatchRequest(create_request=pb.WatchCreateRequest(
        key=b"\0", range_end=b"\0", start_revision=1, prev_kv=True))
    yield pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"v/", range_end=b"v0"))
    hold.get()
def keepalive_requests():
    yield pb.LeaseKeepAliveRequest(ID=lease_id)
    hold.get()
watch = rpc_pb2_grpc.WatchStub(ch).Watch(watch_requests())
first = next(watch)          # "created"
replay = next(watch)         # the first events of a long replay
ka = rpc_pb2_grpc.LeaseStub(ch).LeaseKeepAlive(keepalive_requests())
assert next(ka).TTL > 0
print("READY", first.watch_id, len(replay.events), flush=True)
hold.get()                   # until killed
"""


def test_clients_vanishing_mid_watch_and_mid_keepalive(k8s_sql, connect, tmp_path) -> None:
    c = connect(k8s_sql)
    value = b"w" * 4096
    for batch in range(10):  # ~1.2 MB of history for the replaying watchers
        c.kv.Txn(pb.TxnRequest(success=[put_op(b"v/%03d/%02d" % (batch, i), value) for i in range(30)]), timeout=30)
    lease = c.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=60), timeout=10)
    c.kv.Put(pb.PutRequest(key=b"v/leased", value=b"1", lease=lease.ID), timeout=10)

    script = tmp_path / "vanishing_client.py"
    script.write_text(VANISHING_CLIENT)
    for _round in range(2):
        children = [
            subprocess.Popen(
                [sys.executable, str(script), k8s_sql.endpoint, str(lease.ID)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            for _ in range(4)
        ]
        try:
            for child in children:
                line = read_line(child, timeout=30)
                assert line.startswith("READY"), line + (child.stderr.read() if child.poll() is not None else "")
                # writes keep flowing to the streams the dying clients hold
                c.kv.Put(pb.PutRequest(key=b"v/live", value=b"x" * 1000), timeout=10)
        finally:
            for child in children:
                if child.poll() is None:
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait(10)

    # the server serves: writes, reads, a fresh watch, the lease they kept alive
    assert_serving(k8s_sql, c)
    rev = c.kv.Put(pb.PutRequest(key=b"v/after", value=b"ok"), timeout=10).header.revision
    (ev,) = watch_replay(c, b"v/after", rev, 1)
    assert (ev.kv.key, ev.kv.value, ev.kv.mod_revision) == (b"v/after", b"ok", rev)
    ttl = c.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lease.ID, keys=True), timeout=10)
    assert ttl.TTL > 0 and list(ttl.keys) == [b"v/leased"]
    ka = list(c.lease.LeaseKeepAlive(iter([pb.LeaseKeepAliveRequest(ID=lease.ID)]), timeout=10))
    assert [r.TTL for r in ka] == [60]
    count = c.kv.Range(pb.RangeRequest(key=b"v/", range_end=b"v0", count_only=True), timeout=10)
    assert count.count == 300 + 3  # 300 batch keys, v/leased, v/live, v/after


def read_line(child: subprocess.Popen[str], timeout: float) -> str:
    out: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: out.put(child.stdout.readline() if child.stdout else ""), daemon=True).start()
    try:
        return out.get(timeout=timeout).strip()
    except queue.Empty:
        raise AssertionError(f"child printed nothing within {timeout}s") from None


def test_client_closing_its_channel_mid_stream(k8s_sql, connect) -> None:
    """In-process variant: channels closed while their streams are busy."""
    c = connect(k8s_sql)
    for i in range(50):
        c.kv.Put(pb.PutRequest(key=b"s/%02d" % i, value=b"q" * 20000), timeout=10)
    lease = c.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=30), timeout=10)
    for _ in range(5):
        ch = grpc.insecure_channel(k8s_sql.endpoint)
        hold: queue.Queue[None] = queue.Queue()

        def reqs(h: queue.Queue[None] = hold) -> Iterator[pb.WatchRequest]:
            yield pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"s/", range_end=b"s0", start_revision=1))
            h.get()

        def kareqs(h: queue.Queue[None] = hold) -> Iterator[pb.LeaseKeepAliveRequest]:
            yield pb.LeaseKeepAliveRequest(ID=lease.ID)
            h.get()

        w = rpc_pb2_grpc.WatchStub(ch).Watch(reqs())
        assert next(w).created
        ka = rpc_pb2_grpc.LeaseStub(ch).LeaseKeepAlive(kareqs())
        assert next(ka).TTL == 30
        ch.close()  # both streams are cut while the replay is in flight
        hold.put(None)
        hold.put(None)
    assert_serving(k8s_sql, c)
    assert c.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lease.ID), timeout=10).TTL > 0
