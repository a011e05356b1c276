"""metrics.py's counters and histograms as Prometheus reads them, and the hub's
publication times behind k8s_sql_watch_delivery_lag_seconds."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from k8s_sql import metrics
from k8s_sql.backend.base import PUT, LogRow, Row
from k8s_sql.watch import hub as hub_module
from k8s_sql.watch.hub import Hub


def _exposed(family: metrics._Family) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry(auto_describe=False)

    class One(metrics.EventCollector):
        def collect(self):  # type: ignore[no-untyped-def]
            yield family.collect()

    registry.register(One())
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_histogram_buckets_are_less_or_equal_and_cumulative() -> None:
    h = metrics.Histogram("test_latency_seconds", "test", ("op",), buckets=(0.1, 1.0))
    child = h.labels("get")
    for v in (0.05, 0.1, 0.5, 1.0, 7.0):
        child.observe(v)
    out = _exposed(h)
    le = {dict(labels)["le"]: v for (name, labels), v in out.items() if name == "test_latency_seconds_bucket"}
    assert le == {"0.1": 2, "1.0": 4, "+Inf": 5}  # 0.1 and 1.0 fall in their own buckets
    assert out[("test_latency_seconds_count", (("op", "get"),))] == 5
    assert out[("test_latency_seconds_sum", (("op", "get"),))] == 8.65
    metrics.FAMILIES.remove(h)


def test_counter_names_and_labels() -> None:
    c = metrics.Counter("test_things_total", "test", ("kind",))
    c.labels("a").inc()
    c.labels("a").inc(2)
    c.labels("b").inc()
    out = _exposed(c)
    assert out == {("test_things_total", (("kind", "a"),)): 3, ("test_things_total", (("kind", "b"),)): 1}
    metrics.FAMILIES.remove(c)


def test_grpc_codes_are_go_grpcs_names() -> None:
    import grpc

    assert metrics.grpc_code_name(grpc.StatusCode.CANCELLED) == "Canceled"
    assert metrics.grpc_code_name(grpc.StatusCode.OUT_OF_RANGE) == "OutOfRange"
    assert metrics.grpc_code_name(None) == "OK"


def _change(rev: int) -> LogRow:
    return LogRow(rev, 0, PUT, Row(b"k%d" % rev, rev, rev, 1, 0, b"v"), None)


def test_publication_times_cover_each_batchs_revisions(monkeypatch) -> None:
    clock = iter(range(100, 10_000))
    monkeypatch.setattr(hub_module, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(hub_module, "PUBLISHED_TIMES", 4)
    hub = Hub(log=None)  # type: ignore[arg-type]
    hub.start(10)
    hub.publish(13, [_change(11), _change(12), _change(13)])  # one commit batch, three revisions
    hub.publish(14, [_change(14)])
    assert [hub.published(r) for r in (11, 12, 13, 14)] == [100.0, 100.0, 100.0, 101.0]
    assert hub.published(15) is None  # not yet published
    for rev in range(15, 25):
        hub.publish(rev, [_change(rev)])
    assert hub.published(11) is None  # older than what is kept
    assert hub.published(24) == 111.0
