"""The slow-request warning's description of a request: every request type, nested
txns, any byte in keys -- and never a value (found by the fuzzer in CI: a txn whose
first op was a nested txn made the description raise, and the call end UNKNOWN)."""

from __future__ import annotations

import logging

import pytest

from k8s_sql.api import interceptor
from k8s_sql.pb import rpc_pb2 as pb


def _nested() -> pb.TxnRequest:
    inner = pb.TxnRequest()
    inner.success.add().request_put.CopyFrom(pb.PutRequest(key=b"/inner", value=b"SECRET"))
    outer = pb.TxnRequest()
    outer.success.add().request_txn.CopyFrom(inner)
    return outer


REQUESTS = {
    "range": (pb.RangeRequest(key=b"/a", range_end=b"/b", limit=5, revision=3), 'key:"/a" range_end:"/b" limit:5'),
    "put": (pb.PutRequest(key=b"/k", value=b"SECRET", lease=7), 'key:"/k" value_size:6 lease:7'),
    "delete": (pb.DeleteRangeRequest(key=b"/d"), 'key:"/d"'),
    "txn-compare": (pb.TxnRequest(compare=[pb.Compare(key=b"/c")]), 'key:"/c" compare:1'),
    "txn-nested": (_nested(), 'key:"/inner" compare:0 success:1'),
    "txn-empty": (pb.TxnRequest(), "compare:0 success:0 failure:0"),
    "binary-key": (pb.PutRequest(key=b'\x00\xff"q', value=b"SECRET"), r'key:"\x00\xff\"q"'),
    "lease": (pb.LeaseGrantRequest(ID=9, TTL=60), "id:9"),
    "compact": (pb.CompactionRequest(revision=12), "revision:12"),
}


@pytest.mark.parametrize("case", sorted(REQUESTS))
def test_describe(case: str) -> None:
    request, expected = REQUESTS[case]
    text = interceptor.describe(request)
    assert expected in text
    assert "SECRET" not in text


def test_a_failing_description_never_fails_the_request(monkeypatch, caplog) -> None:
    def broken(request: object) -> str:
        raise AttributeError("key")

    monkeypatch.setattr(interceptor, "describe", broken)
    calls = interceptor.ErrorInterceptor(slow=0.001)
    with caplog.at_level(logging.WARNING):
        calls._warn_slow("Txn", 1.0, _nested())
    assert "not described: AttributeError" in caplog.text


def test_go_durations() -> None:
    assert [interceptor.go_duration(s) for s in (0.1, 1.5, 0.000001, 0.0152, 2e-9)] == [
        "100ms",
        "1.5s",
        "1µs",
        "15.2ms",
        "2ns",
    ]
